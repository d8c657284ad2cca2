"""python -m data_tools.report on real COCO photos converted with bad rows, on img2dataset's real
output and on bare tars; the page parsed back, and rendered by a real browser (headless chromium).

    .venv/bin/python -m pytest tests/test_report.py -q

The shards come from data_tools.convert over coco-mini photos with every kind of bad row
(missing, corrupt, too-short caption, duplicate URL), so each number on the page can be checked
against the converter's own stats files and against the tars read here with tarfile.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import shutil
import subprocess
import tarfile
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data_tools import convert, report, shards

GOOD = 22  # real photos; the bad rows below go between them, so failures land in several shards
NASTY = '<b>Tom & "Jerry"</b> <script>alert(1)</script> café <img src=x onerror=alert(2)>'
BAD = {3: "missing", 9: "corrupt", 14: "short", 19: "duplicate"}  # insert before good row i
THUMB = 100  # below the stored images' longer side (keep_ratio, shorter side 96)


class Page(HTMLParser):
    """What the tests read back from the page: cards, tables, histogram bars, thumbnails."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.cards: dict[str, str] = {}
        self.tables: dict[str, list[list[str]]] = {}
        self.bars: dict[str, list[tuple[float, float, int]]] = {}
        self.thumbs: list[dict[str, Any]] = []
        self.sections: list[str] = []
        self._card: str | None = None
        self._table: str | None = None
        self._hist: str | None = None
        self._cell: list[str] | None = None
        self._in_b = self._in_caption = False
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "section":
            self.sections.append(a.get("id") or "")
        if tag == "div" and "data-field" in a:
            self._card = a["data-field"]
        if tag == "b" and self._card:
            self._in_b = True
            self.cards[self._card] = ""
        if tag == "table":
            self._table = a.get("id")
            self.tables[self._table or ""] = []
        if tag == "tr" and self._table is not None:
            self.tables[self._table or ""].append([])
        if tag in ("td", "th") and self._table is not None:
            self._cell = []
        if tag == "figure" and (a.get("id") or "").startswith("hist-"):
            self._hist = a["id"][5:]  # type: ignore[index]
            self.bars[self._hist] = []
        if tag == "rect" and self._hist:
            self.bars[self._hist].append(
                (float(a["data-lo"]), float(a["data-hi"]), int(a["data-count"]))  # type: ignore[arg-type]
            )
        if tag == "figure" and a.get("class") == "thumb":
            self.thumbs.append({"key": a["data-key"], "shard": a["data-shard"], "caption": ""})
        if tag == "img" and self.thumbs and "src" not in self.thumbs[-1]:
            self.thumbs[-1]["src"] = a["src"]
        if tag == "figcaption" and self.thumbs and self._hist is None:
            self._in_caption = True

    def handle_endtag(self, tag: str) -> None:
        if tag == "b":
            self._in_b, self._card = False, None
        if tag in ("td", "th") and self._cell is not None:
            self.tables[self._table or ""][-1].append("".join(self._cell).strip())
            self._cell = None
        if tag == "table":
            self._table = None
        if tag == "figure":
            self._hist = None
        if tag == "figcaption":
            self._in_caption = False

    def handle_data(self, data: str) -> None:
        if self._in_b and self._card:
            self.cards[self._card] += data
        if self._cell is not None:
            self._cell.append(data)
        if self._in_caption:
            self.thumbs[-1]["caption"] += data

    def table(self, name: str) -> list[dict[str, str]]:
        head, *rows = self.tables[name]
        return [dict(zip(head, row, strict=True)) for row in rows]


def num(text: str) -> int:
    return int(text.replace(",", ""))


def in_bin(value: float, lo: float, hi: float, last: bool) -> bool:
    """Bins are [lo, hi); the last one also holds its upper edge."""
    return lo <= value < hi or (last and value == hi)


