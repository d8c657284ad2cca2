"""Preemption: a request to checkpoint at the next step boundary and stop.

A request is SIGUSR1 delivered to a trainer process, or the file RUN_DIR/preempt.flag, which
launch/slurm.sh creates when Slurm signals the batch script (`#SBATCH --signal=B:USR1@120`),
since torchrun does not forward USR1 to its workers. Ranks agree through one tiny all-reduce on
the host group (gloo, also in an NCCL run) every `every` steps, at the same steps on every rank,
so all of them save the same step and stop together. Polling every step would put a blocking
host round trip into every step; Slurm's warning (120 s) leaves time for a few dozen steps.
"""

from __future__ import annotations

import signal
from pathlib import Path

from clipforge.engine import dist


class Preemption:
    def __init__(self, run_dir: Path, is_main: bool, every: int = 1):
        self.flag = Path(run_dir) / "preempt.flag"
        self.every = max(1, every)
        self.signalled = False
        if is_main:  # a flag left by the previous (preempted) incarnation is consumed
            self.flag.unlink(missing_ok=True)
        signal.signal(signal.SIGUSR1, self._on_signal)

    def _on_signal(self, signum: int, frame: object) -> None:
        self.signalled = True

    def requested(self, step: int) -> bool:
        """True on every rank alike when any rank was asked to stop; polls at multiples of
        `every` only (the step counter is the same on every rank), False in between."""
        if step % self.every:
            return False
        return dist.any_rank(self.signalled or self.flag.exists())
