"""Where the shards are and how many samples each holds: never typed by hand.

A source (`data.train=`) is one of:
  - a shard folder holding `manifest.json` (written by data_tools.convert),
  - a `manifest.json` path or URL,
  - a folder of `.tar` files without a manifest (img2dataset output: sizes from `*_stats.json`),
  - a CLIP_benchmark webdataset export: its root (read as ROOT/test) or a split folder
    (ROOT/train), with the root's classnames.txt and zeroshot_classification_templates.txt,
  - a brace pattern such as `s3://bucket/{00000..00099}.tar` (sizes from a `manifest.json` in
    the same folder when there is one, else from local `*_stats.json`, else unknown),
  - a `.txt` file listing shard URLs, one per line (sizes found as for a brace pattern),
  - several of these joined with `::`; each keeps its index in `ShardSet.sources`, which the
    mixing weights (`data.weights`, one per source) refer to.
Every path may be an fsspec URL; `pipe:CMD` is a shard read from a command's stdout.

    python -m clipforge.data.shards SOURCE      # print the shards and sizes a source resolves to
"""

from __future__ import annotations

import json
import posixpath
import sys
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
    # Index of the `::`-separated source each shard came from (mixing weights refer to it).
    sources: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.sources:
            self.sources = [0] * len(self.urls)

    @property
    def num_sources(self) -> int:
        return max(self.sources, default=-1) + 1

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
            self.sources + [i + self.num_sources for i in other.sources],
        )


# CLIP_benchmark's webdataset export: ROOT/{train,test}/{0..N-1}.tar + nshards.txt, and
# ROOT/classnames.txt, ROOT/zeroshot_classification_templates.txt for both splits.
_NSHARDS = "nshards.txt"
_CLIP_BENCHMARK_SPLIT = "test"


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
    split = posixpath.join(path, _CLIP_BENCHMARK_SPLIT)
    if not tars and fs.exists(posixpath.join(split, _NSHARDS)):
        return _from_folder(fs, split, protocol_prefix)  # a CLIP_benchmark export's root
    if not tars:
        raise SourceError(f"{path}: no manifest.json and no .tar shards")
    counts: list[int | None] = []
    for tar in tars:
        stats = _read_text(fs, _stats_path(tar))
        # img2dataset writes "successes"; our converter writes "samples".
        counts.append(_count_from_stats(stats))
    sset = ShardSet([protocol_prefix + t for t in tars], counts)
    if fs.exists(posixpath.join(path, _NSHARDS)):
        # A CLIP_benchmark split folder: its classnames and templates sit one level up, in the
        # export's root (files beside the shards, read next, still win).
        sset = _sidecars(fs, posixpath.dirname(path.rstrip("/")), sset)
    return _sidecars(fs, path, sset)


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


def _counts_for(urls: list[str]) -> list[int | None]:
    """Sizes of listed shards: from a manifest.json beside them (one read per folder), else from
    their `_stats.json` where the shards are local (one small read each), else unknown."""
    by_folder: dict[str, dict[str, int]] = {}
    counts: list[int | None] = []
    for url in urls:
        if url.startswith("pipe:"):
            counts.append(None)
            continue
        folder, name = posixpath.split(url)
        if folder not in by_folder:
            by_folder[folder] = _manifest_counts(folder)
        count = by_folder[folder].get(name)
        if count is None and "://" not in url:
            count = _count_from_stats(_read_text(fsspec.filesystem("file"), _stats_path(url)))
        counts.append(count)
    return counts


def _manifest_counts(folder: str) -> dict[str, int]:
    try:
        fs, path = fsspec.core.url_to_fs(posixpath.join(folder, "manifest.json"))
        text = _read_text(fs, path)
        return {s["name"]: int(s["samples"]) for s in json.loads(text)["shards"]} if text else {}
    except (OSError, ValueError, KeyError, TypeError, ImportError):
        return {}  # no readable manifest there (or no fsspec backend for the protocol yet)


def _stats_path(tar: str) -> str:
    return tar.rsplit(".tar", 1)[0].removesuffix(".tgz") + "_stats.json"


def _from_list(fs: fsspec.AbstractFileSystem, path: str) -> ShardSet:
    text = _read_text(fs, path) or ""
    urls = [line.strip() for line in text.splitlines() if line.strip() and line[0] != "#"]
    if not urls:
        raise SourceError(f"{path}: shard list is empty")
    return ShardSet(urls, _counts_for(urls))


def _resolve_one(source: str) -> ShardSet:
    if any(c in source for c in "{}"):
        urls = list(braceexpand.braceexpand(source))
        return ShardSet(urls, _counts_for(urls))
    if source.startswith("pipe:"):
        return ShardSet([source], [None])
    fs, path = fsspec.core.url_to_fs(source)
    # fsspec strips the protocol from paths; put it back on every URL we hand out.
    # Most fsspec filesystems strip the protocol from paths (s3, gcs, file), which must then be
    # put back on every URL handed out; http keeps whole URLs as its paths.
    keeps_protocol = "://" in path
    prefix = source.split("://")[0] + "://" if "://" in source and not keeps_protocol else ""
    if path.endswith(".json"):
        return _from_manifest(fs, path, prefix)
    if fs.isdir(path):
        return _from_folder(fs, path, prefix)
    if path.endswith(".txt") and fs.exists(path):
        return _from_list(fs, path)
    if fs.exists(path):
        return ShardSet([source], _counts_for([source]))
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


def draw_weights(sset: ShardSet, weights: list[float] | None = None) -> list[float]:
    """Probability of drawing each shard: a source's weight spread over its shards by their
    sizes. Without weights every sample is equally likely (sources weighted by their size).
    A shard of unknown size counts as the mean of its source's known sizes (1 if none known)."""
    n_src = sset.num_sources
    if weights is not None and len(weights) != n_src:
        raise SourceError(f"data.weights has {len(weights)} entries for {n_src} sources")
    sizes = [0.0] * len(sset.urls)
    src_total = [0.0] * n_src
    for src in range(n_src):
        idx = [i for i, s in enumerate(sset.sources) if s == src]
        known = [sset.counts[i] for i in idx if sset.counts[i] is not None]
        fill = sum(known) / len(known) if known else 1.0  # type: ignore[arg-type]
        for i in idx:
            sizes[i] = float(sset.counts[i] if sset.counts[i] is not None else fill)  # type: ignore[arg-type]
            src_total[src] += sizes[i]
    if weights is None:
        probs = sizes
    else:
        probs = [
            weights[s] * size / src_total[s] if src_total[s] else 0.0
            for s, size in zip(sset.sources, sizes)
        ]
    total = sum(probs)
    if total <= 0:
        raise SourceError("data.weights leave no shard with a chance of being drawn")
    return [p / total for p in probs]


if __name__ == "__main__":
    shard_set = resolve(sys.argv[1])
    for url, count, src in zip(shard_set.urls, shard_set.counts, shard_set.sources):
        print(f"{src}\t{count if count is not None else '?'}\t{url}")
    print(
        f"{len(shard_set.urls)} shards, {shard_set.samples or 'unknown'} samples", file=sys.stderr
    )
