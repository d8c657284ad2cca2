"""Atomic tar shard writer, per-shard stats and row reports, and the dataset manifest.

Used by ``python -m data_tools.convert``; print a folder's manifest summary with
``python -m data_tools.shards DIR``.

Shard folder layout (the contract with ``clipforge.data``, which must not import this module)::

    DIR/00000.tar            WebDataset shard: per sample KEY.jpg, KEY.txt, KEY.json [, KEY.cls]
    DIR/00000_stats.json     {"shard", "rows", "ok", "failed", "failure_reasons": {category: n}}
    DIR/00000.parquet        one row per input row of the slice: key, source, status, error
    DIR/manifest.json        written last; its presence means the conversion finished
    DIR/tokenizer.model      optional, from python -m data_tools.tokenizer

KEY is the input row index zero-padded to 9 digits. KEY.txt is the UTF-8 caption; KEY.json holds
{"key", "source", "caption", "width", "height", "original_width", "original_height", plus the
--extra-cols}; KEY.cls is the class index in ASCII. Tar members have fixed mtime/owner/mode so
that the same input gives byte-identical shards.

manifest.json (format "clipforge-shards/1")::

    {
      "format": "clipforge-shards/1",
      "samples": 1234,                   # sum of shards[*].samples
      "failed": 5,                       # input rows that produced no sample
      "shards": [{"name": "00000.tar", "samples": 1000, "bytes": 12345678, "sha256": "<hex>"}],
      "args": {...},                     # the conversion's command-line arguments
      "tool_version": "0.1.0",           # clipforge version that wrote the folder
      "tokenizer": null                  # or a path relative to DIR, e.g. "tokenizer.model"
    }

Shard names are relative to DIR; shard numbers may have gaps (a slice whose every row failed
writes stats and a report but no tar, and is not listed). A shard may hold fewer samples than --samples-per-shard (the
last one, and any slice where rows failed); a loader wanting equal work per worker should use
the per-shard "samples" counts, not assume a fixed size.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import tarfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "clipforge-shards/1"
SHARD_DIGITS = 5
REPORT_SCHEMA = pa.schema(
    [("key", pa.string()), ("source", pa.string()), ("status", pa.string()), ("error", pa.string())]
)


def shard_stem(index: int) -> str:
    return f"{index:0{SHARD_DIGITS}d}"


@dataclass(frozen=True)
class ShardInfo:
    name: str
    samples: int
    bytes: int
    sha256: str


class _HashingFile(io.RawIOBase):
    # Hashes while tarfile writes, so multi-GB shards are not read back just to checksum them.
    def __init__(self, f: io.BufferedWriter) -> None:
        self._f = f
        self._hash = hashlib.sha256()
        self._pos = 0

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self._f.write(data)
        self._hash.update(data)
        self._pos += len(data)
        return len(data)

    def tell(self) -> int:
        return self._pos

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def fsync_dir(path: Path) -> None:
    # Makes the rename itself durable; not possible (or needed) on every platform.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _commit(tmp: Path, final: Path) -> None:
    os.replace(tmp, final)
    fsync_dir(final.parent)


class ShardWriter:
    """Writes ``NAME.tar.tmp``; ``close()`` fsyncs and renames it, so readers never see a torn tar.

    Use as a context manager: leaving it by an exception deletes the temporary file.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._tmp = self.path.with_name(self.path.name + ".tmp")
        # Both stay open across add() calls; close() or abort() ends them.
        self._file = open(self._tmp, "wb")  # noqa: SIM115
        self._hashing = _HashingFile(self._file)
        self._tar = tarfile.open(fileobj=self._hashing, mode="w", format=tarfile.PAX_FORMAT)  # noqa: SIM115
        self.samples = 0

    def add(self, key: str, members: Mapping[str, bytes]) -> None:
        """One sample: ``members`` maps an extension ("jpg", "txt", ...) to its bytes."""
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mode = 0o444
            info.mtime = 0  # fixed so reruns are byte-identical
            self._tar.addfile(info, io.BytesIO(data))
        self.samples += 1

    def close(self) -> ShardInfo:
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        _commit(self._tmp, self.path)
        return ShardInfo(
            name=self.path.name,
            samples=self.samples,
            bytes=self._hashing.tell(),
            sha256=self._hashing.hexdigest(),
        )

    def abort(self) -> None:
        self._file.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


def write_json(path: str | Path, obj: Any) -> None:
    """Atomic JSON write (tmp + fsync + rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    _commit(tmp, path)


def write_report(path: str | Path, rows: list[dict[str, str | None]]) -> None:
    """Per-row outcome table (key, source, status "ok"/"failed", error), written atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(pa.Table.from_pylist(rows, schema=REPORT_SCHEMA), tmp)
    _commit(tmp, path)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def new_manifest(
    shards: list[ShardInfo], failed: int, args: dict[str, Any], tool_version: str
) -> dict[str, Any]:
    return {
        "format": MANIFEST_FORMAT,
        "samples": sum(s.samples for s in shards),
        "failed": failed,
        "shards": [asdict(s) for s in shards],
        "args": args,
        "tool_version": tool_version,
        "tokenizer": None,
    }


def _manifest_path(path_or_dir: str | Path) -> Path:
    path = Path(path_or_dir)
    return path / MANIFEST_NAME if path.is_dir() else path


def read_manifest(path_or_dir: str | Path) -> dict[str, Any]:
    """Load ``manifest.json`` from a shard folder (or the file itself) and check its format."""
    path = _manifest_path(path_or_dir)
    with open(path, encoding="utf-8") as f:
        manifest = json.load(f)
    fmt = manifest.get("format", "")
    if not str(fmt).startswith("clipforge-shards/"):
        raise ValueError(f"{path}: not a clipforge shard manifest (format={fmt!r})")
    return manifest


def write_manifest(directory: str | Path, manifest: dict[str, Any]) -> Path:
    """Write ``DIR/manifest.json`` atomically; returns its path."""
    path = Path(directory) / MANIFEST_NAME
    write_json(path, manifest)
    return path


if __name__ == "__main__":
    m = read_manifest(sys.argv[1])
    print(f"{m['format']}: {m['samples']} samples in {len(m['shards'])} shards")
    print(f"tool_version={m['tool_version']} tokenizer={m['tokenizer']}")
