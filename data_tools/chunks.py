"""One chunk of input rows -> serialized samples and per-row outcomes in the work folder.

Runs inside the converter's worker processes (``python -m data_tools.convert --processes N``);
nothing here writes a final shard. For chunk ``i`` it writes ``WORK/chunk-0000i.bin`` (the tar
records of the rows that became samples, in row order) and then ``WORK/chunk-0000i.json``
(every row's outcome and the length of its record). The JSON is renamed into place last: its
presence marks the chunk done, so a killed run redoes only chunks without one.

Inside a worker, the process's fetch threads (``data_tools.hosts``: per-host caps, backoff,
opt-outs) fetch a bounded window of rows ahead (network and disk waits overlap) while the
worker's own thread decodes, resizes and encodes one image at a time: one CPU per process,
memory bounded by the window, and the order of rows never depends on timing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_tools import fetch, hosts, images, shards
from data_tools.rows import Row

OK, FAILED, FILTERED, DUPLICATE, OPT_OUT = "ok", "failed", "filtered", "duplicate", "opt-out"
# Rows fetched ahead of the one being encoded, per fetch thread: enough that other hosts' rows
# keep coming while one host backs off, few enough to bound memory (64 images at 16 threads).
LOOKAHEAD = 4


class SampleError(ValueError):
    """A row's non-image fields are unusable; the message starts with a failure category."""


@dataclass(frozen=True)
class ChunkTask:
    index: int
    rows: list[Row]
    work_dir: str
    base_dir: str  # relative image paths are taken against it
    image: images.ImageOptions
    fetch: fetch.FetchOptions
    threads: int
    # Decided before any fetch (caption filters, duplicate URLs): row index -> (status, error).
    verdicts: dict[int, tuple[str, str]] = field(default_factory=dict)


@dataclass(frozen=True)
class ChunkSummary:
    index: int
    rows: int
    ok: int


def chunk_name(index: int) -> str:
    return f"chunk-{index:06d}"


def is_done(work_dir: Path, index: int) -> bool:
    return (work_dir / f"{chunk_name(index)}.json").exists()


def read_outcomes(work_dir: Path, index: int) -> list[dict[str, Any]]:
    with open(work_dir / f"{chunk_name(index)}.json", encoding="utf-8") as f:
        return json.load(f)["rows"]


def source_label(row: Row) -> str:
    """How the report names a row's image: a tar member gets ``tar#member-key``."""
    if row.member is None and row.data is None:
        return row.source
    return f"{row.source}#{row.extra.get('original_key', row.key)}"


def _label(value: Any) -> bytes:
    # Accept 3, "3" and 3.0 but never silently truncate 3.5 or read True as 1.
    number: int | None = None
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            number = int(value.strip())
    elif isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    if number is None:
        raise SampleError(f"bad label: {value!r} is not an integer")
    return str(number).encode("ascii")


def members(row: Row, encoded: images.EncodedImage, digest: str) -> dict[str, bytes]:
    """The tar members of one sample; ``digest`` is the sha256 of the source bytes."""
    label = _label(row.label) if row.label is not None else None
    meta: dict[str, Any] = {"key": row.key, "source": source_label(row), "caption": row.caption}
    if row.captions is not None:
        meta["captions"] = list(row.captions)  # the loader draws one per visit
    meta.update(
        width=encoded.width,
        height=encoded.height,
        original_width=encoded.original_width,
        original_height=encoded.original_height,
        sha256=digest,
    )
    meta.update(row.extra)
    out = {
        encoded.ext: encoded.data,
        "txt": row.caption.encode("utf-8"),
        # default=str: parquet columns may hold dates or decimals that JSON has no type for.
        "json": json.dumps(meta, ensure_ascii=False, default=str).encode("utf-8"),
    }
    if label is not None:
        out["cls"] = label
    return out


def _start(row: Row, task: ChunkTask, fetcher: hosts.Fetcher) -> bytes | Future[bytes]:
    if row.index in task.verdicts:
        return b""
    if row.data is not None:
        return row.data
    return fetcher.submit(fetch.resolve_source(row.source, task.base_dir), row.member)


def _result(item: bytes | Future[bytes]) -> bytes | Exception:
    # Errors travel back as values so the row order is kept.
    if not isinstance(item, Future):
        return item
    try:
        return item.result()
    except Exception as e:  # noqa: BLE001 - reported per row, see _error_outcome
        return e


def fetched_in_order(task: ChunkTask) -> Iterator[bytes | Exception]:
    """Each row's bytes (or its error) in row order, fetched LOOKAHEAD x threads rows ahead."""
    fetcher = hosts.fetcher_for(task.work_dir, task.fetch, task.threads)
    window: deque[bytes | Future[bytes]] = deque()
    for row in task.rows:
        window.append(_start(row, task, fetcher))
        if len(window) >= LOOKAHEAD * task.threads:
            yield _result(window.popleft())
    while window:
        yield _result(window.popleft())


def _error_outcome(error: Exception) -> tuple[str, str]:
    if isinstance(error, images.FilteredError):
        return FILTERED, str(error)
    if isinstance(error, fetch.OptOut):
        return OPT_OUT, str(error)
    if isinstance(error, fetch.FetchError | images.ImageError | SampleError):
        return FAILED, str(error)
    # One unforeseen library error must not cost the other rows of a days-long run;
    # its own category makes it stand out in the stats.
    return FAILED, f"unexpected: {type(error).__name__}: {error}"


def process_row(
    row: Row, fetched: bytes | Exception, task: ChunkTask
) -> tuple[dict[str, Any], bytes]:
    """(outcome, tar record); the record is empty unless the row became a sample."""
    outcome: dict[str, Any] = {"key": row.key, "source": source_label(row), "note": row.note}
    if row.index in task.verdicts:
        outcome["status"], outcome["error"] = task.verdicts[row.index]
        return outcome, b""
    try:
        if isinstance(fetched, Exception):
            raise fetched
        digest = hashlib.sha256(fetched).hexdigest()
        outcome["sha256"] = digest
        encoded = images.process_image(fetched, task.image)
        record = shards.tar_record(row.key, members(row, encoded, digest))
    except Exception as e:  # noqa: BLE001 - every row gets an outcome, never a crash
        outcome["status"], outcome["error"] = _error_outcome(e)
        return outcome, b""
    outcome.update(status=OK, error=None, length=len(record))
    return outcome, record


def run_chunk(task: ChunkTask) -> ChunkSummary:
    """Process every row of the chunk and commit its two work files."""
    work = Path(task.work_dir)
    name = chunk_name(task.index)
    outcomes = []
    ok = 0
    bin_tmp = work / f"{name}.bin.tmp"
    with open(bin_tmp, "wb") as out:
        for row, data in zip(task.rows, fetched_in_order(task), strict=True):
            outcome, record = process_row(row, data, task)
            out.write(record)
            ok += outcome["status"] == OK
            outcomes.append(outcome)
        out.flush()
        os.fsync(out.fileno())
    shards.commit(bin_tmp, work / f"{name}.bin")
    text = json.dumps({"rows": outcomes}, ensure_ascii=False, separators=(",", ":"))
    shards.write_bytes(work / f"{name}.json", text.encode("utf-8", "surrogateescape"))
    return ChunkSummary(task.index, len(task.rows), ok)
