"""Table of (image, caption) rows -> WebDataset tar shards, per-shard stats, and a manifest.

    python -m data_tools.convert --input rows.csv --images imgs/ --output shards/ \\
        --image-size 224 --resize-mode center_crop --processes 8
    clipforge-convert --help                     # same, as an installed console script

Rows are split into slices of --samples-per-shard consecutive rows; slice i becomes shard i, so the
output is byte-identical for any --processes. A slice whose rows partly fail yields a shorter
shard (rows are not borrowed from the next slice): simple and deterministic, at the price of
uneven shards; the manifest records every shard's count. A slice with no good row leaves no tar
(its stats and report remain) and is not listed in the manifest. Bad rows are recorded in the
shard's stats and parquet report and never stop the run; a bad table or option stops it before
any work with one ``error: ...`` line and exit code 2. Output goes to a local folder.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from tqdm import tqdm

from data_tools import fetch, images, readers, shards

EXIT_USAGE = 2


class SampleError(ValueError):
    """A row's non-image fields are unusable; the message starts with a failure category."""


@dataclass(frozen=True)
class SliceTask:
    index: int
    rows: list[readers.Row]
    output_dir: str
    base_dir: str  # relative image paths are taken against it
    image: images.ImageOptions
    timeout: float
    retries: int


