"""Images/s of data_tools.convert against img2dataset 1.47.0 on the same input; -> docs/benchmarks.md.

    make bench                                                   # every benchmark
    .venv/bin/python -m pytest -q -s tests/bench/bench_convert.py
    BENCH_CONVERT_ROWS=200 BENCH_CONVERT_ROUNDS=1 .venv/bin/python -m pytest -q -s \\
        tests/bench/bench_convert.py                             # a quick validation

The input: BENCH_CONVERT_ROWS (1000) URLs /img/N.jpg?i=K, each a distinct URL, over the 159
COCO-mini val2017 JPEGs (640 px class photos) served by a loopback HTTP server in its own
process. Both tools: parquet in, WebDataset tars out, 256 px center_crop, JPEG quality 95,
sha256 of each image, 2 processes, 16 fetch threads each, rows/8 samples per shard. img2dataset's
EXIF extraction is turned off (ours extracts none) and wandb too. The time is the whole command,
start-up included, as a user waits for it; rounds alternate the tools and each tool's best round
counts (the machine is shared, so figures are noisy). img2dataset is installed from PyPI into
.bench/img2dataset-venv the first time.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "benchmarks.md"

ROWS = int(os.environ.get("BENCH_CONVERT_ROWS", 1000))
ROUNDS = int(os.environ.get("BENCH_CONVERT_ROUNDS", 3))
PROCESSES, THREADS, SIZE, QUALITY = 2, 16, 256, 95
PEER = "img2dataset==1.47.0"


def timed(cmd: list[str], **kwargs) -> float:
    """Wall-clock seconds of a command that must succeed."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, f"{cmd[0]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return elapsed


def write_doc_section(title: str, body: str) -> None:
    """Replace only the ``## {title}`` section of docs/benchmarks.md (appended if absent)."""
    text = DOC.read_text(encoding="utf-8") if DOC.exists() else "# Benchmarks\n"
    section = f"## {title}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text).rstrip() + "\n"
    else:
        text = text.rstrip() + "\n\n" + section
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(text, encoding="utf-8")


def write_input(folder: Path, base_url: str, distinct: int) -> Path:
    urls = [f"{base_url}/img/{i % distinct}.jpg?i={i}" for i in range(ROWS)]
    table = pa.table({"url": urls, "caption": [f"photo {i}" for i in range(ROWS)]})
    path = folder / "input.parquet"
    pq.write_table(table, path)
    return path


def run_ours(table: Path, out: Path, per_shard: int) -> float:
    cmd = [sys.executable, "-m", "data_tools.convert", "--input", str(table), "--output", str(out)]
    cmd += ["--url-col", "url", "--caption-col", "caption", "--image-size", str(SIZE)]
    cmd += ["--resize-mode", "center_crop", "--quality", str(QUALITY), "--overwrite"]
    cmd += ["--processes", str(PROCESSES), "--threads", str(THREADS), "--no-progress"]
    seconds = timed([*cmd, "--samples-per-shard", str(per_shard)], cwd=REPO)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["samples"] == ROWS, manifest["status"]
    return seconds


def run_img2dataset(venv: Path, table: Path, out: Path, per_shard: int) -> float:
    cmd = [str(venv / "bin" / "img2dataset"), "--url_list", str(table)]
    cmd += ["--input_format", "parquet", "--url_col", "url", "--caption_col", "caption"]
    cmd += ["--output_format", "webdataset", "--output_folder", str(out)]
    cmd += ["--image_size", str(SIZE), "--resize_mode", "center_crop"]
    cmd += ["--encode_quality", str(QUALITY), "--compute_hash", "sha256"]
    cmd += ["--processes_count", str(PROCESSES), "--thread_count", str(THREADS)]
    cmd += ["--number_sample_per_shard", str(per_shard), "--extract_exif", "False"]
    cmd += ["--enable_wandb", "False", "--retries", "0"]
    # No update check: albumentations asks PyPI for a newer version at import otherwise.
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    shutil.rmtree(out, ignore_errors=True)  # a fresh folder: incremental mode would skip work
    seconds = timed(cmd, env=env)
    ok = sum(json.loads(p.read_text())["successes"] for p in out.glob("*_stats.json"))
    assert ok == ROWS, f"img2dataset wrote {ok} of {ROWS}"
    return seconds


def report(ours: list[float], theirs: list[float]) -> str:
    best_ours, best_theirs = ROWS / min(ours), ROWS / min(theirs)
    rounds = ", ".join(f"{ROWS / s:.0f}" for s in ours)
    rounds_theirs = ", ".join(f"{ROWS / s:.0f}" for s in theirs)
    return f"""
Written by `make bench` (`tests/bench/bench_convert.py`); figures from a shared machine are
noisy, each tool's best round counts.

{ROWS} image URLs on a loopback HTTP server (the 159 COCO-mini val2017 JPEGs, 640 px, each URL
distinct) -> WebDataset shards: {SIZE} px center_crop, JPEG quality {QUALITY}, sha256 per image,
{PROCESSES} processes x {THREADS} threads, {ROWS // 8} samples per shard. Images/s over the whole
command (start-up included).

| converter | images/s | ratio |
| --- | ---: | ---: |
| clipforge data_tools.convert | {best_ours:.0f} | {best_ours / best_theirs:.2f}x |
| img2dataset 1.47.0 (EXIF extraction off) | {best_theirs:.0f} | 1.00x |

Machine: {os.cpu_count()} CPUs, {platform.machine()}, Python {platform.python_version()};
all rounds (images/s): ours [{rounds}], img2dataset [{rounds_theirs}].

Reproduce: `.venv/bin/python -m pytest -q -s tests/bench/bench_convert.py`
(`BENCH_CONVERT_ROWS`, `BENCH_CONVERT_ROUNDS` to change the size).
"""


def test_convert_throughput_against_img2dataset(
    image_server: tuple[str, int], peer_venv: Callable[[str, str], Path], tmp_path: Path
) -> None:
    base_url, distinct = image_server
    venv = peer_venv("img2dataset", PEER)
    table = write_input(tmp_path, base_url, distinct)
    per_shard = max(1, ROWS // 8)
    ours, theirs = [], []
    for _ in range(ROUNDS):
        ours.append(run_ours(table, tmp_path / "ours", per_shard))
        theirs.append(run_img2dataset(venv, table, tmp_path / "img2dataset", per_shard))
    text = report(ours, theirs)
    write_doc_section("Converter", text)
    print(text)
    ratio = min(theirs) / min(ours)
    # The target is >= 2x; below 1x something is wrong with ours, not with the machine's load.
    assert ratio >= 1.0, f"clipforge converter slower than img2dataset: {ratio:.2f}x"
