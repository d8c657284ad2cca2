"""data_tools.convert end to end on tiny real images: shards, stats, reports, manifest.

    PYTHONPATH=src:. .venv/bin/python -m pytest tests/test_convert.py -q

Captions say which row they came from ("row 7"), so every assertion can name its sample.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from data_tools import convert, images, readers, shards

ROOT = Path(__file__).parents[1]
RED, BLUE = (255, 0, 0), (0, 0, 255)
# Row index -> image file; None is an empty path. Rows 6-8 must fail, the others must land.
FILES = [
    "rgb.jpg",
    "cmyk.jpg",
    "palette.png",
    "rgba.png",
    "rotated.jpg",
    "gray16.png",
    "missing.jpg",
    "corrupt.jpg",
    None,
    "gray.png",
]
FAILING = {6: "missing", 7: "decode failed", 8: "empty source"}
OK_ROWS = [i for i in range(len(FILES)) if i not in FAILING]


def make_images(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (320, 240), (30, 120, 200)).save(folder / "rgb.jpg", quality=90)
    Image.new("CMYK", (200, 300), (0, 255, 255, 0)).save(folder / "cmyk.jpg")
    Image.new("RGB", (150, 100), (0, 128, 0)).convert("P", palette=Image.Palette.ADAPTIVE).save(
        folder / "palette.png"
    )
    rgba = Image.new("RGBA", (120, 160), (0, 0, 0, 0))
    rgba.paste((255, 0, 0, 255), (40, 60, 80, 100))
    rgba.save(folder / "rgba.png")
    # Stored landscape, left half red; EXIF orientation 6 displays it portrait with red on top.
    rotated = Image.new("RGB", (300, 200), BLUE)
    rotated.paste(RED, (0, 0, 150, 200))
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated.save(folder / "rotated.jpg", exif=exif.tobytes(), quality=95)
    Image.fromarray(np.full((48, 64), 32896, dtype=np.uint16)).save(folder / "gray16.png")
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    Image.new("L", (90, 70), 200).save(folder / "gray.png")


def write_csv(path: Path, files: list[str | None] = FILES) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["url", "caption", "label", "note"])
        for i, name in enumerate(files):
            writer.writerow([name or "", f"row {i}", i % 3, f"note {i}"])
    return path


def write_jsonl(path: Path, files: list[str | None], opener=open) -> Path:
    with opener(path, "wt", encoding="utf-8") as f:
        for i, name in enumerate(files):
            f.write(json.dumps({"image": name, "text": f"row {i}", "extra": {"i": i}}) + "\n")
    return path


def read_tar(path: Path) -> dict[str, dict[str, bytes]]:
    """key -> {ext: bytes}, through the standard tarfile module."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def run(tmp_path: Path, *extra: str, table: Path | None = None, out: str = "out") -> Path:
    table = table or write_csv(tmp_path / "rows.csv")
    output = tmp_path / out
    argv = ["--input", str(table), "--images", str(tmp_path / "img"), "--output", str(output)]
    argv += ["--image-size", "64", "--samples-per-shard", "4", *extra]
    assert convert.main(argv) == 0
    return output


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    make_images(tmp_path / "img")
    return tmp_path


def test_csv_shards_members_captions_and_manifest(tmp: Path) -> None:
    out = run(tmp, "--cls-col", "label", "--extra-cols", "note", "--resize-mode", "center_crop")
    manifest = shards.read_manifest(out)
    # 10 rows in slices of 4: rows 0-3, 4-7, 8-9.
    assert [s["name"] for s in manifest["shards"]] == ["00000.tar", "00001.tar", "00002.tar"]
    seen: list[int] = []
    for entry in manifest["shards"]:
        path = out / entry["name"]
        data = path.read_bytes()
        assert entry["bytes"] == len(data)
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()
        samples = read_tar(path)
        assert entry["samples"] == len(samples)
        for key, members in samples.items():
            row = int(key)
            assert key == f"{row:09d}"
            assert set(members) == {"jpg", "txt", "json", "cls"}
            assert members["txt"].decode("utf-8") == f"row {row}"
            assert members["cls"] == str(row % 3).encode("ascii")
            meta = json.loads(members["json"])
            assert meta["key"] == key and meta["source"] == FILES[row]
            assert meta["caption"] == f"row {row}" and meta["note"] == f"note {row}"
            img = Image.open(io.BytesIO(members["jpg"]))
            assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (64, 64))
            seen.append(row)
    assert seen == OK_ROWS
    assert manifest["samples"] == len(OK_ROWS) and manifest["failed"] == len(FAILING)
    assert manifest["format"] == "clipforge-shards/1" and manifest["tokenizer"] is None
    assert manifest["args"]["samples_per_shard"] == 4 and manifest["tool_version"]
    assert not list(out.glob("*.tmp"))


