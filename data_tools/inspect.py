"""Count, size, sample and validate existing shards: ours or img2dataset's, local or any URL.

    python -m data_tools.inspect shards/                  # summary + a few samples
    python -m data_tools.inspect s3://bucket/ds/ --json   # one JSON object on stdout
    python -m data_tools.inspect shards/ --processes 8    # validate shards in parallel

Every member is checked: images must decode fully, ``.txt`` must be UTF-8, ``.json`` must parse,
``.cls`` must be an integer, and every sample must hold an image member the trainer reads
(``clipforge.data.tario.IMAGE_EXTS``: a ``.gif`` one is not trainable). With a manifest.json,
each shard's size, sha256 and sample count are compared with it. Exit code 0 when everything is
valid, 1 when anything is not. ``--json`` prints at least ``samples``, ``shards``, ``invalid``
(members that failed to check, and samples the trainer cannot read), ``bytes``, ``extensions``
and ``problems``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import multiprocessing
import posixpath
import sys
import tarfile
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import fsspec
from PIL import Image

from clipforge import cli
from clipforge.data.tario import IMAGE_EXTS
from data_tools.layouts import split_member

MAX_PROBLEMS = 20  # per shard: enough to see the pattern, not a flood


@dataclass
class ShardReport:
    url: str
    samples: int = 0
    bytes: int = 0
    sha256: str = ""
    invalid: int = 0
    extensions: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    examples: list[dict[str, Any]] = field(default_factory=list)


class _Hashing(io.RawIOBase):
    # tarfile reads the stream once; the checksum comes with it for free.
    def __init__(self, f: Any) -> None:
        self._f, self.hash, self.size = f, hashlib.sha256(), 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._f.read(len(buffer))
        buffer[: len(data)] = data
        self.hash.update(data)
        self.size += len(data)
        return len(data)


def check_member(ext: str, data: bytes) -> str | None:
    """None when the member is valid, else why not."""
    last = ext.rsplit(".", 1)[-1]
    try:
        if last in IMAGE_EXTS:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                img = Image.open(io.BytesIO(data))
                img.load()
        elif last == "txt":
            data.decode("utf-8")
        elif last == "json":
            json.loads(data)
        elif last == "cls":
            int(data.decode("ascii").strip())
    except Exception as e:  # noqa: BLE001 - any failure is the finding
        return f"{type(e).__name__}: {e}"
    return None


def untrainable(key: str, members: Sequence[str]) -> str | None:
    """None when the trainer can read the sample's image, else why not."""
    if any(e in IMAGE_EXTS for e in members):
        return None
    return (
        f"{key}: not trainable, no image member the trainer reads ({'/'.join(IMAGE_EXTS)}); "
        f"members: {', '.join(sorted(members))}"
    )


def _example(key: str, members: dict[str, bytes]) -> dict[str, Any]:
    example: dict[str, Any] = {"key": key, "members": sorted(members)}
    if "txt" in members:
        example["caption"] = members["txt"].decode("utf-8", "replace")[:100]
    image = next((e for e in members if e in IMAGE_EXTS), None)
    if image is not None:
        with contextlib.suppress(Exception):  # already counted as invalid
            example["size"] = list(Image.open(io.BytesIO(members[image])).size)
    return example


def _finish(report: ShardReport, key: str, members: dict[str, bytes], n_examples: int) -> None:
    """A sample's members are all read: judge the sample as a whole."""
    error = untrainable(key, list(members))
    if error is not None:
        report.invalid += 1
        if len(report.problems) < MAX_PROBLEMS:
            report.problems.append(f"{report.url}: {error}")
    if len(report.examples) < n_examples:
        report.examples.append(_example(key, members))


def inspect_shard(url: str, n_examples: int = 3) -> ShardReport:
    report = ShardReport(url)
    keys: set[str] = set()
    current: tuple[str, dict[str, bytes]] | None = None
    ext_counts: Counter[str] = Counter()
    try:
        with fsspec.open(url, "rb", compression="infer") as raw:
            stream = _Hashing(raw)
            with tarfile.open(fileobj=io.BufferedReader(stream, 1 << 20), mode="r|*") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    key, ext = split_member(member.name)
                    data = tar.extractfile(member).read()  # type: ignore[union-attr]
                    ext_counts[ext] += 1
                    error = check_member(ext, data)
                    if error is not None:
                        report.invalid += 1
                        if len(report.problems) < MAX_PROBLEMS:
                            report.problems.append(f"{url}: {member.name}: {error}")
                    keys.add(key)
                    if current is None or current[0] != key:
                        if current is not None:
                            _finish(report, *current, n_examples)
                        current = (key, {})
                    current[1][ext] = data
            # Read to the end: the checksum must cover the padding too.
            while stream.readinto(bytearray(1 << 20)):
                pass
        if current is not None:
            _finish(report, *current, n_examples)
        report.bytes, report.sha256 = stream.size, stream.hash.hexdigest()
    except (OSError, tarfile.TarError, EOFError) as e:
        report.invalid += 1
        report.problems.append(f"{url}: unreadable tar: {type(e).__name__}: {e}")
    report.samples = len(keys)
    report.extensions = dict(sorted(ext_counts.items()))
    return report


