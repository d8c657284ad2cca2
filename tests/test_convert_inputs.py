"""Real third-party dumps through data_tools: every table format, COCO, Flickr, folders, tars.

    .venv/bin/python -m pytest tests/test_convert_inputs.py -q

Inputs come from ../shared/data (the ``shared_data`` fixture skips when it is absent). The URLs
in those tables point at the internet: they are read and counted here, never fetched;
conversions use local images (coco-mini, CIFAR-10 JPEGs, tars).
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from data_tools import convert, readers, shards
from data_tools.rows import ColumnSpec, Dataset, ReadOptions, TableError

I2D = ("URL", "TEXT")


def load(path: Path, **opts) -> Dataset:
    columns = opts.pop("columns", ColumnSpec())
    return readers.load(str(path), ReadOptions(columns=columns, **opts))


@pytest.mark.parametrize(
    "name",
    [
        "test_1000.parquet",
        "derived_test_1000.csv",
        "derived_test_1000.tsv",
        "derived_test_1000.tsv.gz",
        "derived_test_1000.json",
        "derived_test_1000.jsonl",
    ],
)
def test_img2dataset_input_tables(name: str, shared_data: Path) -> None:
    path = shared_data / "formats" / "img2dataset_input" / name
    rows = load(path, columns=ColumnSpec(*I2D)).rows
    assert len(rows) == 1000
    assert rows[0].key == "000000000" and rows[-1].key == "000000999"
    assert all(r.source.startswith(("http://", "https://")) for r in rows)
    assert rows[1].caption == "Tavern Brawl by velinov"
    # The same 1,000 rows whatever the format (captions cleaned the same way: the one with a
    # TAB is on one line with single spaces).
    reference = load(shared_data / "formats/img2dataset_input/derived_test_1000.csv",
                     columns=ColumnSpec(*I2D)).rows  # fmt: skip
    assert [(r.source, r.caption) for r in rows] == [(r.source, r.caption) for r in reference]
    assert all("\t" not in r.caption for r in rows)


def test_parquet_extra_columns_and_bigger_table(shared_data: Path) -> None:
    folder = shared_data / "formats" / "img2dataset_input"
    spec = ColumnSpec("url", "txt", extra=("sha256hash",))
    rows = load(folder / "sample_image.parquet", columns=spec).rows
    assert len(rows) == 2 and len(rows[0].extra["sha256hash"]) == 64
    assert len(load(folder / "test_10000.parquet", columns=ColumnSpec(*I2D)).rows) == 10000


def test_cc3m_headerless_tsv(shared_data: Path) -> None:
    path = shared_data / "formats" / "cc3m" / "Validation_GCC-1.1.0-Validation.tsv"
    named = load(path, column_names=("caption", "url")).rows
    assert len(named) == 15833
    assert named[0].caption.startswith("author : a life in photography")
    assert named[0].source.startswith("https://i.pinimg.com/")
    # Detected as headerless (row 1 holds a URL): columns are numbered, and the error says how.
    with pytest.raises(TableError, match="--columns"):
        load(path)
    by_index = load(path, columns=ColumnSpec("1", "0")).rows
    assert [r.source for r in by_index[:50]] == [r.source for r in named[:50]]


def test_unknown_column_names_the_columns(shared_data: Path) -> None:
    path = shared_data / "formats" / "img2dataset_input" / "derived_test_1000.jsonl"
    with pytest.raises(TableError, match="'nope'.*its columns are: URL, TEXT"):
        load(path, columns=ColumnSpec("nope", "TEXT"))


def test_coco_captions_and_flickr_tokens(shared_data: Path) -> None:
    coco = load(shared_data / "formats" / "coco_captions" / "captions_train2017.json").rows
    assert len(coco) == 80 and all(len(r.captions) == 5 for r in coco)
    assert coco[0].caption == coco[0].captions[0] and coco[0].source.endswith(".jpg")
    flickr = load(shared_data / "formats" / "flickr8k_text" / "Flickr8k.token.txt").rows
    assert len(flickr) == 8093  # 40,460 lines; the release has one image with 4, one with 1
    assert flickr[0].source == "1000268201_693b08cb0e.jpg" and len(flickr[0].captions) == 5
    assert flickr[0].caption.startswith("A child in a pink dress")


def test_tars_webdataset_and_image_only(shared_data: Path) -> None:
    formats = shared_data / "formats"
    wds = load(formats / "webdataset_testdata" / "sample.tgz").rows
    assert len(wds) == 90 and wds[0].data is not None and wds[0].label == "0"
    only_images = load(formats / "clip_retrieval_image_only_tars").rows
    assert len(only_images) == 11 and all(r.caption == "" and r.member for r in only_images)
    i2d = load(formats / "img2dataset_webdataset_output").rows
    assert len(i2d) == 159 and i2d[0].extra["original_key"] == "0000003"
    with pytest.raises(TableError, match="no sample with an image"):
        load(formats / "webdataset_testdata" / "testgz.tar")


def test_coco_mini_val2017_to_shards(shared_data: Path, tmp_path: Path) -> None:
    coco = shared_data / "coco-mini"
    out = tmp_path / "coco"
    argv = ["--input", str(coco / "annotations" / "captions_val2017.json"), "--output", str(out)]
    argv += ["--images", str(coco / "val2017"), "--image-size", "64", "--samples-per-shard", "32"]
    assert convert.main([*argv, "--resize-mode", "center_crop", "--processes", "2"]) == 0
    manifest = shards.read_manifest(out)
    assert manifest["samples"] == 79 and [s["samples"] for s in manifest["shards"]] == [32, 32, 15]
    with tarfile.open(out / "00000.tar") as tar:
        metas = [json.loads(tar.extractfile(m).read()) for m in tar if m.name.endswith(".json")]
    assert all(len(m["captions"]) == 5 and m["caption"] == m["captions"][0] for m in metas)
    assert metas[0]["image_id"] == 397133


def test_folder_of_classes_makes_a_zero_shot_set(shared_data: Path, tmp_path: Path) -> None:
    folder = tmp_path / "cifar"
    with tarfile.open(shared_data / "cifar10" / "test.tar.gz") as tar:
        # The first few JPEGs of three classes are plenty to prove the layout.
        picked = {"airplane": 0, "automobile": 0, "bird": 0}
        for member in tar:
            parts = member.name.split("/")
            if member.isfile() and len(parts) >= 3 and picked.get(parts[-2], 9) < 3:
                picked[parts[-2]] += 1
                (folder / parts[-2]).mkdir(parents=True, exist_ok=True)
                (folder / parts[-2] / parts[-1]).write_bytes(tar.extractfile(member).read())
            if all(n == 3 for n in picked.values()):
                break
    out = tmp_path / "zs"
    argv = ["--input", str(folder), "--caption-template", "a photo of a {label}."]
    argv += ["--zeroshot-templates", "a photo of a {}.|a blurry photo of a {c}."]
    assert convert.main([*argv, "--output", str(out), "--image-size", "32"]) == 0
    assert (out / "classnames.txt").read_text().split("\n")[:3] == [
        "airplane",
        "automobile",
        "bird",
    ]
    templates = (out / "zeroshot_classification_templates.txt").read_text().splitlines()
    assert templates == ["a photo of a {}.", "a blurry photo of a {}."]
    with tarfile.open(out / "00000.tar") as tar:
        got = {m.name: tar.extractfile(m).read() for m in tar}
    assert got["000000000.cls"] == b"0" and got["000000008.cls"] == b"2"
    assert got["000000004.txt"] == b"a photo of a automobile."


def test_folder_with_sidecar_captions(tmp_path: Path) -> None:
    folder = tmp_path / "imgs" / "sub"
    folder.mkdir(parents=True)
    for name in ("b", "a"):
        Image.new("RGB", (40, 30), (200, 10, 10)).save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(f"caption of {name}\n", encoding="utf-8")
    rows = load(tmp_path / "imgs").rows
    assert [(r.source, r.caption) for r in rows] == [
        ("sub/a.png", "caption of a"),
        ("sub/b.png", "caption of b"),
    ]


def test_reshard_img2dataset_output(shared_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "reshard"
    argv = ["--input", str(shared_data / "formats" / "img2dataset_webdataset_output")]
    argv += ["--output", str(out), "--resize-mode", "no", "--samples-per-shard", "100"]
    assert convert.main(argv) == 0
    manifest = shards.read_manifest(out)
    assert [s["samples"] for s in manifest["shards"]] == [100, 59]
    report = pq.read_table(out / "00000.parquet").to_pylist()
    assert report[0]["source"].endswith("00000.tar#0000003")
    with tarfile.open(out / "00000.tar") as tar:
        meta = json.loads(tar.extractfile("000000000.json").read())
        image = tar.extractfile("000000000.jpg").read()
    # Already 256x256 RGB JPEG: stored as it was (--reencode if-needed), metadata kept.
    with tarfile.open(shared_data / "formats/img2dataset_webdataset_output/00000.tar") as tar:
        assert image == tar.extractfile("0000003.jpg").read()
    assert meta["image_id"] == 466137 and meta["original_key"] == "0000003"
