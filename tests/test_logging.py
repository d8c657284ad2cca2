"""wandb offline logging through a real (tiny) training run; the API key never lands on disk."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SECRET = "0123456789abcdef0123456789abcdef01234567"  # a 40-char key, wandb's format


def test_wandb_offline_run_logs_metrics_and_never_the_key(tmp_path):
    run = tmp_path / "run"
    env = dict(os.environ, WANDB_API_KEY=SECRET, WANDB_MODE="", OMP_NUM_THREADS="1")
    env.pop("WANDB_MODE")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "clipforge.train",
            "experiment=smoke_cpu",
            "logger=wandb",
            f"run_dir={run}",
            "train.steps=2",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    keys = set(rows[-1])
    for key in (
        "loss",
        "lr",
        "logit_scale",
        "grad_norm",
        "samples_per_s",
        "samples_per_s_per_gpu",
        "data_wait_frac",
        "mem_peak_rss_gb",
    ):
        assert key in keys, key
    offline = list((run / "wandb").glob("offline-run-*"))
    assert offline, "wandb wrote no offline run"
    assert list(offline[0].glob("*.wandb")), "no wandb event file"
    # The key must appear nowhere: not in the run directory, not in what the run printed.
    assert SECRET not in proc.stdout + proc.stderr
    for path in run.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
