"""SigLIP's pairwise sigmoid loss over the GLOBAL batch, computed locally on each rank.

Definitions (as in contrastive.py: W ranks, B pairs each, N = W * B, rank r's pairs are global
rows r * B .. r * B + B - 1). Every (image i, text j) pair of the N x N global batch is an
independent binary problem: positive when i == j, negative otherwise, with logit
l_ij = s * <I_i, T_j> + b. The global loss is

    L = -(1/N) * sum_{i, j} log sigmoid( z_ij * l_ij ),   z_ij = +1 if i == j else -1

(normalized by N, not N^2, as in the SigLIP paper and open_clip). Rank r owns the B rows of its
local images against all N texts:

    loss_r = -(1/B) * sum_{i in r, j} log sigmoid( z_ij * l_ij )

Unlike the softmax loss, one direction covers every pair (each (i, j) sits in exactly one rank's
rows), so only the texts travel. The model returns the learned bias as `logit_bias` beside
`logit_scale` (SigLIP initialises s = 10 and b = -10 so the N - 1 negatives per row do not swamp
the start).

Why mean_r loss_r and its gradients are exactly the global batch's (for both forms below):
- value: mean_r loss_r = (1/W) * (1/B) * sum over all N^2 pairs = L, because B * W = N;
- images: I_r enters only loss_r, so d(loss_r)/dI_r = W * dL/dI_r;
- texts: T_q enters every rank's loss, and rank q must receive d(sum_r loss_r)/dT_q
  = W * dL/dT_q (each form's communication delivers that sum, see below);
- the engine's 1/W average over ranks turns those into exactly dL/dtheta (contrastive.py,
  point 3);
- s and b are replicated and enter each rank's loss locally: each rank's gradient is
  d(loss_r)/d(s, b) and their mean is dL/d(s, b), counted once;
- the positive of local image j is local text j, global column r * B + j; that offset, like the
  1/B normalization, needs equal local batch sizes: checked on the first call, as for
  ContrastiveLoss (contrastive.py, point 6).
In general the caller may scale each rank's loss (backward starts from g_r = d(total)/d(loss_r),
1 for a plain `loss.backward()`); "the sum" above is then sum_r g_r * d(loss_r)/dT_q.

dist_impl="gather": the texts are all-gathered with gradient ([N, D] on every rank) and the
rank's B x N logits built at once. The gather's backward is a reduce-scatter that sums, for
T_q's slice, what every rank's loss sent it: the sum above.

dist_impl="ring" (the default): the texts go round the ring instead. In the forward, rank r
first scores its own texts (block 0, the only one with positives, on its diagonal), then passes
the chunk it holds to rank r + 1 and receives one from rank r - 1, W - 1 times, so at step k it
holds T_{(r - k) mod W}: as k runs over 0..W-1 that is every rank's chunk exactly once, and the
B x B blocks tile the same B x N rows as the gather form (the same terms; only the order of the
summation differs). The next chunk is received while the current block is computed. Nothing of
the blocks is kept: the backward RECOMPUTES each block from the saved inputs. With
G = (g_r / B) * (sigmoid(L_k) - E_k), the derivative of loss_r by the block's logits L_k
(E_k: 1 on the positives; d(-log sigmoid(z l))/dl = sigmoid(l) - [z = +1]):

    dI_r = s * sum_k G_k @ C_k      ds = sum_k <G_k, I_r @ C_k.T> = <sum_k G_k @ C_k, I_r>
    db = sum_k sum(G_k)             this rank's share of dC_k = s * G_k.T @ I_r

(C_k: the chunk held at step k). Image, scale and bias gradients are local sums over blocks. A
chunk's text gradient travels with it: chunk T_q and its accumulator start at their owner q
(step 0), and each rank adds its share before passing both to the right, so after W - 1 hops
the pair sits at rank q - 1 (= q + W - 1 mod W) having collected the share of every rank
q, q + 1, ..., q - 1 once; a final hop to the right delivers the accumulated sum to q. That is
the gather form's sum, term for term (tests/test_loss.py checks both forms against one process
holding the global batch, against each other, and against open_clip's SigLipLoss).

Cost per rank (B local pairs, D dims, W ranks):
- memory: ring O(B^2 + B * D) whatever W: one B x B block (and its elementwise temporaries) at a
  time, two [B, D] receive buffers per travelling tensor, and only the local inputs saved for
  backward; gather O(B * N + N * D): the [N, D] texts and the B x N logits are kept for backward;
- communication: ring forward W - 1 hops of one [B, D] tensor ((W - 1) * B * D elements sent,
  as much as the all-gather), backward W - 1 hops of two [B, D] tensors (chunk, accumulator)
  and one final hop of the accumulator ((2W - 1) * B * D sent, against the reduce-scatter's
  (W - 1) * B * D), each hop overlapped with a block's compute; the price is also one recomputed
  B x N product in the backward. Hops are point-to-point (batch_isend_irecv) to rank r + 1 and
  from rank r - 1: with W = 2 both are the same peer, with W = 1 there is no communication.

Metrics (loss_and_metrics; detached, each rank's value averaged over ranks is the global value,
identical in both forms): acc_i2t, a local image's own text beats all N - 1 others; acc_t2i, a
local text's own image beats all N - 1 others (the column maxima over each rank's images are
combined with one all-reduce MAX of an [N] vector); positive_logit and negative_logit, the mean
logit over positives and over negatives; loss_pos and loss_neg, their shares of the loss (they
sum to it); logit_scale and logit_bias. Ties count as misses.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from clipforge.loss.contrastive import EQUAL_BATCHES
from clipforge.loss.gather import all_gather_with_grad, check_same_shape, world_info

DIST_IMPLS = ("ring", "gather")
CHECK_BATCH_SIZES = (True, False, "always")
# Text chunks and their gradient accumulators can be in flight to the same peer at once; gloo
# matches sends to receives by (peer, tag), so each stream gets its own tag (NCCL ignores tags
# and matches in issue order, which is the same on every rank).
_CHUNK_TAG, _GRAD_TAG = 17, 18


class _Stats(NamedTuple):
    """What the metrics need from the logits, the same in both forms (no gradient)."""

    positive: Tensor  # [B] this rank's positive logits
    row_max_negative: Tensor  # [B] each local image's largest negative logit over all N texts
    column_max_negative: Tensor  # [N] each text's largest negative logit over the local images
    negative_sum: Tensor  # [] sum of this rank's B * (N - 1) negative logits


class SigLipLoss(nn.Module):
    """Sigmoid loss over the global batch; returns this rank's local loss (see module doc).

    `image_features`, `text_features`: [B, D], L2-normalized. `logit_scale`: the multiplier
    (exp of the learned log-scale). `logit_bias`: the learned bias. Scale and bias are shape
    [] or [1]. `dist_impl`: "ring" (memory independent of the world size) or "gather".
    `check_batch_sizes`: True checks equal local batches on the first call, "always" on every
    call, False never.
    """

    def __init__(self, dist_impl: str = "ring", check_batch_sizes: bool | str = True) -> None:
        super().__init__()
        if dist_impl not in DIST_IMPLS:
            raise ValueError(f"SigLipLoss dist_impl must be one of {DIST_IMPLS}, got {dist_impl!r}")
        if check_batch_sizes not in CHECK_BATCH_SIZES:
            raise ValueError(
                f"SigLipLoss check_batch_sizes must be one of {CHECK_BATCH_SIZES}, "
                f"got {check_batch_sizes!r}"
            )
        self.dist_impl = dist_impl
        self.check_batch_sizes = check_batch_sizes
        self._checked = False

    def forward(
        self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor, logit_bias: Tensor
    ) -> Tensor:
        return self._loss(image_features, text_features, logit_scale, logit_bias, False)[0]

    def loss_and_metrics(
        self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor, logit_bias: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The scalar local loss and detached metrics (for logging; one extra tiny collective)."""
        loss, stats = self._loss(image_features, text_features, logit_scale, logit_bias, True)
        assert stats is not None
        return loss, _metrics(loss, stats, logit_scale, logit_bias)

    def _should_check(self) -> bool:
        if self.check_batch_sizes == "always":
            return True
        return bool(self.check_batch_sizes) and not self._checked

    def _loss(
        self, image: Tensor, text: Tensor, scale: Tensor, bias: Tensor, want_stats: bool
    ) -> tuple[Tensor, _Stats | None]:
        if image.dim() != 2 or image.shape != text.shape:
            raise ValueError(
                "image_features and text_features must both be [B, D] with the same shape, got "
                f"{list(image.shape)} and {list(text.shape)}"
            )
        rank, world = world_info()
        if world > 1 and self._should_check():
            check_same_shape(image, name="SigLipLoss [batch, dim]", hint=EQUAL_BATCHES)
            self._checked = True
        if self.dist_impl == "gather":
            return _gather_form(image, text, scale, bias, rank, want_stats)
        loss, *stats = _RingSigLip.apply(image, text, scale, bias, rank, world, want_stats)
        return loss, _Stats(*stats) if want_stats else None


