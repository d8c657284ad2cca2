"""CLIP: an image tower, a text tower and a learned temperature.

The forward returns the loss's arguments by name (model -> loss contract in ARCHITECTURE.md):
`{"image_features", "text_features", "logit_scale"}`, features L2-normalized and
`logit_scale` the multiplier for the cosine similarities (not its logarithm); a model built
with `init_logit_bias` (the sigmoid loss's) adds `"logit_bias"`, learned like the scale. Nothing here
knows about processes or DeepSpeed: the same module runs on a laptop and under ZeRO-3.

Precision (engine/precision.py): the towers run in whatever dtype their weights have; the
normalization and the temperature are computed in float32, so the loss gets float32 inputs
from a bf16 model too.

    PYTHONPATH=src python -c "from clipforge.config import ModelConfig; \
from clipforge.model import build_model; print(build_model(ModelConfig(), vocab_size=49408))"
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from clipforge.config import ModelConfig
from clipforge.model.image_tower import build_image_tower
from clipforge.model.text_tower import TextTower


class CLIP(nn.Module):
    """Two towers into one embed_dim space, plus a learned log temperature (and, for the
    sigmoid loss, a learned logit bias)."""

    def __init__(
        self,
        visual: nn.Module,
        text: nn.Module,
        init_logit_scale: float,
        max_logit_scale: float,
        init_logit_bias: float | None = None,
    ) -> None:
        super().__init__()
        self.visual = visual
        self.text = text
        # Shape [1], not a 0-dim scalar: DeepSpeed's ZeRO partitioning fails on 0-dim params.
        # Learned in log space so the multiplier stays positive whatever the optimizer does.
        self.logit_scale = nn.Parameter(torch.full([1], float(init_logit_scale)))
        self.max_logit_scale = float(max_logit_scale)
        # Shape [1] for the same reason. None: the softmax loss, which no bias can change.
        self.logit_bias = (
            None
            if init_logit_bias is None
            else nn.Parameter(torch.full([1], float(init_logit_bias)))
        )

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Trade compute for memory in both towers."""
        self.visual.set_grad_checkpointing(enable)
        self.text.set_grad_checkpointing(enable)

    def encode_image(self, image: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Images [B, 3, H, W] -> embeddings [B, embed_dim], unit-norm unless normalize=False."""
        features = self.visual(image)
        return F.normalize(features.float(), dim=-1) if normalize else features

    def encode_text(self, text: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Token ids [B, L] -> embeddings [B, embed_dim], unit-norm unless normalize=False."""
        features = self.text(text)
        return F.normalize(features.float(), dim=-1) if normalize else features

    def scale(self) -> torch.Tensor:
        """The temperature multiplier exp(logit_scale) in float32; shape [1]."""
        # No clamp here: a clamp in the forward has zero gradient past the cap, so Adam's
        # momentum carries the raw parameter further up and nothing ever brings it back. The
        # cap is a bound on the parameter instead (`param_bounds`), applied by the engine after
        # each optimizer step, as open_clip clamps after its step; the gradient stays live.
        return self.logit_scale.float().exp()

    def param_bounds(self) -> dict[str, tuple[float, float]]:
        """Parameters kept inside [low, high] after every optimizer step: the log-scale in
        [0, log(max_logit_scale)], so the multiplier stays in [1, max_logit_scale]."""
        return {"logit_scale": (0.0, math.log(self.max_logit_scale))}

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> dict[str, torch.Tensor]:
        """Images and token ids -> {"image_features", "text_features", "logit_scale"} and
        "logit_bias" (float32, shape [1]) when the model has one."""
        out = {
            "image_features": self.encode_image(image),
            "text_features": self.encode_text(text),
            "logit_scale": self.scale(),
        }
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias.float()
        return out


def vocab_problem(configured: int, tokenizer_vocab: int | None) -> str | None:
    """Why a text tower of `configured` rows (0: take the tokenizer's) cannot embed the ids of a
    tokenizer of `tokenizer_vocab` pieces; None when it can."""
    if not configured and not tokenizer_vocab:
        return (
            "model.text.vocab_size is 0 and no tokenizer gives one: set model.text.vocab_size "
            "or train with a tokenizer"
        )
    if configured and tokenizer_vocab and tokenizer_vocab > configured:
        # Ids up to tokenizer_vocab - 1 would index past the embedding table: silent garbage
        # on CPU, a device-side assert on GPU.
        return (
            f"the tokenizer has {tokenizer_vocab} pieces but model.text.vocab_size is "
            f"{configured}: set model.text.vocab_size={tokenizer_vocab} (or 0, to take the "
            "tokenizer's)"
        )
    return None


def build_model(cfg: ModelConfig, vocab_size: int | None = None) -> CLIP:
    """Build CLIP from its config. `vocab_size` is the tokenizer's: it fills
    cfg.text.vocab_size=0, and a tokenizer larger than a configured vocabulary is refused."""
    text_cfg = cfg.text
    problem = vocab_problem(text_cfg.vocab_size, vocab_size)
    if problem:
        raise ValueError(problem)
    vocab = text_cfg.vocab_size or vocab_size
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
    model = CLIP(visual, text, cfg.init_logit_scale, cfg.max_logit_scale, cfg.init_logit_bias)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model
