"""Any image-caption dump -> verified WebDataset shards of a fixed size, resumable.

    python -m data_tools.convert --input rows.parquet --url-col url --caption-col caption \\
        --output shards/ --image-size 256 --resize-mode center_crop --processes 8
    python -m data_tools.convert --input captions_val2017.json --images val2017/ --output coco/
    python -m data_tools.convert --input rows.parquet --output s3://bucket/ds/ --work-dir /scratch/w
    python -m data_tools.convert --input cifar/test --caption-template "a photo of a {label}" \\
        --output zs/ --zeroshot-templates templates.txt      # + KEY.cls, classnames.txt
    clipforge-convert --help                     # same, as an installed console script

How the work flows, and why (details in chunks.py and packer.py):
  1. The whole input is read and checked first: a bad table, option or column is one
     ``error: ...`` line and exit code 2 before any image is fetched.
  2. Rows are cut into chunks; worker processes turn each chunk into ``WORK/chunk-*.bin``
     (tar records of its good rows) and ``chunk-*.json`` (every row's outcome). WORK is local:
     ``OUT/_work`` for a local OUT, else ``--work-dir DIR``/<hash of OUT> (default DIR:
     $TMPDIR/clipforge-work).
  3. The main process feeds chunks to the packer in input order; it cuts the stream of
     successes into shards of exactly --samples-per-shard (only the last may be short). Output
     bytes therefore depend on the input and the settings, never on --processes or timing.
  4. Re-running the same command after a crash or ``kill -9`` keeps finished chunks and shards
     and redoes the rest, to the same bytes. manifest.json is written last.
OUT may be any fsspec URL (s3://, gs://, ...): shards, reports and the manifest go straight
there, each appearing whole or not at all (store.py), and ``OUT/_work/plan.json`` marks an
unfinished conversion there. A resume on another machine, without the old WORK, keeps every
finished shard and writes the others (fetching and encoding every chunk again: the chunk files
were on the old machine); a half-uploaded object is never trusted.
Bad rows (unreachable, corrupt, filtered, duplicate) are reported per shard and never stop the
run: the exit code is 0 whenever it ran to the end. A Slurm array converts slice I of N of the
input with ``--slice-index I --slice-count N`` into OUT/part-0000I/; ``python -m
data_tools.merge_manifests OUT`` then writes one manifest (launch/convert_slurm.sh does both).
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import math
import multiprocessing
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from tqdm import tqdm

from clipforge import cli
from data_tools import chunks, fetch, images, readers, shards, store
from data_tools.layouts import class_label, fill_template
from data_tools.packer import STATUSES, DamagedOutput, Packer, WorkFilesMissing
from data_tools.rows import ColumnSpec, Dataset, ReadOptions, Row, TableError

EXIT_USAGE = 2
WORK_DIR = "_work"
CLASSNAMES = "classnames.txt"
TEMPLATES = "zeroshot_classification_templates.txt"
# Settings that change how fast or how patiently the work is done, not what it produces:
# a resume may change them (say a longer --timeout) and still continue the same conversion.
RUNTIME_ARGS = {"processes", "threads", "chunk_rows", "timeout", "retries", "user_agent"}
RUNTIME_ARGS |= {"user_agent_contact", "host_connections", "max_retry_after"}
RUNTIME_ARGS |= {"output", "overwrite", "keep_work", "progress", "work_dir"}
PLAN = "plan.json"


class UsageError(ValueError):
    """Reported as one ``error:`` line with exit code 2, before any work."""


def positive_int(text: str) -> int:
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


def _seconds(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 seconds, got {text}")
    return value


def _positive_seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0 seconds, got {text}")
    return value


def _directives(text: str) -> list[str]:
    # "noai,noindex"; "" or "none" (or img2dataset's '[]') disables the X-Robots-Tag check.
    names = [d.strip(" '\"").lower() for d in text.strip().strip("[]").split(",")]
    names = [d for d in names if d]
    return [] if names == ["none"] else names


def default_processes() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def _input_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("input")
    g.add_argument("--input", required=True, help="table, COCO/Flickr file, folder, tar(s); URL ok")
    g.add_argument("--input-format", default="auto", choices=["auto", *readers.FORMATS])
    g.add_argument("--images", default=None, help="folder that relative image names refer to")
    g.add_argument("--url-col", default="url", help="column holding the image path or URL")
    g.add_argument("--caption-col", default="caption", help="column holding the caption")
    g.add_argument("--cls-col", default=None, help="integer class column, written as KEY.cls")
    g.add_argument("--extra-cols", "--save-additional-columns", type=_column_list, default=[],
                   help="a,b: columns copied into KEY.json")  # fmt: skip
    g.add_argument("--header", choices=["auto", "yes", "no"], default="auto",
                   help="csv/tsv header line; auto: none when row 1 holds a URL or image name")  # fmt: skip
    g.add_argument("--columns", type=_column_list, default=[],
                   help="names for a headerless csv/tsv, e.g. caption,url (CC3M)")  # fmt: skip
    g.add_argument("--caption-template", default=None,
                   help='folder mode: class sub-folders, caption "a photo of a {label}"')  # fmt: skip
    g.add_argument("--zeroshot-templates", default=None,
                   help="file (one per line) or 'a photo of a {}.|...': written beside the shards")  # fmt: skip


def _image_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("images")
    g.add_argument("--image-size", type=positive_int, default=256)
    g.add_argument("--resize-mode", default="border", choices=images.RESIZE_MODES)
    g.add_argument("--encode-format", default="jpg", choices=images.ENCODE_FORMATS)
    g.add_argument("--quality", "--encode-quality", type=_quality, default=95)
    g.add_argument("--reencode", default="if-needed", choices=images.REENCODE,
                   help="if-needed: keep images that already have the target size/format; "
                   "never: keep every jpg/png/webp as is (needs --resize-mode no)")  # fmt: skip
    g.add_argument("--downscale-interpolation", default="area", choices=images.INTERPOLATIONS)
    g.add_argument("--upscale-interpolation", default="lanczos", choices=images.INTERPOLATIONS)
    g.add_argument("--max-pixels", type=positive_int, default=images.DEFAULT_MAX_PIXELS,
                   help="refuse images with more pixels (decompression-bomb guard)")  # fmt: skip


def _filter_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("filters (rows turned away get status 'filtered' or 'duplicate')")
    g.add_argument("--min-image-size", type=int, default=0, help="smaller side, in pixels")
    g.add_argument("--max-aspect-ratio", type=float, default=math.inf)
    g.add_argument("--min-caption-length", type=int, default=0, help="characters, after cleanup")
    g.add_argument("--max-caption-length", type=int, default=None)
    g.add_argument("--dedupe", choices=["none", "url", "content", "both"], default="none",
                   help="exact duplicates by source URL/path and/or content sha256; first wins")  # fmt: skip


def _run_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output and execution")
    g.add_argument("--output", required=True,
                   help="output folder or fsspec URL (s3://bucket/prefix, gs://...)")  # fmt: skip
    g.add_argument("--samples-per-shard", "--number-sample-per-shard", type=positive_int,
                   default=10000)  # fmt: skip
    g.add_argument("--processes", type=positive_int, default=default_processes())
    g.add_argument("--threads", type=positive_int, default=16, help="fetch threads per process")
    g.add_argument("--chunk-rows", type=positive_int, default=None,
                   help="rows per work unit (default: from rows and processes, <= 1000)")  # fmt: skip
    g.add_argument("--timeout", type=_positive_seconds, default=10.0,
                   help="seconds per remote fetch attempt in all: DNS, connect, headers, body")  # fmt: skip
    g.add_argument("--retries", type=int, default=2, help="extra tries per remote fetch")
    g.add_argument("--max-bytes", type=positive_int, default=fetch.DEFAULT_MAX_BYTES,
                   help="refuse sources larger than this")  # fmt: skip
    _polite_args(p)
    g.add_argument("--slice-index", type=int, default=None, help="Slurm array: this task's slice")
    g.add_argument("--slice-count", type=int, default=None, help="Slurm array: number of slices")
    g.add_argument("--overwrite", action="store_true", help="discard earlier output in --output")
    g.add_argument("--work-dir", default=None,
                   help="local folder for chunk files, in DIR/<hash of OUT>/ (default: OUT/_work "
                   "for a local OUT, else $TMPDIR/clipforge-work)")  # fmt: skip
    g.add_argument("--keep-work", action="store_true", help="keep the work folder after success")
    g.add_argument("--no-progress", dest="progress", action="store_false")


def _polite_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("polite fetching (rows a host opts out of get status 'opt-out')")
    g.add_argument("--user-agent", default=None,
                   help="the whole User-Agent header (default: clipforge-data_tools/VERSION (+URL))")  # fmt: skip
    g.add_argument("--user-agent-contact", default=None, metavar="URL",
                   help="where site owners reach you, put in the default User-Agent")  # fmt: skip
    g.add_argument("--disallowed-header-directives", type=_directives,
                   default=list(fetch.OPT_OUT_DIRECTIVES), metavar="A,B",
                   help="X-Robots-Tag directives that turn a row away (default: "
                   f"{','.join(fetch.OPT_OUT_DIRECTIVES)}; 'none' disables the check)")  # fmt: skip
    g.add_argument("--robots-txt", action="store_true",
                   help="obey each image host's robots.txt (fetched once per host and process)")  # fmt: skip
    g.add_argument("--host-connections", type=positive_int, default=8, metavar="N",
                   help="requests in flight per host, per process (default: 8)")  # fmt: skip
    g.add_argument("--max-retry-after", type=_seconds, default=60.0, metavar="S",
                   help="a 429/503 asking for a longer wait fails the host's rows (default: 60)")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(
        prog="clipforge-convert",
        description="Convert an image-caption dump into fixed-size WebDataset shards "
        "(resumable: re-run the same command after a crash).",
    )
    _input_args(p)
    _image_args(p)
    _filter_args(p)
    _run_args(p)
    return p


def validate(args: argparse.Namespace) -> list[str]:
    """Every problem with the options at once (litgpt's habit), before anything is read."""
    problems = []
    if args.reencode == "never" and args.resize_mode != "no":
        problems.append("--reencode never keeps images as they are: it needs --resize-mode no")
    if (args.slice_index is None) != (args.slice_count is None):
        problems.append("--slice-index and --slice-count go together")
    elif args.slice_count is not None and not 0 <= args.slice_index < args.slice_count:
        problems.append(f"--slice-index must be in 0..{args.slice_count - 1}")
    if args.max_caption_length is not None and args.max_caption_length < args.min_caption_length:
        problems.append("--max-caption-length is below --min-caption-length")
    if args.zeroshot_templates is not None and args.caption_template is None:
        problems.append("--zeroshot-templates needs class folders (--caption-template)")
    if args.max_aspect_ratio < 1:
        problems.append("--max-aspect-ratio must be >= 1")
    return problems


def read_options(args: argparse.Namespace) -> ReadOptions:
    spec = ColumnSpec(args.url_col, args.caption_col, args.cls_col, tuple(args.extra_cols))
    return ReadOptions(
        args.input_format, spec, args.header, tuple(args.columns), args.caption_template
    )


def image_options(args: argparse.Namespace) -> images.ImageOptions:
    return images.ImageOptions(
        image_size=args.image_size,
        resize_mode=args.resize_mode,
        quality=args.quality,
        max_pixels=args.max_pixels,
        encode_format=args.encode_format,
        reencode=args.reencode,
        min_image_size=args.min_image_size,
        max_aspect_ratio=args.max_aspect_ratio,
        downscale_interpolation=args.downscale_interpolation,
        upscale_interpolation=args.upscale_interpolation,
    )


def output_dir(args: argparse.Namespace) -> str:
    """Where shards go: a local path or fsspec URL (a slice's own part-NNNNN under it)."""
    out = args.output.rstrip("/") if store.is_url(args.output) else args.output
    if args.slice_count is not None:
        out = store.join(out, f"part-{args.slice_index:05d}")
    try:
        store.filesystem(out)
    except store.StoreError as e:
        raise UsageError(f"--output {e}") from None
    return out


def work_dir(args: argparse.Namespace, out: str) -> Path:
    """The local folder of chunk files: workers write it with plain file I/O and the packer
    seeks in it, so it never lives on an object store."""
    if args.work_dir is None and store.is_local(out):
        return Path(store.filesystem(out)[1]) / WORK_DIR  # file:///x -> /x/_work
    base = Path(args.work_dir or Path(tempfile.gettempdir()) / "clipforge-work")
    # A folder of our own inside the one given, named after OUT: each slice of an array gets
    # its own, and removing it after success never touches anything else there.
    return base / hashlib.sha256(out.encode("utf-8")).hexdigest()[:16]


def check_images_dir(rows: list[Row], base_dir: str) -> None:
    """One clear error when no image is where the options say, instead of N 'missing' rows."""
    local = [r for r in rows[:64] if r.member is None and r.data is None and r.source]
    local = [r for r in local if not fetch.is_url(r.source) and not os.path.isabs(r.source)]
    if len(local) < 8 or fetch.is_url(base_dir):
        return
    if not any(os.path.exists(os.path.join(base_dir, r.source)) for r in local[:8]):
        raise UsageError(
            f"none of the first 8 images exist under {base_dir} (e.g. {local[0].source}); "
            "pass the folder they are relative to with --images"
        )


def pre_verdicts(rows: list[Row], args: argparse.Namespace) -> dict[int, tuple[str, str]]:
    """Outcomes known without fetching: caption filters, then duplicate URLs (first wins)."""
    verdicts: dict[int, tuple[str, str]] = {}
    first_of: dict[tuple[str, Any], str] = {}
    for row in rows:
        n = len(row.caption)
        if n < args.min_caption_length:
            verdicts[row.index] = (
                "filtered",
                f"caption too short: {n} < {args.min_caption_length}",
            )
        elif args.max_caption_length is not None and n > args.max_caption_length:
            verdicts[row.index] = ("filtered", f"caption too long: {n} > {args.max_caption_length}")
        elif args.dedupe in ("url", "both") and row.source:
            first = first_of.setdefault((row.source, row.member), row.key)
            if first != row.key:
                verdicts[row.index] = ("duplicate", f"duplicate url: same source as {first}")
    return verdicts


def fingerprint(args: argparse.Namespace, rows: list[Row]) -> str:
    """What the output depends on: output-affecting settings and every row's content."""
    digest = hashlib.sha256()
    settings = {k: v for k, v in sorted(vars(args).items()) if k not in RUNTIME_ARGS}
    digest.update(json.dumps(settings, default=str, sort_keys=True).encode())
    for r in rows:
        fields = (r.key, r.source, r.caption, r.captions, r.label, r.extra, r.member)
        digest.update(json.dumps(fields, default=str, sort_keys=True).encode())
        if r.data is not None:
            digest.update(hashlib.sha256(r.data).digest())
    return digest.hexdigest()


OUTPUT_PATTERNS = ("[0-9]*.tar", "[0-9]*_stats.json", "[0-9]*.parquet", "*.tmp")


def _remove_outputs(out: str, work: Path) -> None:
    names = store.listing(out)
    doomed = [n for n in names if any(fnmatch.fnmatch(n, p) for p in OUTPUT_PATTERNS)]
    doomed += [n for n in (shards.MANIFEST_NAME, CLASSNAMES, TEMPLATES) if n in names]
    store.remove([store.join(out, n) for n in doomed])
    if WORK_DIR in names:
        store.remove([store.join(out, WORK_DIR)], recursive=True)
    shutil.rmtree(work, ignore_errors=True)


def _plans(out: str, work: Path) -> list[tuple[str, str]]:
    """(plan path, what to name in an error): the output's, and the work folder's when apart.

    The output's marks an unfinished conversion where the shards are (a resume elsewhere finds
    it); the work folder's keeps chunk files of one conversion from feeding another."""
    plans = [(store.join(out, WORK_DIR, PLAN), str(out))]
    local = store.is_local(out)
    if not local or Path(store.filesystem(out)[1]).resolve() / WORK_DIR != work.resolve():
        plans.append((str(work / PLAN), f"--work-dir {work}"))
    return plans


def _read_plan(path: str) -> dict[str, Any] | None:
    data = store.read_if_exists(path)
    return json.loads(data) if data is not None else None


def prepare_output(out: str, work: Path, fp: str, overwrite: bool) -> bool:
    """Make the output and work folder ready; True when OUT already holds this very
    conversion, finished."""
    if store.kind(out) != "object" and store.isfile(out):  # an S3 key "ds" is no conflict
        raise UsageError(f"--output {out} exists and is not a folder")
    if overwrite:
        _remove_outputs(out, work)
    manifest = _read_plan(store.join(out, shards.MANIFEST_NAME))
    if manifest is not None:
        if manifest.get("fingerprint") == fp:
            return True
        raise UsageError(
            f"{out} holds a finished conversion of other settings or input; "
            "pass --overwrite to replace it, or choose another --output"
        )
    for plan, where in _plans(out, work):
        known = _read_plan(plan)
        if known is not None and known.get("fingerprint") != fp:
            raise UsageError(
                f"{where} holds an unfinished conversion of other settings or input; "
                "pass --overwrite to discard it, or choose another --output"
            )
    store.makedirs(out)
    work.mkdir(parents=True, exist_ok=True)
    # Torn writes of a killed run (temporary names, S3 uploads never completed): finished
    # objects were committed whole, so whatever is not is thrown away, never trusted.
    store.clear_partials(out)
    for stale in work.glob("*.tmp"):
        stale.unlink()
    return False


def plan_chunks(out: str, work: Path, fp: str, n_rows: int, args: argparse.Namespace) -> int:
    """Rows per chunk: from an unfinished run's plan when resuming, so chunk files match."""
    plans = {path: _read_plan(path) for path, _ in _plans(out, work)}
    known = [plan for plan in plans.values() if plan is not None]
    # Several chunks per process balance the load; <= 1000 rows keeps a redo after a crash
    # short. The output does not depend on this number.
    size = args.chunk_rows or max(16, min(1000, math.ceil(n_rows / (args.processes * 8))))
    size = int(known[0]["chunk_rows"]) if known else size
    plan = {"fingerprint": fp, "chunk_rows": size, "rows": n_rows, "output": str(out)}
    for path, found in plans.items():
        if found is None:
            if not store.is_url(path):
                os.makedirs(os.path.dirname(path), exist_ok=True)
            shards.write_json(path, plan)
    return size


def make_tasks(
    rows: list[Row], size: int, args: argparse.Namespace, work: Path, base_dir: str
) -> list[chunks.ChunkTask]:
    verdicts = pre_verdicts(rows, args)
    image, opts = image_options(args), fetch_options(args)
    tasks = []
    for i in range(0, len(rows), size):
        part = rows[i : i + size]
        mine = {r.index: verdicts[r.index] for r in part if r.index in verdicts}
        tasks.append(
            chunks.ChunkTask(i // size, part, str(work), base_dir, image, opts, args.threads, mine)
        )
    return tasks


def fetch_options(args: argparse.Namespace) -> fetch.FetchOptions:
    return fetch.FetchOptions(
        timeout=args.timeout,
        retries=args.retries,
        max_bytes=args.max_bytes,
        user_agent=args.user_agent or fetch.default_user_agent(args.user_agent_contact),
        disallowed_directives=tuple(args.disallowed_header_directives),
        robots_txt=args.robots_txt,
        host_connections=args.host_connections,
        max_retry_after=args.max_retry_after,
    )


def start_method() -> str:
    """fork while this process has a single thread (main() starts the workers before any tqdm
    bar, fsspec event loop or fetch clock exists) on Linux: each worker starts in ~10 ms with
    everything imported. Otherwise spawn, a fresh interpreter importing data_tools (~0.25 s of
    CPU each): forking a threaded process can copy a lock some thread holds, and macOS's
    system libraries are not fork-safe."""
    return "fork" if sys.platform == "linux" and threading.active_count() == 1 else "spawn"


class Workers:
    """The worker processes (``--processes``), started before the input is read (see
    start_method), so that their start-up overlaps with reading, checking and planning in this
    process instead of following it. With one process, or one chunk to do, chunks run here."""

    def __init__(self, processes: int) -> None:
        self.pool: Any = None
        if processes > 1:
            self.pool = multiprocessing.get_context(start_method()).Pool(processes)

    def results(self, pending: list[chunks.ChunkTask]) -> Iterator[chunks.ChunkSummary]:
        """Chunk summaries as workers finish them (any order)."""
        if self.pool is None or len(pending) <= 1:
            yield from map(chunks.run_chunk, pending)
        else:
            yield from self.pool.imap_unordered(chunks.run_chunk, pending)

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            self.pool.terminate()  # all work is done (or abandoned): no need to wait for idle workers
            self.pool.join()


def run(
    tasks: list[chunks.ChunkTask],
    work: Path,
    packer: Packer,
    args: argparse.Namespace,
    workers: Workers,
) -> None:
    """Process pending chunks in parallel; pack finished ones in input order as they arrive."""
    done = {t.index for t in tasks if chunks.is_done(work, t.index)}
    pending = [t for t in tasks if t.index not in done]
    resumed = sum(len(t.rows) for t in tasks if t.index in done)
    bar = tqdm(total=sum(len(t.rows) for t in tasks), initial=resumed, unit="row",
               file=sys.stderr, disable=not args.progress, mininterval=0.5, dynamic_ncols=True)  # fmt: skip
    next_chunk = 0
    with bar:
        for summary in _chained(done, pending, workers):
            done.add(summary.index)
            bar.update(summary.rows)
            # The packer needs chunks in input order: feed every one finished so far in a row.
            while next_chunk < len(tasks) and next_chunk in done:
                packer.add_chunk(next_chunk, chunks.read_outcomes(work, next_chunk))
                next_chunk += 1
            ok = packer.status["ok"]
            bad = sum(packer.status.values()) - ok
            bar.set_postfix(ok=ok, bad=bad, shards=packer.shard, refresh=False)


def _chained(
    done: set[int], pending: list[chunks.ChunkTask], workers: Workers
) -> Iterator[chunks.ChunkSummary]:
    # Chunks finished by an earlier run go first (rows=0: already counted in the bar).
    for index in sorted(done):
        yield chunks.ChunkSummary(index, 0, 0)
    yield from workers.results(pending)


def _templates(value: str) -> list[str]:
    lines = (
        Path(value).read_text(encoding="utf-8").splitlines()
        if os.path.isfile(value)
        else value.split("|")
    )
    # The loader fills templates with str.format(classname): positional "{}".
    return [t.strip().replace("{label}", "{}").replace("{c}", "{}") for t in lines if t.strip()]


def write_sidecars(out: str, ds: Dataset, args: argparse.Namespace) -> None:
    if ds.classnames is not None:
        text = "\n".join(ds.classnames) + "\n"
        shards.write_bytes(store.join(out, CLASSNAMES), text.encode("utf-8"))
    if args.zeroshot_templates is not None:
        text = "\n".join(_templates(args.zeroshot_templates)) + "\n"
        shards.write_bytes(store.join(out, TEMPLATES), text.encode("utf-8"))


def tool_version() -> str:
    try:
        return metadata.version("clipforge")
    except metadata.PackageNotFoundError:
        return "unknown"


def finish(
    out: str, work: Path, packer: Packer, args: argparse.Namespace, fp: str, n_rows: int
) -> dict:
    infos = packer.finish()
    status = {s: packer.status.get(s, 0) for s in STATUSES}
    extra: dict[str, Any] = {
        "rows": n_rows,
        "status": status,
        "failure_reasons": dict(sorted(packer.reasons.items())),
        "reports": packer.reports,
        "fingerprint": fp,
    }
    if args.slice_count is not None:
        extra["slice"] = {"index": args.slice_index, "count": args.slice_count}
    failed = n_rows - status["ok"]
    manifest = shards.new_manifest(infos, failed, vars(args), tool_version(), **extra)
    shards.write_manifest(out, manifest)  # last: from here on the conversion counts as finished
    if not args.keep_work:
        shutil.rmtree(work, ignore_errors=True)
        store.remove([store.join(out, WORK_DIR)], recursive=True)
    return manifest


def load_dataset(args: argparse.Namespace) -> tuple[Dataset, list[Row], str]:
    """Read and check everything; raises TableError/UsageError (-> exit 2) before any work."""
    problems = validate(args)
    if problems:
        raise UsageError("; ".join(problems))
    if args.caption_template is not None:
        fill_template(args.caption_template, class_label("x"))  # a bad template fails now
    ds = readers.load(args.input, read_options(args))
    rows = ds.rows
    if args.slice_count is not None:
        rows = readers.select_slice(rows, args.slice_index, args.slice_count)
    base_dir = os.path.abspath(args.images) if args.images is not None else ds.base_dir
    check_images_dir(rows, base_dir)
    return ds, rows, base_dir


def open_output(out: str, work: Path, fp: str, n_rows: int, args: argparse.Namespace) -> int | None:
    """Prepare and plan: rows per chunk, or None when OUT already holds this conversion.

    Nothing has been done yet, so a store that refuses us (no such bucket, no permission) is
    a usage error like a bad option."""
    try:
        if prepare_output(out, work, fp, args.overwrite):
            return None
        return plan_chunks(out, work, fp, n_rows, args)
    except OSError as e:
        raise UsageError(f"--output {out}: {type(e).__name__}: {e}") from None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with Workers(args.processes) as workers:
        return _convert(args, workers)


def _convert(args: argparse.Namespace, workers: Workers) -> int:
    try:
        ds, rows, base_dir = load_dataset(args)
        out = output_dir(args)
        work = work_dir(args, out)
        fp = fingerprint(args, rows)
        size = open_output(out, work, fp, len(rows), args)
    except (TableError, UsageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    if size is None:
        print(f"{out} already holds this conversion, finished; nothing to do", file=sys.stderr)
        return 0
    tasks = make_tasks(rows, size, args, work, base_dir)
    try:
        packer = Packer(out, work, args.samples_per_shard, args.dedupe in ("content", "both"))
        run(tasks, work, packer, args, workers)
        write_sidecars(out, ds, args)
        manifest = finish(out, work, packer, args, fp, len(rows))
    except (WorkFilesMissing, DamagedOutput) as e:
        print(f"error: {e}; re-run with --overwrite to start over", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted: re-run the same command to resume", file=sys.stderr)
        return 130
    except OSError as e:  # the store failed mid-run: what was committed stays valid
        print(f"error: {type(e).__name__}: {e}; re-run the same command to resume", file=sys.stderr)
        return 1
    s = manifest["status"]
    print(
        f"wrote {manifest['samples']} samples in {len(manifest['shards'])} shards to {out} "
        f"({len(rows)} rows: {s['failed']} failed, {s['filtered']} filtered, "
        f"{s['duplicate']} duplicate, {s['opt-out']} opt-out)",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
