"""Atomic tar shard writer, per-shard stats and row reports, and the dataset manifest.

Used by ``python -m data_tools.convert``; print a folder's manifest summary with
``python -m data_tools.shards DIR``.

Shard folder layout (the contract with ``clipforge.data``, which must not import this module);
DIR is a local folder or any fsspec URL (``s3://bucket/prefix``), and every file in it appears
whole or not at all (store.py says how on each kind of filesystem)::

    DIR/00000.tar            WebDataset shard: per sample KEY.jpg (or .webp), KEY.txt, KEY.json
                             [, KEY.cls]; every shard holds --samples-per-shard samples but the last
    DIR/00000_stats.json     {"shard", "samples", "rows", "ok", "failed", "filtered", "duplicate",
                              "opt-out", "failure_reasons": {category: n}, "first_key", "last_key", ...}
    DIR/00000.parquet        row report: one row per input row from this shard's first sample
                             up to the next shard's first sample (key, source, status, error,
                             sha256, note); status is ok, failed, filtered, duplicate or opt-out
    DIR/manifest.json        written last; its presence means the conversion finished
    DIR/classnames.txt       folder mode with class sub-folders (line i = class i)
    DIR/tokenizer.model      optional, from python -m data_tools.tokenizer

Rows before the first sample are reported in shard 0's files, rows after the last sample in the
last shard's; so the reports together list every input row exactly once, in input order. KEY is
the input row index zero-padded to 9 digits. KEY.txt is the UTF-8 caption (the first one for
COCO/Flickr); KEY.json holds {"key", "source", "caption", ["captions"], "width", "height",
"original_width", "original_height", "sha256" (of the source bytes), plus the --extra-cols};
KEY.cls is the class index in ASCII. Tar members have fixed mtime/owner/mode so the same input
gives byte-identical shards.

manifest.json (format "clipforge-shards/1")::

    {
      "format": "clipforge-shards/1",
      "samples": 1234,                   # sum of shards[*].samples
      "failed": 5,                       # input rows that produced no sample (any reason)
      "rows": 1239, "status": {"ok": 1234, "failed": 3, "filtered": 1, "duplicate": 1},
      "failure_reasons": {"http 404": 2, ...},
      "shards": [{"name": "00000.tar", "samples": 1000, "bytes": 12345678, "sha256": "<hex>"}],
      "reports": ["00000.parquet", ...],
      "args": {...},                     # the conversion's command-line arguments
      "fingerprint": "<hex>",            # settings + input rows; a resume must match it
      "tool_version": "0.1.0",           # clipforge version that wrote the folder
      "tokenizer": null                  # or a path relative to DIR, e.g. "tokenizer.model"
    }

Shard names are relative to DIR (a merged Slurm conversion names them ``part-00003/00000.tar``).
"""

from __future__ import annotations

import array
import hashlib
import io
import itertools
import json
import os
import posixpath
import sys
import tarfile
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import fsspec

from data_tools import store

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "clipforge-shards/1"
SHARD_DIGITS = 5
REPORT_COLUMNS = ("key", "source", "status", "error", "sha256", "note")
# data_tools.filter's per-shard table beside STEM.tar (one row per sample, with its "score").
SCORES_SUFFIX = "_scores.parquet"
_BLOCK = tarfile.BLOCKSIZE
_RECORD = tarfile.RECORDSIZE  # tarfile pads archives to this; so do we, so both agree


def shard_stem(index: int) -> str:
    return f"{index:0{SHARD_DIGITS}d}"


@dataclass(frozen=True)
class ShardInfo:
    name: str
    samples: int
    bytes: int
    sha256: str


# The fixed fields of every member's ustar header: mode 0444, uid and gid 0, mtime 0 (so reruns
# are byte-identical), a regular file, "ustar\0" "00", no user, group or device fields.
_USTAR = bytearray(_BLOCK)
for _at, _field in ((100, b"0000444"), (108, b"0000000"), (116, b"0000000"), (136, b"0" * 11),
                    (156, b"0"), (257, b"ustar\x0000")):  # fmt: skip
    _USTAR[_at : _at + len(_field)] = _field


def _header(name: str, size: int) -> bytes:
    """The member header tarfile writes in PAX format, ~10x faster: built here when the name
    is short ASCII and the size fits ustar (a plain ustar header is all tarfile writes then),
    else by tarfile (with its PAX extension header)."""
    raw = name.encode("utf-8", "surrogateescape")
    if len(raw) > 100 or not raw.isascii() or size >= 8**11:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = size, 0o444, 0
        return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    head = _USTAR.copy()
    head[: len(raw)] = raw
    head[124:135] = b"%011o" % size
    head[148:156] = b"        "  # the checksum counts its own field as spaces
    head[148:155] = b"%06o\0" % sum(head)
    return bytes(head)


def tar_record(key: str, members: Mapping[str, bytes]) -> bytes:
    """One sample as tar bytes (header + data + padding per member), ready to concatenate.

    Workers serialize samples once; the packer then copies these bytes into shards without
    re-reading or re-encoding anything.
    """
    parts = []
    for ext, data in members.items():
        parts.append(_header(f"{key}.{ext}", len(data)))
        parts.append(data)
        if len(data) % _BLOCK:
            parts.append(b"\0" * (_BLOCK - len(data) % _BLOCK))
    return b"".join(parts)


def commit(tmp: Path, final: Path, durable: bool = True) -> None:
    """Rename a finished local temporary file into place (the work folder's chunk files)."""
    os.replace(tmp, final)
    if durable:
        store.fsync_dir(final.parent)


