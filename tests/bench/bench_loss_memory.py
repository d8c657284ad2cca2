"""Peak memory and time of the losses per rank as the world grows: CLIP local, SigLIP gather, ring.

    .venv/bin/python -m pytest -q -s tests/bench/bench_loss_memory.py   # writes docs/benchmarks.md
    .venv/bin/python tests/bench/bench_loss_memory.py                   # prints only

W gloo processes on CPU (W = 2, 4, 8), each holding a FIXED local batch of B pairs of
D-dimensional normalized float32 features, so the global batch N = W * B grows with W. Each
rank runs each loss forward and backward (its communication included):

  clip-local      ContrastiveLoss: this rank's B rows of both N x N matrices, B x N logits
  siglip-gather   SigLipLoss(dist_impl="gather"): all-gathered [N, D] texts, B x N logits
  siglip-ring     SigLipLoss(dist_impl="ring"): texts passed round the ring, one B x B block
                  at a time, recomputed in the backward
  open_clip ...   open_clip 3.3.0's ClipLoss (gather_with_grad, full N x N matrix, and
                  local_loss) and SigLipLoss (its default "bidir" neighbour exchange), for
                  reference; its loss.py is loaded on its own (the package's __init__ costs
                  ~10 s of imports per process)

Peak: under torch's profiler with profile_memory=True, the highest running sum of the
allocator's [memory] events (allocations minus frees) during one forward + backward, i.e. what
the loss adds on top of its inputs; the largest over ranks. Time: wall time of forward +
backward per rank after a barrier, median of BENCH_LOSS_REPEATS calls, the slowest rank's.
"""

from __future__ import annotations

import os
import platform
import re
import statistics
import sys
import time
from importlib import util
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))  # dist_utils

from dist_utils import run_distributed  # noqa: E402

DOC = REPO / "docs" / "benchmarks.md"
WORLDS = [int(w) for w in os.environ.get("BENCH_LOSS_WORLDS", "2,4,8").split(",")]
LOCAL_BATCH = int(os.environ.get("BENCH_LOSS_BATCH", "512"))
DIM = int(os.environ.get("BENCH_LOSS_DIM", "512"))
REPEATS = int(os.environ.get("BENCH_LOSS_REPEATS", "3"))
OURS = ["clip-local", "siglip-gather", "siglip-ring"]
THEIRS = ["open_clip ClipLoss full", "open_clip ClipLoss local", "open_clip SigLipLoss"]
KINDS = OURS + THEIRS
MIB = 2**20


def _open_clip_loss():
    """open_clip's loss.py as a module of its own (it needs only torch), or None."""
    spec = util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "loss.py"
    module_spec = util.spec_from_file_location("open_clip_loss_bench", path)
    module = util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def _make_loss(kind: str, rank: int, world: int, open_clip_loss):
    """(loss module, whether it takes a bias): the SigLIP losses do."""
    from clipforge.loss import ContrastiveLoss
    from clipforge.loss.siglip import SigLipLoss

    if kind == "clip-local":
        return ContrastiveLoss(), False
    if kind.startswith("siglip-"):
        return SigLipLoss(dist_impl=kind.removeprefix("siglip-")), True
    if kind == "open_clip SigLipLoss":
        return open_clip_loss.SigLipLoss(rank=rank, world_size=world), True
    local = kind.endswith("local")
    clip = open_clip_loss.ClipLoss(
        local_loss=local, gather_with_grad=True, rank=rank, world_size=world
    )
    return clip, False


