"""The training task: model + loss behind the small protocol the engine drives.

The engine only sees this module, so it stays ignorant of CLIP. The protocol (`TrainTask`):

- `embed(batch) -> dict[str, Tensor]`: the model's outputs for a batch. Every tensor is indexed
  by sample along dim 0 ([B, ...]) except those named in `shared_outputs`, which do not depend on
  the batch (CLIP's temperature).
- `loss_from(embeddings) -> (loss, metrics)`: the scalar loss of this rank and detached metrics,
  from a dict shaped like `embed`'s output. Any cross-rank gather lives in here (loss/gather.py),
  so it runs once over whatever rows it is given: one micro batch, or the rows of K chunks
  concatenated when the engine accumulates with cached embeddings (engine/accumulate.py).
- `forward(batch, embed_only=False)`: `loss_from(embed(batch))`, or `embed(batch)` alone. The
  engine calls the task through DeepSpeed's wrapper (hooks, ZeRO-3 gathering), whose forward is
  the only entry point, hence the flag.
- `param_bounds() -> {name: (low, high)}`: parameters the engine clamps into a range after
  every optimizer step (CLIP's log-temperature), in whatever copies ZeRO keeps of them.

The engine compiles the whole task module (DeepSpeed's `engine.compile()`, after initialize);
`loss_from` is excluded from tracing, so the towers are compiled and the loss with its
collectives and host-side checks runs eagerly.

The model returns a dict keyed like the loss's arguments, so the loss can be swapped without
touching either side.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import Tensor, nn

Batch = dict[str, Any]


class TrainTask(Protocol):
    """What engine/ needs from a task module (ContrastiveTask below is the one we ship)."""

    shared_outputs: tuple[str, ...]

    def embed(self, batch: Batch) -> dict[str, Tensor]: ...

    def loss_from(self, embeddings: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]: ...

    def param_bounds(self) -> dict[str, tuple[float, float]]: ...


class ContrastiveTask(nn.Module):
    """A two-tower model and a loss over its outputs: the softmax (ContrastiveLoss) or the
    sigmoid (SigLipLoss) loss, whose `loss_and_metrics` takes the model's output dict."""

    def __init__(self, model: nn.Module, loss: nn.Module):
        super().__init__()
        self.model = model
        self.loss = loss
        # The temperature (and the sigmoid loss's bias) is one value for the whole batch:
        # accumulation must count it once.
        self.shared_outputs: tuple[str, ...] = ("logit_scale",) + (
            ("logit_bias",) if getattr(model, "logit_bias", None) is not None else ()
        )

    def embed(self, batch: Batch) -> dict[str, Tensor]:
        return self.model(batch["image"].to(self.compute_dtype), batch["text"])

    @property
    def compute_dtype(self) -> torch.dtype:
        # Under bf16/fp16 DeepSpeed casts the weights; the images must follow.
        return self.model.logit_scale.dtype

    @torch.compiler.disable
    def loss_from(self, embeddings: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        # The loss runs in fp32 whatever the towers' precision: it is [B, N] small next to the
        # towers, and a bf16 softmax over N logits loses the small negatives' gradients.
        # The metrics are the loss's own (accuracies, per-direction or per-sign losses, scale,
        # bias), detached; the engine reads them back only on the steps that log.
        out = {k: v.float() for k, v in embeddings.items()}
        return self.loss.loss_and_metrics(**out)

    def forward(
        self, batch: Batch, embed_only: bool = False
    ) -> dict[str, Tensor] | tuple[Tensor, dict[str, Tensor]]:
        embeddings = self.embed(batch)
        return embeddings if embed_only else self.loss_from(embeddings)

    def param_bounds(self) -> dict[str, tuple[float, float]]:
        return {f"model.{k}": v for k, v in self.model.param_bounds().items()}

    # Evaluation goes through the task too, so that the engine (which wraps this module, and
    # under ZeRO-3 gathers its partitioned weights) stays the only handle on the parameters.
    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(image.to(self.compute_dtype))

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(text)
