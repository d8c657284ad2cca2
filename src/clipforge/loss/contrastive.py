"""CLIP's symmetric contrastive loss over the GLOBAL batch, computed locally on each rank.

Definitions. W ranks each hold B image/text pairs; the global batch has N = W * B pairs, ordered
by rank (rank 0's pairs are rows 0..B-1, and so on). With normalized features I, T ([N, D]) and
logit scale s, the global loss is

    L = ( CE(s * I @ T.T, arange(N)) + CE(s * T @ I.T, arange(N)) ) / 2

with each cross-entropy the mean over its N rows (row i: image i must pick text i among all N
texts, and the other way round). Rank r computes only its own B rows of each matrix:

    loss_r = ( CE(s * I_r @ T.T, labels_r) + CE(s * T_r @ I.T, labels_r) ) / 2,
    labels_r = arange(B) + r * B

where I_r, T_r are its local features and I, T come from all_gather_with_grad. Memory per rank
is B x N logits, linear in N; the N x N matrix never exists anywhere.

Why this is exact, not an approximation (tests/test_loss.py checks each claim on gloo against
one process holding the global batch: 1e-5 in float32, 1e-10 in float64):

1. Value. Every row of L is a row of exactly one rank's loss_r, and each rank's mean divides by
   B = N / W, so mean_r(loss_r) = (1/W) * sum_r (1/B) * sum_{rows of r} = (1/N) * sum_rows = L.
   The number this rank returns is loss_r; its mean over ranks is the global loss.

2. Feature gradients. Rank r's features enter loss_r directly (its local rows) and enter every
   rank's loss_q through the gathered I, T (the columns). The gather's backward sums, over all
   ranks q, the gradient loss_q sends to rank r's slice, so rank r receives
   d(sum_q loss_q)/d(I_r, T_r) = W * dL/d(I_r, T_r): W times the global gradient of its slice.

3. Parameter gradients. Backpropagating that through the (replicated) model on rank r gives W
   times the part of dL/dtheta that flows through rank r's samples. The data-parallel engine
   averages gradients over ranks (divides the sum by W), so the step sees
   (1/W) * sum_r W * dL/dtheta|_{samples of r} = dL/dtheta, exactly the global batch's gradient.
   No rescaling is needed. A plain, non-autograd all_gather would be wrong: rank r would keep
   only d(loss_r)/d(I_r, T_r) and lose what the other ranks' rows send to its samples.

4. Logit scale. s is a replicated parameter and is NOT gathered: it multiplies the logits after
   the gather, so its gradient on rank r is d(loss_r)/ds only, and the engine's 1/W average
   gives mean_r d(loss_r)/ds = dL/ds. The scale is counted once, never W times, as long as
   nobody "corrects" the W-fold feature gradient of point 2 (scaling loss_r by W, or summing
   gradients over ranks instead of averaging would multiply the scale's gradient by W too).
   (Had s been applied before the gather it would still be exact, by the argument of point 3,
   since it is replicated like any other parameter; the local factor is just cheaper.)

5. Labels. The gathered tensors are ordered by rank, so rank r's pair j sits at global row
   r * B + j; its positive is that column, hence the offset r * B.

6. Equal local batch sizes are required. The offset r * B assumes every earlier rank holds B
   rows; the mean over ranks in (1) equals the global mean only if every rank divides by the same
   B (otherwise samples on a smaller rank weigh more); and the collective itself needs equal
   shapes (gloo aborts the process, NCCL may hang). The loss therefore gathers the [B, D] shapes
   on its first call and raises ValueError on every rank if they differ. Only the first: the
   check is a collective plus a host sync, which would stall every step's GPU queue, and the
   training loader guarantees equal batches from then on (`check_batch_sizes="always"` checks
   every call, for callers without that guarantee; False never checks).

Single process (or no process group): the gather is the identity, r = 0, B = N, and loss_r = L.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clipforge.loss.gather import all_gather_with_grad, check_same_shape, world_info

EQUAL_BATCHES = (
    "Unequal local batches would shift the labels and mis-weight the mean over ranks; drop the "
    "last partial batch (the loader's equal-size batches) or pad every rank to the same size."
)


class ContrastiveLoss(nn.Module):
    """Symmetric InfoNCE over the global batch; returns this rank's local loss (see module doc).

    Call it with the model's output dict: `loss(**model_out)` where the keys are
    `image_features`, `text_features` ([B, D], L2-normalized) and `logit_scale` (the multiplier,
    exp of the learned log-scale, shape [] or [1]).
    """

    def __init__(self, check_batch_sizes: bool | str = True) -> None:
        super().__init__()
        # True: the first call; "always": every call; False: never (see point 6 above).
        self.check_batch_sizes = check_batch_sizes
        self._checked = False

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor) -> Tensor:
        return self.loss_and_metrics(image_features, text_features, logit_scale)[0]

    def loss_and_metrics(
        self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The scalar local loss and detached metrics over this rank's rows (for logging)."""
        logits_i2t, logits_t2i, labels = self._local_logits(
            image_features, text_features, logit_scale
        )
        loss_i2t = F.cross_entropy(logits_i2t, labels)
        loss_t2i = F.cross_entropy(logits_t2i, labels)
        loss = (loss_i2t + loss_t2i) / 2
        with torch.no_grad():
            metrics = {
                "loss_i2t": loss_i2t.detach(),
                "loss_t2i": loss_t2i.detach(),
                "acc_i2t": (logits_i2t.argmax(dim=1) == labels).float().mean(),
                "acc_t2i": (logits_t2i.argmax(dim=1) == labels).float().mean(),
                "logit_scale": logit_scale.detach().reshape(()),
            }
        return loss, metrics

    def _should_check(self) -> bool:
        if self.check_batch_sizes == "always":
            return True
        return bool(self.check_batch_sizes) and not self._checked

    def _local_logits(
        self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        if image_features.dim() != 2 or image_features.shape != text_features.shape:
            raise ValueError(
                "image_features and text_features must both be [B, D] with the same shape, got "
                f"{list(image_features.shape)} and {list(text_features.shape)}"
            )
        rank, world = world_info()
        local_batch, dim = image_features.shape
        if world > 1 and self._should_check():
            check_same_shape(
                image_features, name="ContrastiveLoss [batch, dim]", hint=EQUAL_BATCHES
            )
            self._checked = True
        # One collective for both modalities instead of two: the features are concatenated
        # along dim 1, gathered, and split again. Slicing is differentiable, so each half's
        # gradient returns through the same summing backward as two separate gathers would.
        both = torch.cat([image_features, text_features], dim=1)
        all_both = all_gather_with_grad(both, check_shapes=False)  # the check above covers it
        all_image, all_text = all_both[:, :dim], all_both[:, dim:]
        # Local rows use the local tensors directly; the copy of this rank's slice inside the
        # gathered tensor is also in the graph, and the gather's backward adds its gradient
        # back to the same tensors, so the total is the full derivative (point 2 above).
        # The scale multiplies the local [B, D] factor: cheaper than scaling the [B, N] product
        # or the gathered [N, D] features, same numbers (point 4).
        logits_i2t = (logit_scale * image_features) @ all_text.T
        logits_t2i = (logit_scale * text_features) @ all_image.T
        labels = torch.arange(local_batch, device=image_features.device) + rank * local_batch
        return logits_i2t, logits_t2i, labels
