"""Losses: the CLIP contrastive loss over the global batch and the gather it rests on."""

from clipforge.loss.contrastive import ContrastiveLoss
from clipforge.loss.gather import all_gather_with_grad, check_same_shape, world_info

__all__ = ["ContrastiveLoss", "all_gather_with_grad", "check_same_shape", "world_info"]
