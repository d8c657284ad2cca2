"""One static HTML page about a shard set: counts, failures, histograms, scores, contact sheet.

    python -m data_tools.report shards/ -o report.html
    python -m data_tools.report 's3://bucket/ds/{00000..00099}.tar' -o report.html --samples 96
    python -m data_tools.report img2dataset_out/ other/ -o report.html --max-shards 0

The page is one file that opens from disk: inline CSS, inline SVG charts, thumbnails as data:
URIs, no script, and a Content-Security-Policy that forbids loading anything from anywhere.

SHARDS are whatever the trainer accepts (``clipforge.data.shards.resolve``): a folder with
manifest.json, a manifest, a folder of tars (img2dataset's output), a brace pattern, a .txt list,
several of them (as arguments or joined with ``::``); local or any fsspec URL.

Where the numbers come from, and why:
  - Counts, success rate and failure reasons come from the small files beside each tar, for
    every shard: ``NNNNN.parquet`` (one row per input row: our converter's ``status``/``error``,
    img2dataset's ``status``/``error_message``), else ``NNNNN_stats.json``. A numeric ``score``
    column, or data_tools.filter's ``NNNNN_scores.parquet`` beside the shard (its --output or
    --reports, or beside the source shards), adds a score histogram; without one there is none.
  - Caption lengths, image sizes and the contact sheet need the tars themselves, which can be
    terabytes: they are read from at most ``--max-shards`` shards, evenly spaced (0: all), and the
    page says how many. Sheet samples are the ``--samples`` with the smallest
    sha256(seed, shard, key): the same page for the same shards, whatever the reading order.
Bad input (no such source, no shards, unwritable output) is one ``error:`` line and exit code 2,
and nothing is written; a shard that breaks mid-way is listed under "Problems" on the page.
"""

from __future__ import annotations

import argparse
import base64
import bisect
import hashlib
import heapq
import html
import io
import json
import math
import os
import posixpath
import statistics
import sys
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import fsspec
from PIL import Image, ImageOps

from clipforge import cli
from clipforge.data.shards import SourceError, resolve
from clipforge.data.tario import IMAGE_EXTS, ShardReadError, iter_samples
from data_tools import shards
from data_tools.convert import positive_int
from data_tools.packer import STATUSES, category

EXIT_USAGE = 2
MAX_REASON_COLUMNS = 12  # per-shard table: the most frequent reasons, the rest as "other"
# img2dataset's row statuses -> ours.
_IMG2DATASET_STATUS = {
    "success": "ok",
    "failed_to_download": "failed",
    "failed_to_resize": "failed",
}


class UsageError(ValueError):
    """Reported as one ``error:`` line with exit code 2; nothing is written."""


# ---------------------------------------------------------------- what the small files say


@dataclass
class Shard:
    """One shard's numbers; ``url`` is None for a report whose shard got no sample."""

    stem: str  # URL without .tar: STEM.parquet and STEM_stats.json sit beside it
    url: str | None
    samples: int | None = None
    name: str = ""  # on the page: relative to the folder all shards of the page share
    status: Counter[str] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)
    scores: dict[str, float] = field(default_factory=dict)  # key -> score
    counted: bool = False  # status/reasons known (from a report or stats file)
    read: bool = False  # its tar was read for histograms and the sheet
    missing: bool = False  # a named tar that does not exist (a brace pattern's typo)
    problems: list[str] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return sum(self.status.values())


@dataclass
class Source:
    """One SHARDS argument: its shards, and its manifest when it has one."""

    text: str
    shards: list[Shard]
    manifest: dict[str, Any] | None = None


def _stem(url: str) -> str:
    for suffix in (".tar.gz", ".tgz", ".tar"):
        if url.endswith(suffix):
            return url[: -len(suffix)]
    return url


