"""AdamW parameter groups and the warmup + cosine schedule.

Weight decay only applies to matrices: CLIP (and open_clip after it) exempts biases, norm
gains, embeddings' scalar gains and the logit scale, since decaying them pulls the model
towards a degenerate solution rather than regularising it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from clipforge.config import OptimConfig, SchedConfig


def _no_decay(name: str, param: nn.Parameter) -> bool:
    return param.ndim < 2 or "logit_scale" in name or "norm" in name or name.endswith(".bias")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if _no_decay(name, p) else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    # torch's AdamW needs no compiled op, so a fresh machine starts at once (DeepSpeed's
    # FusedAdam/CPUAdam would JIT-compile for minutes). fused=True is torch's own one-kernel
    # update (CPU and CUDA, shipped precompiled): on CPU the default per-tensor loop of ~10
    # elementwise passes took ~30% of a small model's step (tests/bench/bench_train.py).
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        fused=True,
    )


def lr_lambda(cfg: SchedConfig, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the base lr at a step: linear warmup, then cosine down to min_lr_ratio."""
    warmup = cfg.warmup_steps
    floor = cfg.min_lr_ratio

    def fn(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        span = max(1, total_steps - warmup)
        progress = min(1.0, (step - warmup) / span)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return fn


def scheduler_factory(
    cfg: SchedConfig, total_steps: int
) -> Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]:
    """DeepSpeed wraps the optimizer first, then builds the scheduler on the wrapper."""
    fn = lr_lambda(cfg, total_steps)
    return lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, fn)
