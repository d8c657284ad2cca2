"""What every reader hands on: the row and dataset records, read options, and their helpers.

``data_tools.readers`` (tables) and ``data_tools.layouts`` (COCO, Flickr, folders, tars) both
build ``Row``s with ``make_row`` and raise ``TableError``; everything after ``readers.load``
(convert, chunks) sees only these records. This module imports no other data_tools module, so the
arrows run one way: rows <- layouts <- readers, and rows <- readers. Nothing here runs on its
own; try an input with ``python -m data_tools.readers INPUT [FORMAT]``.
"""

from __future__ import annotations

import json
import os
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any

KEY_DIGITS = 9  # 1e9 rows per input; keys are zero-padded so they sort like row indices
# Bytes that were not UTF-8 arrive as lone surrogates (errors="surrogateescape", or "\udXXX" in
# JSON); they cannot be written as UTF-8 and are dropped from captions.
_SURROGATES = re.compile("[\ud800-\udfff]")
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


class TableError(ValueError):
    """The input can't be read or lacks a requested column (reported as one line, exit 2)."""


@dataclass(frozen=True)
class ColumnSpec:
    """Which table columns feed which sample fields (img2dataset's option names)."""

    url: str = "url"
    caption: str = "caption"
    cls: str | None = None
    extra: tuple[str, ...] = ()


@dataclass(frozen=True)
class ReadOptions:
    """How to read the input; every field has a command-line flag of the same name."""

    input_format: str = "auto"
    columns: ColumnSpec = field(default_factory=ColumnSpec)
    header: str = "auto"  # csv/tsv: "yes", "no" or "auto" (no header when row 1 holds a URL)
    column_names: tuple[str, ...] = ()  # names for a headerless csv/tsv
    caption_template: str | None = None  # folder mode: class sub-folders -> captions


@dataclass(frozen=True)
class Row:
    index: int
    key: str
    source: str  # as written in the input; fetch.resolve_source makes it openable
    caption: str
    captions: tuple[str, ...] | None = None  # all captions of the image (COCO, Flickr)
    label: Any = None  # raw class value, validated when the sample is built
    extra: dict[str, Any] = field(default_factory=dict)
    member: tuple[int, int] | None = None  # (offset, size) of the image inside the tar `source`
    data: bytes | None = None  # image bytes already in memory (members of compressed tars)
    note: str | None = None  # what cleaning changed, for the row report


@dataclass(frozen=True)
class Dataset:
    rows: list[Row]
    base_dir: str  # relative image names are taken against it unless --images is given
    classnames: list[str] | None = None  # folder mode with class sub-folders


def clean_caption(text: str) -> tuple[str, str | None]:
    """NFC text on one line with single spaces; invalid UTF-8 and control characters dropped."""
    note = None
    if _SURROGATES.search(text):
        text = _SURROGATES.sub("", text)
        note = "caption: invalid UTF-8 dropped"
    text = unicodedata.normalize("NFC", _CONTROL.sub(" ", text))
    return " ".join(text.split()), note


def as_text(value: Any) -> str:
    """A cell as a string; a missing cell (None) is the empty string, not "None"."""
    return "" if value is None else str(value)


def make_row(index: int, source: str, caption: Any, **fields: Any) -> Row:
    """A row with a cleaned caption (and captions), keyed by its index."""
    clean, note = clean_caption(as_text(caption))
    captions = fields.pop("captions", None)
    if captions is not None:
        cleaned = [clean_caption(as_text(c)) for c in captions]
        captions = tuple(c for c, _ in cleaned)
        note = note or next((n for _, n in cleaned if n), None)
    key = f"{index:0{KEY_DIGITS}d}"
    return Row(index, key, source.strip(), clean, captions=captions, note=note, **fields)


def open_text(path: str):
    import fsspec  # workers import this module for its types only: keep their start-up light

    # newline="" lets the csv module handle quoted newlines; surrogateescape keeps a row with
    # invalid UTF-8 readable so only its caption is repaired, not the whole table lost.
    return fsspec.open(
        path, "rt", compression="infer", encoding="utf-8", errors="surrogateescape", newline=""
    )


def load_json(path: str) -> Any:
    try:
        with open_text(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise TableError(f"{path}: invalid JSON: {e}") from e
    except OSError as e:
        raise TableError(f"cannot read {path}: {e}") from e


def table_dir(path: str) -> str:
    """The folder an input file sits in: relative image names in it are taken against it."""
    if "://" in path:
        return path.rsplit("/", 1)[0]
    return os.path.dirname(os.path.abspath(path))
