"""Faults a week-long run meets: SIGKILL mid-run, a save cut short, a loss that turns NaN.

    .venv/bin/python -m pytest tests/test_faults.py -q

The kill test runs the real trainer under torchrun (2 processes, ZeRO-2, CPU), kills the whole
process group with SIGKILL once a checkpoint exists, resumes with resume=latest, and compares
every step's loss with an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from clipforge import checkpoint as ckpt

REPO = Path(__file__).resolve().parents[1]
KILL_STEPS = 24  # long enough that the kill lands mid-run, short enough for CPU CI


def _cmd(run_dir: Path, *overrides: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "clipforge.train",
        f"run_dir={run_dir}",
        "experiment=smoke_cpu",
        "deepspeed=zero2",
        f"train.steps={KILL_STEPS}",
        "checkpoint.every=2",
        "checkpoint.keep=3",
        *overrides,
    ]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _run(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        _cmd(run_dir, *overrides), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=400
    )
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def _process_tree(pid: int) -> list[int]:
    """`pid` and its descendants, from /proc (Linux)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # the process ended while we looked
        children.setdefault(ppid, []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    return tree


def _sigkill_tree(pid: int) -> None:
    # torchrun starts each worker in a session of its own, so killing torchrun's process group
    # would leave the workers running: kill every process of the tree by id, torchrun first
    # (it would otherwise notice a dead worker and stop the others gracefully).
    for p in _process_tree(pid):
        with contextlib.suppress(ProcessLookupError):  # it ended on its own meanwhile
            os.kill(p, signal.SIGKILL)


def kill_after_checkpoint(cmd: list[str], run_dir: Path, step: int) -> None:
    """Start `cmd`, a run in `run_dir`; SIGKILL it and its workers once `step` is checkpointed."""
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    marker = ckpt.ckpt_dir(run_dir) / ckpt.tag_for(step) / ckpt.COMPLETE
    deadline = time.monotonic() + 300
    try:
        while not marker.exists():
            assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before the kill"
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.02)
    finally:
        _sigkill_tree(proc.pid)
        proc.wait()


def _losses_by_step(run_dir: Path) -> dict[int, list[tuple[float, float]]]:
    """step -> [(loss, lr), ...], one entry per time the step ran."""
    out: dict[int, list[tuple[float, float]]] = {}
    for row in metrics(run_dir):
        out.setdefault(row["step"], []).append((row["loss"], row["lr"]))
    return out


@pytest.mark.multiproc
@pytest.mark.slow
def test_sigkill_then_resume_gives_the_uninterrupted_losses(tmp_path: Path) -> None:
    seed = int(os.environ.get("CLIPFORGE_KILL_SEED", time.time_ns() % 10**6))
    kill_at = random.Random(seed).choice(range(2, KILL_STEPS - 6, 2))
    print(f"killing after the step-{kill_at} checkpoint (CLIPFORGE_KILL_SEED={seed})")

    full = tmp_path / "full"
    _run(full)
    cut = tmp_path / "cut"
    kill_after_checkpoint(_cmd(cut), cut, kill_at)
    assert not (cut / "model.safetensors").exists(), "the run finished before it was killed"
    resumed_from = int(ckpt.resolve_resume(cut, "latest")[1].removeprefix("step_"))
    assert resumed_from >= kill_at

    proc = _run(cut, "resume=latest")
    assert f"at step {resumed_from}" in proc.stdout, proc.stdout[:600]
    want = {step: losses[0] for step, losses in _losses_by_step(full).items()}
    got = _losses_by_step(cut)
    assert sorted(got) == sorted(want), "every step logged, before or after the kill"
    # Steps after the checkpoint ran twice (killed run, then resumed): both must match, the
    # learning rate too (the scheduler's state came back with the checkpoint).
    for step, runs in got.items():
        for loss, lr in runs:
            assert loss == pytest.approx(want[step][0], abs=1e-6), (step, runs, want[step])
            assert lr == pytest.approx(want[step][1], rel=1e-9), (step, runs, want[step])
    assert len(got[KILL_STEPS]) == 1 and (cut / "model.safetensors").is_file()


def _fake_tag(root: Path, step: int, complete: bool) -> str:
    tag = ckpt.tag_for(step)
    ckpt.save_rank_state(root, tag, 0, {"step": step})
    (root / tag / "mp_rank_00_model_states.pt").write_bytes(b"")
    if complete:
        ckpt.mark_complete(root, tag, 1)
    return tag


def test_a_save_cut_short_is_never_resumed(tmp_path: Path) -> None:
    root = ckpt.ckpt_dir(tmp_path)
    _fake_tag(root, 2, complete=True)
    _fake_tag(root, 4, complete=True)
    cut = _fake_tag(root, 6, complete=False)
    # DeepSpeed's pointer already names the cut tag (rank 0 finished, another rank did not).
    (root / "latest").write_text(cut)
    assert ckpt.resolve_resume(tmp_path, "latest") == (root, "step_00000004")
    with pytest.raises(FileNotFoundError, match="incomplete"):
        ckpt.resolve_resume(tmp_path, str(root / cut))
    assert ckpt.resolve_resume(tmp_path, str(root / "step_00000002")) == (root, "step_00000002")
    # Rewriting a tag unmarks it first: a crash mid-rewrite leaves it unusable, not half-old.
    ckpt.save_rank_state(root, "step_00000004", 0, {"step": 4})
    assert ckpt.resolve_resume(tmp_path, "latest") == (root, "step_00000002")
    ckpt.mark_complete(root, "step_00000004", 1)
    _fake_tag(root, 8, complete=True)
    # keep=2: the two newest complete tags stay; the cut tag older than them goes too.
    assert ckpt.prune(tmp_path, keep=2) == ["step_00000002", "step_00000006"]
    assert ckpt.list_tags(tmp_path) == ["step_00000004", "step_00000008"]
    state = json.loads((root / "step_00000008" / ckpt.COMPLETE).read_text())
    assert state == {"tag": "step_00000008", "world_size": 1}
    assert torch.load(root / "step_00000008" / "client_rank00000.pt", weights_only=True)


def test_nan_loss_stops_naming_the_steps_and_the_last_checkpoint(tmp_path: Path) -> None:
    """lr 1e30: step 1 is finite and checkpointed, its update overflows the weights, and the
    loss of step 2 is NaN. No test hook: the same thing a bad learning rate does."""
    run = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "clipforge.train",
            f"run_dir={run}",
            "experiment=smoke_cpu",
            "optim.lr=1e30",
            "checkpoint.every=1",
            "train.steps=6",
        ],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: loss is nan"), line
    assert "(1, 2]" in line and "last good checkpoint: step_00000001" in line
    assert ckpt.list_tags(run) == ["step_00000001"]  # nothing saved after the NaN
    assert not (run / "model.safetensors").exists()
