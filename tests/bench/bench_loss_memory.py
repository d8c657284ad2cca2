"""Peak memory of the contrastive loss per rank as the world grows: local form vs full matrix.

    .venv/bin/python -m pytest -q -s tests/bench/bench_loss_memory.py   # writes docs/benchmarks.md
    .venv/bin/python tests/bench/bench_loss_memory.py                   # prints only

W gloo processes on CPU (W = 2, 4, 8), each holding a FIXED local batch of B pairs of
D-dimensional normalized features, so the global batch N = W * B grows with W. Each rank runs
the loss forward and backward (gather with gradient included) under torch's profiler with
profile_memory=True; the peak is the highest running sum of the allocator's [memory] events
(allocations minus frees) inside that region, i.e. what the loss adds on top of its inputs.

  clipforge (local form)   ContrastiveLoss: this rank's B rows of the N x N matrix, B x N logits
  open_clip full matrix    ClipLoss(gather_with_grad=True, local_loss=False): N x N on every rank
  open_clip local          ClipLoss(gather_with_grad=True, local_loss=True): B x N, for reference

The features are float32 leaves; the reported figure is the largest peak over the ranks.
"""

from __future__ import annotations

import os
import platform
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))  # dist_utils

from dist_utils import run_distributed  # noqa: E402

DOC = REPO / "docs" / "benchmarks.md"
WORLDS = [int(w) for w in os.environ.get("BENCH_LOSS_WORLDS", "2,4,8").split(",")]
LOCAL_BATCH = int(os.environ.get("BENCH_LOSS_BATCH", "512"))
DIM = int(os.environ.get("BENCH_LOSS_DIM", "512"))
KINDS = ["clipforge (local form)", "open_clip full matrix", "open_clip local"]
MIB = 2**20


def _make_loss(kind: str, rank: int, world: int):
    if kind.startswith("clipforge"):
        from clipforge.loss import ContrastiveLoss

        return ContrastiveLoss()
    from open_clip.loss import ClipLoss

    return ClipLoss(
        local_loss=kind.endswith("local"), gather_with_grad=True, rank=rank, world_size=world
    )


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


def _worker(rank: int, world: int, batch: int, dim: int) -> dict[str, int]:
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)  # open_clip's deprecated gather
    g = torch.Generator().manual_seed(rank)
    out = {}
    for kind in KINDS:
        image = F.normalize(torch.randn(batch, dim, generator=g), dim=1).requires_grad_()
        text = F.normalize(torch.randn(batch, dim, generator=g), dim=1).requires_grad_()
        scale = torch.tensor([1 / 0.07], requires_grad=True)
        loss_fn = _make_loss(kind, rank, world)

        def step(loss_fn=loss_fn, image=image, text=text, scale=scale) -> None:
            loss = loss_fn(image, text, scale)
            loss.backward()

        step()  # warm-up: first-call allocations of the collectives are not the loss's
        for t in (image, text, scale):
            t.grad = None
        out[kind] = _peak_bytes(step)
    return out


def measure() -> dict[int, dict[str, float]]:
    table = {}
    for world in WORLDS:
        per_rank = run_distributed(_worker, world, LOCAL_BATCH, DIM, timeout=600)
        table[world] = {k: max(r[k] for r in per_rank) / MIB for k in KINDS}
        print(f"W={world} N={world * LOCAL_BATCH}: {table[world]}", flush=True)
    return table


def render(table: dict[int, dict[str, float]]) -> str:
    b, d = LOCAL_BATCH, DIM
    lines = [
        "<!-- loss-memory:begin -->",
        "Written by `make bench` (`tests/bench/bench_loss_memory.py`). Peak memory the loss adds "
        f"per rank (MiB, forward + backward, gather included), float32, fixed local batch "
        f"B = {b} pairs of D = {d} features, so the global batch N = W x B grows with the world "
        "size W (gloo processes on CPU). Measured with torch's profiler (profile_memory): the "
        "highest running sum of allocations minus frees inside the loss call; largest over ranks.",
        "",
        "| W | N | " + " | ".join(KINDS) + " | full / local |",
        "| ---: | ---: | " + " | ".join("---:" for _ in KINDS) + " | ---: |",
    ]
    for world, row in table.items():
        ratio = row[KINDS[1]] / row[KINDS[0]]
        cells = " | ".join(f"{row[k]:.1f}" for k in KINDS)
        lines.append(f"| {world} | {world * b} | {cells} | {ratio:.1f}x |")
    lines += [
        "",
        "One float32 B x N matrix is "
        + ", ".join(f"{b * w * b * 4 / MIB:.0f} MiB at W={w}" for w in table)
        + "; one N x N matrix "
        + ", ".join(f"{(w * b) ** 2 * 4 / MIB:.0f} MiB" for w in table)
        + ". The local form grows linearly in N (its logits are B x N), the full matrix "
        "quadratically; both gather the same N x D features.",
        "",
        f"Machine: {os.cpu_count()} CPUs, {platform.machine()}; torch {torch.__version__}. "
        "Reproduce: `.venv/bin/python -m pytest -q -s tests/bench/bench_loss_memory.py` "
        "(`BENCH_LOSS_WORLDS`, `BENCH_LOSS_BATCH`, `BENCH_LOSS_DIM`).",
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


def test_loss_memory_local_vs_full_matrix() -> None:
    table = measure()
    write_doc(render(table))
    worlds = sorted(table)
    local = [table[w][KINDS[0]] for w in worlds]
    full = [table[w][KINDS[1]] for w in worlds]
    # The local form stays below the full matrix, and the gap widens as N grows.
    assert all(lo < fu for lo, fu in zip(local, full))
    assert full[-1] / local[-1] > full[0] / local[0]


if __name__ == "__main__":
    print(render(measure()))
