"""Image tower: a timm trunk plus the projection into the joint image-text space.

Use timm's `*_clip_*` ViTs (LayerNorm before the transformer, class-token pooling, patch
embedding without bias) with a bias-free projection: parameter counts then equal
open_clip's ViTs. timm's CLIP ResNets (`resnet50_clip`, ...) end in CLIP's attention pool,
whose own output Linear projects to embed_dim, so no extra projection is added for them.

    PYTHONPATH=src python -c "from clipforge.config import ImageTowerConfig as C; \
from clipforge.model.image_tower import build_image_tower as b; print(b(C(), 512))"
"""

from __future__ import annotations

from typing import Any

import timm
import torch
from omegaconf import DictConfig, OmegaConf
from timm.layers import AttentionPool2d, PatchDropout, RotAttentionPool2d, trunc_normal_
from torch import nn

from clipforge.config import ImageTowerConfig


class ImageTower(nn.Module):
    """Images [B, 3, H, W] -> image embeddings [B, embed_dim] (not normalized)."""

    def __init__(self, trunk: nn.Module, proj: nn.Module) -> None:
        super().__init__()
        self.trunk = trunk
        self.proj = proj

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Pass through to timm, which checkpoints block by block."""
        self.trunk.set_grad_checkpointing(enable)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.proj(self.trunk(image))


def _timm_kwargs(cfg: ImageTowerConfig) -> dict[str, Any]:
    """Keyword arguments for timm.create_model, with img_size taken from cfg.image_size."""
    extra = cfg.timm_kwargs
    # A hydra-composed config hands us a DictConfig; timm wants plain lists and dicts.
    if isinstance(extra, DictConfig):
        extra = OmegaConf.to_container(extra, resolve=True)
    extra = dict(extra)
    if "img_size" in extra and extra["img_size"] != cfg.image_size:
        raise ValueError(
            f"image.timm_kwargs.img_size={extra['img_size']} disagrees with "
            f"image.image_size={cfg.image_size}; set image.image_size only"
        )
    extra["img_size"] = cfg.image_size
    if cfg.patch_dropout > 0:
        extra["patch_drop_rate"] = cfg.patch_dropout
    return extra


def _create_trunk(cfg: ImageTowerConfig) -> nn.Module:
    kwargs = _timm_kwargs(cfg)
    try:
        return _create(cfg, kwargs)
    except TypeError as err:
        # Plain CNNs (resnet50, convnext, ...) take any input size and have no img_size
        # argument; only drop it for them, every other TypeError is a real config error.
        if "img_size" not in str(err):
            raise
    kwargs.pop("img_size")
    return _create(cfg, kwargs)


def _create(cfg: ImageTowerConfig, kwargs: dict[str, Any]) -> nn.Module:
    try:
        return timm.create_model(cfg.timm_name, pretrained=False, num_classes=0, **kwargs)
    except TypeError as err:
        if "patch_drop_rate" in str(err):
            raise ValueError(_no_patch_dropout(cfg)) from err
        raise


def _no_patch_dropout(cfg: ImageTowerConfig) -> str:
    return (
        f"image.patch_dropout={cfg.patch_dropout} needs a timm ViT with patch dropout; "
        f"{cfg.timm_name} has none"
    )


def clip_init_(trunk: nn.Module) -> bool:
    """Re-initialize a timm ViT as OpenAI CLIP's and open_clip's ViTs start; False if not a ViT.

    Those use PyTorch's own layer defaults (uniform +-1/sqrt(fan_in) for linear and conv
    weights), xavier-uniform q/k/v with zero attention biases (nn.MultiheadAttention), and a
    class token and position embedding drawn with std width**-0.5. timm's default (std 0.02
    everywhere, class token 1e-6) starts every image at nearly the same embedding: from
    scratch at small scale that costs the contrastive loss its first hundreds of steps.
    """
    if not isinstance(getattr(trunk, "pos_embed", None), nn.Parameter):
        return False
    for module in trunk.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.LayerNorm)):
            module.reset_parameters()
    for module in trunk.modules():
        qkv, proj = getattr(module, "qkv", None), getattr(module, "proj", None)
        if isinstance(qkv, nn.Linear) and isinstance(proj, nn.Linear):
            nn.init.xavier_uniform_(qkv.weight)
            for linear in (qkv, proj):
                if linear.bias is not None:
                    nn.init.zeros_(linear.bias)
    scale = trunk.num_features**-0.5
    nn.init.normal_(trunk.pos_embed, std=scale)
    if isinstance(getattr(trunk, "cls_token", None), nn.Parameter):
        nn.init.normal_(trunk.cls_token, std=scale)
    return True


def build_image_tower(cfg: ImageTowerConfig, embed_dim: int) -> ImageTower:
    """Build the timm trunk named by cfg.timm_name (never pretrained) and its projection."""
    trunk = _create_trunk(cfg)
    if cfg.init == "clip":
        clip_init_(trunk)
    if cfg.patch_dropout > 0 and not isinstance(getattr(trunk, "patch_drop", None), PatchDropout):
        # Some timm models swallow unknown kwargs; make sure the dropout really exists.
        raise ValueError(_no_patch_dropout(cfg))
    head = getattr(trunk, "head", None)
    if isinstance(head, (AttentionPool2d, RotAttentionPool2d)):
        # CLIP ResNet: the attention pool's output Linear (CLIP's c_proj, with bias) is the
        # projection. num_classes=0 removed it; put it back at embed_dim with CLIP's init.
        trunk.reset_classifier(embed_dim)
        trunk_proj = trunk.head.proj
        trunc_normal_(trunk_proj.weight, std=trunk_proj.in_features**-0.5)
        nn.init.zeros_(trunk_proj.bias)
        return ImageTower(trunk, nn.Identity())
    width = trunk.num_features
    # Bias-free like open_clip's `proj`; std width**-0.5 matches its scale * randn init.
    proj = nn.Linear(width, embed_dim, bias=False)
    nn.init.normal_(proj.weight, std=width**-0.5)
    return ImageTower(trunk, proj)