def _read_bytes(url: str) -> bytes | None:
    try:
        with fsspec.open(url, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def _score(value: Any) -> float | None:
    # The filter may write scores as numbers or, like the other report columns, as text.
    try:
        score = float(value)
    except (TypeError, ValueError):
        return None
    return score if math.isfinite(score) else None


def _count_report(shard: Shard, data: bytes) -> None:
    import pyarrow.parquet as pq  # only when a report exists: keeps --help fast

    table = pq.read_table(io.BytesIO(data))
    cols = set(table.column_names)
    if "status" not in cols:
        raise ValueError("no status column")
    n = table.num_rows
    statuses = table.column("status").to_pylist()
    err_col = "error" if "error" in cols else "error_message" if "error_message" in cols else None
    errors = table.column(err_col).to_pylist() if err_col else [None] * n
    keys = table.column("key").to_pylist() if "key" in cols else [None] * n
    scores = table.column("score").to_pylist() if "score" in cols else [None] * n
    for status, error, key, score in zip(statuses, errors, keys, scores, strict=True):
        status = _IMG2DATASET_STATUS.get(status, status)
        shard.status[status] += 1
        if status != "ok":
            shard.reasons[category(error) if error else status] += 1
        value = _score(score)
        if value is not None:
            shard.scores[str(key)] = value


def _read_scores(data: bytes) -> dict[str, float]:
    """key -> score of data_tools.filter's STEM_scores.parquet (null where a sample failed)."""
    import pyarrow.parquet as pq

    table = pq.read_table(io.BytesIO(data), columns=["key", "score"])
    pairs = zip(table.column("key").to_pylist(), table.column("score").to_pylist(), strict=True)
    return {str(k): v for k, s in pairs if (v := _score(s)) is not None}


def _count_stats(shard: Shard, stats: dict[str, Any]) -> None:
    if "status_dict" in stats:  # img2dataset: {"success": n, "<error message>": n, ...}
        for message, n in stats["status_dict"].items():
            if message == "success":
                shard.status["ok"] += n
            else:
                shard.status["failed"] += n
                shard.reasons[category(message)] += n
        return
    for status in STATUSES:
        if stats.get(status):
            shard.status[status] += int(stats[status])
    shard.reasons.update({k: int(v) for k, v in stats.get("failure_reasons", {}).items()})


def read_side_files(shard: Shard) -> Shard:
    """Fill a shard's counts from STEM.parquet, else STEM_stats.json (both optional)."""
    stem = shard.stem
    if stem.startswith("pipe:"):
        return shard
    if shard.url is not None:
        fs, path = fsspec.core.url_to_fs(shard.url)
        shard.missing = not fs.exists(path)
    try:
        stats_bytes = _read_bytes(stem + "_stats.json")
        stats = json.loads(stats_bytes) if stats_bytes is not None else None
        if stats is not None and shard.samples is None:
            shard.samples = next(
                (stats[k] for k in ("samples", "successes") if isinstance(stats.get(k), int)), None
            )
        report = _read_bytes(stem + ".parquet")
        if report is not None:
            _count_report(shard, report)
            shard.counted = True
        elif stats is not None:
            _count_stats(shard, stats)
            shard.counted = True
        scored = _read_bytes(
            stem + shards.SCORES_SUFFIX
        )  # data_tools.filter's scores, when filtered
        if scored is not None:
            shard.scores = _read_scores(scored)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        shard.status, shard.reasons, shard.scores = Counter(), Counter(), {}
        shard.counted = False
        shard.problems.append(f"{shard.name}: unreadable report: {type(e).__name__}: {e}")
    return shard


def _manifest_of(part: str) -> tuple[dict[str, Any], str] | None:
    """(manifest, its folder URL) when ``part`` names a whole converted set, else None."""
    if any(c in part for c in "{}") or part.startswith("pipe:"):
        return None
    fs, path = fsspec.core.url_to_fs(part)
    if path.endswith(".json"):
        manifest_path = path
    elif fs.isdir(path) and fs.exists(posixpath.join(path, shards.MANIFEST_NAME)):
        manifest_path = posixpath.join(path, shards.MANIFEST_NAME)
    else:
        return None
    with fs.open(manifest_path, "rt", encoding="utf-8") as f:
        manifest = json.load(f)
    # As resolve() names the shards: fsspec's path, with the protocol put back where stripped.
    prefix = part.split("://")[0] + "://" if "://" in part and "://" not in path else ""
    return manifest, prefix + posixpath.dirname(manifest_path)


def _display_names(urls: list[str]) -> list[str]:
    """Shard URLs without the folder they all share (``part-00001/00000.tar`` stays whole)."""
    if len(urls) < 2:
        return [posixpath.basename(u) for u in urls]
    split = [u.split("/") for u in urls]
    common = 0
    while all(len(s) > common + 1 and s[common] == split[0][common] for s in split):
        common += 1
    return ["/".join(s[common:]) for s in split]


def locate(part: str) -> Source:
    """The shards one source names, with the manifest's report-only entries (shards that got
    no sample, e.g. a conversion where every row failed). Names are set by ``collect``."""
    try:
        sset = resolve(part)
        found = _manifest_of(part)
    except SourceError as e:
        raise UsageError(str(e)) from None
    except (OSError, ValueError) as e:
        raise UsageError(f"{part}: {type(e).__name__}: {e}") from None
    manifest, folder = found if found else (None, None)
    out = [Shard(_stem(u), u, c) for u, c in zip(sset.urls, sset.counts, strict=True)]
    if manifest is not None and folder is not None:
        stems = {shard.stem for shard in out}
        for report in manifest.get("reports", []):
            # convert lists NNNNN.parquet, data_tools.filter NNNNN_scores.parquet
            stem = _stem(f"{folder}/{report}").removesuffix(shards.SCORES_SUFFIX)
            stem = stem.removesuffix(".parquet")
            if stem not in stems:
                out.append(Shard(stem, None, 0))
    if not out:
        raise UsageError(f"{part}: no shards")
    return Source(part, out, manifest)


def collect(texts: Sequence[str], threads: int) -> list[Source]:
    """Every source's shards with their counts (the small files only)."""
    sources, seen = [], set()
    for text in texts:
        for part in (p for p in text.split("::") if p.strip()):
            source = locate(part)
            # A shard named twice (overlapping sources) is counted once.
            source.shards = [s for s in source.shards if s.stem not in seen]
            seen.update(s.stem for s in source.shards)
            sources.append(source)
    all_shards = [s for src in sources for s in src.shards]
    # Names relative to what all shards share: unique across sources, short on the page.
    names = _display_names([s.url or s.stem + ".tar" for s in all_shards])
    for shard, name in zip(all_shards, names, strict=True):
        shard.name = name
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(read_side_files, all_shards))
    missing = [s.url for s in all_shards if s.missing]
    if missing:
        n = len(all_shards)
        raise UsageError(f"{len(missing)} of {n} shards do not exist, e.g. {missing[0]}")
    return sources