def find_shards(source: str) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """Shard URLs, and what the manifest says about each (empty without a manifest)."""
    fs, path = fsspec.core.url_to_fs(source)
    prefix = source.split("://", 1)[0] + "://" if "://" in source else ""
    if fs.isfile(path) and not path.endswith(".json"):
        return [source], {}
    base = posixpath.dirname(path) if path.endswith(".json") else path
    manifest_path = path if path.endswith(".json") else posixpath.join(path, "manifest.json")
    if fs.exists(manifest_path):
        with fs.open(manifest_path, "rt", encoding="utf-8") as f:
            manifest = json.load(f)
        urls = [prefix + posixpath.join(base, s["name"]) for s in manifest["shards"]]
        return urls, dict(zip(urls, manifest["shards"], strict=True))
    tars = sorted(p for p in fs.ls(path, detail=False) if p.endswith((".tar", ".tgz", ".tar.gz")))
    return [prefix + t for t in tars], {}


def _compare(report: ShardReport, expected: dict[str, Any] | None) -> None:
    if not expected:
        return
    for field_name in ("samples", "bytes", "sha256"):
        want, got = expected.get(field_name), getattr(report, field_name)
        if want is not None and want != got:
            report.problems.append(f"{report.url}: {field_name} {got} != manifest {want}")


def summarize(reports: list[ShardReport], source: str) -> dict[str, Any]:
    extensions: Counter[str] = Counter()
    for r in reports:
        extensions.update(r.extensions)
    examples = [e for r in reports for e in r.examples][:5]
    return {
        "source": source,
        "shards": len(reports),
        "samples": sum(r.samples for r in reports),
        "bytes": sum(r.bytes for r in reports),
        "invalid": sum(r.invalid for r in reports),
        "extensions": dict(sorted(extensions.items())),
        "problems": [p for r in reports for p in r.problems],
        "examples": examples,
        "per_shard": [{k: v for k, v in asdict(r).items() if k != "examples"} for r in reports],
    }


def inspect(source: str, processes: int = 1) -> dict[str, Any]:
    urls, expected = find_shards(source)
    if processes > 1 and len(urls) > 1:
        with multiprocessing.get_context("spawn").Pool(min(processes, len(urls))) as pool:
            reports = pool.map(inspect_shard, urls)
    else:
        reports = [inspect_shard(u) for u in urls]
    for report in reports:
        _compare(report, expected.get(report.url))
    return summarize(reports, source)


def _print_human(s: dict[str, Any]) -> None:
    ok = "valid" if not s["invalid"] and not s["problems"] else "INVALID"
    print(
        f"{s['source']}: {s['samples']} samples in {s['shards']} shards, {s['bytes']:,} bytes: {ok}"
    )
    print("members: " + ", ".join(f"{k}={v}" for k, v in s["extensions"].items()))
    for shard in s["per_shard"]:
        print(f"  {shard['url']}: {shard['samples']} samples, {shard['bytes']:,} bytes")
    for example in s["examples"]:
        print(f"  sample {example['key']}: {example.get('size')} {example.get('caption', '')!r}")
    for problem in s["problems"]:
        print(f"  problem: {problem}")


def main(argv: Sequence[str] | None = None) -> int:
    p = cli.ArgumentParser(prog="python -m data_tools.inspect", description=__doc__.split("\n")[0])
    p.add_argument("source", help="shard folder, manifest.json, or one tar (local or URL)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--processes", type=int, default=1)
    args = p.parse_args(argv)
    try:
        summary = inspect(args.source, args.processes)
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {args.source}: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(summary, ensure_ascii=False))
    else:
        _print_human(summary)
    return 0 if not summary["invalid"] and not summary["problems"] else 1


if __name__ == "__main__":
    sys.exit(main())