@dataclass(frozen=True)
class SliceResult:
    shard: shards.ShardInfo
    rows: int
    failed: int


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _quality(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 100:
        raise argparse.ArgumentTypeError(f"must be in 1..100, got {value}")
    return value


def _column_list(text: str) -> list[str]:
    return [col.strip() for col in text.split(",") if col.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="clipforge-convert",
        description="Convert a table of image paths/URLs and captions into WebDataset shards.",
    )
    p.add_argument("--input", required=True, help="table path or fsspec URL (.csv/.jsonl[.gz])")
    p.add_argument("--input-format", default="auto", choices=["auto", *readers.READERS])
    p.add_argument("--images", default=None, help="folder for relative paths (default: table's)")
    p.add_argument("--url-col", default="url", help="column holding the image path or URL")
    p.add_argument("--caption-col", default="caption", help="column holding the caption")
    p.add_argument("--cls-col", default=None, help="integer class column, written as KEY.cls")
    p.add_argument("--extra-cols", type=_column_list, default=[], help="a,b: copied to KEY.json")
    p.add_argument("--output", required=True, help="output folder (local)")
    p.add_argument("--image-size", type=_positive_int, default=256)
    p.add_argument("--resize-mode", default="border", choices=images.RESIZE_MODES)
    p.add_argument("--samples-per-shard", type=_positive_int, default=10000)
    p.add_argument("--quality", type=_quality, default=95, help="JPEG quality")
    p.add_argument("--processes", type=_positive_int, default=1)
    p.add_argument(
        "--max-pixels",
        type=_positive_int,
        default=images.DEFAULT_MAX_PIXELS,
        help="refuse images with more pixels (decompression-bomb guard)",
    )
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per remote fetch")
    p.add_argument("--retries", type=int, default=2, help="extra tries per remote fetch")
    return p


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


def make_sample(row: readers.Row, task: SliceTask) -> dict[str, bytes]:
    """Tar members of one row; raises FetchError/ImageError/SampleError for a bad row."""
    label = _label(row.label) if row.label is not None else None
    source = fetch.resolve_source(row.source, task.base_dir)
    encoded = images.process_image(
        fetch.fetch_bytes(source, task.timeout, task.retries), task.image
    )
    meta = {
        "key": row.key,
        "source": row.source,
        "caption": row.caption,
        "width": encoded.width,
        "height": encoded.height,
        "original_width": encoded.original_width,
        "original_height": encoded.original_height,
        **row.extra,
    }
    members = {
        "jpg": encoded.data,
        "txt": row.caption.encode("utf-8"),
        "json": json.dumps(meta, ensure_ascii=False).encode("utf-8"),
    }
    if label is not None:
        members["cls"] = label
    return members


def _try_sample(row: readers.Row, task: SliceTask) -> tuple[dict[str, bytes] | None, str | None]:
    try:
        return make_sample(row, task), None
    except (fetch.FetchError, images.ImageError, SampleError) as e:
        return None, str(e)
    except Exception as e:  # noqa: BLE001
        # One unforeseen library error must not cost the other rows of a days-long run;
        # its own category makes it stand out in the stats.
        return None, f"unexpected: {type(e).__name__}: {e}"


def convert_slice(task: SliceTask) -> SliceResult:
    """Write shard ``task.index`` with its stats and row report; runs inside pool workers."""
    out = Path(task.output_dir)
    stem = shards.shard_stem(task.index)
    report: list[dict[str, str | None]] = []
    reasons: Counter[str] = Counter()
    with shards.ShardWriter(out / f"{stem}.tar") as writer:
        for row in task.rows:
            members, error = _try_sample(row, task)
            if members is not None:
                writer.add(row.key, members)
            else:
                reasons[str(error).split(":", 1)[0]] += 1
            status = "ok" if error is None else "failed"
            report.append({"key": row.key, "source": row.source, "status": status, "error": error})
        info = writer.close()
    if info.samples == 0:
        # An empty tar only costs loaders an open; stats and report still record the slice.
        (out / info.name).unlink()
    failed = sum(reasons.values())
    shards.write_report(out / f"{stem}.parquet", report)
    stats = {
        "shard": info.name,
        "rows": len(task.rows),
        "ok": info.samples,
        "failed": failed,
        "failure_reasons": dict(sorted(reasons.items())),
    }
    shards.write_json(out / f"{stem}_stats.json", stats)
    return SliceResult(shard=info, rows=len(task.rows), failed=failed)


def plan_slices(
    rows: list[readers.Row], args: argparse.Namespace, base_dir: str
) -> list[SliceTask]:
    opts = images.ImageOptions(args.image_size, args.resize_mode, args.quality, args.max_pixels)
    n = args.samples_per_shard
    return [
        SliceTask(i // n, rows[i : i + n], args.output, base_dir, opts, args.timeout, args.retries)
        for i in range(0, len(rows), n)
    ]


def run_slices(tasks: list[SliceTask], processes: int) -> list[SliceResult]:
    """Results in shard order, whatever the process count."""
    progress = tqdm(total=sum(len(t.rows) for t in tasks), unit="row", file=sys.stderr)
    results: list[SliceResult] = []
    with progress:
        if processes == 1 or len(tasks) <= 1:
            mapped = map(convert_slice, tasks)
            pool = None
        else:
            # spawn: no forked copy of tqdm's thread or a parent's open handles; same on macOS.
            pool = multiprocessing.get_context("spawn").Pool(min(processes, len(tasks)))
            mapped = pool.imap(convert_slice, tasks)
        try:
            for result in mapped:
                results.append(result)
                progress.update(result.rows)
        finally:
            if pool is not None:
                pool.close()
                pool.join()
    return results


def tool_version() -> str:
    try:
        return metadata.version("clipforge")
    except metadata.PackageNotFoundError:
        return "unknown"


def _table_dir(path: str) -> str:
    if fetch.is_url(path):
        return path.rsplit("/", 1)[0]
    return str(Path(path).resolve().parent)


def load_rows(args: argparse.Namespace) -> list[readers.Row]:
    """Read and check the table; raises readers.TableError (-> exit 2) before any work."""
    spec = readers.ColumnSpec(args.url_col, args.caption_col, args.cls_col, tuple(args.extra_cols))
    return readers.to_rows(readers.read_table(args.input, args.input_format), spec)


def _prepare_output(path: str) -> None:
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise readers.TableError(f"--output {path} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    # The manifest marks a finished conversion; drop a stale one before rewriting shards.
    (out / shards.MANIFEST_NAME).unlink(missing_ok=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rows = load_rows(args)
        _prepare_output(args.output)
    except readers.TableError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    base_dir = _table_dir(args.input) if args.images is None else os.path.abspath(args.images)
    results = run_slices(plan_slices(rows, args, base_dir), args.processes)
    failed = sum(r.failed for r in results)
    written = [r.shard for r in results if r.shard.samples]
    manifest = shards.new_manifest(written, failed, vars(args), tool_version())
    shards.write_manifest(args.output, manifest)
    print(
        f"wrote {manifest['samples']} samples in {len(written)} shards to {args.output} "
        f"({failed} of {len(rows)} rows failed)",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