# ------------------------------------------------------------------ what the tars hold


@dataclass
class Candidate:
    """A contact-sheet sample; ``rank`` orders the draw."""

    rank: bytes
    shard: str
    key: str
    caption: str | None
    size: tuple[int, int] | None
    image: bytes | None

    def __lt__(self, other: Candidate) -> bool:  # heapq keeps the smallest ranks
        return self.rank > other.rank


@dataclass
class Scan:
    caption_lengths: list[int] = field(default_factory=list)
    no_caption: int = 0
    sizes: list[tuple[int, int]] = field(default_factory=list)  # stored width, height
    originals: list[tuple[int, int]] = field(default_factory=list)  # source width, height
    samples: int = 0
    chosen: list[Candidate] = field(default_factory=list)


def _image_member(sample: dict[str, Any]) -> str | None:
    return next((e for e in IMAGE_EXTS if e in sample), None)


def _sizes(sample: dict[str, Any], ext: str | None) -> tuple[Any, Any]:
    meta: dict[str, Any] = {}
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
        except ValueError:
            meta = {}
    stored = _pair(meta, "width", "height")
    if stored is None and ext is not None:
        try:  # the header is enough for the size: no full decode
            stored = Image.open(io.BytesIO(sample[ext])).size
        except Exception:  # noqa: BLE001 - an undecodable image just has no size
            stored = None
    return stored, _pair(meta, "original_width", "original_height")