def test_failed_rows_in_reports_and_stats(tmp: Path) -> None:
    out = run(tmp)
    report = []
    for i in range(3):
        report += pq.read_table(out / f"{i:05d}.parquet").to_pylist()
    assert [r["key"] for r in report] == [f"{i:09d}" for i in range(len(FILES))]
    for i, r in enumerate(report):
        if i in FAILING:
            assert r["status"] == "failed" and r["error"].startswith(FAILING[i]), r
        else:
            assert r["status"] == "ok" and r["error"] is None, r
    stats = [json.loads((out / f"{i:05d}_stats.json").read_text()) for i in range(3)]
    assert [(s["rows"], s["ok"], s["failed"]) for s in stats] == [(4, 4, 0), (4, 2, 2), (2, 1, 1)]
    assert stats[1]["failure_reasons"] == {"decode failed": 1, "missing": 1}
    assert stats[2]["failure_reasons"] == {"empty source": 1}


def test_slice_with_no_good_row_leaves_no_shard(tmp: Path) -> None:
    out = run(tmp, "--samples-per-shard", "3")  # slice 2 is rows 6-8: all failing
    manifest = shards.read_manifest(out)
    assert [s["name"] for s in manifest["shards"]] == ["00000.tar", "00001.tar", "00003.tar"]
    assert not (out / "00002.tar").exists()
    stats = json.loads((out / "00002_stats.json").read_text())
    assert (stats["ok"], stats["failed"]) == (0, 3)
    assert manifest["samples"] == len(OK_ROWS)


def test_webdataset_reads_the_shards(tmp: Path) -> None:
    out = run(tmp, "--resize-mode", "border")
    urls = [str(out / s["name"]) for s in shards.read_manifest(out)["shards"]]
    dataset = wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("pil")
    rows = []
    for sample in dataset:
        assert sample["txt"] == f"row {int(sample['__key__'])}"
        assert sample["json"]["key"] == sample["__key__"]
        assert sample["jpg"].size == (64, 64)
        rows.append(int(sample["__key__"]))
    assert rows == OK_ROWS


@pytest.mark.parametrize(
    ("mode", "sizes"),
    [
        ("no", [(320, 240), (200, 300)]),
        ("keep_ratio", [(85, 64), (64, 96)]),
        ("center_crop", [(64, 64), (64, 64)]),
        ("border", [(64, 64), (64, 64)]),
    ],
)
def test_resize_modes(tmp: Path, mode: str, sizes: list[tuple[int, int]]) -> None:
    table = write_jsonl(tmp / "rows.jsonl", ["rgb.jpg", "rotated.jpg"])
    argv = ["--url-col", "image", "--caption-col", "text", "--resize-mode", mode]
    out = run(tmp, *argv, table=table)
    samples = read_tar(out / "00000.tar")
    for (key, members), size in zip(samples.items(), sizes, strict=True):
        assert Image.open(io.BytesIO(members["jpg"])).size == size, key
        meta = json.loads(members["json"])
        assert (meta["width"], meta["height"]) == size
    rgb = Image.open(io.BytesIO(samples["000000000"]["jpg"]))
    if mode == "border":  # 320x240 -> 64x48 centred: 8 white rows above
        assert min(rgb.getpixel((32, 2))) > 245


def test_jsonl_gz_relative_to_table_folder_with_extra_columns(tmp: Path) -> None:
    table = write_jsonl(tmp / "img" / "rows.jsonl.gz", ["rgb.jpg", "gray.png"], opener=gzip.open)
    out = tmp / "jsonl_out"
    argv = ["--input", str(table), "--url-col", "image", "--caption-col", "text"]
    argv += ["--extra-cols", "extra", "--output", str(out), "--image-size", "32"]
    assert convert.main(argv) == 0
    samples = read_tar(out / "00000.tar")
    assert sorted(samples) == ["000000000", "000000001"]
    assert json.loads(samples["000000001"]["json"])["extra"] == {"i": 1}
    assert set(samples["000000000"]) == {"jpg", "txt", "json"}


