"""Rank-0 helpers and loggers: metrics.jsonl always, wandb when asked, nothing on other ranks.

Call sites never test the rank: non-main ranks get a logger whose methods do nothing.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from clipforge.config import LoggerConfig

_log = logging.getLogger("clipforge")


def setup_console(is_main: bool) -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    _log.handlers[:] = [handler]
    _log.setLevel(logging.INFO if is_main else logging.WARNING)
    _log.propagate = False


def print0(msg: str) -> None:
    """Log on rank 0 only (other ranks' level is WARNING)."""
    _log.info(msg)


class NullLogger:
    def log(self, step: int, metrics: dict[str, Any]) -> None:
        pass

    def log_images(self, step: int, images: dict[str, Any]) -> None:
        """PIL images by name (eval figures)."""

    def close(self) -> None:
        pass


class JsonlLogger(NullLogger):
    """One JSON object per logged step in RUN_DIR/metrics.jsonl, whatever else is configured."""

    def __init__(self, run_dir: Path, wandb_run: Any = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = self.path.open("a", buffering=1)
        self._wandb = wandb_run

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        row = {"step": step, "time": round(time.time(), 3), **metrics}
        self._f.write(json.dumps(row) + "\n")
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)

    def log_images(self, step: int, images: dict[str, Any]) -> None:
        """Each image to RUN_DIR/eval/figures/NAME_stepN.png (readable without wandb) and
        to wandb when it is on."""
        folder = self.path.parent / "eval" / "figures"
        folder.mkdir(parents=True, exist_ok=True)
        for name, img in images.items():
            img.save(folder / f"{name.replace('/', '_')}_step{step:08d}.png")
        if self._wandb is not None:
            import wandb

            self._wandb.log({k: wandb.Image(v) for k, v in images.items()}, step=step)

    def close(self) -> None:
        self._f.close()
        if self._wandb is not None:
            self._wandb.finish()


def build_logger(
    cfg: LoggerConfig, run_dir: Path, is_main: bool, config: dict[str, Any]
) -> NullLogger:
    if not is_main:
        return NullLogger()
    run = None
    if cfg.kind == "wandb":
        import wandb

        # Offline by default: no account and no network; the files land in RUN_DIR/wandb.
        run = wandb.init(
            project=cfg.project,
            name=cfg.name,
            mode=cfg.mode,
            dir=str(run_dir),
            config=config,
            resume="allow",
            id=_wandb_id(run_dir),
        )
    return JsonlLogger(run_dir, run)


def _wandb_id(run_dir: Path) -> str:
    """A stable id per run directory, so a resumed run continues the same wandb run."""
    path = Path(run_dir) / "wandb_id.txt"
    if path.exists():
        return path.read_text().strip()
    rid = uuid.uuid4().hex[:8]
    path.write_text(rid)
    return rid


def memory_stats() -> dict[str, float]:
    """Peak host RSS of this process and, on GPUs, peak allocated device memory (GiB)."""
    import resource

    import torch

    out = {"mem_peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if torch.cuda.is_available():
        out["mem_peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return out


class Throughput:
    """Samples/s between two log points and the fraction of that time spent waiting for data."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.t0 = time.perf_counter()
        self.samples = 0
        self.data_wait = 0.0

    def add(self, samples: int, data_wait: float) -> None:
        self.samples += samples
        self.data_wait += data_wait

    def read(self) -> dict[str, float]:
        dt = max(1e-9, time.perf_counter() - self.t0)
        out = {"samples_per_s": self.samples / dt, "data_wait_frac": self.data_wait / dt}
        self.reset()
        return out