def _pair(meta: dict[str, Any], a: str, b: str) -> tuple[int, int] | None:
    if isinstance(meta, dict) and isinstance(meta.get(a), int) and isinstance(meta.get(b), int):
        return meta[a], meta[b]
    return None


def scan_shard(shard: Shard, n_samples: int, seed: int) -> Scan:
    """Caption lengths, sizes and this shard's best ``n_samples`` sheet candidates."""
    scan = Scan()
    heap: list[Candidate] = []
    try:
        for sample in iter_samples(shard.url):  # type: ignore[arg-type]
            scan.samples += 1
            caption = None
            if "txt" in sample:
                caption = sample["txt"].decode("utf-8", "replace")
                scan.caption_lengths.append(len(caption))
            else:
                scan.no_caption += 1
            ext = _image_member(sample)
            stored, original = _sizes(sample, ext)
            if stored is not None:
                scan.sizes.append(stored)
            if original is not None:
                scan.originals.append(original)
            if n_samples and ext is not None:
                key = sample["__key__"]
                rank = hashlib.sha256(f"{seed}\0{shard.name}\0{key}".encode()).digest()
                item = Candidate(rank, shard.name, key, caption, stored, sample[ext])
                if len(heap) < n_samples:
                    heapq.heappush(heap, item)
                elif rank < heap[0].rank:
                    heapq.heapreplace(heap, item)
    except ShardReadError as e:
        shard.problems.append(str(e))
    shard.read = True
    if shard.samples is None:
        shard.samples = scan.samples
    scan.chosen = heap
    return scan


def pick_shards(all_shards: list[Shard], max_shards: int) -> list[Shard]:
    """At most ``max_shards`` shards with a tar, evenly spaced over the set (0: all)."""
    readable = [s for s in all_shards if s.url is not None]
    if not max_shards or len(readable) <= max_shards:
        return readable
    step = len(readable) / max_shards
    return [readable[int(i * step)] for i in range(max_shards)]


def scan_all(picked: list[Shard], n_samples: int, seed: int, threads: int) -> Scan:
    total = Scan()
    chosen: list[Candidate] = []
    with ThreadPoolExecutor(threads) as pool:
        for part in pool.map(lambda s: scan_shard(s, n_samples, seed), picked):
            total.samples += part.samples
            total.no_caption += part.no_caption
            total.caption_lengths += part.caption_lengths
            total.sizes += part.sizes
            total.originals += part.originals
            chosen += part.chosen
    total.chosen = sorted(chosen, key=lambda c: c.rank)[:n_samples]
    order = {s.name: i for i, s in enumerate(picked)}
    total.chosen.sort(key=lambda c: (order[c.shard], c.key))  # shown in shard order
    return total


