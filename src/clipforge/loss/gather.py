"""All-gather with gradient: with siglip.py's ring exchange, the only torch.distributed calls
outside engine/.

The contrastive loss needs every rank's embeddings to build its rows of the global N x N
similarity matrix, and it needs gradients to flow back through the gather to the rank that
produced each embedding. Everything here degrades to the identity when there is one process or
no process group, so the loss runs unchanged on a laptop CPU.

Check the maths on CPU with: `PYTHONPATH=src:. python -m pytest tests/test_loss.py -q`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

try:
    # The non-deprecated functional collective. Earlier releases call the same op
    # `all_gather_tensor_autograd`, which is now a deprecated alias that warns on every call.
    from torch.distributed._functional_collectives import all_gather_single_autograd as _ag_single
    from torch.distributed._functional_collectives import wait_tensor as _wait_tensor
except ImportError:  # pragma: no cover - older torch, see _gather_cat below
    _ag_single = None
    _wait_tensor = None


def world_info() -> tuple[int, int]:
    """(rank, world_size) of the default process group; (0, 1) when there is none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_gather_sizes(x: Tensor) -> list[tuple[int, ...]]:
    """Every rank's shape of `x`, in rank order (one tiny collective, then a host sync).

    Every rank must pass a tensor with the same number of dimensions; that holds because all
    ranks run the same code (SPMD), so the shapes themselves are what we compare.
    """
    _, world = world_info()
    if world == 1:
        return [tuple(x.shape)]
    # The collective runs on x's device because NCCL only moves CUDA tensors.
    local = torch.tensor(list(x.shape), dtype=torch.int64, device=x.device)
    gathered = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(gathered, local)
    return [tuple(int(v) for v in t.tolist()) for t in gathered]


def check_same_shape(x: Tensor, *, name: str = "all_gather_with_grad", hint: str = "") -> None:
    """Raise ValueError, on every rank alike, unless `x` has the same shape on all ranks.

    Every rank receives the same list of shapes, so either all ranks raise the same error or
    none does: no rank is left blocked in a collective its peers never reach.
    """
    rank, world = world_info()
    if world == 1:
        return
    shapes = all_gather_sizes(x)
    if len(set(shapes)) != 1:
        listed = ", ".join(f"rank {r}: {list(s)}" for r, s in enumerate(shapes))
        raise ValueError(
            f"{name} needs the same shape on every rank, got {listed} (this is rank {rank})."
            + (f" {hint}" if hint else "")
        )


def all_gather_with_grad(x: Tensor, *, check_shapes: bool = True) -> Tensor:
    """Concatenate `x` over ranks along dim 0 (rank 0's rows first), differentiably.

    Backward: each rank receives, for its own slice, the SUM over ranks of the gradients every
    rank computed for that slice (a reduce-scatter with sum). That sum is what makes the local
    contrastive loss exact; see contrastive.py for the argument.

    All ranks must hold the same shape. With `check_shapes` (the default) check_same_shape runs
    first. Without the check a mismatch is not a Python error: gloo aborts the process (SIGABRT,
    "Received data size doesn't match expected size") and NCCL can hang or read past the
    buffer. The check costs one tiny all-gather and a host sync; callers that have already
    checked (the losses check their inputs once) or whose shapes are fixed pass False.

    World size 1 or no process group: returns `x` itself.
    """
    _, world = world_info()
    if world == 1:
        return x
    if check_shapes:
        check_same_shape(x)
    return _gather_cat(x.contiguous())


def _gather_cat(x: Tensor) -> Tensor:
    # Why this collective (verified on gloo with torch 2.14.1 by tests/test_loss.py, which checks
    # each rank's gradient against a single process holding the global batch):
    # - all_gather_single_autograd is the non-deprecated functional collective. Its backward is a
    #   registered reduce_scatter_tensor(sum), which is exactly the summed gradient we need, and
    #   gloo implements that reduce-scatter in current torch. It returns an AsyncCollectiveTensor;
    #   wait_tensor (whose backward is the identity) turns it into a plain tensor so the loss
    #   never sees the subclass.
    # - torch.distributed.nn.functional.all_gather (deprecated, same summed gradient, emulated
    #   with all_to_all on gloo) is the fallback for torch releases without the functional op.
    # The plain dist.all_gather is NOT an option: it has no autograd, so the other ranks' rows
    # would be constants and every rank would lose the gradient other ranks send to its slice.
    if _ag_single is not None and _wait_tensor is not None:
        return _wait_tensor(_ag_single(x, 0, dist.group.WORLD))
    from torch.distributed.nn.functional import all_gather  # pragma: no cover

    return torch.cat(all_gather(x), dim=0)  # pragma: no cover