def _gather_form(
    image: Tensor, text: Tensor, scale: Tensor, bias: Tensor, rank: int, want_stats: bool
) -> tuple[Tensor, _Stats | None]:
    local_batch = image.shape[0]
    all_text = all_gather_with_grad(text, check_shapes=False)  # checked by the caller, if on
    logits = (scale * image) @ all_text.T + bias
    rows = torch.arange(local_batch, device=logits.device) + rank * local_batch
    positive = torch.arange(all_text.shape[0], device=logits.device) == rows[:, None]
    signs = positive.to(logits.dtype) * 2 - 1
    loss = -F.logsigmoid(signs * logits).sum() / local_batch
    if not want_stats:
        return loss, None
    with torch.no_grad():
        own = logits[:, rank * local_batch : (rank + 1) * local_batch]
        negatives = logits.masked_fill(positive, float("-inf"))
        stats = _Stats(
            positive=own.diagonal().clone(),
            row_max_negative=negatives.amax(dim=1),
            column_max_negative=negatives.amax(dim=0),
            negative_sum=logits.sum() - own.diagonal().sum(),
        )
    return loss, stats


def _metrics(loss: Tensor, stats: _Stats, scale: Tensor, bias: Tensor) -> dict[str, Tensor]:
    rank, world = world_info()
    with torch.no_grad():
        positive = stats.positive
        local_batch, total = positive.shape[0], stats.column_max_negative.shape[0]
        column_max = stats.column_max_negative
        if world > 1:
            # Column j's negatives live on every rank (its images); only its owner scores it.
            dist.all_reduce(column_max, op=dist.ReduceOp.MAX)
        own_columns = column_max[rank * local_batch : (rank + 1) * local_batch]
        loss_pos = -F.logsigmoid(positive).sum() / local_batch
        return {
            "loss_pos": loss_pos,
            "loss_neg": loss.detach() - loss_pos,
            "acc_i2t": (positive > stats.row_max_negative).float().mean(),
            "acc_t2i": (positive > own_columns).float().mean(),
            "positive_logit": positive.mean(),
            "negative_logit": stats.negative_sum / (local_batch * (total - 1)),
            "logit_scale": scale.detach().reshape(()),
            "logit_bias": bias.detach().reshape(()),
        }


