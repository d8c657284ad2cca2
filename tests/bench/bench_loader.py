"""Loader throughput: clipforge's TrainLoader against open_clip 3.3.0's webdataset pipeline
(`open_clip_train.data.get_wds_dataset`), on the same shards, in one run.

    make bench                                                  # every benchmark
    .venv/bin/python -m pytest -q -s tests/bench/bench_loader.py

Both sides: 256 px JPEG shards built by data_tools.convert from the COCO-mini photos (repeated,
each row with its own human caption), 2 DataLoader workers, batch 64, RandomResizedCrop to
224 px (scale 0.9-1, bicubic) + ToTensor + Normalize, captions tokenized to 77 ids in the
workers: ours with our sentencepiece model (trained on these captions by data_tools.tokenizer),
theirs with open_clip's default tokenizer for ViT-B-32 (its BPE SimpleTokenizer).

open_clip_train's pipeline breaks on webdataset 1.x (KeyError 'fname' in its own
group_by_keys), and our package needs 1.x, so its side runs in a subprocess with
webdataset==0.2.86 installed by `pip install --target .bench/wds-0.2.86` (gitignored) ahead of
the rest of .venv on its path; open_clip 3.3.0, torch and PIL are the same installs. Compared
twice, mode against mode: resampled (ours) vs --dataset-resampled (theirs), and exact epochs
(ours) vs their shard-split epochs. Rounds alternate the two sides; each side's best round
counts, since other jobs on a shared machine only ever slow a round down. The figures replace
the "Loader" section of docs/benchmarks.md.

Knobs (environment): BENCH_LOADER_SAMPLES (shard set size, 2000), BENCH_LOADER_BATCHES (timed
batches per round, 16), BENCH_LOADER_ROUNDS (2), BENCH_LOADER_MIN_RATIO (0.9: below it the
benchmark fails; the target is >= 1).
"""

from __future__ import annotations

import csv
import json
import os
import platform
import re
import subprocess
import sys
import time
from argparse import Namespace
from collections.abc import Iterable
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
COCO = REPO.parent / "shared" / "data" / "coco-mini"
WORK = REPO / ".bench" / "loader"
WDS_PIN = "webdataset==0.2.86"
WDS_DIR = REPO / ".bench" / "wds-0.2.86"
DOC = REPO / "docs" / "benchmarks.md"
BEGIN, END = "<!-- loader:begin -->", "<!-- loader:end -->"

SAMPLES = int(os.environ.get("BENCH_LOADER_SAMPLES", 2000))
BATCHES = int(os.environ.get("BENCH_LOADER_BATCHES", 16))
ROUNDS = int(os.environ.get("BENCH_LOADER_ROUNDS", 2))
MIN_RATIO = float(os.environ.get("BENCH_LOADER_MIN_RATIO", 0.9))
BATCH, WORKERS, SIZE, WARMUP = 64, 2, 224, 2


# -- the shards ----------------------------------------------------------------------------------
def _coco_rows() -> list[tuple[str, str]]:
    rows = []
    for split in ("train2017", "val2017"):
        ann = json.loads((COCO / "annotations" / f"captions_{split}.json").read_text())
        files = {im["id"]: im["file_name"] for im in ann["images"]}
        for a in ann["annotations"]:
            path = COCO / split / files[a["image_id"]]
            if path.is_file():
                rows.append((str(path), a["caption"].strip()))
    return rows


def build_shards() -> Path:
    """SAMPLES rows of (COCO photo, one of its captions) -> 256 px shards + tokenizer; cached."""
    from data_tools import convert, tokenizer

    out = WORK / f"shards_{SAMPLES}"
    if (out / "manifest.json").is_file() and (out / "tokenizer.model").is_file():
        return out
    if not COCO.is_dir():
        pytest.skip(f"COCO-mini not found at {COCO} (../shared/data)")
    rows = _coco_rows()
    WORK.mkdir(parents=True, exist_ok=True)
    table = WORK / f"rows_{SAMPLES}.csv"
    with open(table, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "caption"])
        for i in range(SAMPLES):
            w.writerow(rows[i % len(rows)])
    args = ["--input", str(table), "--url-col", "path", "--output", str(out)]
    args += ["--image-size", "256", "--resize-mode", "center_crop", "--samples-per-shard", "250"]
    assert convert.main([*args, "--processes", "2"]) == 0
    assert tokenizer.main(["--input", str(out), "--vocab-size", "2000"]) == 0
    return out


# -- the two pipelines ---------------------------------------------------------------------------
def ours(shards: Path, mode: str) -> Iterable:
    from clipforge.config import AugmentConfig
    from clipforge.data.shards import resolve
    from clipforge.data.tokenizer import Tokenizer
    from clipforge.data.train_loader import TrainLoader
    from clipforge.data.transforms import train_transform

    sset = resolve(str(shards))
    return TrainLoader(
        sset,
        train_transform(SIZE, AugmentConfig()),
        Tokenizer(sset.tokenizer, 77),
        BATCH,
        0,
        0,
        WORKERS,
        1000,
        mode=mode,
    )


