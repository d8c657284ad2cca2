"""How DataLoader workers start and hand batches back, for every loader (train and eval):
the forkserver start method with what it preloads, and batch tensors in shared memory.

Workers (`data.workers`) start from a forkserver, not by fork (worker_context says why), so
what a worker needs, the StreamSpec with its transform and tokenizer, must pickle.
"""

from __future__ import annotations

import multiprocessing
import sys

import numpy as np
import torch
from torch.utils.data import get_worker_info

# What DataLoader workers unpickle (loaders, transforms, tokenizer): imported once in the
# forkserver, which each worker is forked from, rather than once per worker.
WORKER_PRELOAD = [
    "clipforge.data.samples",
    "clipforge.data.lanes",
    "clipforge.data.stream",
    "clipforge.data.eval_loader",
    "clipforge.data.transforms",
    "clipforge.data.tokenizer",
]


def worker_context() -> multiprocessing.context.BaseContext:
    """The start method of every loader's DataLoader workers: forkserver, not fork.

    By the time the trainer iterates a loader, NCCL, DeepSpeed and wandb have started threads;
    a fork copies their locks in whatever state they are (held ones are never released in the
    child) and the parent's CUDA state, which a child cannot use. A forkserver is a clean
    process, started once with WORKER_PRELOAD imported, that forks each worker cheaply; the
    worker gets the dataset (spec, transform, tokenizer) pickled, so those must pickle.
    """
    ctx = multiprocessing.get_context("forkserver")
    # Each worker re-runs the parent's main module, as under spawn (`python -m clipforge.train`:
    # 10 s of imports, deepspeed's among them). With every clipforge module the parent has
    # imported already in the server, that re-run finds its imports cached. Not the main module
    # itself: runpy warns when the module it runs is imported already.
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    ours = {m for m in sys.modules if m.startswith("clipforge.")}
    preload = sorted({*WORKER_PRELOAD, *ours} - {getattr(spec, "name", None)})
    # Read only when the server starts (the first workers of this process); harmless after.
    ctx.set_forkserver_preload(["__main__", *preload])
    return ctx


def shared_empty(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A batch tensor; in a DataLoader worker, allocated in shared memory as torch's own collate
    does, so handing it to the main process copies nothing (38 MB at 64 x 224 px)."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    proto = torch.empty(0, dtype=dtype)
    storage = proto._typed_storage()._new_shared(int(np.prod(shape)), device="cpu")
    return proto.new(storage).view(shape)
