"""Image <-> text retrieval recall@k over a captioned set, with several captions per image.

A set is WebDataset shards whose samples carry captions in KEY.json {"captions": [...]} (COCO:
five per image) or a single KEY.txt. Every caption is a text query and every image one image
query:
  - text -> image: a hit at k when the caption's own image is among its k most similar images;
  - image -> text: a hit at k when ANY of the image's captions is among its k most similar
    captions (COCO's convention: 5 correct answers per image query).

Images are embedded in batches, each rank reading its own share of the set (data.eval_loader),
and captions in chunks, each rank taking every W-th; the embeddings are gathered and put back
in global order, so every rank holds the same [N, D] and [M, D] matrices and the same numbers
come out with 1 or N processes.

    python -m clipforge.eval checkpoint=RUN_DIR eval.retrieval=SHARDS
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from clipforge.data.eval_loader import EvalLoader
from clipforge.data.samples import json_captions
from clipforge.data.shards import ShardSet
from clipforge.data.tario import iter_samples
from clipforge.engine.dist import all_gather_object

Encoder = Callable[[torch.Tensor], torch.Tensor]
TextTokenizer = Callable[[list[str]], torch.Tensor]
# Rows of the similarity matrix scored at once: bounds memory at chunk x (captions or images).
_CHUNK = 1024


def captions_of(sample: dict[str, Any]) -> list[str]:
    """Every caption of a raw sample: KEY.json "captions" when present, else KEY.txt."""
    caps = json_captions(sample)
    if caps:
        return caps
    txt = sample.get("txt")
    return [txt.decode("utf-8", errors="replace")] if txt is not None else []


class CaptionedLoader(EvalLoader):
    """EvalLoader whose batches also carry `captions`: a list of every caption per sample."""

    def _collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = super()._collate(samples)
        batch["captions"] = [captions_of(s) for s in samples]
        return batch


def iter_captions(shards: ShardSet) -> Iterator[tuple[str, list[str]]]:
    """(key, captions) of every sample in shard order, without decoding any image."""
    for url in shards.urls:
        for sample in iter_samples(url):
            yield sample["__key__"], captions_of(sample)


@dataclass
class ImageEmbeddings:
    keys: list[str]  # global order: shard order, the same for any world size
    features: torch.Tensor  # [N, D] float32, unit norm
    captions: list[list[str]]


@torch.no_grad()
def embed_images(
    encode_image: Encoder, batches: Iterable[dict[str, Any]], rank: int = 0, world: int = 1
) -> ImageEmbeddings:
    """Embed this rank's batches, gather every rank's, and restore the global order.

    EvalLoader hands each rank its own share of the set, in no particular order; a batch's
    `start` (the shard and offset of its first sample) gives its place in the global order.
    Padding batches (which still run the encoder, for ZeRO-3) are dropped.
    """
    mine: list[tuple[tuple[int, int], list[str], torch.Tensor, list[list[str]]]] = []
    for batch in batches:
        feats = F.normalize(encode_image(batch["image"]).float(), dim=-1).cpu()
        if not batch.get("pad"):
            start = tuple(batch["start"])
            mine.append((start, batch["key"], feats, batch.get("captions", [])))  # type: ignore[arg-type]
    parts = sorted((p for ranks in all_gather_object(mine) for p in ranks), key=lambda p: p[0])  # type: ignore[attr-defined]
    if not parts:
        raise ValueError("retrieval set is empty")
    return ImageEmbeddings(
        keys=[k for p in parts for k in p[1]],
        features=torch.cat([p[2] for p in parts]),
        captions=[c for p in parts for c in p[3]],
    )


@torch.no_grad()
def embed_texts(
    encode_text: Encoder,
    tokenizer: TextTokenizer,
    texts: Sequence[str],
    batch_size: int,
    rank: int = 0,
    world: int = 1,
) -> torch.Tensor:
    """[M, D] unit-norm embeddings of `texts` (the same list on every rank), split over ranks.

    Chunk c goes to rank c % W; every rank runs the same number of forwards (a short rank
    repeats its last chunk and drops the result), which ZeRO-3's per-forward collectives need.
    """
    chunks = [list(texts[i : i + batch_size]) for i in range(0, len(texts), batch_size)]
    per_rank = -(-len(chunks) // world) if chunks else 0
    mine: list[tuple[int, torch.Tensor]] = []
    for j in range(per_rank):
        c = rank + j * world
        real = c < len(chunks)
        idx = c if real else len(chunks) - 1
        feats = F.normalize(encode_text(tokenizer(chunks[idx])).float(), dim=-1).cpu()
        if real:
            mine.append((c, feats))
    parts = sorted((p for ranks in all_gather_object(mine) for p in ranks), key=lambda p: p[0])  # type: ignore[attr-defined]
    if not parts:
        return torch.zeros(0, 0)
    return torch.cat([p[1] for p in parts])


def flatten_captions(captions: list[list[str]]) -> tuple[list[str], torch.Tensor]:
    """All captions in order, and for each the index of its image."""
    texts = [c for caps in captions for c in caps]
    owner = [i for i, caps in enumerate(captions) for _ in caps]
    return texts, torch.tensor(owner, dtype=torch.long)


def recall_at_k(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    text_to_image: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Recall@k both ways from unit-norm features and each caption's image index.

    Keys: "image_to_text_R@k", "text_to_image_R@k" and their mean "mean_recall". A k above
    the number of candidates is capped (every query then hits).
    """
    n_img, n_txt = image_features.shape[0], text_features.shape[0]
    if n_img == 0 or n_txt == 0:
        raise ValueError("retrieval needs at least one image and one caption")
    ks = sorted(set(int(k) for k in ks))
    t2i = torch.zeros(len(ks))
    for s in range(0, n_txt, _CHUNK):
        sim = text_features[s : s + _CHUNK] @ image_features.T  # [t, N]
        top = sim.topk(min(max(ks), n_img), dim=1).indices
        hit = top == text_to_image[s : s + _CHUNK, None]
        for j, k in enumerate(ks):
            t2i[j] += hit[:, :k].any(dim=1).sum()
    i2t = torch.zeros(len(ks))
    for s in range(0, n_img, _CHUNK):
        sim = image_features[s : s + _CHUNK] @ text_features.T  # [i, M]
        top = sim.topk(min(max(ks), n_txt), dim=1).indices
        # A retrieved caption is right when it belongs to the querying image.
        own = torch.arange(s, s + sim.shape[0])[:, None]
        hit = text_to_image[top] == own
        for j, k in enumerate(ks):
            i2t[j] += hit[:, :k].any(dim=1).sum()
    out = {f"image_to_text_R@{k}": float(i2t[j]) / n_img for j, k in enumerate(ks)}
    out.update({f"text_to_image_R@{k}": float(t2i[j]) / n_txt for j, k in enumerate(ks)})
    out["mean_recall"] = sum(out.values()) / len(out)
    return out


def top_images(
    image_features: torch.Tensor, text_features: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices [M, k], scores [M, k]) of each text query's k nearest images (for figures)."""
    sim = text_features @ image_features.T
    top = sim.topk(min(k, image_features.shape[0]), dim=1)
    return top.indices, top.values


@torch.no_grad()
def evaluate(
    encode_image: Encoder,
    encode_text: Encoder,
    tokenizer: TextTokenizer,
    batches: Iterable[dict[str, Any]],
    batch_size: int,
    ks: Sequence[int] = (1, 5, 10),
    rank: int = 0,
    world: int = 1,
) -> tuple[dict[str, Any], ImageEmbeddings, torch.Tensor, torch.Tensor]:
    """Metrics plus what a figure needs: (metrics, images, caption features, caption owners)."""
    images = embed_images(encode_image, batches, rank, world)
    texts, owner = flatten_captions(images.captions)
    if not texts:
        raise ValueError("retrieval set has no captions (.txt or .json 'captions')")
    text_features = embed_texts(encode_text, tokenizer, texts, batch_size, rank, world)
    metrics: dict[str, Any] = recall_at_k(images.features, text_features, owner, ks)
    metrics.update(images=len(images.keys), captions=len(texts))
    return metrics, images, text_features, owner
