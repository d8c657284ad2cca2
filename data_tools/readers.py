"""Every dump format -> uniform rows (key, image source, caption(s), label, extra columns).

Used by ``python -m data_tools.convert``; try an input on its own with
``python -m data_tools.readers INPUT [FORMAT]`` (prints the row count and the first rows).

Tables (csv, tsv, parquet, jsonl, json; each may be gzipped, bz2'd, xz'd or zstd'd) are read here;
the dumps that are not one table (COCO captions, Flickr token files, image folders, tars and
existing shards) live in ``data_tools.layouts``. ``load`` dispatches on ``--input-format`` (or
guesses it) and returns a ``Dataset`` (``data_tools.rows`` holds it, ``Row`` and ``ReadOptions``);
everything after it is format-blind. Inputs are read whole into memory: fine for the slices a
Slurm array task handles, and for tables of tens of millions of rows on one machine.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from data_tools import layouts
from data_tools.rows import (
    ColumnSpec,
    Dataset,
    ReadOptions,
    Row,
    TableError,
    as_text,
    load_json,
    make_row,
    open_text,
    table_dir,
)

COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst")
TABLE_FORMATS = ("csv", "tsv", "parquet", "jsonl", "json")
LAYOUT_FORMATS = ("coco", "flickr", "folder", "tar", "webdataset")
FORMATS = TABLE_FORMATS + LAYOUT_FORMATS


@dataclass(frozen=True)
class Table:
    columns: list[str]  # every column seen, in first-seen order
    records: list[dict[str, Any]]


def _looks_like_source(value: str) -> bool:
    value = value.strip().lower()
    return "://" in value or value.endswith((".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp"))


def _header(first: list[str], opts: ReadOptions, path: str) -> tuple[list[str], bool]:
    """Column names and whether ``first`` was the header line."""
    if opts.column_names:
        if len(opts.column_names) != len(first):
            raise TableError(
                f"{path}: --columns names {len(opts.column_names)} columns, the first row has "
                f"{len(first)}"
            )
        return list(opts.column_names), opts.header == "yes"
    has_header = opts.header == "yes" or (
        opts.header == "auto" and not any(_looks_like_source(v) for v in first)
    )
    if not has_header:
        return [str(i) for i in range(len(first))], False
    if len(set(first)) != len(first):
        raise TableError(f"{path}: duplicate column names in header {first}")
    return first, True


def _read_delimited(path: str, opts: ReadOptions, delimiter: str) -> Table:
    records: list[dict[str, Any]] = []
    kind = "TSV" if delimiter == "\t" else "CSV"
    try:
        with open_text(path) as f:
            reader = csv.reader(f, delimiter=delimiter)
            first = next(reader, None)
            if not first:
                raise TableError(f"{path}: empty {kind}")
            header, skip = _header(first, opts, path)
            lines = reader if skip else _chain(first, reader)
            for values in lines:
                if not values:
                    continue
                if len(values) != len(header):
                    raise TableError(
                        f"{path} line {reader.line_num}: {len(values)} fields, expected "
                        f"{len(header)} ({', '.join(header)})"
                    )
                records.append(dict(zip(header, values, strict=True)))
    except csv.Error as e:
        raise TableError(f"{path}: malformed {kind}: {e}") from e
    except OSError as e:
        raise TableError(f"cannot read table {path}: {e}") from e
    return Table(columns=list(header), records=records)


def _chain(first: list[str], rest: Any):
    yield first
    yield from rest


def read_csv(path: str, opts: ReadOptions) -> Table:
    """Comma-separated; header line detected (see --header) or named with --columns."""
    return _read_delimited(path, opts, ",")


def read_tsv(path: str, opts: ReadOptions) -> Table:
    """Tab-separated, e.g. Conceptual Captions' headerless ``caption<TAB>url``."""
    return _read_delimited(path, opts, "\t")


def read_jsonl(path: str, opts: ReadOptions) -> Table:
    """One JSON object per line; columns are the union of keys in first-seen order."""
    records: list[dict[str, Any]] = []
    columns: dict[str, None] = {}  # ordered set
    try:
        with open_text(path) as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise TableError(f"{path} line {line_no}: invalid JSON: {e}") from e
                if not isinstance(record, dict):
                    raise TableError(f"{path} line {line_no}: expected a JSON object")
                columns.update(dict.fromkeys(record))
                records.append(record)
    except OSError as e:
        raise TableError(f"cannot read table {path}: {e}") from e
    return Table(columns=list(columns), records=records)


def is_coco(obj: Any) -> bool:
    return isinstance(obj, dict) and "images" in obj and "annotations" in obj


def table_from_json(obj: Any, path: str) -> Table:
    """A list of records, or pandas' column orientation ``{"col": {"0": v, ...}}``."""
    if isinstance(obj, dict) and obj and all(isinstance(v, dict) for v in obj.values()):
        index = list(next(iter(obj.values())))
        obj = [{col: values.get(i) for col, values in obj.items()} for i in index]
    if not isinstance(obj, list) or not all(isinstance(r, dict) for r in obj):
        raise TableError(f"{path}: expected a JSON list of objects (or COCO captions JSON)")
    columns: dict[str, None] = {}
    for record in obj:
        columns.update(dict.fromkeys(record))
    return Table(columns=list(columns), records=obj)


