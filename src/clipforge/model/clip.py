"""CLIP: an image tower, a text tower and a learned temperature.

The forward returns the loss's arguments by name (model -> loss contract in ARCHITECTURE.md):
`{"image_features", "text_features", "logit_scale"}`, features L2-normalized and
`logit_scale` the multiplier for the cosine similarities (not its logarithm). Nothing here
knows about processes or DeepSpeed: the same module runs on a laptop and under ZeRO-3.

    PYTHONPATH=src python -c "from clipforge.config import ModelConfig; \
from clipforge.model import build_model; print(build_model(ModelConfig(), vocab_size=49408))"
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clipforge.config import ModelConfig
from clipforge.model.image_tower import build_image_tower
from clipforge.model.text_tower import TextTower


class CLIP(nn.Module):
    """Two towers into one embed_dim space, plus a learned log temperature."""

    def __init__(
        self,
        visual: nn.Module,
        text: nn.Module,
        init_logit_scale: float,
        max_logit_scale: float,
    ) -> None:
        super().__init__()
        self.visual = visual
        self.text = text
        # Shape [1], not a 0-dim scalar: DeepSpeed's ZeRO partitioning fails on 0-dim params.
        # Learned in log space so the multiplier stays positive whatever the optimizer does.
        self.logit_scale = nn.Parameter(torch.full([1], float(init_logit_scale)))
        self.max_logit_scale = float(max_logit_scale)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Trade compute for memory in both towers."""
        self.visual.set_grad_checkpointing(enable)
        self.text.set_grad_checkpointing(enable)

    def encode_image(self, image: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Images [B, 3, H, W] -> embeddings [B, embed_dim], unit-norm unless normalize=False."""
        features = self.visual(image)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, text: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Token ids [B, L] -> embeddings [B, embed_dim], unit-norm unless normalize=False."""
        features = self.text(text)
        return F.normalize(features, dim=-1) if normalize else features

    def scale(self) -> torch.Tensor:
        """The temperature multiplier exp(logit_scale), capped at max_logit_scale; shape [1]."""
        # The cap is applied here, in the forward, rather than by clamping the parameter in
        # place after each step (open_clip's way): under ZeRO-3 the parameter is partitioned
        # across ranks outside the forward, so an in-place clamp would not see its data.
        # Past the cap the gradient to logit_scale is zero, so the scale simply stays at it.
        return self.logit_scale.exp().clamp(max=self.max_logit_scale)

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> dict[str, torch.Tensor]:
        """Images and token ids -> {"image_features", "text_features", "logit_scale"}."""
        return {
            "image_features": self.encode_image(image),
            "text_features": self.encode_text(text),
            "logit_scale": self.scale(),
        }


def build_model(cfg: ModelConfig, vocab_size: int | None = None) -> CLIP:
    """Build CLIP from its config; vocab_size (from the tokenizer) fills cfg.text.vocab_size=0."""
    text_cfg = cfg.text
    vocab = text_cfg.vocab_size or vocab_size
    if not vocab:
        raise ValueError(
            "model.text.vocab_size is 0 and no vocab_size was given: pass the tokenizer's "
            "vocabulary size to build_model or set model.text.vocab_size"
        )
    if vocab_size and vocab_size > vocab:
        # Token ids up to vocab_size - 1 would index past the embedding table.
        raise ValueError(
            f"tokenizer vocabulary ({vocab_size}) is larger than model.text.vocab_size ({vocab})"
        )
    visual = build_image_tower(cfg.image, cfg.embed_dim)
    text = TextTower(
        vocab_size=vocab,
        context_length=text_cfg.context_length,
        width=text_cfg.width,
        layers=text_cfg.layers,
        heads=text_cfg.heads,
        embed_dim=cfg.embed_dim,
        mlp_ratio=text_cfg.mlp_ratio,
    )
    model = CLIP(visual, text, cfg.init_logit_scale, cfg.max_logit_scale)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model