class ShardWriter:
    """Streams a tar to ``path`` (a local path or any fsspec URL) that appears only, whole, at
    ``close()``: locally ``NAME.tar.tmp`` + fsync + rename, on S3 a multipart upload completed at
    the end (store.py). Readers never see a torn tar.

    Use as a context manager: leaving it by an exception discards what was written.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = path
        self.name = posixpath.basename(str(path))
        self._file = store.open_atomic(path)
        self._hash = hashlib.sha256()
        self._bytes = 0
        self.samples = 0

    def _write(self, data: bytes) -> None:
        # Hashing while writing: multi-GB shards are not read back just to checksum them.
        self._file.write(data)
        self._hash.update(data)
        self._bytes += len(data)

    def add(self, key: str, members: Mapping[str, bytes]) -> None:
        """One sample: ``members`` maps an extension ("jpg", "txt", ...) to its bytes."""
        self.add_record(tar_record(key, members))

    def add_record(self, record: bytes) -> None:
        """One sample already serialized by ``tar_record``."""
        self._write(record)
        self.samples += 1

    def close(self) -> ShardInfo:
        # End of archive: two zero blocks, then zeros up to a whole record, as tarfile does.
        end = self._bytes + 2 * _BLOCK
        self._write(b"\0" * (2 * _BLOCK + (-end) % _RECORD))
        self._file.commit()
        return ShardInfo(self.name, self.samples, self._bytes, self._hash.hexdigest())

    def abort(self) -> None:
        self._file.abort()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


def write_bytes(path: str | Path, data: bytes, durable: bool = True) -> None:
    """Atomic write to a path or URL (tmp + [fsync] + rename, or one PUT on an object store)."""
    store.write_bytes(path, data, durable)


def write_json(path: str | Path, obj: Any, durable: bool = True) -> None:
    """Atomic JSON write (see write_bytes)."""
    text = json.dumps(obj, indent=2, ensure_ascii=False) + "\n"
    write_bytes(path, text.encode("utf-8"), durable)


def read_json(path: str | Path) -> Any:
    return json.loads(store.read_bytes(path))


def _string_array(values: list[str | None]) -> Any:
    """A pyarrow string array built from its buffers.

    pa.array(), even of a numpy array, imports pandas to look for pandas objects: 0.7 s of CPU
    in the converter's main process, taken from the workers beside it.
    """
    import pyarrow as pa

    encoded = [b"" if v is None else v.encode("utf-8") for v in values]
    offsets = array.array("i", itertools.accumulate(map(len, encoded), initial=0))
    valid = bytearray((len(values) + 7) // 8)
    for i, value in enumerate(values):
        if value is not None:
            valid[i // 8] |= 1 << (i % 8)
    data = pa.py_buffer(b"".join(encoded))
    return pa.StringArray.from_buffers(
        len(values), pa.py_buffer(offsets), data, pa.py_buffer(valid)
    )


def write_report(path: str | Path, rows: Iterable[Mapping[str, Any]]) -> None:
    """Per-row outcome table (REPORT_COLUMNS), written atomically."""
    import pyarrow as pa  # the workers never write reports: keep their start-up light
    import pyarrow.parquet as pq

    rows = list(rows)
    columns = [_string_array([r.get(c) for r in rows]) for c in REPORT_COLUMNS]
    table = pa.Table.from_arrays(columns, names=list(REPORT_COLUMNS))
    buffer = io.BytesIO()  # one shard's rows: small enough to send in one piece
    pq.write_table(table, buffer)
    write_bytes(path, buffer.getvalue())


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 of a local file or any fsspec URL, streamed."""
    digest = hashlib.sha256()
    with fsspec.open(str(path), "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def new_manifest(
    shards: list[ShardInfo], failed: int, args: dict[str, Any], tool_version: str, **fields: Any
) -> dict[str, Any]:
    """The manifest; ``fields`` adds keys (rows, status, reports, fingerprint, ...)."""
    return {
        "format": MANIFEST_FORMAT,
        "samples": sum(s.samples for s in shards),
        "failed": failed,
        **fields,
        "shards": [asdict(s) for s in shards],
        "args": args,
        "tool_version": tool_version,
        "tokenizer": None,
    }


def _manifest_path(path_or_dir: str | Path) -> str:
    path = str(path_or_dir)
    return path if path.endswith(".json") else store.join(path_or_dir, MANIFEST_NAME)


def read_manifest(path_or_dir: str | Path) -> dict[str, Any]:
    """Load ``manifest.json`` from a shard folder or URL (or the file itself), check its format."""
    path = _manifest_path(path_or_dir)
    manifest = read_json(path)
    fmt = manifest.get("format", "")
    if not str(fmt).startswith("clipforge-shards/"):
        raise ValueError(f"{path}: not a clipforge shard manifest (format={fmt!r})")
    return manifest


def write_manifest(directory: str | Path, manifest: dict[str, Any]) -> str:
    """Write ``DIR/manifest.json`` atomically (DIR: a folder or URL); returns its path."""
    path = store.join(directory, MANIFEST_NAME)
    write_json(path, manifest)
    return path


if __name__ == "__main__":
    m = read_manifest(sys.argv[1])
    print(f"{m['format']}: {m['samples']} samples in {len(m['shards'])} shards")
    print(f"tool_version={m['tool_version']} tokenizer={m['tokenizer']}")