def theirs(shards: Path, mode: str) -> Iterable:
    import open_clip
    from open_clip_train.data import get_wds_dataset

    tars = sorted(p.name for p in shards.glob("*.tar"))
    first, last = tars[0].removesuffix(".tar"), tars[-1].removesuffix(".tar")
    args = Namespace(
        train_data=str(shards / f"{{{first}..{last}}}.tar"),
        train_num_samples=SAMPLES,
        train_data_upsampling_factors=None,
        dataset_resampled=mode == "resampled",
        batch_size=BATCH,
        workers=WORKERS,
        world_size=1,
        seed=0,
    )
    preprocess = open_clip.image_transform(SIZE, is_train=True)
    info = get_wds_dataset(
        args, preprocess, is_train=True, tokenizer=open_clip.get_tokenizer("ViT-B-32")
    )
    return info.dataloader


def _old_webdataset() -> Path:
    """webdataset 0.2.86 for open_clip_train's pipeline, in a folder of its own (cached)."""
    if not (WDS_DIR / "webdataset").is_dir():
        pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target"]
        subprocess.run([*pip, str(WDS_DIR), WDS_PIN], check=True)
    return WDS_DIR


def theirs_samples_per_s(shards: Path, mode: str) -> float:
    """One round of open_clip's pipeline in a subprocess that sees webdataset 0.2.86 first."""
    env = {**os.environ, "PYTHONPATH": str(_old_webdataset())}
    cmd = [sys.executable, __file__, str(shards), mode]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True, timeout=600)
    return float(out.stdout.strip().splitlines()[-1])


def samples_per_s(loader: Iterable) -> float:
    """Batches after WARMUP (workers started, buffers filled), timed; both sides yield
    (image, text) as a dict or a tuple."""
    it = iter(loader)
    for _ in range(WARMUP):
        next(it)
    t0, n = time.perf_counter(), 0
    for _ in range(BATCHES):
        batch = next(it)
        image = batch["image"] if isinstance(batch, dict) else batch[0]
        assert image.shape == (BATCH, 3, SIZE, SIZE)
        n += len(image)
    rate = n / (time.perf_counter() - t0)
    del it  # stops the workers before the other side's start
    return rate


# -- the report ----------------------------------------------------------------------------------
def write_section(results: dict[str, dict[str, list[float]]]) -> str:
    lines = [
        "## Loader",
        "",
        BEGIN,
        "Written by `make bench` (`tests/bench/bench_loader.py`); figures from a shared machine "
        "are noisy, each side's best round counts.",
        "",
        f"Samples/s of decode + augment + tokenize: {SAMPLES} samples of 256 px JPEG "
        f"(COCO-mini photos via data_tools.convert, 250 per shard), {WORKERS} workers, batch "
        f"{BATCH}, RandomResizedCrop {SIZE} (0.9-1, bicubic) + Normalize, 77-token captions; "
        f"{BATCHES} timed batches after {WARMUP} warm-up, {ROUNDS} alternating rounds. "
        "Tokenizers: ours sentencepiece BPE (vocab 2000), open_clip's SimpleTokenizer "
        "(ViT-B-32 default).",
        "",
        "| mode | clipforge | open_clip 3.3.0 (webdataset) | ratio |",
        "| --- | ---: | ---: | ---: |",
    ]
    for mode, r in results.items():
        a, b = max(r["ours"]), max(r["theirs"])
        lines.append(f"| {mode} | {a:.0f} | {b:.0f} | {a / b:.2f}x |")
    cpu = f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}"
    lines += [
        "",
        f"Machine: {cpu}; torch {torch.__version__}; all rounds: "
        + "; ".join(
            f"{m} ours {[round(x) for x in r['ours']]} theirs {[round(x) for x in r['theirs']]}"
            for m, r in results.items()
        )
        + ".",
        "",
        "Reproduce: `.venv/bin/python -m pytest -q -s tests/bench/bench_loader.py`.",
        END,
        "",
    ]
    section = "\n".join(lines)
    text = DOC.read_text() if DOC.is_file() else "# Benchmarks\n\n"
    pattern = re.compile(r"## Loader\n\n" + re.escape(BEGIN) + ".*?" + re.escape(END) + "\n", re.S)
    text = (
        pattern.sub(lambda _: section, text)
        if pattern.search(text)
        else text.rstrip() + "\n\n" + section
    )
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(text)
    return section


def test_loader_throughput_against_open_clip():
    shards = build_shards()
    results: dict[str, dict[str, list[float]]] = {}
    for mode in ("resampled", "epoch"):
        r = results[mode] = {"ours": [], "theirs": []}
        for _ in range(ROUNDS):
            r["ours"].append(samples_per_s(ours(shards, mode)))
            r["theirs"].append(theirs_samples_per_s(shards, mode))
    print("\n" + write_section(results))
    for mode, r in results.items():
        ratio = max(r["ours"]) / max(r["theirs"])
        assert ratio >= MIN_RATIO, f"{mode}: clipforge at {ratio:.2f}x open_clip's samples/s"


if __name__ == "__main__":  # open_clip's side, run by theirs_samples_per_s
    import webdataset

    assert webdataset.__version__ == WDS_PIN.split("==")[1], webdataset.__file__
    print(samples_per_s(theirs(Path(sys.argv[1]), sys.argv[2])))
