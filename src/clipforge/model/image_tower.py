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
from timm.layers.attention import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from clipforge.config import ImageTowerConfig
from clipforge.model.pooled import attend_one, maybe_checkpoint


class ImageTower(nn.Module):
    """Images [B, 3, H, W] -> image embeddings [B, embed_dim] (not normalized).

    A timm ViT that pools its class token runs its last block for that token only
    (model/pooled.py): the same features for a quarter of the block's matmul work."""

    def __init__(self, trunk: nn.Module, proj: nn.Module) -> None:
        super().__init__()
        self.trunk = trunk
        self.proj = proj
        # False runs timm's full forward (tests and the bench compare the two).
        self.last_block_pooled_only = pools_class_token(trunk)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Pass through to timm, which checkpoints block by block."""
        self.trunk.set_grad_checkpointing(enable)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if self.last_block_pooled_only:
            return self.proj(_class_token_forward(self.trunk, image))
        return self.proj(self.trunk(image))


def pools_class_token(trunk: nn.Module) -> bool:
    """Whether `trunk` is a plain timm ViT whose output is its class token after pre-norm blocks
    of timm's own Block/Attention: the trunks _class_token_forward reproduces. Anything else
    (average or attention pooling, other block types, a ResNet) runs timm's full forward."""
    if type(trunk) is not VisionTransformer or trunk.global_pool != "token":
        return False
    if trunk.attn_pool is not None or trunk.cls_token is None or len(trunk.blocks) == 0:
        return False
    last = trunk.blocks[-1]
    attn = getattr(last, "attn", None)
    return (
        type(last) is Block
        and type(attn) is Attention
        and getattr(attn, "gate", None) is None
        and attn.qkv.out_features == 3 * attn.proj.in_features
    )


def _class_token_forward(trunk: VisionTransformer, image: torch.Tensor) -> torch.Tensor:
    """timm's forward_features + forward_head for class-token pooling, with the last block run
    for the class token alone (pools_class_token says when this equals trunk(image))."""
    x = trunk.norm_pre(trunk.patch_drop(trunk._pos_embed(trunk.patch_embed(image))))
    *blocks, last = trunk.blocks
    for block in blocks:
        x = maybe_checkpoint(trunk.grad_checkpointing, block, x)
    x = maybe_checkpoint(trunk.grad_checkpointing, _last_block_class_token, last, x)
    x = trunk.norm(x)[:, 0]
    return trunk.head(trunk.head_drop(trunk.fc_norm(x)))


def _last_block_class_token(block: Block, x: torch.Tensor) -> torch.Tensor:
    """timm's Block.forward at row 0 only: [B, N, C] -> [B, 1, C]."""
    attn = block.attn
    h = block.norm1(x)
    out = attend_one(
        attn.qkv(h),
        attn.num_heads,
        dropout_p=attn.attn_drop.p if attn.training else 0.0,
        q_norm=attn.q_norm,
        k_norm=attn.k_norm,
    )
    norm = getattr(attn, "norm", None)  # timm's scale_norm (absent from older timm)
    out = attn.proj_drop(attn.proj(out if norm is None else norm(out)))
    x = x[:, :1] + block.drop_path1(block.ls1(out))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


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
