"""One chunk of input rows -> serialized samples and per-row outcomes in the work folder.

Runs inside the converter's worker processes (``python -m data_tools.convert --processes N``);
nothing here writes a final shard. For chunk ``i`` it writes ``WORK/chunk-0000i.bin`` (the tar
records of the rows that became samples, in row order) and then ``WORK/chunk-0000i.json``
(every row's outcome and the length of its record). The JSON is renamed into place last: its
presence marks the chunk done, so a killed run redoes only chunks without one.

Inside a worker, a small thread pool fetches a bounded window of rows ahead (network and disk
waits overlap) while the worker's own thread decodes, resizes and encodes one image at a time:
one CPU per process, memory bounded by the window, and the order of rows never depends on
timing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from data_tools import fetch, images, shards
from data_tools.rows import Row

T = TypeVar("T")
R = TypeVar("R")
OK, FAILED, FILTERED, DUPLICATE = "ok", "failed", "filtered", "duplicate"


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


def load_bytes(row: Row, task: ChunkTask) -> bytes:
    if row.data is not None:
        return row.data
    source = fetch.resolve_source(row.source, task.base_dir)
    return fetch.fetch_bytes(source, task.fetch, row.member)


def _fetch(row: Row, task: ChunkTask) -> bytes | Exception:
    # Runs in a fetch thread: errors travel back as values so the row order is kept.
    if row.index in task.verdicts:
        return b""
    try:
        return load_bytes(row, task)
    except Exception as e:  # noqa: BLE001 - reported per row, see _outcome
        return e


def _error_outcome(error: Exception) -> tuple[str, str]:
    if isinstance(error, images.FilteredError):
        return FILTERED, str(error)
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


def ordered_map(fn: Callable[[T], R], items: Iterable[T], threads: int) -> Iterator[R]:
    """``map`` on a thread pool, in input order, never more than 2 x threads results ahead."""
    window: deque[Future[R]] = deque()
    with ThreadPoolExecutor(max(1, threads)) as pool:
        for item in items:
            window.append(pool.submit(fn, item))
            if len(window) >= 2 * threads:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()


def run_chunk(task: ChunkTask) -> ChunkSummary:
    """Process every row of the chunk and commit its two work files."""
    work = Path(task.work_dir)
    name = chunk_name(task.index)
    outcomes = []
    ok = 0
    bin_tmp = work / f"{name}.bin.tmp"
    with open(bin_tmp, "wb") as out:
        fetched = ordered_map(lambda r: _fetch(r, task), task.rows, task.threads)
        for row, data in zip(task.rows, fetched, strict=True):
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
