"""The training task: model + loss behind one forward(batch) -> (loss, metrics).

The engine only sees this module, so it stays ignorant of CLIP; the model returns a dict keyed
like the loss's arguments, which lets the loss be swapped without touching either side.
"""

from __future__ import annotations

import torch
from torch import nn


class ContrastiveTask(nn.Module):
    def __init__(self, model: nn.Module, loss: nn.Module):
        super().__init__()
        self.model = model
        self.loss = loss

    def forward(
        self, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # Under bf16/fp16 DeepSpeed casts the weights; the images must follow.
        dtype = self.model.logit_scale.dtype
        out = self.model(batch["image"].to(dtype), batch["text"])
        loss = self.loss(**out)
        return loss, {"logit_scale": out["logit_scale"].detach().float().mean()}

    # Evaluation goes through the task too, so that the engine (which wraps this module, and
    # under ZeRO-3 gathers its partitioned weights) stays the only handle on the parameters.
    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(image.to(self.model.logit_scale.dtype))

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(text)
