"""End-to-end training through DeepSpeed on CPU: real processes, real gloo, real checkpoints."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", WANDB_MODE="offline", PYTHONUNBUFFERED="1")
    return env


def train_cmd(run_dir: Path, *overrides: str, nproc: int = 1) -> list[str]:
    """The clipforge.train command line (under torchrun when nproc > 1)."""
    if nproc > 1:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(nproc),
            "-m",
            "clipforge.train",
        ]
    else:
        cmd = [sys.executable, "-m", "clipforge.train"]
    return [*cmd, f"run_dir={run_dir}", *overrides]


def train(run_dir: Path, *overrides: str, nproc: int = 1, timeout: int = 300):
    """Run clipforge.train (under torchrun when nproc > 1); returns the CompletedProcess."""
    return subprocess.run(
        train_cmd(run_dir, *overrides, nproc=nproc),
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _ok(proc) -> None:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    )


@pytest.mark.multiproc
@pytest.mark.slow
def test_two_steps_zero2_two_processes(tmp_path):
    run = tmp_path / "run"
    proc = train(run, "experiment=smoke_cpu", "deepspeed=zero2", "train.steps=2", nproc=2)
    _ok(proc)
    assert "world_size=2 ranks_per_node=2" in proc.stdout
    assert "zero_stage=2" in proc.stdout
    rows = metrics(run)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert {"loss", "lr", "logit_scale", "samples_per_s", "grad_norm"} <= r.keys()
        assert r["loss"] > 0 and r["grad_norm"] > 0
    # Each rank wrote its client state and ZeRO-2 optimizer partition.
    tag = run / "checkpoints" / "step_00000002"
    assert (tag / "client_rank00000.pt").is_file() and (tag / "client_rank00001.pt").is_file()
    assert len(list(tag.glob("*optim_states.pt"))) == 2
    assert (run / "model.safetensors").is_file()
    assert (run / "config.yaml").is_file() and "git_revision" in (run / "meta.json").read_text()


@pytest.mark.multiproc
@pytest.mark.slow
def test_siglip_ring_trains_under_zero3_and_logs_its_metrics(tmp_path):
    """`loss=siglip` end to end: two ranks pass texts round the ring under ZeRO-3, the
    sigmoid loss's metrics and the learned bias are logged, and the export carries the bias
    into an evaluable model."""
    run = tmp_path / "run"
    proc = train(
        run, "experiment=smoke_cpu", "loss=siglip", "deepspeed=zero3", "train.steps=3", nproc=2
    )
    _ok(proc)
    assert "zero_stage=3" in proc.stdout and "bias -10.0" in proc.stdout
    rows = metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3]
    want = {"acc_i2t", "acc_t2i", "positive_logit", "negative_logit", "loss_pos", "loss_neg"}
    for r in rows:
        assert want | {"logit_scale", "logit_bias", "grad_norm"} <= r.keys()
        assert r["loss_pos"] + r["loss_neg"] == pytest.approx(r["loss"], rel=1e-5)
        assert r["positive_logit"] < 0 and r["negative_logit"] < r["positive_logit"] + 5
    # The bias is learned: it moves off its init (lr 1e-3 warm-up steps move it by ~1e-4).
    assert rows[-1]["logit_bias"] != -10.0
    from clipforge.checkpoint import load_exported
    from clipforge.model import build_model

    state, cfg = load_exported(run)
    assert cfg.loss.kind == "siglip" and state["logit_bias"].shape == (1,)
    model = build_model(cfg.model)
    model.load_state_dict(state)
    assert model.logit_bias.item() == pytest.approx(rows[-1]["logit_bias"], abs=1e-3)


@pytest.mark.multiproc
@pytest.mark.slow
def test_clip_logs_both_directions(tmp_path):
    run = tmp_path / "run"
    _ok(train(run, "experiment=smoke_cpu", "train.steps=1"))
    (row,) = metrics(run)
    assert {"loss_i2t", "loss_t2i", "acc_i2t", "acc_t2i", "logit_scale"} <= row.keys()
    assert (row["loss_i2t"] + row["loss_t2i"]) / 2 == pytest.approx(row["loss"], rel=1e-5)
    assert "logit_bias" not in row


@pytest.mark.multiproc
@pytest.mark.slow
def test_resume_continues_with_identical_losses(tmp_path):
    """Uninterrupted 4 steps vs. the same run cut at step 2 and resumed: steps 3-4 match."""
    full = tmp_path / "full"
    _ok(
        train(
            full,
            "experiment=smoke_cpu",
            "train.steps=4",
            "checkpoint.every=2",
            "checkpoint.keep=0",
            nproc=2,
        )
    )
    cut = tmp_path / "cut"
    shutil.copytree(full / "checkpoints" / "step_00000002", cut / "checkpoints" / "step_00000002")
    (cut / "checkpoints" / "latest").write_text("step_00000002")
    proc = train(
        cut, "experiment=smoke_cpu", "train.steps=4", "checkpoint.every=2", "resume=latest", nproc=2
    )
    _ok(proc)
    assert "resumed from" in proc.stdout and "at step 2" in proc.stdout
    want = {r["step"]: r["loss"] for r in metrics(full)}
    got = {r["step"]: r["loss"] for r in metrics(cut)}
    assert sorted(got) == [3, 4]
    for step in (3, 4):
        assert got[step] == pytest.approx(want[step], abs=1e-6), (step, got, want)


def test_unknown_config_key_is_one_clear_line(tmp_path):
    proc = train(tmp_path / "r", "experiment=smoke_cpu", "train.stepz=3")
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert "stepz" in proc.stderr


def test_missing_data_path_is_one_clear_line(tmp_path):
    proc = train(tmp_path / "r", f"data.train={tmp_path / 'nope'}", "data.tokenizer=x.model")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "nope" in errors[0], proc.stderr


def test_invalid_values_are_all_reported_at_once(tmp_path):
    proc = train(tmp_path / "r", "experiment=smoke_cpu", "train.steps=0", "train.precision=fp8")
    assert proc.returncode == 2
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: invalid configuration")
    assert "train.steps" in line and "train.precision" in line


def test_tokenizer_larger_than_the_text_tower_is_one_clear_line(tmp_path):
    from eval_data import captioned_shards

    shards = captioned_shards(tmp_path)  # a 48-piece tokenizer in the manifest
    proc = train(
        tmp_path / "r",
        "experiment=smoke_cpu",
        "data.synthetic=false",
        f"data.train={shards}",
        "data.workers=0",
        "model.text.vocab_size=16",
        "train.steps=2",
    )
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "48" in errors[0] and "model.text.vocab_size" in errors[0], errors
    assert not (tmp_path / "r" / "checkpoints").exists()  # refused before any training


def _cpu_has_fp16() -> bool:
    import torch

    from clipforge.engine.precision import supports

    return supports("fp16", torch.device("cpu"))


@pytest.mark.skipif(_cpu_has_fp16(), reason="this CPU has oneDNN fp16 kernels: nothing to refuse")
def test_fp16_on_a_cpu_without_it_is_one_clear_line(tmp_path):
    proc = train(tmp_path / "r", "experiment=smoke_cpu", "train.precision=fp16")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "train.precision=fp16" in errors[0], proc.stderr
