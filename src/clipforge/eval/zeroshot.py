"""Zero-shot classification: embed "a photo of a {c}." for every class, pick the closest.

Each class's weight is the mean of its normalized prompt embeddings over all templates, then
renormalized (the CLIP paper's prompt ensemble). Counts (a confusion matrix and top-k hits) are
summed over ranks before any ratio is taken, so the numbers are the same whatever the world size.

    python -m clipforge.eval checkpoint=RUN_DIR eval.zeroshot=SHARDS      # standalone
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from clipforge.engine.dist import all_gather_object

Encoder = Callable[[torch.Tensor], torch.Tensor]
TextTokenizer = Callable[[list[str]], torch.Tensor]


@torch.no_grad()
def build_classifier(
    encode_text: Encoder,
    tokenizer: TextTokenizer,
    classnames: Sequence[str],
    templates: Sequence[str],
    batch_size: int = 256,
) -> torch.Tensor:
    """[D, C] matrix of unit-norm class embeddings (float32, CPU).

    Every rank builds the whole matrix with the same forward calls in the same order: under
    ZeRO-3 a forward is a collective, so ranks must not split this work unevenly.
    """
    prompts = [fill(t, name) for name in classnames for t in templates]
    feats = []
    for i in range(0, len(prompts), batch_size):
        emb = encode_text(tokenizer(prompts[i : i + batch_size]))
        feats.append(F.normalize(emb.float(), dim=-1).cpu())
    per_class = torch.cat(feats).view(len(classnames), len(templates), -1)
    return F.normalize(per_class.mean(dim=1), dim=-1).T.contiguous()


def fill(template: str, classname: str) -> str:
    """A prompt: the class name where the template has `{c}` (CLIP_benchmark's files) or `{}`."""
    return template.format(classname, c=classname)


def count_batch(
    logits: torch.Tensor, target: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(confusion [C, C] with rows = true class, top-k hits) of one batch of logits [B, C]."""
    n_cls = logits.shape[1]
    pred = logits.argmax(dim=-1)
    confusion = torch.bincount(target * n_cls + pred, minlength=n_cls * n_cls).view(n_cls, n_cls)
    hits = (logits.topk(k, dim=-1).indices == target[:, None]).any(dim=-1).sum()
    return confusion, hits


def metrics_from_counts(confusion: torch.Tensor, top_k: int, k: int) -> dict[str, Any]:
    """Ratios from summed counts. Mean per-class recall averages only classes the set holds."""
    total = int(confusion.sum())
    if total == 0:
        raise ValueError("zero-shot set has no samples with a .cls label")
    support = confusion.sum(dim=1)
    recall = confusion.diag().double() / support.clamp(min=1).double()
    return {
        "top1": float(confusion.diag().sum()) / total,
        f"top{k}": top_k / total,
        "mean_per_class_recall": float(recall[support > 0].mean()),
        "samples": total,
        "per_class_recall": recall.tolist(),
        "confusion": confusion.tolist(),
    }


@torch.no_grad()
def evaluate(
    encode_image: Encoder, batches: Iterable[dict[str, Any]], classifier: torch.Tensor
) -> dict[str, Any]:
    """top1, top5 (top-C with fewer classes), mean per-class recall over every rank's samples.

    Padding batches (`pad`: True, see data.eval_loader.EvalLoader) still run the encoder, because
    every rank must join every forward under ZeRO-3, but are not counted.
    """
    n_cls = classifier.shape[1]
    k = min(5, n_cls)
    confusion = torch.zeros(n_cls, n_cls, dtype=torch.long)
    top_k = torch.zeros(1, dtype=torch.long)
    for batch in batches:
        feats = F.normalize(encode_image(batch["image"]).float(), dim=-1).cpu()
        if batch.get("pad"):
            continue
        if "cls" not in batch:
            raise ValueError("zero-shot set has samples without a .cls label")
        bad = batch["cls"][(batch["cls"] < 0) | (batch["cls"] >= n_cls)]
        if len(bad):
            raise ValueError(f"zero-shot set has label {int(bad[0])}, outside its {n_cls} classes")
        c, h = count_batch(feats @ classifier, batch["cls"], k)
        confusion += c
        top_k += h
    # Sums of integers: exact, so 1 and N processes give identical numbers. Gathered as objects
    # (CPU, pickled) rather than all-reduced, which NCCL refuses for CPU tensors.
    confusion = sum_over_ranks(confusion)
    top_k = sum_over_ranks(top_k)
    return metrics_from_counts(confusion, int(top_k), k)


def sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """The sum of a small CPU tensor over all ranks (itself for one process)."""
    parts = all_gather_object(t.cpu())
    return torch.stack(parts).sum(dim=0)  # type: ignore[arg-type]
