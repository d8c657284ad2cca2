"""Every dump format -> uniform rows (key, image source, caption, label, extra columns).

Used by ``python -m data_tools.convert``; try a table on its own with
``python -m data_tools.readers TABLE [FORMAT]`` (prints the columns and the first rows).

A reader maps a path or fsspec URL to a ``Table`` (column names + one dict per row). To add a
format, write ``read_<fmt>(path) -> Table`` and register it in ``READERS``; everything after
``to_rows`` is format-blind. Tables are read whole into memory: fine for the slices a Slurm array
task handles, to be replaced by streaming readers for single huge files.
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import fsspec

KEY_DIGITS = 9  # 1e9 rows per table; keys are zero-padded so they sort like row indices
COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst")


class TableError(ValueError):
    """The table can't be read or lacks a requested column (reported as one line, exit 2)."""


@dataclass(frozen=True)
class Table:
    columns: list[str]  # every column seen, in first-seen order
    records: list[dict[str, Any]]


@dataclass(frozen=True)
class ColumnSpec:
    """Which table columns feed which sample fields (img2dataset's option names)."""

    url: str = "url"
    caption: str = "caption"
    cls: str | None = None
    extra: tuple[str, ...] = ()


@dataclass(frozen=True)
class Row:
    index: int
    key: str
    source: str  # as written in the table; fetch.resolve_source makes it openable
    caption: str
    label: Any = None  # raw --cls-col value, validated when the sample is built
    extra: dict[str, Any] = field(default_factory=dict)


def _open_text(path: str):
    # newline="" lets the csv module handle quoted newlines itself.
    return fsspec.open(path, "rt", compression="infer", encoding="utf-8", newline="")


def read_csv(path: str) -> Table:
    """Comma-separated table with a header line."""
    records: list[dict[str, Any]] = []
    try:
        with _open_text(path) as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if not header:
                raise TableError(f"{path}: empty CSV, expected a header line")
            if len(set(header)) != len(header):
                raise TableError(f"{path}: duplicate column names in header {header}")
            for values in reader:
                if not values:
                    continue
                if len(values) != len(header):
                    raise TableError(
                        f"{path} line {reader.line_num}: {len(values)} fields, header has "
                        f"{len(header)}"
                    )
                records.append(dict(zip(header, values, strict=True)))
    except (csv.Error, UnicodeDecodeError) as e:
        raise TableError(f"{path}: malformed CSV: {e}") from e
    except OSError as e:
        raise TableError(f"cannot read table {path}: {e}") from e
    return Table(columns=list(header), records=records)


def read_jsonl(path: str) -> Table:
    """One JSON object per line; columns are the union of keys in first-seen order."""
    records: list[dict[str, Any]] = []
    columns: dict[str, None] = {}  # ordered set
    try:
        with _open_text(path) as f:
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
    except UnicodeDecodeError as e:
        raise TableError(f"{path}: not UTF-8: {e}") from e
    except OSError as e:
        raise TableError(f"cannot read table {path}: {e}") from e
    return Table(columns=list(columns), records=records)


READERS: dict[str, Callable[[str], Table]] = {"csv": read_csv, "jsonl": read_jsonl}


def detect_format(path: str) -> str:
    """Format name from the extension, ignoring a compression suffix (``x.csv.gz`` -> csv)."""
    name = path.lower()
    for suffix in COMPRESSION_SUFFIXES:
        name = name.removesuffix(suffix)
    ext = name.rsplit(".", 1)[-1] if "." in name else ""
    if ext not in READERS:
        raise TableError(
            f"cannot tell the format of {path} from its extension; pass --input-format "
            f"({', '.join(READERS)})"
        )
    return ext


def read_table(path: str, fmt: str = "auto") -> Table:
    """Read a whole table with the reader registered for ``fmt`` ("auto": from the extension)."""
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt not in READERS:
        raise TableError(f"unknown input format {fmt!r}; known: {', '.join(READERS)}")
    return READERS[fmt](path)


def check_columns(table: Table, spec: ColumnSpec) -> None:
    """Fail before any work when a requested column is absent, naming all of them at once."""
    wanted = {"--url-col": spec.url, "--caption-col": spec.caption}
    if spec.cls is not None:
        wanted["--cls-col"] = spec.cls
    wanted.update({f"--extra-cols[{i}]": col for i, col in enumerate(spec.extra)})
    missing = [f"{col!r} ({flag})" for flag, col in wanted.items() if col not in table.columns]
    if missing:
        raise TableError(
            f"column {', '.join(missing)} not in table; its columns are: {', '.join(table.columns)}"
        )
    reserved = {"key", "source", "caption"} & set(spec.extra)
    if reserved:
        raise TableError(f"--extra-cols may not use reserved names: {', '.join(sorted(reserved))}")


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def to_rows(table: Table, spec: ColumnSpec) -> list[Row]:
    """Uniform rows, keyed by row index so keys are stable across runs and process counts."""
    check_columns(table, spec)
    return [
        Row(
            index=i,
            key=f"{i:0{KEY_DIGITS}d}",
            source=_text(rec.get(spec.url)).strip(),
            caption=_text(rec.get(spec.caption)),
            label=rec.get(spec.cls) if spec.cls else None,
            extra={col: rec.get(col) for col in spec.extra},
        )
        for i, rec in enumerate(table.records)
    ]


if __name__ == "__main__":
    table = read_table(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "auto")
    print(f"{len(table.records)} rows, columns: {table.columns}")
    for record in table.records[:3]:
        print(record)