def _peak_bytes(fn) -> int:
    """Peak of (allocated - freed) bytes while fn runs, from the profiler's memory events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    running = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        running += e.nbytes()
        peak = max(peak, running)
    return peak


def _worker(rank: int, world: int, batch: int, dim: int, kinds: list[str]) -> dict[str, tuple]:
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)  # open_clip's deprecated gather
    open_clip_loss = _open_clip_loss() if any(k in THEIRS for k in kinds) else None
    g = torch.Generator().manual_seed(rank)
    out = {}
    for kind in kinds:
        image = F.normalize(torch.randn(batch, dim, generator=g), dim=1).requires_grad_()
        text = F.normalize(torch.randn(batch, dim, generator=g), dim=1).requires_grad_()
        loss_fn, with_bias = _make_loss(kind, rank, world, open_clip_loss)
        scalars = [torch.tensor([10.0 if with_bias else 1 / 0.07], requires_grad=True)]
        if with_bias:
            scalars.append(torch.tensor([-10.0], requires_grad=True))
        leaves = [image, text, *scalars]

        def step(loss_fn=loss_fn, leaves=leaves) -> None:
            for t in leaves:
                t.grad = None
            loss_fn(*leaves).backward()

        step()  # warm-up: the batch-size check and first-call allocations are not the loss's
        peak = _peak_bytes(step)
        times = []
        for _ in range(REPEATS):
            dist.barrier()
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        out[kind] = (peak, statistics.median(times))
    return out


def measure(kinds: list[str] | None = None) -> dict[int, dict[str, tuple[float, float]]]:
    """{W: {kind: (peak MiB, seconds)}}; the open_clip kinds only where it is installed."""
    if kinds is None:
        kinds = KINDS if util.find_spec("open_clip") is not None else OURS
    table = {}
    for world in WORLDS:
        per_rank = run_distributed(_worker, world, LOCAL_BATCH, DIM, kinds, timeout=900)
        table[world] = {
            k: (max(r[k][0] for r in per_rank) / MIB, max(r[k][1] for r in per_rank)) for k in kinds
        }
        print(f"W={world} N={world * LOCAL_BATCH}: {table[world]}", flush=True)
    return table


def render(table: dict[int, dict[str, tuple[float, float]]]) -> str:
    b, d = LOCAL_BATCH, DIM
    kinds = list(next(iter(table.values())))
    lines = [
        "<!-- loss-memory:begin -->",
        "Written by `make bench` (`tests/bench/bench_loss_memory.py`). Per rank, forward + "
        f"backward of the loss alone (its communication included): float32, fixed local batch "
        f"B = {b} pairs of D = {d} features, so the global batch N = W x B grows with the world "
        "size W; W gloo processes on CPU, 1 thread each. Each cell is **peak MiB / ms**: peak = "
        "the highest running sum of allocations minus frees inside the call (torch's profiler, "
        "profile_memory), largest over ranks; ms = wall time after a barrier, median of "
        f"{REPEATS} calls, slowest rank.",
        "",
        "| W | N | " + " | ".join(kinds) + " |",
        "| ---: | ---: | " + " | ".join("---:" for _ in kinds) + " |",
    ]
    for world, row in table.items():
        cells = " | ".join(f"{mib:.1f} / {s * 1e3:.0f}" for mib, s in row.values())
        lines.append(f"| {world} | {world * b} | {cells} |")
    lines += [
        "",
        "Sizes for scale: one float32 B x B block is "
        f"{b * b * 4 / MIB:.3g} MiB and one [B, D] tensor {b * d * 4 / MIB:.3g} MiB; one B x N "
        "matrix is "
        + ", ".join(f"{b * w * b * 4 / MIB:.3g} MiB at W={w}" for w in table)
        + "; one N x N matrix "
        + ", ".join(f"{(w * b) ** 2 * 4 / MIB:.3g} MiB" for w in table)
        + ". clip-local and siglip-gather grow linearly in N (B x N logits and the gathered"
        " N x D features kept for backward), the full matrix quadratically; siglip-ring stays"
        " flat (one B x B block at a time, only its [B, D] inputs saved; see"
        " src/clipforge/loss/siglip.py). The times come from up to 8 processes sharing 2 cores"
        " over loopback gloo, so they show the extra work (the ring recomputes its blocks in"
        " the backward and makes 2W - 1 hops there), not what NCCL on GPUs would give.",
        "",
        f"Machine: {os.cpu_count()} CPUs, {platform.machine()}; torch {torch.__version__}. "
        "Reproduce: `.venv/bin/python -m pytest -q -s tests/bench/bench_loss_memory.py` "
        "(`BENCH_LOSS_WORLDS`, `BENCH_LOSS_BATCH`, `BENCH_LOSS_DIM`, `BENCH_LOSS_REPEATS`).",
        "<!-- loss-memory:end -->",
    ]
    return "\n".join(lines)


def write_doc(block: str) -> None:
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    pattern = re.compile(r"<!-- loss-memory:begin -->.*?<!-- loss-memory:end -->", re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = text.rstrip("\n") + "\n\n## Loss memory\n\n" + block + "\n"
    DOC.write_text(text)


def test_loss_memory_per_rank() -> None:
    table = measure()
    write_doc(render(table))
    worlds = sorted(table)
    first, last = table[worlds[0]], table[worlds[-1]]
    growth = worlds[-1] / worlds[0]
    # The ring does not grow with W (1 MiB of slack for allocator noise); the gather form does,
    # and at the largest W the ring needs less than both forms that keep B x N logits.
    assert last["siglip-ring"][0] <= first["siglip-ring"][0] + 1.0
    assert last["siglip-gather"][0] > growth / 2 * first["siglip-gather"][0]
    assert last["siglip-ring"][0] < min(last["siglip-gather"][0], last["clip-local"][0])
    if "open_clip ClipLoss full" in last:
        # The local form stays below the full matrix, and the gap widens as N grows.
        full, local = "open_clip ClipLoss full", "clip-local"
        assert all(table[w][local][0] < table[w][full][0] for w in worlds)
        assert last[full][0] / last[local][0] > first[full][0] / first[local][0]


if __name__ == "__main__":
    print(render(measure()))
