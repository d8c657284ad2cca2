"""Losses over the global batch: CLIP's softmax (contrastive.py), SigLIP's sigmoid (siglip.py),
and the gather they rest on. `build_loss` maps the `loss` config section to one of them."""

from torch import nn

from clipforge.config import LossConfig
from clipforge.loss.contrastive import ContrastiveLoss
from clipforge.loss.gather import all_gather_with_grad, check_same_shape, world_info
from clipforge.loss.siglip import SigLipLoss


def build_loss(cfg: LossConfig) -> nn.Module:
    """The loss `cfg.kind` names (validated by config.validate)."""
    if cfg.kind == "siglip":
        return SigLipLoss(dist_impl=cfg.dist_impl)
    if cfg.kind == "clip":
        return ContrastiveLoss()
    raise ValueError(f"unknown loss.kind {cfg.kind!r}")


__all__ = [
    "ContrastiveLoss",
    "SigLipLoss",
    "all_gather_with_grad",
    "build_loss",
    "check_same_shape",
    "world_info",
]
