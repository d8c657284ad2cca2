"""DeepSpeed as the trainer, on CPU (gloo) as on GPUs (nccl): the project's one deepspeed import.

The engine wraps a *task* module whose forward takes a batch dict and returns
`(loss, metrics)`; it never knows the task is CLIP. Batch sizes, clipping and precision are
derived here, once, from the typed config, on top of the plain DeepSpeed dict from
conf/deepspeed/ (ZeRO stage and its knobs).
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from clipforge.config import Config
from clipforge.engine.dist import DistInfo
from clipforge.engine.optim import build_optimizer, scheduler_factory

os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")

import deepspeed  # noqa: E402  (must follow DS_ACCELERATOR)
from deepspeed.utils import logger as ds_logger  # noqa: E402

ds_logger.setLevel(logging.WARNING)


def build_ds_config(cfg: Config, world_size: int) -> dict[str, Any]:
    """The DeepSpeed dict: conf/deepspeed/<stage>.yaml plus what the typed config decides."""
    ds = copy.deepcopy(dict(cfg.deepspeed))
    ds["train_micro_batch_size_per_gpu"] = cfg.train.batch_size
    ds["gradient_accumulation_steps"] = ds.get("gradient_accumulation_steps", 1)
    ds["train_batch_size"] = cfg.train.batch_size * world_size * ds["gradient_accumulation_steps"]
    ds["gradient_clipping"] = cfg.train.grad_clip
    ds["bf16"] = {"enabled": cfg.train.precision == "bf16"}
    # loss_scale 0 selects the dynamic loss scale, which fp16 needs to avoid underflow.
    ds["fp16"] = {"enabled": cfg.train.precision == "fp16", "loss_scale": 0}
    # Our AdamW is torch's: ZeRO accepts it once told that a client optimizer is intended.
    ds["zero_allow_untested_optimizer"] = True
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("wall_clock_breakdown", False)
    return ds


class Engine:
    """One training step = forward, backward, step; plus checkpoints and weight export."""

    def __init__(self, task: nn.Module, cfg: Config, dist_info: DistInfo):
        if dist_info.device.type == "cpu":
            # The shared-memory comm op JIT-compiles on first use; gloo needs none of it.
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        self.cfg = cfg
        self.device = dist_info.device
        self.ds_config = build_ds_config(cfg, dist_info.world_size)
        task = task.to(self.device)
        self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=task,
            optimizer=build_optimizer(task, cfg.optim),
            lr_scheduler=scheduler_factory(cfg.sched, cfg.train.steps),
            config=self.ds_config,
            dist_init_required=False,
        )
        self.zero_stage = self.ds.zero_optimization_stage()

    @property
    def module(self) -> nn.Module:
        return self.ds.module

    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {
            k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v
            for k, v in batch.items()
        }

    def train_step(self, batch: dict[str, Any]) -> dict[str, float]:
        self.ds.train()
        loss, metrics = self.ds(self._to_device(batch))
        self.ds.backward(loss)
        self.ds.step()
        out = {"loss": loss.detach().float().item(), "lr": self.scheduler.get_last_lr()[0]}
        grad_norm = self.ds.get_global_grad_norm()
        if grad_norm is not None:
            out["grad_norm"] = float(grad_norm)
        out.update({k: float(v) for k, v in metrics.items()})
        return out

    @torch.no_grad()
    def forward_eval(self, fn_name: str, *args: Any) -> Any:
        """Call a method of the task's model in eval mode (all ranks must call under ZeRO-3)."""
        self.ds.eval()
        args = [a.to(self.device) if torch.is_tensor(a) else a for a in args]
        return getattr(self.module, fn_name)(*args)

    # -- checkpoints -------------------------------------------------------------------------
    def save(self, ckpt_dir: Path, tag: str, client_state: dict[str, Any]) -> None:
        """Every rank writes its ZeRO partition; DeepSpeed writes the `latest` pointer."""
        self.ds.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state)

    def load(self, ckpt_dir: Path, tag: str | None) -> dict[str, Any]:
        path, client_state = self.ds.load_checkpoint(str(ckpt_dir), tag=tag)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint {tag or 'latest'} in {ckpt_dir}")
        return client_state or {}

    def fp32_state_dict(self, ckpt_dir: Path, tag: str) -> dict[str, torch.Tensor]:
        """Full fp32 weights: from the ZeRO partitions (stages 1-3 hold the fp32 master copy
        in the optimizer), or the module itself for stage 0."""
        if self.zero_stage == 0:
            sd = {k: v.detach().float().cpu().clone() for k, v in self.module.state_dict().items()}
        else:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
            sd = {k: v.float().contiguous() for k, v in sd.items()}
        return sd


def remove_checkpoint(ckpt_dir: Path, tag: str) -> None:
    shutil.rmtree(Path(ckpt_dir) / tag, ignore_errors=True)
