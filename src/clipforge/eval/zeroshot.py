"""Zero-shot classification: embed "a photo of a {label}" for every class, pick the closest.

Each class's weight is the mean of its normalized prompt embeddings over all templates, then
renormalized (the CLIP paper's prompt ensemble). Counts are summed over ranks before any ratio is
taken, so the numbers are the same whatever the world size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from clipforge.engine.dist import all_reduce_sum

Encoder = Callable[[torch.Tensor], torch.Tensor]


@torch.no_grad()
def build_classifier(
    encode_text: Encoder,
    tokenizer: Callable[[list[str]], torch.Tensor],
    classnames: Sequence[str],
    templates: Sequence[str],
) -> torch.Tensor:
    """[D, C] matrix of unit-norm class embeddings."""
    weights = []
    for name in classnames:
        tokens = tokenizer([t.format(name) for t in templates])
        emb = F.normalize(encode_text(tokens).float(), dim=-1).mean(0)
        weights.append(F.normalize(emb, dim=-1))
    return torch.stack(weights, dim=1)


@torch.no_grad()
def evaluate(
    encode_image: Encoder, batches: Iterable[dict[str, Any]], classifier: torch.Tensor
) -> dict[str, Any]:
    """top1, top5 and mean per-class recall over every non-pad sample of every rank."""
    n_cls = classifier.shape[1]
    k = min(5, n_cls)
    confusion = torch.zeros(n_cls, n_cls, dtype=torch.long)
    top_k = torch.zeros(1, dtype=torch.long)
    for batch in batches:
        feats = F.normalize(encode_image(batch["image"]).float(), dim=-1)
        if batch.get("pad"):
            continue
        logits = feats.cpu() @ classifier.cpu()
        target = batch["cls"]
        pred = logits.argmax(dim=-1)
        confusion += torch.bincount(target * n_cls + pred, minlength=n_cls * n_cls).view(
            n_cls, n_cls
        )
        top_k += (logits.topk(k, dim=-1).indices == target[:, None]).any(dim=-1).sum()
    confusion = all_reduce_sum(confusion)
    top_k = all_reduce_sum(top_k)
    total = int(confusion.sum())
    if total == 0:
        raise ValueError("zero-shot set has no samples with a .cls label")
    support = confusion.sum(dim=1)
    recall = confusion.diag().float() / support.clamp(min=1).float()
    return {
        "top1": float(confusion.diag().sum()) / total,
        f"top{k}": float(top_k) / total,
        "mean_per_class_recall": float(recall[support > 0].mean()),
        "samples": total,
        "confusion": confusion.tolist(),
    }