def read_json(path: str, opts: ReadOptions) -> Table:
    """A JSON array of objects (``df.to_json(orient="records")``) or pandas' column layout."""
    return table_from_json(load_json(path), path)


def read_parquet(path: str, opts: ReadOptions) -> Table:
    import fsspec
    import pyarrow.parquet as pq  # only parquet inputs pay for the import

    try:
        with fsspec.open(path, "rb", compression="infer") as f:
            # Compressed files are not seekable; parquet needs its footer first.
            data = f.read() if path.lower().endswith(COMPRESSION_SUFFIXES) else None
            # ParquetFile.read: pq.read_table would import pandas to parse pandas' metadata.
            table = pq.ParquetFile(io.BytesIO(data) if data is not None else f).read()
    except OSError as e:
        raise TableError(f"cannot read parquet {path}: {e}") from e
    # pandas' saved index is an artefact of how the file was written, not a column of the data.
    columns = [c for c in table.column_names if not c.startswith("__index_level_")]
    return Table(columns=columns, records=table.select(columns).to_pylist())


TABLE_READERS: dict[str, Callable[[str, ReadOptions], Table]] = {
    "csv": read_csv,
    "tsv": read_tsv,
    "parquet": read_parquet,
    "jsonl": read_jsonl,
    "json": read_json,
}


def _strip_compression(name: str) -> str:
    for suffix in COMPRESSION_SUFFIXES:
        name = name.removesuffix(suffix)
    return name


def detect_format(path: str) -> str:
    """Format name from the path: a folder, tar, token file, or a table's extension."""
    name = _strip_compression(path.lower().rstrip("/"))
    if "://" not in path and os.path.isdir(path):
        return "webdataset" if layouts.is_shard_folder(path) else "folder"
    if name.endswith((".tar", ".tgz")) or any(c in path for c in "*{"):
        return "webdataset"
    if name.endswith(".token.txt"):
        return "flickr"
    ext = name.rsplit(".", 1)[-1] if "." in name else ""
    if ext not in TABLE_READERS:
        raise TableError(
            f"cannot tell the format of {path} from its name; pass --input-format "
            f"({', '.join(FORMATS)})"
        )
    return ext


def read_table(path: str, fmt: str = "auto", opts: ReadOptions | None = None) -> Table:
    """Read a whole table with the reader registered for ``fmt`` ("auto": from the extension)."""
    opts = opts or ReadOptions()
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt not in TABLE_READERS:
        raise TableError(f"{fmt!r} is not a table format; tables: {', '.join(TABLE_READERS)}")
    return TABLE_READERS[fmt](path, opts)


def check_columns(table: Table, spec: ColumnSpec) -> None:
    """Fail before any work when a requested column is absent, naming all of them at once."""
    wanted = {"--url-col": spec.url, "--caption-col": spec.caption}
    if spec.cls is not None:
        wanted["--cls-col"] = spec.cls
    wanted.update({f"--extra-cols[{i}]": col for i, col in enumerate(spec.extra)})
    missing = [f"{col!r} ({flag})" for flag, col in wanted.items() if col not in table.columns]
    if missing:
        hint = ""
        if all(c.isdigit() for c in table.columns):
            hint = " (no header line: name them with --columns, e.g. --columns caption,url)"
        raise TableError(
            f"column {', '.join(missing)} not in table; its columns are: "
            f"{', '.join(table.columns)}{hint}"
        )
    reserved = {"key", "source", "caption", "captions"} & set(spec.extra)
    if reserved:
        raise TableError(f"--extra-cols may not use reserved names: {', '.join(sorted(reserved))}")


def to_rows(table: Table, spec: ColumnSpec) -> list[Row]:
    """Uniform rows, keyed by row index so keys are stable across runs and process counts."""
    check_columns(table, spec)
    return [
        make_row(
            i,
            as_text(rec.get(spec.url)),
            rec.get(spec.caption),
            label=rec.get(spec.cls) if spec.cls else None,
            extra={col: rec.get(col) for col in spec.extra},
        )
        for i, rec in enumerate(table.records)
    ]


def load(path: str, opts: ReadOptions) -> Dataset:
    """Any supported input -> rows; raises TableError before any image is touched."""
    fmt = opts.input_format if opts.input_format != "auto" else detect_format(path)
    if fmt not in FORMATS:
        raise TableError(f"unknown input format {fmt!r}; known: {', '.join(FORMATS)}")
    if fmt == "json" and opts.input_format == "auto":
        obj = load_json(path)  # COCO captions are .json too: tell them apart by content
        if is_coco(obj):
            return layouts.coco_dataset(path, obj)
        return Dataset(to_rows(table_from_json(obj, path), opts.columns), table_dir(path))
    if fmt in LAYOUT_FORMATS:
        return layouts.LOADERS[fmt](path, opts)
    return Dataset(to_rows(read_table(path, fmt, opts), opts.columns), table_dir(path))


def select_slice(rows: list[Row], index: int, count: int) -> list[Row]:
    """Rows of Slurm slice ``index`` of ``count``: contiguous, sizes differ by at most one."""
    n = len(rows)
    return rows[index * n // count : (index + 1) * n // count]


if __name__ == "__main__":
    ds = load(sys.argv[1], ReadOptions(input_format=sys.argv[2] if len(sys.argv) > 2 else "auto"))
    print(f"{len(ds.rows)} rows, images relative to {ds.base_dir}")
    for row in ds.rows[:3]:
        print(row)