def read_tars(folder: Path) -> dict[str, dict[str, bytes]]:
    """(shard name, key) -> members, every shard of a folder, with the standard tarfile."""
    samples: dict[str, dict[str, bytes]] = {}
    for tar_path in sorted(folder.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar:
                key, ext = m.name.split(".", 1)
                samples.setdefault(f"{tar_path.name} {key}", {})[ext] = tar.extractfile(m).read()  # type: ignore[union-attr]
    return samples


def render(tmp_path: Path, *argv: str, name: str = "report.html") -> tuple[Path, str]:
    out = tmp_path / name
    assert report.main([*argv, "-o", str(out)]) == 0
    return out, out.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def converted(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """coco-mini photos -> shards of 8, with one row of each kind of failure among them."""
    coco = shared_data / "coco-mini"
    ann = json.loads((coco / "annotations" / "captions_val2017.json").read_text(encoding="utf-8"))
    first = {}
    for a in ann["annotations"]:
        first.setdefault(a["image_id"], a["caption"].strip())
    images = sorted(ann["images"], key=lambda im: im["id"])[:GOOD]
    tmp = tmp_path_factory.mktemp("report")
    (tmp / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg after all")
    rows = []
    for i, im in enumerate(images):
        kind = BAD.get(i)
        if kind == "missing":
            rows.append([str(tmp / "missing.jpg"), "a photo that is not there"])
        elif kind == "corrupt":
            rows.append([str(tmp / "corrupt.jpg"), "a photo that does not decode"])
        elif kind == "short":
            rows.append([str(coco / "val2017" / images[0]["file_name"]), "ok"])
        elif kind == "duplicate":
            rows.append([str(coco / "val2017" / images[1]["file_name"]), "the same url again"])
        caption = NASTY if i == 5 else first[im["id"]]
        rows.append([str(coco / "val2017" / im["file_name"]), caption])
    with open(tmp / "rows.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["url", "caption"], *rows])
    out = tmp / "shards"
    argv = ["--input", str(tmp / "rows.csv"), "--output", str(out), "--image-size", "96"]
    argv += ["--resize-mode", "keep_ratio", "--samples-per-shard", "8", "--processes", "1"]
    argv += ["--min-caption-length", "4", "--dedupe", "url", "--no-progress"]
    assert convert.main(argv) == 0
    return out


@pytest.fixture(scope="module")
def page(converted: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    tmp = tmp_path_factory.mktemp("page")
    return render(tmp, str(converted), "--samples", "12", "--thumb-size", str(THUMB))


def test_counts_failures_and_histograms(converted: Path, page: tuple[Path, str]) -> None:
    manifest = shards.read_manifest(converted)
    p = Page(page[1])
    status = manifest["status"]
    assert status == {"ok": GOOD, "failed": 2, "filtered": 1, "duplicate": 1, "opt-out": 0}
    assert num(p.cards["samples"]) == manifest["samples"] == GOOD
    assert num(p.cards["rows"]) == manifest["rows"] == GOOD + len(BAD)
    assert {s: num(p.cards[s]) for s in status} == status
    assert p.cards["success_rate"] == f"{100 * GOOD / (GOOD + len(BAD)):.1f} %"
    reasons = {r["reason"]: num(r["rows"]) for r in p.table("reasons")}
    assert reasons == manifest["failure_reasons"]
    assert set(reasons) == {"missing", "decode failed", "caption too short", "duplicate url"}
    # The per-shard table says what each shard's own stats file says.
    per_shard = p.table("shards")
    assert [r["shard"] for r in per_shard] == ["00000.tar", "00001.tar", "00002.tar", "total"]
    for row, entry in zip(per_shard, manifest["shards"], strict=False):
        stats = json.loads((converted / f"{entry['name'][:-4]}_stats.json").read_text())
        assert num(row["samples"]) == stats["samples"] and num(row["rows"]) == stats["rows"]
        for col in ("ok", "failed", "filtered", "duplicate", "opt-out"):
            assert num(row[col]) == stats[col]
        assert {r: num(row[r]) for r in reasons if num(row[r])} == stats["failure_reasons"]
    assert sum(bool(json.loads(p_.read_text())["failure_reasons"]) for p_ in
               converted.glob("*_stats.json")) >= 2  # fmt: skip
    # Histogram bins hold exactly the samples whose caption length / source width fall in them.
    samples = read_tars(converted)
    lengths = [len(m["txt"].decode("utf-8")) for m in samples.values()]
    widths = [json.loads(m["json"])["original_width"] for m in samples.values()]
    for name, values in (("caption-length", lengths), ("image-width", widths)):
        bars = p.bars[name]
        assert sum(c for _, _, c in bars) == len(values) == GOOD
        for i, (lo, hi, count) in enumerate(bars):
            last = i == len(bars) - 1
            assert count == sum(in_bin(v, lo, hi, last) for v in values), (name, lo)
        assert bars[0][0] <= min(values) and max(values) <= bars[-1][1]
    assert len(set(lengths)) > 3 and len(p.bars["caption-length"]) > 3
    assert "stored-short-side" in p.bars and "score" not in p.bars  # not filtered: no scores
    assert "scores" not in p.sections


def test_contact_sheet_thumbnails_and_escaping(converted: Path, page: tuple[Path, str]) -> None:
    text = page[1]
    p = Page(text)
    samples = read_tars(converted)
    assert len(p.thumbs) == 12
    assert len({(t["shard"], t["key"]) for t in p.thumbs}) == 12
    for t in p.thumbs:
        members = samples[f"{t['shard']} {t['key']}"]
        assert t["caption"] == members["txt"].decode("utf-8")  # escaped, then read back exactly
        assert t["src"].startswith("data:image/jpeg;base64,")
        img = Image.open(io.BytesIO(base64.b64decode(t["src"].split(",", 1)[1])))
        stored = Image.open(io.BytesIO(members["jpg"])).size
        assert max(stored) > THUMB and img.format == "JPEG" and max(img.size) == THUMB
    # Nothing from the caption is markup; nothing loads from anywhere.
    assert "<script" not in text and "onerror=" not in text.replace("onerror=alert", "")
    assert "<b>Tom" not in text
    assert ' src="http' not in text and " href=" not in text and "url(" not in text
    # Every caption, the nasty one included, is shown as text when the sheet holds them all.
    _, full = render(page[0].parent, str(converted), "--samples", "100", name="all.html")
    captions = [t["caption"] for t in Page(full).thumbs]
    assert len(captions) == GOOD and NASTY in captions
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in full and "<script" not in full
    # The draw is deterministic, and the seed changes it.
    _, again = render(page[0].parent, str(converted), "--samples", "12", "--thumb-size",
                      str(THUMB), name="again.html")  # fmt: skip
    assert again == text
    _, other = render(page[0].parent, str(converted), "--samples", "12", "--seed", "1",
                      name="seed1.html")  # fmt: skip
    assert {t["key"] for t in Page(other).thumbs} != {t["key"] for t in p.thumbs}
    _, none = render(page[0].parent, str(converted), "--samples", "0", name="none.html")
    assert Page(none).thumbs == [] and "sheet" not in Page(none).sections


def test_scores_from_filtered_reports(converted: Path, tmp_path: Path) -> None:
    """A report with a `score` column (what data_tools.filter writes) gets a score histogram."""
    folder = tmp_path / "scored"
    shutil.copytree(converted, folder)
    scores = {}
    for path in sorted(folder.glob("*.parquet")):
        table = pq.read_table(path)
        values = [
            round(0.1 + (int(k) % 7) * 0.04, 3) if s == "ok" else None
            for k, s in zip(table.column("key").to_pylist(), table.column("status").to_pylist())
        ]
        scores.update({k: v for k, v in zip(table.column("key").to_pylist(), values) if v})
        # As numbers, or as text like the report's other columns: both are scores.
        column = pa.array(values, pa.float64())
        if path.name == "00001.parquet":
            column = pa.array([None if v is None else str(v) for v in values], pa.string())
        pq.write_table(table.append_column("score", column), path)
    p = Page(render(tmp_path, str(folder), "--samples", "4")[1])
    assert "scores" in p.sections
    bars = p.bars["score"]
    assert sum(c for _, _, c in bars) == len(scores) == GOOD
    for i, (lo, hi, count) in enumerate(bars):
        last = i == len(bars) - 1
        assert count == sum(in_bin(v, lo, hi, last) for v in scores.values())


def test_img2dataset_output_brace_pattern_and_bare_tars(shared_data: Path, tmp_path: Path) -> None:
    i2d = shared_data / "formats" / "img2dataset_webdataset_output"
    p = Page(render(tmp_path, str(i2d), "--samples", "6")[1])
    stats = [json.loads((i2d / f"0000{i}_stats.json").read_text()) for i in range(3)]
    assert num(p.cards["samples"]) == sum(s["successes"] for s in stats) == 159
    assert num(p.cards["rows"]) == sum(s["count"] for s in stats) == 161
    assert num(p.cards["failed"]) == 2
    assert {r["reason"]: num(r["rows"]) for r in p.table("reasons")} == {
        "HTTP Error 404": 1,
        "Image decoding error": 1,
    }
    assert sum(c for _, _, c in p.bars["caption-length"]) == 159 and len(p.thumbs) == 6
    # A brace pattern selects shards; a list of sources adds them up.
    p = Page(render(tmp_path, f"{i2d}/{{00000..00001}}.tar", name="brace.html")[1])
    assert num(p.cards["samples"]) == 128 and num(p.cards["shards"]) == 2
    p = Page(render(tmp_path, f"{i2d}/00000.tar", f"{i2d}/00002.tar", name="list.html")[1])
    assert num(p.cards["samples"]) == 64 + 31 and num(p.cards["rows"]) == 64 + 33
    # Bare tars (no report, no stats): samples and histograms from the tars, rows unknown.
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(i2d / "00002.tar", bare)
    p = Page(render(tmp_path, str(bare), "--max-shards", "0", name="bare.html")[1])
    assert num(p.cards["samples"]) == 31 and "rows" not in p.cards
    assert p.cards["success_rate"] == "n/a" and sum(c for *_, c in p.bars["image-width"]) == 31
    # Stats files without the parquet reports: counts and reasons from img2dataset's stats.
    shutil.copy(i2d / "00002_stats.json", bare)
    p = Page(render(tmp_path, str(bare), name="stats.html")[1])
    assert (num(p.cards["rows"]), num(p.cards["ok"]), num(p.cards["failed"])) == (33, 31, 2)
    assert {r["reason"] for r in p.table("reasons")} == {"HTTP Error 404", "Image decoding error"}
    # A shard cut short mid-way: what could be read is shown, and the break is listed.
    data = (i2d / "00001.tar").read_bytes()
    (bare / "00001.tar").write_bytes(data[: len(data) // 2 + 700])
    p = Page(render(tmp_path, str(bare), "--max-shards", "0", name="torn.html")[1])
    assert "problems" in p.sections and 31 < sum(c for *_, c in p.bars["image-width"]) < 31 + 64


def test_fsspec_urls_and_several_sources(shared_data: Path, converted: Path) -> None:
    """Sources and the page as fsspec URLs (the in-memory filesystem); two sources add up and
    keep their shards apart on the page."""
    fs = fsspec.filesystem("memory")
    i2d = shared_data / "formats" / "img2dataset_webdataset_output"
    try:
        for path in i2d.iterdir():
            fs.pipe(f"/report-test/i2d/{path.name}", path.read_bytes())
        argv = ["memory://report-test/i2d", str(converted), "--samples", "40"]
        assert report.main([*argv, "-o", "memory://report-test/out/page.html"]) == 0
        p = Page(fs.cat("/report-test/out/page.html").decode("utf-8"))
    finally:
        fs.rm("/report-test", recursive=True)
    assert num(p.cards["samples"]) == 159 + GOOD and num(p.cards["rows"]) == 161 + GOOD + len(BAD)
    names = [r["shard"] for r in p.table("shards")][:-1]
    assert len(names) == len(set(names)) == 6
    assert {t["shard"].split("/")[0] for t in p.thumbs} == {names[0].split("/")[0],
                                                          names[-1].split("/")[0]}  # fmt: skip


def test_every_row_failed_still_reports(tmp_path: Path) -> None:
    rows = tmp_path / "rows.csv"
    rows.write_text("url,caption\nnope1.jpg,one\nnope2.jpg,two\n", encoding="utf-8")
    out = tmp_path / "out"
    assert convert.main(["--input", str(rows), "--output", str(out), "--no-progress"]) == 0
    assert shards.read_manifest(out)["shards"] == []
    p = Page(render(tmp_path, str(out))[1])
    assert num(p.cards["samples"]) == 0 and num(p.cards["failed"]) == 2
    assert p.cards["success_rate"] == "0.0 %" and p.thumbs == []


@pytest.mark.parametrize(
    "make_args",
    [
        lambda t: [str(t / "no-such-folder"), "-o", str(t / "r.html")],
        lambda t: [str(t), "-o", str(t / "r.html")],  # a folder without shards
        lambda t: [f"{t}/{{00000..00001}}.tar", "-o", str(t / "r.html")],
        lambda t: [str(t), "-o", str(t / "missing" / "r.html")],
        lambda t: [str(t / "bad.json"), "-o", str(t / "r.html")],
    ],
)
def test_bad_input_is_one_error_line(make_args, tmp_path: Path, capsys) -> None:
    (tmp_path / "bad.json").write_text("{not json", encoding="utf-8")
    assert report.main(make_args(tmp_path)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert not (tmp_path / "r.html").exists() and not list(tmp_path.glob("*.tmp"))


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    msg = "no chromium to render the page (Debian: apt-get install chromium; .ci/run does)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(msg)
    pytest.skip(msg)


class Screen:
    """A screenshot (grayscale) to look for images in, by normalized cross-correlation."""

    def __init__(self, pixels: np.ndarray, max_template: int) -> None:
        self.pixels = pixels
        # One FFT of the screen for every template; sizes rounded up to fast FFT lengths.
        h, w = (-(-(n + max_template) // 256) * 256 for n in pixels.shape)
        self.shape = (h, w)
        self.spectrum = np.fft.rfft2(pixels, self.shape)
        self.c1 = np.pad(pixels, ((1, 0), (1, 0))).cumsum(0).cumsum(1)
        self.c2 = np.pad(pixels**2, ((1, 0), (1, 0))).cumsum(0).cumsum(1)

    def best_match(self, template: np.ndarray) -> float:
        """Highest correlation of ``template`` at any position (1.0: the very same pixels)."""
        th, tw = template.shape
        t = template - template.mean()
        spectrum = np.fft.rfft2(t[::-1, ::-1], self.shape)
        corr = np.fft.irfft2(self.spectrum * spectrum, self.shape)
        corr = corr[th - 1 : self.pixels.shape[0], tw - 1 : self.pixels.shape[1]]

        def window(c: np.ndarray) -> np.ndarray:  # sums over every th x tw window
            return c[th:, tw:] - c[:-th, tw:] - c[th:, :-tw] + c[:-th, :-tw]

        var = np.maximum(window(self.c2) - window(self.c1) ** 2 / (th * tw), 1e-6)
        return float((corr / np.sqrt(var * (t**2).sum())).max())


def gray(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("L"), dtype=np.float64)


def test_chromium_renders_the_sheet(shared_data: Path, page: tuple[Path, str], tmp_path: Path):
    browser = _chromium()
    shot = tmp_path / "shot.png"
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    cmd += ["--force-device-scale-factor=1", "--window-size=1280,2400", f"--screenshot={shot}"]
    result = subprocess.run([*cmd, page[0].as_uri()], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and shot.exists(), result.stderr[-2000:]
    screen = Screen(gray(Image.open(shot)), THUMB)
    # Every thumbnail of the sheet is on screen at its own pixels, as the browser drew it.
    thumbs = Page(page[1]).thumbs
    assert len(thumbs) == 12
    for t in thumbs:
        img = Image.open(io.BytesIO(base64.b64decode(t["src"].split(",", 1)[1])))
        score = screen.best_match(gray(img))
        assert score > 0.95, (t["key"], score)
    # A photo that is not in the set is not found: the check can fail.
    other = Image.open(next((shared_data / "coco-mini" / "train2017").glob("*.jpg")))
    other.thumbnail((THUMB, THUMB))
    assert screen.best_match(gray(other)) < 0.8