def thumbnail(data: bytes, size: int) -> tuple[str | None, tuple[int, int] | None, str | None]:
    """(data: URI of a JPEG at most ``size`` px, its size, error)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data))
            img.draft("RGB", (size, size))  # JPEG: decode at 1/2, 1/4, 1/8 scale when it can
            img = ImageOps.exif_transpose(img)
            if img.mode != "RGB":
                img = img.convert("RGBA").convert("RGB") if "A" in img.mode else img.convert("RGB")
            img.thumbnail((size, size), Image.Resampling.LANCZOS)
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=85)
    except Exception as e:  # noqa: BLE001 - shown in its cell instead of the image
        return None, None, f"{type(e).__name__}: {e}"
    uri = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    return uri, img.size, None


# ------------------------------------------------------------------------ histograms


@dataclass
class Histogram:
    name: str  # id in the page
    title: str
    edges: list[float]  # len(counts) + 1; bin i is [edges[i], edges[i+1]), the last one closed
    counts: list[int]
    values: list[float]


def _nice_width(raw: float, integer: bool) -> float:
    if raw <= 0:
        return 1.0 if integer else 0.01
    magnitude = 10 ** math.floor(math.log10(raw))
    width = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    return float(max(1, math.ceil(width))) if integer else width


def histogram(
    name: str, title: str, values: Sequence[float], integer: bool, max_bins: int = 24
) -> Histogram | None:
    if not values:
        return None
    lo, hi = min(values), max(values)
    width = _nice_width((hi - lo) / max_bins, integer)
    start = math.floor(lo / width) * width
    n_bins = max(1, math.floor((hi - start) / width) + 1)
    # Rounded edges are both what the page shows and what the counting compares against.
    edges = [round(start + i * width, 9) for i in range(n_bins + 1)]
    counts = [0] * n_bins
    for v in values:
        counts[min(max(bisect.bisect_right(edges, v) - 1, 0), n_bins - 1)] += 1
    return Histogram(name, title, edges, counts, list(values))


def _fmt(x: float) -> str:
    return f"{x:,.0f}" if float(x).is_integer() else f"{x:,.4g}"


def render_histogram(h: Histogram) -> str:
    w, ht, pad_l, pad_b = 560, 180, 48, 34
    plot_w, plot_h = w - pad_l - 8, ht - pad_b - 10
    top = max(h.counts)
    bar_w = plot_w / len(h.counts)
    bars = []
    for i, count in enumerate(h.counts):
        lo, hi = h.edges[i], h.edges[i + 1]
        bh = plot_h * count / top if top else 0
        x, y = pad_l + i * bar_w, 10 + plot_h - bh
        bars.append(
            f'<rect class="bar" x="{x:.1f}" y="{y:.1f}" width="{max(bar_w - 1, 1):.1f}" '
            f'height="{bh:.1f}" data-lo="{lo!r}" data-hi="{hi!r}" data-count="{count}">'
            f"<title>[{_fmt(lo)}, {_fmt(hi)}): {count}</title></rect>"
        )
    base = 10 + plot_h
    labels = [
        f'<text x="{pad_l - 4}" y="16" text-anchor="end">{top:,}</text>',
        f'<text x="{pad_l - 4}" y="{base}" text-anchor="end">0</text>',
        f'<text x="{pad_l}" y="{base + 16}">{_fmt(h.edges[0])}</text>',
        f'<text x="{pad_l + plot_w}" y="{base + 16}" text-anchor="end">{_fmt(h.edges[-1])}</text>',
        f'<line x1="{pad_l}" y1="{base}" x2="{pad_l + plot_w}" y2="{base}" class="axis"/>',
    ]
    v = h.values
    stats = (
        f"n={len(v):,} &middot; min {_fmt(min(v))} &middot; median {_fmt(statistics.median(v))} "
        f"&middot; mean {_fmt(statistics.fmean(v))} &middot; max {_fmt(max(v))}"
    )
    return (
        f'<figure class="hist" id="hist-{h.name}"><figcaption>{html.escape(h.title)}'
        f'<span class="stats">{stats}</span></figcaption>'
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{ht}" role="img">'
        + "".join(bars + labels)
        + "</svg></figure>"
    )


# ------------------------------------------------------------------------------ page

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Liberation Sans",sans-serif;
 margin:24px;color:#1d2330;background:#fff}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #dde2ea}
.muted{color:#667085} code{font-size:12px}
table{border-collapse:collapse;font-variant-numeric:tabular-nums}
th,td{padding:3px 10px;border-bottom:1px solid #eef0f4;text-align:right;white-space:nowrap}
th:first-child,td:first-child{text-align:left} thead th{background:#f5f7fa;position:sticky;top:0}
td.zero{color:#c0c6d0} tr.total td{font-weight:600;border-top:2px solid #dde2ea}
.scroll{overflow-x:auto;max-height:520px;overflow-y:auto}
.cards{display:flex;flex-wrap:wrap;gap:10px}
.card{border:1px solid #dde2ea;border-radius:6px;padding:8px 14px;min-width:110px}
.card b{display:block;font-size:20px}
.hists{display:flex;flex-wrap:wrap;gap:16px} figure{margin:0}
.hist figcaption{font-weight:600} .hist .stats{display:block;font-weight:400;color:#667085;font-size:12px}
svg text{font-size:11px;fill:#667085} .bar{fill:#3b6fd8} .axis{stroke:#98a2b3}
.sheet{display:grid;grid-template-columns:repeat(auto-fill,minmax(180px,1fr));gap:14px}
.thumb{border:1px solid #eef0f4;border-radius:6px;padding:6px;background:#fafbfc}
.thumb .frame{height:var(--t);display:flex;align-items:center;justify-content:center}
.thumb img{display:block;max-width:none}
.thumb figcaption{font-size:12px;margin-top:4px;overflow-wrap:anywhere}
.thumb .meta{font-size:11px;color:#667085} .bad{color:#b42318}
"""