def pixels(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


def test_modes_orientation_and_colours(tmp: Path) -> None:
    opts = images.ImageOptions(image_size=64, resize_mode="no")
    folder = tmp / "img"
    cmyk = pixels(images.process_image((folder / "cmyk.jpg").read_bytes(), opts).data)
    r, g, b = cmyk.getpixel((10, 10))
    assert r > 200 and g < 60 and b < 60
    rgba = pixels(images.process_image((folder / "rgba.png").read_bytes(), opts).data)
    assert min(rgba.getpixel((2, 2))) > 245  # transparent -> white, not black
    assert rgba.getpixel((60, 80))[0] > 200
    palette = pixels(images.process_image((folder / "palette.png").read_bytes(), opts).data)
    assert palette.mode == "RGB" and palette.getpixel((5, 5))[1] > 100
    gray16 = pixels(images.process_image((folder / "gray16.png").read_bytes(), opts).data)
    assert abs(gray16.getpixel((5, 5))[0] - 128) <= 3  # 16-bit mid-grey stays mid-grey
    rotated = images.process_image((folder / "rotated.jpg").read_bytes(), opts)
    assert (rotated.original_width, rotated.original_height) == (200, 300)
    upright = pixels(rotated.data)
    assert upright.getpixel((100, 30))[0] > 200 and upright.getpixel((100, 270))[2] > 200


def test_decompression_bomb_is_a_row_error(tmp: Path) -> None:
    with pytest.raises(images.ImageError, match="image too large"):
        images.process_image(
            (tmp / "img" / "rgb.jpg").read_bytes(), images.ImageOptions(max_pixels=1000)
        )
    out = run(tmp, "--max-pixels", "20000")  # of rows 0-3 only 150x100 and 120x160 fit
    stats = json.loads((out / "00000_stats.json").read_text())
    assert stats["ok"] == 2 and stats["failure_reasons"] == {"image too large": 2}


def test_unknown_column_is_one_error_line_and_exit_2(tmp: Path) -> None:
    table = write_csv(tmp / "rows.csv")
    cmd = [sys.executable, "-m", "data_tools.convert", "--input", str(table)]
    cmd += ["--caption-col", "nope", "--output", str(tmp / "out")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "'nope'" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp / "out").exists()  # nothing started


def test_malformed_table_is_exit_2(tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp / "bad.csv"
    bad.write_text("url,caption\na.jpg,row 0\nb.jpg,row 1,surplus\n", encoding="utf-8")
    assert convert.main(["--input", str(bad), "--output", str(tmp / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "line 3" in err[0]
    bad_json = tmp / "bad.jsonl"
    bad_json.write_text('{"url": "a.jpg", "caption": "row 0"}\n{oops\n', encoding="utf-8")
    assert convert.main(["--input", str(bad_json), "--output", str(tmp / "out")]) == 2
    assert capsys.readouterr().err.startswith("error:")


def test_output_identical_for_any_process_count(tmp: Path) -> None:
    one = run(tmp, "--processes", "1", out="p1")
    two = run(tmp, "--processes", "2", out="p2")
    names = sorted(p.name for p in one.iterdir() if p.name != "manifest.json")
    assert names == sorted(p.name for p in two.iterdir() if p.name != "manifest.json")
    for name in names:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    assert shards.read_manifest(one)["shards"] == shards.read_manifest(two)["shards"]


def test_format_detection() -> None:
    assert readers.detect_format("s3://b/x.CSV.gz") == "csv"
    assert readers.detect_format("rows.jsonl") == "jsonl"
    with pytest.raises(readers.TableError, match="--input-format"):
        readers.detect_format("rows.txt")


@pytest.mark.parametrize("name", ["derived_test_1000.csv", "derived_test_1000.jsonl"])
def test_reads_img2dataset_input_table(name: str, shared_data: Path) -> None:
    # shared_data (conftest) is ../shared/data beside the repo; it skips where that is absent.
    path = shared_data / "formats" / "img2dataset_input" / name
    rows = readers.to_rows(readers.read_table(str(path)), readers.ColumnSpec("URL", "TEXT"))
    assert len(rows) == 1000
    assert rows[0].key == "000000000" and rows[-1].key == "000000999"
    assert all(r.source.startswith(("http://", "https://")) for r in rows)
    assert rows[1].caption == "Tavern Brawl by velinov"
