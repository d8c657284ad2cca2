"""Run a function in N local processes joined by a gloo process group (for multi-process tests).

    from dist_utils import run_distributed
    results = run_distributed(my_fn, 2, arg)   # my_fn(rank, world_size, arg) on ranks 0 and 1

backend="cuda_only" gives the default group a backend that, like NCCL, has no CPU side (it is
gloo registered for the "cuda" device type alone): any collective on a CPU tensor through it
raises, as it would under NCCL on a GPU machine.

`my_fn` must be defined at module level in an importable module (the processes are spawned, so
it is pickled by name), and its return value must be torch.save-able. A rank that raises makes
run_distributed raise with that rank's traceback; a hang is cut off after `timeout` seconds.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import socket
import tempfile
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

# After one rank fails, the others usually block in a collective until the gloo timeout; give
# them this long to report their own error, then stop them.
_GRACE_S = 3.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    port: int,
    timeout: float,
    out: str,
    args: tuple[Any, ...],
    backend: str,
) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    # The test machines have few cores; N processes each using every core only thrash.
    torch.set_num_threads(1)
    try:
        if backend == CUDA_ONLY:
            _register_cuda_only()
        dist.init_process_group(
            backend,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout),
        )
        try:
            value = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        torch.save({"ok": True, "value": value}, out)
    except BaseException:
        torch.save({"ok": False, "error": traceback.format_exc()}, out)
        raise SystemExit(1) from None


CUDA_ONLY = "cuda_only"


def _register_cuda_only() -> None:
    def create(store, rank, size, timeout):
        return dist.ProcessGroupGloo(store, rank, size, timeout)

    if CUDA_ONLY not in dist.Backend.backend_list:
        dist.Backend.register_backend(CUDA_ONLY, create, devices=["cuda"])


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 120.0,
    backend: str = "gloo",
) -> list[Any]:
    """Call fn(rank, world_size, *args) in `world_size` gloo processes; return values by rank.

    Raises RuntimeError naming every failed rank with its traceback (or exit code when it died
    without one, e.g. a gloo abort), and TimeoutError if the ranks do not finish in `timeout`.
    """
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="clipforge-dist-") as tmp:
        outs = [str(Path(tmp) / f"rank{r}.pt") for r in range(world_size)]
        port = _free_port()
        procs = [
            ctx.Process(
                target=_entry,
                args=(fn, r, world_size, port, timeout, outs[r], args, backend),
                daemon=True,
            )
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        try:
            timed_out = _wait_all(procs, timeout)
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
                p.join()
        return _collect(procs, outs, timed_out, timeout)


def _wait_all(procs: list[Any], timeout: float) -> bool:
    """Wait for every process; stop early (after a grace period) once one has failed."""
    deadline = time.monotonic() + timeout
    while True:
        running = [p for p in procs if p.exitcode is None]
        if not running:
            return False
        if any(p.exitcode not in (None, 0) for p in procs):
            deadline = min(deadline, time.monotonic() + _GRACE_S)
        left = deadline - time.monotonic()
        if left <= 0:
            return True
        wait([p.sentinel for p in running], timeout=left)


def _collect(procs: list[Any], outs: list[str], timed_out: bool, timeout: float) -> list[Any]:
    results: list[Any] = []
    failures: list[str] = []
    raised = False
    for rank, (p, out) in enumerate(zip(procs, outs, strict=True)):
        record = torch.load(out, weights_only=False) if os.path.exists(out) else None
        if record is not None and record["ok"]:
            results.append(record["value"])
        elif record is not None:
            raised = True
            failures.append(f"--- rank {rank} raised:\n{record['error']}")
        elif p.exitcode == -9:
            failures.append(f"--- rank {rank} was still running and was killed")
        else:
            failures.append(f"--- rank {rank} died with exit code {p.exitcode}, no traceback")
    if not failures:
        return results
    # A rank's own exception explains a hang of the others better than the timeout does.
    if timed_out and not raised:
        raise TimeoutError(
            f"run_distributed: ranks did not finish within {timeout:.0f} s\n" + "\n".join(failures)
        )
    raise RuntimeError(
        f"run_distributed: {len(failures)} of {len(procs)} ranks failed\n" + "\n".join(failures)
    )
