"""One GPU through the real entry point: torchrun -> clipforge.train with NCCL, bf16, compile,
ZeRO-2, zero-shot eval during training, and the fp32 export.

    python -m pytest -q -m gpu tests/test_gpu.py      # on a CUDA machine (skipped elsewhere)
    bash tests/bench/gpu_check.sh                      # these tests, then the GPU benchmark

The data is real: coloured squares (tests/eval_data.py) -> data_tools.convert -> shards ->
data_tools.tokenizer, as a user builds them; the eval set is eval_data's labelled squares. One
run (module fixture) serves every test here: on a lent GPU machine the minutes are counted.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from eval_data import captioned_shards, env, write_eval_set

REPO = Path(__file__).resolve().parents[1]
STEPS, EVAL_EVERY, LOG_EVERY, BATCH = 40, 20, 5, 24

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(
        not torch.cuda.is_available(),
        reason="needs a CUDA device: torch.cuda.is_available() is False "
        f"(torch {torch.__version__}, built for CUDA {torch.version.cuda})",
    ),
]


@pytest.fixture(scope="module")
def gpu_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path]:
    """(the finished torchrun process, its run directory): 40 steps of the tiny model."""
    work = tmp_path_factory.mktemp("gpu")
    shards, evalset = captioned_shards(work), write_eval_set(work / "set")
    run_dir = work / "run"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
        "-m", "clipforge.train", f"run_dir={run_dir}", "model=tiny", "deepspeed=zero2",
        "train.precision=bf16", "train.compile=true", f"train.steps={STEPS}",
        f"train.batch_size={BATCH}", f"train.log_every={LOG_EVERY}", "checkpoint.every=0",
        f"data.train={shards}", "data.workers=1", "data.shuffle_buffer=60",
        f"eval.zeroshot={evalset}", f"eval.every={EVAL_EVERY}", "eval.batch_size=8",
        "logger=none", "optim.lr=2e-3", "sched.warmup_steps=3",
    ]  # fmt: skip
    # Compiling the towers takes most of the time; 40 tiny steps take seconds.
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    )
    return proc, run_dir


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _exported(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "model.safetensors"))


def test_bf16_compiled_zero2_run_trains_evaluates_and_exports(
    gpu_run: tuple[subprocess.CompletedProcess, Path],
) -> None:
    proc, run_dir = gpu_run
    assert "backend=nccl" in proc.stdout and "zero_stage=2" in proc.stdout, proc.stdout[-2000:]
    rows = [r for r in _metrics(run_dir) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(LOG_EVERY, STEPS + 1, LOG_EVERY))
    losses = [r["loss"] for r in rows]
    assert all(math.isfinite(v) for v in losses), losses
    # bf16 steps are noisy one by one: compare the first and last two logged steps.
    assert sum(losses[-2:]) < sum(losses[:2]), losses
    assert all(r.get("mem_peak_gpu_gb", 0) > 0 for r in rows), "the run never touched the GPU"
    # During training (step 20) and after it (step 40): the DeepSpeed engine's encoders.
    for step in (EVAL_EVERY, STEPS):
        assert f"zero-shot step {step}: top1" in proc.stdout, proc.stdout[-3000:]
    weights = _exported(run_dir)
    assert weights and all(v.dtype == torch.float32 for v in weights.values()), {
        k: v.dtype for k, v in weights.items() if v.dtype != torch.float32
    }


def test_bf16_export_holds_the_fp32_master_weights(
    gpu_run: tuple[subprocess.CompletedProcess, Path],
) -> None:
    """Exported = the optimizer's fp32 masters, not the bf16 module upcast: a bf16 value cast to
    float32 has its low 16 bits zero, a master weight after 40 AdamW steps almost never."""
    _, run_dir = gpu_run
    weights = _exported(run_dir)
    matrices = {k: v for k, v in weights.items() if v.ndim == 2 and v.numel() >= 1024}
    assert matrices, sorted(weights)
    for name, value in matrices.items():
        low = (value.view(torch.int32) & 0xFFFF) != 0
        assert low.float().mean() > 0.9, f"{name}: {low.float().mean():.1%} with low bits set"
    # And they are the masters of the very weights that trained: rounded to bf16, they are the
    # module's bf16 weights in the final DeepSpeed checkpoint (written by this run, so loading
    # it with pickle's full power trusts nothing foreign).
    states = next((run_dir / "checkpoints").glob("step_*/mp_rank_00_model_states.pt"))
    module = torch.load(states, map_location="cpu", weights_only=False)["module"]
    for name, value in matrices.items():
        trained = module[f"model.{name}"]
        assert trained.dtype == torch.bfloat16, (name, trained.dtype)
        assert torch.equal(value.to(torch.bfloat16), trained), name