class _Ring:
    """Passes a [B, D] tensor to rank + 1 while receiving one from rank - 1, asynchronously.

    Receives alternate between two buffers allocated once. A buffer is received into again two
    exchanges later, by which time the caller has waited the exchange in between (whose send
    read it), so no buffer is overwritten while in use. On NCCL the exchange runs on the
    process group's stream after the work already queued (so after the compute that read the
    buffer), and wait() only makes the compute stream wait: no host sync.
    """

    def __init__(self, like: Tensor, rank: int, world: int, tag: int) -> None:
        self.right, self.left, self.tag = (rank + 1) % world, (rank - 1) % world, tag
        self.buffers = [torch.empty_like(like, memory_format=torch.contiguous_format)]
        self.buffers.append(torch.empty_like(self.buffers[0]))
        self.turn = 0
        self.works: list[dist.Work] = []

    def start(self, send: Tensor) -> Tensor:
        """Start sending `send` right and receiving from the left; returns the receive buffer."""
        recv = self.buffers[self.turn]
        self.turn ^= 1
        self.works = dist.batch_isend_irecv(
            [
                dist.P2POp(dist.isend, send, self.right, tag=self.tag),
                dist.P2POp(dist.irecv, recv, self.left, tag=self.tag),
            ]
        )
        return recv

    def wait(self) -> None:
        for work in self.works:
            work.wait()
        self.works = []


