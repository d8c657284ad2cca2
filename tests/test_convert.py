"""data_tools.convert end to end on tiny local images: shards, stats, reports, manifest, options.

    .venv/bin/python -m pytest tests/test_convert.py -q

Captions say which row they came from ("row 7"), so every assertion can name its sample. Real
third-party inputs are in test_convert_inputs.py; HTTP, resume and Slurm slices in
test_convert_remote.py.
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
from data_tools.rows import TableError

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
    # 7 good rows in shards of exactly 4 (the last one short), whatever rows failed between.
    assert [(s["name"], s["samples"]) for s in manifest["shards"]] == [
        ("00000.tar", 4),
        ("00001.tar", 3),
    ]
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
            digest = hashlib.sha256((tmp / "img" / FILES[row]).read_bytes()).hexdigest()
            assert meta["sha256"] == digest
            img = Image.open(io.BytesIO(members["jpg"]))
            assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (64, 64))
            seen.append(row)
    assert seen == OK_ROWS
    assert manifest["samples"] == len(OK_ROWS) and manifest["failed"] == len(FAILING)
    assert manifest["rows"] == len(FILES) and manifest["status"]["failed"] == len(FAILING)
    assert manifest["format"] == "clipforge-shards/1" and manifest["tokenizer"] is None
    assert manifest["args"]["samples_per_shard"] == 4 and manifest["tool_version"]
    assert not list(out.glob("*.tmp")) and not (out / "_work").exists()


def test_reports_list_every_row_once_with_its_reason(tmp: Path) -> None:
    out = run(tmp)
    manifest = shards.read_manifest(out)
    assert manifest["reports"] == ["00000.parquet", "00001.parquet"]
    report = []
    for name in manifest["reports"]:
        report += pq.read_table(out / name).to_pylist()
    assert [r["key"] for r in report] == [f"{i:09d}" for i in range(len(FILES))]
    for i, r in enumerate(report):
        if i in FAILING:
            assert r["status"] == "failed" and r["error"].startswith(FAILING[i]), r
        else:
            assert r["status"] == "ok" and r["error"] is None, r
    # Shard 1's report runs from its first sample (row 4) to the end, failures included.
    stats = [json.loads((out / f"{i:05d}_stats.json").read_text()) for i in range(2)]
    assert [(s["rows"], s["samples"], s["failed"]) for s in stats] == [(4, 4, 0), (6, 3, 3)]
    assert stats[1]["failure_reasons"] == {"decode failed": 1, "empty source": 1, "missing": 1}
    assert (stats[1]["first_key"], stats[1]["last_key"]) == ("000000004", "000000009")


def test_row_report_round_trips_without_importing_pandas(tmp: Path) -> None:
    # The converter's main process writes these beside the workers: importing pandas there
    # (pa.array does) cost 0.7 s of CPU per run, taken from the workers.
    rows = [{"key": "000000000", "source": "café.jpg", "status": "ok", "sha256": "ab"}, {}]
    rows += [{"key": "000000002", "status": "failed", "error": "http 404: x", "note": ""}]
    code = (
        "import json, sys; from data_tools import shards; "
        "shards.write_report(sys.argv[1], json.loads(sys.argv[2])); "
        "print('pandas' in sys.modules)"
    )
    out = tmp / "00000.parquet"
    proc = subprocess.run(
        [sys.executable, "-c", code, str(out), json.dumps(rows)],
        capture_output=True, text=True, cwd=ROOT, check=True,
    )  # fmt: skip
    assert proc.stdout.split() == ["False"]
    table = pq.read_table(out)
    assert table.schema.names == list(shards.REPORT_COLUMNS)
    assert all(str(t) == "string" for t in table.schema.types)
    assert table.to_pylist() == [{c: r.get(c) for c in shards.REPORT_COLUMNS} for r in rows]


def test_only_the_last_shard_is_short(tmp: Path) -> None:
    out = run(tmp, "--samples-per-shard", "3")
    counts = [s["samples"] for s in shards.read_manifest(out)["shards"]]
    assert counts == [3, 3, 1]


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
    out = run(tmp, "--max-pixels", "20000")  # 320x240, 200x300 and 300x200 do not fit
    manifest = shards.read_manifest(out)
    assert manifest["samples"] == 4 and manifest["failure_reasons"]["image too large"] == 3


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


def test_output_identical_for_any_process_count_and_chunking(tmp: Path) -> None:
    one = run(tmp, "--processes", "1", out="p1")
    two = run(tmp, "--processes", "2", "--chunk-rows", "3", out="p2")
    names = sorted(p.name for p in one.iterdir() if p.name != "manifest.json")
    assert names == sorted(p.name for p in two.iterdir() if p.name != "manifest.json")
    for name in names:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    assert shards.read_manifest(one)["shards"] == shards.read_manifest(two)["shards"]


def test_worker_processes_start_before_the_input_is_read(
    tmp: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Their start-up (a fresh interpreter each) overlaps with reading and planning; a bad
    input still ends in one error line, the workers stopped."""
    import multiprocessing

    seen: list[int] = []
    real = readers.load

    def load(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202 - readers.load's signature
        seen.append(len(multiprocessing.active_children()))
        return real(*args, **kwargs)

    monkeypatch.setattr(convert.readers, "load", load)
    run(tmp, "--processes", "2", "--chunk-rows", "3", out="p2")
    assert seen == [2]
    capsys.readouterr()
    bad = tmp / "bad.csv"
    bad.write_text("url,caption\n", encoding="utf-8")
    argv = [
        "--input",
        str(bad),
        "--output",
        str(tmp / "o"),
        "--url-col",
        "nope",
        "--processes",
        "2",
    ]
    assert convert.main(argv) == 2
    assert seen == [2, 2] and multiprocessing.active_children() == []
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error:") and "nope" in line, line


@pytest.mark.skipif(sys.platform != "linux", reason="fork is used on Linux only")
def test_workers_fork_only_while_the_process_has_one_thread() -> None:
    """A fresh process (this one has the threads of earlier in-process conversions) forks;
    with a second thread alive it spawns: a forked copy could inherit a lock held there."""
    code = (
        "import threading; from data_tools import convert; a = convert.start_method(); "
        "e = threading.Event(); t = threading.Thread(target=e.wait); t.start(); "
        "b = convert.start_method(); e.set(); print(a, b)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["fork", "spawn"]


def test_rerun_is_a_no_op_and_other_settings_need_overwrite(
    tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = run(tmp)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    run(tmp)  # same command: already finished
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert "nothing to do" in capsys.readouterr().err
    argv = ["--input", str(tmp / "rows.csv"), "--images", str(tmp / "img"), "--output", str(out)]
    assert convert.main([*argv, "--image-size", "32"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert convert.main([*argv, "--image-size", "32", "--overwrite"]) == 0
    assert pixels(read_tar(out / "00000.tar")["000000000"]["jpg"]).size == (32, 32)


def test_dedupe_by_url_and_content_first_row_wins(tmp: Path) -> None:
    (tmp / "img" / "copy.jpg").write_bytes((tmp / "img" / "rgb.jpg").read_bytes())
    table = write_csv(tmp / "dup.csv", ["rgb.jpg", "gray.png", "rgb.jpg", "copy.jpg"])
    out = run(tmp, "--dedupe", "both", table=table)
    report = pq.read_table(out / "00000.parquet").to_pylist()
    assert [r["status"] for r in report] == ["ok", "ok", "duplicate", "duplicate"]
    assert report[2]["error"] == "duplicate url: same source as 000000000"
    assert report[3]["error"] == "duplicate content: same bytes as 000000000"
    assert sorted(read_tar(out / "00000.tar")) == ["000000000", "000000001"]
    kept = run(tmp, "--dedupe", "none", table=table, out="nodedupe")
    assert shards.read_manifest(kept)["samples"] == 4


def test_filters_and_caption_cleanup(tmp: Path) -> None:
    table = tmp / "rows.jsonl"
    captions = ["  a  red\n\tcar ", "ab", "x" * 50, "bad \udcff utf-8", "fine caption"]
    files = ["rgb.jpg", "rgb.jpg", "rgb.jpg", "gray.png", "palette.png"]
    with open(table, "w", encoding="utf-8") as f:
        for name, caption in zip(files, captions, strict=True):
            f.write(json.dumps({"url": name, "caption": caption}) + "\n")
    argv = ["--min-caption-length", "3", "--max-caption-length", "40", "--min-image-size", "60"]
    out = run(tmp, *argv, "--max-aspect-ratio", "1.45", table=table)
    report = pq.read_table(out / "00000.parquet").to_pylist()
    assert [r["status"] for r in report] == ["ok", "filtered", "filtered", "ok", "filtered"]
    assert report[1]["error"].startswith("caption too short")
    assert report[2]["error"].startswith("caption too long")
    assert report[4]["error"].startswith("aspect ratio")  # 150x100 = 1.5
    assert report[3]["note"] == "caption: invalid UTF-8 dropped"
    samples = read_tar(out / "00000.tar")
    assert samples["000000000"]["txt"] == b"a red car"
    assert samples["000000003"]["txt"] == b"bad utf-8"
    small = run(tmp, "--min-image-size", "100", table=table, out="small")
    statuses = [r["status"] for r in pq.read_table(small / "00000.parquet").to_pylist()]
    assert statuses == ["ok", "ok", "ok", "filtered", "ok"]  # gray.png is 90x70


def test_reencode_policies_and_webp(tmp: Path) -> None:
    sized = tmp / "img" / "sized.jpg"
    Image.new("RGB", (64, 64), (10, 200, 30)).save(sized, quality=80)
    table = write_csv(tmp / "r.csv", ["sized.jpg", "rgb.jpg", "palette.png"])
    crop = ("--resize-mode", "center_crop")
    kept = read_tar(run(tmp, *crop, table=table, out="ifneeded") / "00000.tar")
    assert kept["000000000"]["jpg"] == sized.read_bytes()  # already 64x64 RGB JPEG
    assert kept["000000001"]["jpg"] != (tmp / "img" / "rgb.jpg").read_bytes()
    always = read_tar(run(tmp, *crop, "--reencode", "always", table=table, out="a") / "00000.tar")
    assert always["000000000"]["jpg"] != sized.read_bytes()
    never = read_tar(
        run(tmp, "--resize-mode", "no", "--reencode", "never", table=table, out="n") / "00000.tar"
    )
    assert never["000000002"]["png"] == (tmp / "img" / "palette.png").read_bytes()
    webp = read_tar(run(tmp, *crop, "--encode-format", "webp", table=table, out="w") / "00000.tar")
    assert set(webp["000000001"]) == {"webp", "txt", "json"}
    assert pixels(webp["000000001"]["webp"]).format == "WEBP"


def test_option_problems_are_one_error_line(tmp: Path, capsys: pytest.CaptureFixture) -> None:
    table = write_csv(tmp / "rows.csv")
    argv = ["--input", str(table), "--output", str(tmp / "o"), "--reencode", "never"]
    assert convert.main([*argv, "--slice-index", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--reencode never" in err[0] and "--slice-count" in err[0]
    assert not (tmp / "o").exists()


def test_wrong_images_folder_is_one_clear_error(tmp: Path, capsys: pytest.CaptureFixture) -> None:
    table = write_csv(tmp / "rows.csv", ["rgb.jpg"] * 10)
    argv = ["--input", str(table), "--output", str(tmp / "o"), "--images", str(tmp)]
    assert convert.main(argv) == 2
    assert "--images" in capsys.readouterr().err


def test_format_detection() -> None:
    assert readers.detect_format("s3://b/x.CSV.gz") == "csv"
    assert readers.detect_format("rows.jsonl") == "jsonl"
    assert readers.detect_format("x.tsv.gz") == "tsv"
    assert readers.detect_format("s3://b/{00000..00009}.tar") == "webdataset"
    assert readers.detect_format("Flickr8k.token.txt") == "flickr"
    with pytest.raises(TableError, match="--input-format"):
        readers.detect_format("rows.txt")


@pytest.mark.parametrize("name", ["000000001.jpg", "a" * 96 + ".jpg", "a" * 97 + ".jpg", "é.txt"])
def test_member_headers_are_the_ones_tarfile_writes(name: str) -> None:
    """shards.tar_record builds plain ustar headers itself; each must equal tarfile's own (PAX
    format), long and non-ASCII names and huge sizes included (tarfile writes those)."""
    for size in (0, 1, 511, 512, 49_000, 8**11 - 1, 8**11):
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = size, 0o444, 0
        want = info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
        assert shards._header(name, size) == want, (name, size)
    record = shards.tar_record("k", {"jpg": b"x" * 700, "txt": "é".encode()})
    with tarfile.open(fileobj=io.BytesIO(record)) as tar:
        assert [(m.name, m.size, m.mode) for m in tar] == [
            ("k.jpg", 700, 0o444),
            ("k.txt", 2, 0o444),
        ]
