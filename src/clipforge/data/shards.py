"""Where the shards are and how many samples each holds: never typed by hand.

A source (`data.train=`) is one of:
  - a shard folder holding `manifest.json` (written by data_tools.convert),
  - a `manifest.json` path or URL,
  - a folder of `.tar` files without a manifest (img2dataset output: sizes from `*_stats.json`),
  - a brace pattern such as `s3://bucket/{00000..00099}.tar`,
  - several of these joined with `::`.
Every path may be an fsspec URL.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass, field

import braceexpand
import fsspec


class SourceError(ValueError):
    """A training or eval source that cannot be used; its message is one line for the user."""


@dataclass
class ShardSet:
    urls: list[str]
    # Samples per shard; None where no manifest or stats file tells.
    counts: list[int | None]
    tokenizer: str | None = None
    classnames: list[str] = field(default_factory=list)
    templates: list[str] = field(default_factory=list)

    @property
    def samples(self) -> int | None:
        return None if any(c is None for c in self.counts) else sum(self.counts)  # type: ignore[misc]

    def __add__(self, other: ShardSet) -> ShardSet:
        return ShardSet(
            self.urls + other.urls,
            self.counts + other.counts,
            self.tokenizer or other.tokenizer,
            self.classnames or other.classnames,
            self.templates or other.templates,
        )


def _join(base: str, name: str) -> str:
    return name if "://" in name or name.startswith("/") else posixpath.join(base, name)


def _read_text(fs: fsspec.AbstractFileSystem, path: str) -> str | None:
    try:
        with fs.open(path, "rt", encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        return None


def _sidecars(fs: fsspec.AbstractFileSystem, base: str, sset: ShardSet) -> ShardSet:
    """classnames.txt / zeroshot_classification_templates.txt (CLIP_benchmark's layout)."""
    for attr, name in (
        ("classnames", "classnames.txt"),
        ("templates", "zeroshot_classification_templates.txt"),
    ):
        text = _read_text(fs, posixpath.join(base, name))
        if text:
            setattr(sset, attr, [line.strip() for line in text.splitlines() if line.strip()])
    return sset


def _from_manifest(fs: fsspec.AbstractFileSystem, path: str, protocol_prefix: str) -> ShardSet:
    text = _read_text(fs, path)
    if text is None:
        raise SourceError(f"{path}: manifest not found")
    try:
        manifest = json.loads(text)
        shards = manifest["shards"]
        base = posixpath.dirname(path)
        urls = [protocol_prefix + _join(base, s["name"]) for s in shards]
        counts = [int(s["samples"]) for s in shards]
    except (ValueError, KeyError, TypeError) as e:
        raise SourceError(f"{path}: not a clipforge manifest ({e})") from None
    tok = manifest.get("tokenizer")
    sset = ShardSet(urls, counts, protocol_prefix + _join(base, tok) if tok else None)
    return _sidecars(fs, base, sset)


def _from_folder(fs: fsspec.AbstractFileSystem, path: str, protocol_prefix: str) -> ShardSet:
    manifest = posixpath.join(path, "manifest.json")
    if fs.exists(manifest):
        return _from_manifest(fs, manifest, protocol_prefix)
    tars = sorted(p for p in fs.ls(path, detail=False) if p.endswith((".tar", ".tgz", ".tar.gz")))
    if not tars:
        raise SourceError(f"{path}: no manifest.json and no .tar shards")
    counts: list[int | None] = []
    for tar in tars:
        stem = tar.rsplit(".tar", 1)[0].removesuffix(".tgz")
        stats = _read_text(fs, stem + "_stats.json")
        # img2dataset writes "successes"; our converter writes "samples".
        counts.append(_count_from_stats(stats))
    return _sidecars(fs, path, ShardSet([protocol_prefix + t for t in tars], counts))


def _count_from_stats(text: str | None) -> int | None:
    if not text:
        return None
    try:
        stats = json.loads(text)
    except ValueError:
        return None
    for key in ("samples", "successes", "ok"):
        if isinstance(stats.get(key), int):
            return stats[key]
    return None


def _resolve_one(source: str) -> ShardSet:
    if any(c in source for c in "{}"):
        urls = list(braceexpand.braceexpand(source))
        return ShardSet(urls, [None] * len(urls))
    if source.startswith("pipe:"):
        return ShardSet([source], [None])
    fs, path = fsspec.core.url_to_fs(source)
    # fsspec strips the protocol from paths; put it back on every URL we hand out.
    prefix = source.split("://")[0] + "://" if "://" in source else ""
    if path.endswith(".json"):
        return _from_manifest(fs, path, prefix)
    if fs.isdir(path):
        return _from_folder(fs, path, prefix)
    if fs.exists(path):
        return ShardSet([source], [None])
    raise SourceError(f"{source}: no such shard folder, manifest or shard")


def resolve(source: str) -> ShardSet:
    """A `::`-separated source list -> one ShardSet (urls in the order given)."""
    parts = [s for s in source.split("::") if s.strip()]
    if not parts:
        raise SourceError("empty data source")
    out = _resolve_one(parts[0])
    for part in parts[1:]:
        out = out + _resolve_one(part)
    return out
