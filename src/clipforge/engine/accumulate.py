"""Gradient accumulation over K chunks of a micro batch, with or without the batch's negatives.

Each rank's micro batch (train.batch_size samples) is split into K = train.accum_chunks equal
chunks that go through the towers one at a time, so activation memory is that of one chunk.

`gradcache_step` (train.accum_mode=gradcache, the default) keeps the result EXACTLY that of
the whole micro batch in one pass, every sample of the global batch still a negative of every
other. Contrastive losses do not decompose over samples, so plain accumulation cannot do this;
the GradCache scheme (Gao et al. 2021) can, because the loss only touches the embeddings:

  1. Embed every chunk without autograd (no activations kept) and cache the embeddings; note
     the RNG state before each chunk.
  2. Compute the loss ONCE over the concatenated cached embeddings (the cross-rank gather
     happens inside the loss, as without accumulation), and backpropagate it to the cached
     embeddings only: g = dloss/d(embeddings), cheap ([B, D] tensors, no tower involved).
  3. For each chunk: restore its RNG state, embed it again with autograd (dropout and patch
     dropout draw the same masks as in 1, so the embeddings are bit-identical), and
     backpropagate the surrogate sum(embedding * g_chunk), whose parameter gradient is exactly
     chunk's share of dloss/dtheta by the chain rule. The K shares sum to dloss/dtheta.

Outputs shared by the whole batch (the task's `shared_outputs`: CLIP's temperature) receive
one gradient for the whole batch in step 2. Every chunk re-creates them in step 3, so each
chunk's surrogate carries g_shared / K: the K terms sum to the gradient counted once. (Giving
it all to one chunk is equally exact but leaves the parameter without a gradient in K - 1 of
the backward passes, which ZeRO's per-micro-step reduction does not expect.)

Cost: one extra forward per chunk (~+33% compute). Limits: batch-statistics layers (BatchNorm,
in RN50) see chunks, not the micro batch, and update their running statistics twice per chunk.

`plain_step` (train.accum_mode=plain) is DeepSpeed's ordinary gradient accumulation: each
chunk's loss uses only that chunk's samples (times the world size) as negatives. It is cheaper
(no second forward) but WEAKER: the contrastive task is easier with fewer negatives, so it is
not the same training as the large batch. Kept for comparison and for losses that decompose.

This file is plain torch: the DeepSpeed calls come in as callables from engine/deepspeed.py.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

Batch = dict[str, Any]
Embeddings = dict[str, Tensor]


def split_batch(batch: Batch, chunks: int) -> list[Batch]:
    """Split every tensor of `batch` along dim 0 into `chunks` equal parts (others are copied)."""
    sizes = {v.shape[0] for v in batch.values() if torch.is_tensor(v)}
    if len(sizes) != 1 or next(iter(sizes)) % chunks:
        raise ValueError(
            f"cannot split a batch of sizes {sorted(sizes)} into {chunks} equal chunks "
            "(train.batch_size must be divisible by train.accum_chunks)"
        )
    parts = [dict() for _ in range(chunks)]
    for key, value in batch.items():
        pieces = value.chunk(chunks) if torch.is_tensor(value) else [value] * chunks
        for part, piece in zip(parts, pieces):
            part[key] = piece
    return parts


@dataclass
class RngState:
    """The generator states a forward may draw from (CPU, and the current CUDA device)."""

    cpu: Tensor
    cuda: Tensor | None

    @classmethod
    def capture(cls, device: torch.device) -> RngState:
        cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        return cls(torch.get_rng_state(), cuda)

    def restore(self, device: torch.device) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, device)


def gradcache_step(
    chunks: Sequence[Batch],
    embed: Callable[[Batch], Embeddings],
    loss_from: Callable[[Embeddings], tuple[Tensor, dict[str, Tensor]]],
    backward: Callable[[Tensor], None],
    shared: Sequence[str],
    device: torch.device,
) -> tuple[Tensor, dict[str, Tensor]]:
    """One optimizer step's worth of exact gradients over all chunks (see the module doc).

    `embed(chunk)` runs the towers (through the engine wrapper), `loss_from(embeddings)` the
    loss with its gather, `backward(surrogate)` one chunk's backward (and the engine's
    micro-step). Returns the loss over the whole micro batch and its metrics.
    """
    states, cached = _embed_without_grad(chunks, embed, device)
    after = RngState.capture(device)
    leaves = _leaves(cached, shared)
    loss, metrics = loss_from(leaves)
    grads = _grads(loss, leaves)
    sizes = [_rows(chunk) for chunk in chunks]
    for i, chunk in enumerate(chunks):
        states[i].restore(device)
        out = embed(chunk)
        backward(_surrogate(out, grads, shared, sizes, i, len(chunks)))
    # The replay rewound the generators; leave them where one pass over the chunks left them.
    after.restore(device)
    return loss.detach(), metrics


def plain_step(
    chunks: Sequence[Batch],
    forward: Callable[[Batch], tuple[Tensor, dict[str, Tensor]]],
    backward: Callable[[Tensor], None],
) -> tuple[Tensor, dict[str, Tensor]]:
    """Each chunk's own loss (its own negatives), backpropagated as it comes; the mean loss."""
    total: Tensor | None = None
    metrics: dict[str, Tensor] = {}
    for chunk in chunks:
        loss, metrics = forward(chunk)
        backward(loss)
        total = loss.detach() if total is None else total + loss.detach()
    assert total is not None
    return total / len(chunks), metrics


def _rows(batch: Batch) -> int:
    return next(v.shape[0] for v in batch.values() if torch.is_tensor(v))


def _embed_without_grad(
    chunks: Sequence[Batch], embed: Callable[[Batch], Embeddings], device: torch.device
) -> tuple[list[RngState], list[Embeddings]]:
    states, cached = [], []
    with torch.no_grad():
        for chunk in chunks:
            states.append(RngState.capture(device))
            cached.append({k: v.detach() for k, v in embed(chunk).items()})
    return states, cached


def _leaves(cached: list[Embeddings], shared: Sequence[str]) -> Embeddings:
    """The whole micro batch's embeddings as autograd leaves (per-sample ones concatenated)."""
    leaves = {}
    for key, first in cached[0].items():
        value = first if key in shared else torch.cat([c[key] for c in cached])
        leaves[key] = value.detach().requires_grad_(value.is_floating_point())
    return leaves


def _grads(loss: Tensor, leaves: Embeddings) -> dict[str, Tensor]:
    names = [k for k, v in leaves.items() if v.requires_grad]
    grads = torch.autograd.grad(loss, [leaves[k] for k in names], allow_unused=True)
    return {k: g for k, g in zip(names, grads) if g is not None}


def _surrogate(
    out: Embeddings,
    grads: dict[str, Tensor],
    shared: Sequence[str],
    sizes: list[int],
    index: int,
    chunks: int,
) -> Tensor:
    """sum(output * its cached gradient): its gradient w.r.t. the parameters is the chunk's
    share of dloss/dtheta (shared outputs take 1/chunks of theirs, see the module doc)."""
    start = sum(sizes[:index])
    terms = []
    for key, grad in grads.items():
        value = out[key].float()
        g = grad / chunks if key in shared else grad[start : start + value.shape[0]]
        terms.append((value * g).sum())
    if not terms:  # nothing reaches the parameters: a zero that still backpropagates
        return sum(v.float().sum() * 0 for v in out.values() if v.requires_grad)
    return torch.stack(terms).sum()
