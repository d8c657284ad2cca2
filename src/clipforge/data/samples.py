"""One sample, from raw tar members to (image tensor, caption): which members hold the image,
the caption a visit draws, and the error budget that counts what fails to decode.

Shared by the training stream (stream.py) and the eval loader (eval_loader.py); the image
members they read are tario.IMAGE_EXTS, also what data_tools.inspect checks shards against, so
it passes only shards the trainer reads.

Errors: a sample whose image fails to decode, or a shard that cannot be read (the rest of it
counts as failed), is logged once per shard and counted (`loader.errors`, logged by the
trainer as `data_errors`). Once a worker has read at least 100 samples, or at the end of an
epoch, a failed fraction above `max_error_rate` stops the run naming the worst shard. A sample
without a caption counts as failed (a torn shard); when a worker's first 8 samples all lack one
the run stops at once: image-only shards cannot train a contrastive model.
"""

from __future__ import annotations

import io
import json
import logging
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from clipforge.data.plan import AUGMENT, CAPTION, seed_for
from clipforge.data.shards import SourceError
from clipforge.data.tario import IMAGE_EXTS

# Below this many samples read, an error rate says little (one bad sample of the first ten).
MIN_SAMPLES_FOR_RATE = 100
# A worker whose first samples all lack a caption reads image-only shards: say so at once.
IMAGE_ONLY_AFTER = 8
# What DataLoader workers unpickle (loaders, transforms, tokenizer): imported once in the
_log = logging.getLogger("clipforge.data")


def json_captions(sample: dict[str, Any]) -> list[str] | None:
    """KEY.json's "captions" list (COCO-style, several per image), or None."""
    meta = sample.get("json")
    if meta is None:
        return None
    try:
        caps = json.loads(meta).get("captions")
    except (ValueError, AttributeError):
        return None
    return [str(c) for c in caps] if isinstance(caps, list) and caps else None


def choose_caption(sample: dict[str, Any], rng_: random.Random) -> str | None:
    """The caption of a visit: one drawn from KEY.json's "captions" (COCO) or KEY.txt."""
    caps = json_captions(sample)
    if caps:
        return rng_.choice(caps)
    txt = sample.get("txt")
    return txt.decode("utf-8", errors="replace") if txt is not None else None


def open_image(sample: dict[str, Any]) -> Image.Image:
    for ext in IMAGE_EXTS:
        if ext in sample:
            img = Image.open(io.BytesIO(sample[ext]))
            img.load()
            return img
    raise ValueError(f"no image member ({'/'.join(IMAGE_EXTS)})")


@dataclass
class Failed:
    """A stream position whose sample could not be read (its shard broke)."""

    url: str
    reason: str
    lost: int = 1  # samples it stands for (a shard that breaks early loses the rest of it)


class ErrorBudget:
    """Counts a worker's reads and failures; stops the run above `max_rate`, naming the shard."""

    def __init__(self, max_rate: float, where: str):
        self.max_rate, self.where = max_rate, where
        self.read = self.failed = 0
        self.by_shard: Counter[str] = Counter()
        self.last: dict[str, str] = {}

    def ok(self) -> None:
        self.read += 1

    def fail(self, url: str, reason: str, n: int = 1) -> None:
        if url not in self.by_shard:  # once per shard: a broken shard must not flood the log
            _log.warning(f"{url}: skipped a sample ({reason}); later failures there are counted")
        self.read += n
        self.failed += n
        self.by_shard[url] += n
        self.last[url] = reason
        self.check()

    def check(self, final: bool = False) -> None:
        if not self.failed or (self.read < MIN_SAMPLES_FOR_RATE and not final):
            return
        rate = self.failed / self.read
        if rate > self.max_rate:
            url, n = self.by_shard.most_common(1)[0]
            raise SourceError(
                f"{url}: {n} samples failed there ({self.last[url]}); {self.failed} of "
                f"{self.read} samples read by {self.where} failed ({rate:.1%} > "
                f"data.max_error_rate={self.max_rate:.1%})"
            )


class Decoder:
    """Raw sample -> (image tensor, caption), with randomness seeded by the sample's position."""

    def __init__(self, transform: Callable[[Image.Image], torch.Tensor], budget: ErrorBudget):
        self.transform = transform  # per image (BatchTransform.image: the batch part comes later)
        self.budget = budget
        self.uncaptioned = 0

    def __call__(self, raw: dict[str, Any] | Failed, key: tuple[int, ...]) -> tuple | None:
        if isinstance(raw, Failed):
            self.budget.fail(raw.url, raw.reason, raw.lost)
            return None
        caption = choose_caption(raw, random.Random(seed_for(*key, CAPTION)))
        if caption is None:  # one in a torn shard is corruption; all of them is image-only data
            self.uncaptioned += 1
            if self.uncaptioned == self.budget.read + 1 >= IMAGE_ONLY_AFTER:
                raise SourceError(
                    f"{raw['__url__']}: sample {raw['__key__']} has no caption (.txt), nor "
                    f"had the {self.uncaptioned - 1} before it; image-only shards cannot "
                    "train a contrastive model"
                )
            self.budget.fail(raw["__url__"], f"{raw['__key__']}: no caption (.txt)")
            return None
        # Seeded per sample: a resumed stream draws the same crops without replaying the past.
        # (The CPU generator only: torch.manual_seed also queues CUDA/XPU seeding, ~1 ms.)
        torch.default_generator.manual_seed(seed_for(*key, AUGMENT))
        try:
            image = self.transform(open_image(raw))
        except Exception as e:  # noqa: BLE001  any decoder error: skip and count the sample
            self.budget.fail(raw["__url__"], f"{raw['__key__']}: {type(e).__name__}: {e}")
            return None
        self.budget.ok()
        return image, caption