def _table(head: Sequence[str], rows: Iterable[Sequence[Any]], attrs: str = "") -> str:
    def cell(v: Any, tag: str) -> str:
        text = f"{v:,}" if isinstance(v, int) else html.escape(str(v))
        cls = ' class="zero"' if v == 0 and tag == "td" else ""
        return f"<{tag}{cls}>{text}</{tag}>"

    head_html = "".join(cell(h, "th") for h in head)
    body = []
    for row in rows:
        total = ' class="total"' if row and row[0] == "total" else ""
        body.append(f"<tr{total}>" + "".join(cell(v, "td") for v in row) + "</tr>")
    return (
        f"<table{attrs}><thead><tr>{head_html}</tr></thead><tbody>{''.join(body)}</tbody></table>"
    )


def _rate(ok: int, rows: int) -> str:
    return f"{100 * ok / rows:.1f} %" if rows else "n/a"


@dataclass
class Totals:
    samples: int
    rows: int
    status: Counter[str]
    reasons: Counter[str]
    uncounted: int  # shards with neither a report nor a stats file


def totals(all_shards: list[Shard]) -> Totals:
    status: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    for s in all_shards:
        status.update(s.status)
        reasons.update(s.reasons)
    samples = sum(s.samples or 0 for s in all_shards)
    uncounted = sum(not s.counted for s in all_shards)
    return Totals(samples, sum(status.values()), status, reasons, uncounted)


def render_counts(t: Totals, n_shards: int) -> str:
    cards = [("samples", t.samples), ("shards", n_shards)]
    if t.rows:
        cards += [("rows", t.rows)] + [(s, t.status.get(s, 0)) for s in STATUSES]
        cards += [(s, n) for s, n in sorted(t.status.items()) if s not in STATUSES]
    html_cards = "".join(
        f'<div class="card" data-field="{html.escape(k)}"><span class="muted">{html.escape(k)}</span>'
        f"<b>{v:,}</b></div>"
        for k, v in cards
    )
    rate = _rate(t.status.get("ok", 0), t.rows)
    html_cards += (
        f'<div class="card" data-field="success_rate"><span class="muted">success rate</span>'
        f"<b>{rate}</b></div>"
    )
    note = ""
    if t.uncounted:
        note = (
            f'<p class="muted">{t.uncounted} shard(s) have no report or stats file: their rows '
            "and failures are unknown; their samples are counted from the tars read.</p>"
        )
    return (
        f'<section id="counts"><h2>Counts</h2><div class="cards">{html_cards}</div>{note}</section>'
    )


def render_failures(all_shards: list[Shard], t: Totals) -> str:
    if not t.rows:
        return ""
    reasons = [r for r, _ in t.reasons.most_common()]
    shown, other = reasons[:MAX_REASON_COLUMNS], reasons[MAX_REASON_COLUMNS:]
    overall = _table(
        ["reason", "rows", "share of rows"],
        [(r, n, f"{100 * n / t.rows:.2f} %") for r, n in t.reasons.most_common()],
        ' id="reasons"',
    )
    head = ["shard", "samples", "rows", *STATUSES, "success rate", *shown]
    head += ["other"] if other else []
    rows = []
    for s in all_shards:
        row = [s.name, s.samples if s.samples is not None else "?"]
        if s.counted:
            row += [s.rows, *(s.status.get(k, 0) for k in STATUSES)]
            row += [_rate(s.status.get("ok", 0), s.rows), *(s.reasons.get(r, 0) for r in shown)]
            row += [sum(s.reasons.get(r, 0) for r in other)] if other else []
        else:
            row += ["?"] * (len(head) - 2)
        rows.append(row)
    total = ["total", t.samples, t.rows, *(t.status.get(k, 0) for k in STATUSES)]
    total += [_rate(t.status.get("ok", 0), t.rows), *(t.reasons.get(r, 0) for r in shown)]
    total += [sum(t.reasons.get(r, 0) for r in other)] if other else []
    per_shard = _table(head, [*rows, total], ' id="shards"')
    none = '<p class="muted">No failures.</p>' if not reasons else overall
    return (
        f'<section id="failures"><h2>Failures</h2>{none}'
        f'<h2>Per shard</h2><div class="scroll">{per_shard}</div></section>'
    )


