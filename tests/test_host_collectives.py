"""Host-side collectives stay legal when the default group is NCCL, which refuses CPU tensors.

    .venv/bin/python -m pytest tests/test_host_collectives.py -q

No GPU is needed to show it: the processes' default group gets a backend that, like NCCL, has
no CPU side (gloo registered for the "cuda" device type alone, tests/dist_utils.py), so any CPU
tensor that reaches it raises exactly as it would on a GPU machine. Stop flags, barriers,
pickled objects and the eval's counts must all travel on the gloo side group instead.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as tdist
from dist_utils import CUDA_ONLY, run_distributed


def _host_worker(rank: int, world: int, run_dir: str, eval_set: str) -> dict[str, object]:
    from clipforge.engine import dist
    from clipforge.eval.zeroshot import sum_over_ranks
    from clipforge.preempt import Preemption

    dist.use_host_group()  # what dist.setup() does after creating the default group
    out: dict[str, object] = {}
    try:  # the emulation holds: a CPU tensor on the default group is refused
        tdist.all_reduce(torch.ones(1))
        out["default_refuses_cpu"] = False
    except RuntimeError:
        out["default_refuses_cpu"] = True
    out["any"] = dist.any_rank(rank == 1)
    out["none"] = dist.any_rank(False)
    dist.barrier()
    out["objects"] = dist.all_gather_object({"rank": rank})
    out["sum"] = sum_over_ranks(torch.tensor([rank + 1])).tolist()

    # A stop request on rank 1 only, polled every 3 steps: all ranks see it at step 3 alike,
    # and the steps in between cost no collective (they answer False without asking).
    preempt = Preemption(Path(run_dir), rank == 0, every=3)
    preempt.signalled = rank == 1
    out["polls"] = [preempt.requested(step) for step in range(1, 7)]

    # The whole eval suite (zero-shot counts, retrieval's gathered embeddings).
    from test_eval_dist import evaluate_on

    out["eval"] = evaluate_on(rank, world, eval_set, 6)
    return out


@pytest.mark.multiproc
def test_host_collectives_avoid_a_cuda_only_default_group(tmp_path: Path) -> None:
    from eval_data import write_eval_set
    from test_eval_dist import evaluate_on

    eval_set = str(write_eval_set(tmp_path / "set", per_class=5))
    results = run_distributed(
        _host_worker, 2, str(tmp_path), eval_set, backend=CUDA_ONLY, timeout=180
    )
    single = evaluate_on(0, 1, eval_set, 6)
    for rank, r in enumerate(results):
        assert r["default_refuses_cpu"], "the emulated NCCL group accepted a CPU tensor"
        assert r["any"] is True and r["none"] is False
        assert r["objects"] == [{"rank": 0}, {"rank": 1}]
        assert r["sum"] == [3]
        assert r["polls"] == [False, False, True, False, False, True], (rank, r["polls"])
        assert r["eval"] == single  # same numbers as one process
