"""Fixture data for the eval tests: a tiny labelled and captioned shard set, and a tiny trained run.

    from eval_data import write_eval_set, trained_run
    write_eval_set(tmp / "set")         # tars with KEY.jpg/.txt/.json/.cls + classnames.txt
    run = trained_run(tmp / "work")     # CSV -> data_tools.convert -> tokenizer -> 30 steps

Images are coloured squares whose colour is the class, so a few training steps already tie
"red" to red pixels; keys say where each sample came from ("003_red"), as STYLE.md asks.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
CLASSNAMES = list(COLOURS)
TEMPLATES = ["a photo of a {} square.", "a {} thing."]
TRAIN_TEMPLATES = ["a {} square.", "a picture of something {}.", "{}", "a {} block."]


def square(colour: str, seed: int, size: int = 32) -> Image.Image:
    """A noisy square of one colour on a grey background."""
    rng = np.random.default_rng(seed)
    pix = np.full((size, size, 3), 128, np.int16)
    lo, hi = sorted(rng.integers(2, size - 2, size=2))
    hi = max(hi, lo + size // 3)
    pix[lo:hi, lo:hi] = COLOURS[colour]
    pix += rng.integers(-20, 21, size=pix.shape)
    return Image.fromarray(pix.clip(0, 255).astype(np.uint8))


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_eval_set(folder: Path, per_class: int = 4, per_shard: int = 5) -> Path:
    """Shards with .jpg, .cls, .txt and .json {"captions": [2 or 3 captions]}, plus the
    CLIP_benchmark sidecars; sample i is class i % 3, so every shard mixes classes."""
    folder.mkdir(parents=True, exist_ok=True)
    n = per_class * len(CLASSNAMES)
    for s in range(0, n, per_shard):
        with tarfile.open(folder / f"{s // per_shard:05d}.tar", "w") as tar:
            for i in range(s, min(n, s + per_shard)):
                colour = CLASSNAMES[i % len(CLASSNAMES)]
                key = f"{i:03d}_{colour}"
                buf = io.BytesIO()
                square(colour, 1000 + i).save(buf, format="JPEG", quality=95)
                # 2 captions for even samples, 3 for odd ones
                caps = [f"a {colour} square.", f"a picture of something {colour}."]
                caps += [colour] if i % 2 else []
                _add(tar, f"{key}.jpg", buf.getvalue())
                _add(tar, f"{key}.cls", str(i % len(CLASSNAMES)).encode())
                _add(tar, f"{key}.txt", caps[0].encode())
                _add(tar, f"{key}.json", json.dumps({"captions": caps}).encode())
    (folder / "classnames.txt").write_text("\n".join(CLASSNAMES) + "\n")
    (folder / "zeroshot_classification_templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    return folder


def env() -> dict[str, str]:
    e = dict(os.environ)
    e.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", WANDB_MODE="offline", PYTHONUNBUFFERED="1")
    return e


def run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"{args}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def captioned_shards(work: Path) -> Path:
    """WORK/shards: 60 captioned squares through data_tools.convert, with a 48-piece
    sentencepiece tokenizer recorded in the manifest."""
    raw = work / "raw"
    raw.mkdir(parents=True)
    rows = []
    for i in range(60):
        colour = CLASSNAMES[i % 3]
        square(colour, i).save(raw / f"{i:03d}.png")
        tpl = TRAIN_TEMPLATES[i % len(TRAIN_TEMPLATES)]
        rows.append({"path": f"{i:03d}.png", "caption": tpl.format(colour), "label": i % 3})
    with open(raw / "train.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "caption", "label"])
        writer.writeheader()
        writer.writerows(rows)
    shards = work / "shards"
    run("-m", "data_tools.convert", "--input", str(raw / "train.csv"), "--url-col", "path",
        "--caption-col", "caption", "--output", str(shards), "--image-size", "32",
        "--resize-mode", "center_crop", "--samples-per-shard", "30")  # fmt: skip
    run("-m", "data_tools.tokenizer", "--input", str(shards), "--vocab-size", "48")
    return shards


_RUNS: dict[Path, Path] = {}


def trained_run(work: Path, steps: int = 60) -> Path:
    """A tiny CLIP trained for `steps` on 60 squares through the real tools, evaluated during
    training on WORK/set; cached per folder, so test modules sharing a folder train it once."""
    if work in _RUNS:
        return _RUNS[work]
    shards = captioned_shards(work)
    run_dir, evalset = work / "run", write_eval_set(work / "set")
    # Training-time eval too (the DeepSpeed engine's encoders): at step 30 and at the end.
    run("-m", "clipforge.train", "experiment=smoke_cpu", f"run_dir={run_dir}",
        f"eval.zeroshot={evalset}", f"eval.retrieval={evalset}", "eval.every=30",
        "eval.batch_size=8",
        "data.synthetic=false", f"data.train={shards}", "data.workers=0", "data.shuffle_buffer=60",
        f"train.steps={steps}", "train.batch_size=12", "train.log_every=10", "checkpoint.every=0",
        "optim.lr=2e-3", "sched.warmup_steps=3", "deepspeed=zero0")  # fmt: skip
    _RUNS[work] = run_dir
    return run_dir