def render_histograms(scan: Scan, picked: int, n_shards: int) -> str:
    widths = [w for w, _ in scan.originals] or [w for w, _ in scan.sizes]
    heights = [h for _, h in scan.originals] or [h for _, h in scan.sizes]
    which = "source image" if scan.originals else "image"
    hists = [
        histogram("caption-length", "caption length (characters)", scan.caption_lengths, True),
        histogram("image-width", f"{which} width (px)", widths, True),
        histogram("image-height", f"{which} height (px)", heights, True),
    ]
    if scan.originals and scan.sizes:
        stored = [min(w, h) for w, h in scan.sizes]
        hists.append(
            histogram("stored-short-side", "stored image, shorter side (px)", stored, True)
        )
    parts = [render_histogram(h) for h in hists if h is not None]
    note = f"From {scan.samples:,} samples in {picked} of {n_shards} shards"
    note += f" ({scan.no_caption:,} without a caption)." if scan.no_caption else "."
    body = "".join(parts) or '<p class="muted">No samples read.</p>'
    return (
        f'<section id="distributions"><h2>Captions and images</h2>'
        f'<p class="muted">{note}</p><div class="hists">{body}</div></section>'
    )


def render_scores(all_shards: list[Shard]) -> str:
    scores = [v for s in all_shards for v in s.scores.values()]
    h = histogram("score", "image-text score (cosine)", scores, False)
    if h is None:
        return ""
    return f'<section id="scores"><h2>Scores</h2><div class="hists">{render_histogram(h)}</div></section>'


def render_sheet(scan: Scan, all_shards: list[Shard], thumb: int) -> str:
    if not scan.chosen:
        return ""
    scores = {(s.name, k): v for s in all_shards for k, v in s.scores.items()}
    cells = []
    for c in scan.chosen:
        uri, size, error = thumbnail(c.image or b"", thumb)
        if uri is not None and size is not None:
            img = f'<img src="{uri}" width="{size[0]}" height="{size[1]}" alt="">'
        else:
            img = f'<span class="bad">undecodable image: {html.escape(str(error))}</span>'
        caption = (
            html.escape(c.caption) if c.caption is not None else '<i class="muted">no caption</i>'
        )
        meta = [html.escape(f"{c.shard} {c.key}")]
        if c.size:
            meta.append(f"{c.size[0]}&times;{c.size[1]}")
        score = scores.get((c.shard, c.key))
        if score is not None:
            meta.append(f"score {score:.3f}")
        cells.append(
            f'<figure class="thumb" data-key="{html.escape(c.key)}" data-shard="{html.escape(c.shard)}">'
            f'<div class="frame">{img}</div><figcaption>{caption}</figcaption>'
            f'<div class="meta">{" &middot; ".join(meta)}</div></figure>'
        )
    return (
        f'<section id="sheet"><h2>Contact sheet</h2><p class="muted">{len(cells)} samples, '
        f'drawn by hash of shard and key.</p><div class="sheet" style="--t:{thumb}px">'
        + "".join(cells)
        + "</div></section>"
    )


