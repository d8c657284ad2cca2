"""SigLIP's pairwise sigmoid loss over the GLOBAL batch, computed locally on each rank.

Every (image i, text j) pair of the N x N global batch is an independent binary problem:
positive when i == j, negative otherwise, with logit s * <I_i, T_j> + b. The global loss is

    L = -(1/N) * sum_{i, j} log sigmoid( z_ij * (s * I_i @ T_j + b) ),  z_ij = +1 if i == j else -1

(normalized by N, not N^2, as in the SigLIP paper and open_clip). Rank r owns rows i of its
B local images against all N texts:

    loss_r = -(1/B) * sum_{i in r, j} log sigmoid(...)

Unlike the softmax loss, one direction covers every pair (each (i, j) sits in exactly one rank's
rows), so only the texts are gathered. The model should return the learned bias as
`logit_bias` beside `logit_scale` (SigLIP initialises s = 10 and b = -10 so the N - 1
negatives per row do not swamp the start).

Exactness follows the argument in contrastive.py, point for point:
- value: mean_r loss_r = (1/W) * (1/B) * sum over all pairs = L, because B * W = N;
- images: I_r enters only loss_r, so d(loss_r)/dI_r = W * dL/dI_r;
- texts: T_q enters every rank's loss through the gather, whose backward sums over ranks, so
  rank q receives d(sum_r loss_r)/dT_q = W * dL/dT_q;
- the engine's 1/W average over ranks turns those into exactly dL/dtheta;
- s and b are replicated and applied after the gather: each rank's gradient is d(loss_r)/d(s, b)
  and their mean is dL/d(s, b), counted once;
- the positive of local row j is global column r * B + j (the gather is ordered by rank), which,
  like the 1/B normalization, needs equal local batch sizes: checked up front, as for
  ContrastiveLoss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clipforge.loss.contrastive import EQUAL_BATCHES
from clipforge.loss.gather import all_gather_with_grad, check_same_shape, world_info


class SigLipLoss(nn.Module):
    """Sigmoid loss over the global batch; returns this rank's local loss (see module doc).

    `image_features`, `text_features`: [B, D], L2-normalized. `logit_scale`: the multiplier
    (exp of the learned log-scale). `logit_bias`: the learned bias. Scale and bias are shape
    [] or [1].
    """

    def __init__(self, check_batch_sizes: bool = True) -> None:
        super().__init__()
        self.check_batch_sizes = check_batch_sizes

    def forward(
        self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor, logit_bias: Tensor
    ) -> Tensor:
        return self.loss_and_metrics(image_features, text_features, logit_scale, logit_bias)[0]

    def loss_and_metrics(
        self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor, logit_bias: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The scalar local loss and detached metrics over this rank's rows (for logging)."""
        if image_features.dim() != 2 or image_features.shape != text_features.shape:
            raise ValueError(
                "image_features and text_features must both be [B, D] with the same shape, got "
                f"{list(image_features.shape)} and {list(text_features.shape)}"
            )
        rank, world = world_info()
        local_batch = image_features.shape[0]
        if self.check_batch_sizes and world > 1:
            check_same_shape(image_features, name="SigLipLoss [batch, dim]", hint=EQUAL_BATCHES)
        all_text = all_gather_with_grad(text_features, check_shapes=False)  # checked above, if on
        logits = (logit_scale * image_features) @ all_text.T + logit_bias
        rows = torch.arange(local_batch, device=logits.device) + rank * local_batch
        positive = torch.arange(all_text.shape[0], device=logits.device) == rows[:, None]
        signs = positive.to(logits.dtype) * 2 - 1
        loss = -F.logsigmoid(signs * logits).sum() / local_batch
        with torch.no_grad():
            metrics = {
                "acc_i2t": (logits.argmax(dim=1) == rows).float().mean(),
                "positive_logit": logits[positive].mean(),
                "negative_logit": logits[~positive].mean(),
                "logit_scale": logit_scale.detach().reshape(()),
                "logit_bias": logit_bias.detach().reshape(()),
            }
        return loss, metrics