class _RingSigLip(torch.autograd.Function):
    """loss_r (and, if asked, the metrics' _Stats) with the texts passed round the ring."""

    @staticmethod
    def forward(ctx, image, text, scale, bias, rank, world, want_stats):  # type: ignore[override]
        ctx.save_for_backward(image, text, scale, bias)  # the inputs only, no block
        ctx.rank, ctx.world = rank, world
        local_batch = image.shape[0]
        text = text.contiguous()  # sent as is
        # The backward recomputes the blocks: both must run in the same dtype, so no autocast.
        with torch.autocast(image.device.type, enabled=False):
            scaled = scale * image
            loss = scaled.new_zeros(())
            if want_stats:
                row_max = scaled.new_full((local_batch,), float("-inf"))
                column_max = scaled.new_empty(world * local_batch)
                negative_sum = scaled.new_zeros(())
            ring = _Ring(text, rank, world, _CHUNK_TAG) if world > 1 else None
            chunk = text
            for step in range(world):
                if ring is not None and step < world - 1:
                    incoming = ring.start(chunk)  # overlaps this block's compute
                logits = scaled @ chunk.T  # [B, B]: rows of rank r, columns of `owner`
                logits += bias  # in place: one B x B buffer, not two
                if step == 0:
                    positive = logits.diagonal().clone()
                    loss -= F.logsigmoid(positive).sum()
                    if want_stats:
                        negative_sum += logits.sum() - positive.sum()
                    # From here on the block is negatives only: -inf drops the diagonal from
                    # the maxima below and from the negatives' loss (log sigmoid(+inf) = 0).
                    logits.diagonal().fill_(float("-inf"))
                elif want_stats:
                    negative_sum += logits.sum()
                if want_stats:
                    owner = (rank - step) % world
                    torch.maximum(row_max, logits.amax(dim=1), out=row_max)
                    column_max[owner * local_batch : (owner + 1) * local_batch] = logits.amax(0)
                loss -= F.logsigmoid(logits.neg_()).sum()
                del logits
                if ring is not None and step < world - 1:
                    ring.wait()
                    chunk = incoming
            loss /= local_batch
        if not want_stats:
            return (loss,)
        stats = (positive, row_max, column_max, negative_sum)
        ctx.mark_non_differentiable(*stats)
        return (loss, *stats)

    @staticmethod
    def backward(ctx, grad_loss, *_unused):  # type: ignore[override]
        image, text, scale, bias = ctx.saved_tensors
        rank, world = ctx.rank, ctx.world
        need_image, need_text, need_scale, need_bias = ctx.needs_input_grad[:4]
        local_batch = image.shape[0]
        text = text.contiguous()
        with torch.autocast(image.device.type, enabled=False):
            scaled = scale * image
            weight = grad_loss / local_batch  # g_r / B, a tensor: no host sync
            image_sum = torch.zeros_like(scaled)  # sum_k G_k @ C_k
            bias_grad = scaled.new_zeros(())
            chunks = _Ring(text, rank, world, _CHUNK_TAG) if world > 1 else None
            grads = _Ring(text, rank, world, _GRAD_TAG) if world > 1 and need_text else None
            chunk, text_grad = text, None
            received = incoming = text  # placeholders until the first exchange
            for step in range(world):
                if chunks is not None and step < world - 1:
                    incoming = chunks.start(chunk)
                block = scaled @ chunk.T  # recomputed exactly as in forward
                block += bias
                block.sigmoid_()
                if step == 0:
                    block.diagonal().sub_(1.0)  # positives: sigmoid(l) - 1
                block.mul_(weight)  # G_k
                image_sum.addmm_(block, chunk)
                bias_grad += block.sum()
                if need_text:
                    text_grad = block.T @ scaled  # this rank's share of d(loss)/dC_k
                    if grads is not None:
                        if step > 0:
                            grads.wait()  # the sum so far for C_k, from rank - 1
                            text_grad = received.add_(text_grad)
                        # Steps 0..W-2 pass the sum on for the next rank's share; after step
                        # W-1 the same hop delivers the finished sum to the chunk's owner.
                        received = grads.start(text_grad)
                del block
                if chunks is not None and step < world - 1:
                    chunks.wait()
                    chunk = incoming
            if grads is not None:
                grads.wait()
                text_grad = received  # our own texts' sum, from rank - 1
            image_grad = scale * image_sum if need_image else None
            scale_grad = (image_sum * image).sum() if need_scale else None
        if scale_grad is not None:
            scale_grad = scale_grad.reshape(scale.shape).to(scale.dtype)
        bias_grad = bias_grad.reshape(bias.shape).to(bias.dtype) if need_bias else None
        return image_grad, text_grad, scale_grad, bias_grad, None, None, None
