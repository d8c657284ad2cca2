"""Rank and world discovery, and the process group, from torchrun's or Slurm's environment.

This file and loss/gather.py are the only places that call torch.distributed. Training always
runs inside a process group, even with one process, because DeepSpeed requires one; without
torchrun's variables we make a single-process group on loopback (plain `python -m ...`).

Two groups, one per kind of tensor. NCCL moves CUDA tensors only, so on GPUs the default group
(nccl) carries the training collectives (DeepSpeed's gradient reductions, the loss's gather),
and a second group over the same ranks, gloo, carries the host-side agreement: stop flags,
barriers, eval counts and pickled objects. On CPU both are the one gloo group. Every helper
below goes through `host_group()`, so none of them can hand NCCL a CPU tensor.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def nodes(self) -> int:
        return max(1, self.world_size // max(1, self.local_world_size))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fill_env() -> None:
    """Give RANK/WORLD_SIZE/... a value when no launcher set them (Slurm srun per task, or none)."""
    env = os.environ
    if "RANK" in env:
        return
    if "SLURM_PROCID" in env and "MASTER_ADDR" in env:
        env["RANK"] = env["SLURM_PROCID"]
        env["WORLD_SIZE"] = env["SLURM_NTASKS"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        env.setdefault("LOCAL_WORLD_SIZE", env.get("SLURM_NTASKS_PER_NODE", "1"))
        return
    env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", str(_free_port()))


# The gloo group of host-side collectives when the default group cannot take CPU tensors (nccl);
# None means the default group takes them itself (gloo).
_HOST_GROUP: dist.ProcessGroup | None = None


def host_group() -> dist.ProcessGroup | None:
    """The group for CPU tensors and objects: the gloo side group on GPUs, else the default."""
    return _HOST_GROUP


def setup(timeout_s: int = 1800) -> DistInfo:
    """Initialise the process group once: nccl on GPUs, gloo on CPU (DS_ACCELERATOR=cpu); on
    GPUs also the gloo group of host-side collectives (see the module docstring)."""
    _fill_env()
    use_cuda = torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu"
    if not use_cuda:
        # DeepSpeed picks its accelerator from this variable before anything else is imported.
        os.environ["DS_ACCELERATOR"] = "cpu"
    local_rank = int(os.environ["LOCAL_RANK"])
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    backend = "nccl" if use_cuda else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    use_host_group(timeout_s)
    world = dist.get_world_size()
    return DistInfo(
        rank=dist.get_rank(),
        world_size=world,
        local_rank=local_rank,
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", world)),
        device=device,
        backend=backend,
    )


def use_host_group(timeout_s: int = 1800) -> None:
    """Create the gloo side group if the default group's backend refuses CPU tensors.

    Called by setup(); also by whoever initialised the default group itself (tests). Every rank
    must call it, in the same order relative to other group creations (new_group is collective).
    """
    global _HOST_GROUP
    _HOST_GROUP = None
    if not dist.is_initialized() or _takes_cpu_tensors(dist.group.WORLD):
        return
    _HOST_GROUP = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))


def _takes_cpu_tensors(group: dist.ProcessGroup) -> bool:
    # A process group dispatches by device type; nccl registers "cuda" only.
    try:
        return group._get_backend(torch.device("cpu")) is not None
    except RuntimeError:
        return False


def _multi() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """The mean over ranks of a tensor on the training device (the default group: NCCL takes
    CUDA tensors, gloo CPU ones). A collective: every rank calls it at the same steps."""
    if not _multi():
        return value
    out = value.detach().clone()
    dist.all_reduce(out)
    return out / dist.get_world_size()


def sum_over_group_(value: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Sum `value` in place over `group`'s ranks (None: the default group) and return it; a
    tensor on the device that group's backend takes. For groups someone else built, such as
    DeepSpeed's data-parallel group (engine/deepspeed.py's gradient norm)."""
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(value, op=dist.ReduceOp.SUM, group=group)
    return value


def barrier() -> None:
    """Wait for every rank (host side: no device stream is involved)."""
    if dist.is_initialized():
        dist.barrier(group=host_group())


def all_gather_object(obj: object) -> list[object]:
    """Every rank's `obj`, in rank order ([obj] for one process); pickled, so keep it small and
    on the CPU (eval embeddings and keys, not training tensors)."""
    if not _multi():
        return [obj]
    out: list[object] = [None] * dist.get_world_size()
    # On the gloo group the objects travel as CPU byte tensors; on nccl they would be copied to
    # the GPU and back for nothing.
    dist.all_gather_object(out, obj, group=host_group())
    return out


def teardown() -> None:
    global _HOST_GROUP
    if dist.is_initialized():
        dist.destroy_process_group()
    _HOST_GROUP = None


def any_rank(flag: bool) -> bool:
    """True on every rank when it is true on any (a stop request must be seen by all ranks at
    the same step, or they would disagree on whether to enter the next collective)."""
    if not _multi():
        return flag
    t = torch.tensor([int(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=host_group())
    return bool(t.item())