def render_meta(sources: list[Source]) -> str:
    items = []
    for src in sources:
        line = f"<li><code>{html.escape(src.text)}</code>: {len(src.shards)} shard(s)"
        m = src.manifest
        if m:
            args = m.get("args") or {}
            keys = ("input", "image_size", "resize_mode", "encode_format", "samples_per_shard")
            shown = ", ".join(f"{k}={args[k]}" for k in keys if k in args)
            line += html.escape(
                f"; {m.get('format', '?')} by clipforge {m.get('tool_version', '?')}"
            )
            line += f" <span class='muted'>({html.escape(shown)})</span>" if shown else ""
        items.append(line + "</li>")
    return f'<ul class="muted">{"".join(items)}</ul>'


def render_problems(all_shards: list[Shard]) -> str:
    problems = [p for s in all_shards for p in s.problems]
    if not problems:
        return ""
    items = "".join(f"<li>{html.escape(p)}</li>" for p in problems)
    return f'<section id="problems"><h2 class="bad">Problems</h2><ul>{items}</ul></section>'


def render(sources: list[Source], scan: Scan, picked: int, thumb: int, title: str) -> str:
    all_shards = [s for src in sources for s in src.shards]
    t = totals(all_shards)
    body = [
        f"<h1>{html.escape(title)}</h1>",
        render_meta(sources),
        render_counts(t, sum(s.url is not None for s in all_shards)),
        render_problems(all_shards),
        render_failures(all_shards, t),
        render_histograms(scan, picked, sum(s.url is not None for s in all_shards)),
        render_scores(all_shards),
        render_sheet(scan, all_shards, thumb),
    ]
    # Nothing may load from anywhere: images are data: URIs, styles inline, no script at all.
    csp = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{csp}">'
        f'<meta name="viewport" content="width=device-width">'
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>"
        + "\n".join(b for b in body if b)
        + "\n</body></html>\n"
    )


# ------------------------------------------------------------------------------- CLI


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(prog="python -m data_tools.report", description=__doc__.split("\n")[0])
    p.add_argument("shards", nargs="+", help="shard folder, manifest, brace pattern, .txt list")
    p.add_argument("-o", "--output", required=True, help="the HTML file to write (path or URL)")
    p.add_argument("--samples", type=_count, default=48, help="thumbnails on the contact sheet")
    p.add_argument("--seed", type=int, default=0, help="changes which samples the sheet shows")
    p.add_argument("--thumb-size", type=positive_int, default=160, help="thumbnail side (px)")
    p.add_argument("--max-shards", type=_count, default=16,
                   help="tars read for histograms and the sheet, evenly spaced; 0: all")  # fmt: skip
    p.add_argument("--threads", type=positive_int, default=8, help="shards read at once")
    p.add_argument("--title", default=None)
    return p


def check_output(output: str) -> None:
    """Fail before any reading when the page could not be written."""
    if "://" in output:
        try:
            fsspec.core.url_to_fs(output)
        except (ValueError, ImportError) as e:
            raise UsageError(f"-o {output}: {e}") from None
        return
    parent = os.path.dirname(os.path.abspath(output))
    if os.path.isdir(output):
        raise UsageError(f"-o {output} is a folder")
    if not os.path.isdir(parent):
        raise UsageError(f"-o {output}: folder {parent} does not exist")


def write_page(output: str, text: str) -> None:
    data = text.encode("utf-8")
    if "://" in output:
        with fsspec.open(output, "wb") as f:  # object stores publish on close: no partial page
            f.write(data)
    else:
        shards.write_bytes(output, data, durable=False)  # tmp + rename


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_output(args.output)
        sources = collect(args.shards, args.threads)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    all_shards = [s for src in sources for s in src.shards]
    picked = pick_shards(all_shards, args.max_shards)
    scan = scan_all(picked, args.samples, args.seed, args.threads)
    title = args.title or f"Shard report: {', '.join(args.shards)}"
    write_page(args.output, render(sources, scan, len(picked), args.thumb_size, title))
    t = totals(all_shards)
    print(
        f"wrote {args.output}: {t.samples:,} samples in {len(all_shards)} shards, "
        f"success rate {_rate(t.status.get('ok', 0), t.rows)}, {len(scan.chosen)} thumbnails",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
