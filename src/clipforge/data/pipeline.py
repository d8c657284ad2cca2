"""Training and eval loaders over WebDataset shards, read through webdataset's tar iterators and
fsspec (local paths, http, s3, gcs, `pipe:`).

Training stream (resampled, the default for pretraining): each (rank, worker) draws shards with
replacement, weighted by their sample counts, from its own seeded RNG, so the stream is infinite
and every rank yields the same number of full batches per step whatever the shard count, world
size and worker count (no rank runs dry, nothing hangs when shards < ranks x workers).

Position and resume: the DataLoader takes batches from its workers in strict round robin, so batch
b comes from worker b % W. Each batch carries its worker's "role" and how many raw samples the
role has consumed; the loader keeps the newest position per role. On resume, worker w plays role
(w + batches) % W, which makes the first resumed batch come from the role that was next, and
each role replays its seeded shard draws and shuffle buffer, skipping the consumed samples
before decoding. The resumed stream is therefore the very next batch of the uninterrupted one,
as long as the worker count, world size and batch size are unchanged. Augmentation randomness
is seeded per sample position, so it replays too.
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Callable, Iterator
from typing import Any

import fsspec
import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_iterator

from clipforge.data.shards import ShardSet, SourceError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def seed_for(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (Python's hash of tuples is salted per process)."""
    return int(
        np.random.SeedSequence([abs(int(p)) for p in parts]).generate_state(1, np.uint64)[0] >> 1
    )


def _open(url: str):
    if url.startswith("pipe:"):
        return wds.gopen(url)
    return fsspec.open(url, "rb").open()


def iter_shard(url: str) -> Iterator[dict[str, Any]]:
    """Samples of one tar: {"__key__", "__url__", "jpg": bytes, "txt": bytes, ...}."""
    stream = _open(url)
    try:
        files = ({**f, "__url__": url} for f in tar_file_iterator(stream))
        yield from group_by_keys(files)
    finally:
        stream.close()


def _caption(sample: dict[str, Any], rng: random.Random) -> str | None:
    """The caption of a visit: one drawn from KEY.json's "captions" (COCO) or KEY.txt."""
    meta = sample.get("json")
    if meta is not None:
        try:
            caps = json.loads(meta).get("captions")
        except (ValueError, AttributeError):
            caps = None
        if isinstance(caps, list) and caps:
            return str(rng.choice(caps))
    txt = sample.get("txt")
    return txt.decode("utf-8", errors="replace") if txt is not None else None


def _image(sample: dict[str, Any]) -> Image.Image:
    for ext in IMAGE_EXTS:
        if ext in sample:
            img = Image.open(io.BytesIO(sample[ext]))
            img.load()
            return img
    raise ValueError(f"no image member ({'/'.join(IMAGE_EXTS)})")


def _shuffle(it: Iterator[Any], bufsize: int, rng: random.Random) -> Iterator[Any]:
    """A reservoir shuffle: deterministic for a given RNG, which resume relies on."""
    buf: list[Any] = []
    for x in it:
        if len(buf) < bufsize:
            buf.append(x)
            continue
        i = rng.randrange(bufsize)
        buf[i], x = x, buf[i]
        yield x
    rng.shuffle(buf)
    yield from buf


class _ResampledBatches(IterableDataset):
    """Runs inside each DataLoader worker; yields collated batches plus position metadata."""

    def __init__(
        self,
        shards: ShardSet,
        transform: Callable,
        tokenizer: Callable,
        batch_size: int,
        seed: int,
        rank: int,
        shuffle_buffer: int,
        start_batches: int,
        positions: list[int],
    ):
        self.shards = shards
        self.transform = transform
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.shuffle_buffer = shuffle_buffer
        self.start_batches = start_batches
        self.positions = positions

    def _raw(self, rng: random.Random) -> Iterator[dict[str, Any]]:
        weights = [c if c else 1 for c in self.shards.counts]
        while True:
            url = rng.choices(self.shards.urls, weights=weights)[0]
            yield from iter_shard(url)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        wid, nworkers = (info.id, info.num_workers) if info else (0, 1)
        role = (wid + self.start_batches) % nworkers
        rng = random.Random(seed_for(self.seed, self.rank, role, 1))
        raw = _shuffle(self._raw(rng), self.shuffle_buffer, rng)
        pos = self.positions[role] if role < len(self.positions) else 0
        for _ in range(pos):  # replay up to the saved position without decoding
            next(raw)
        images, texts, errors = [], [], 0
        for sample in raw:
            pos += 1
            # Per-position seeds: the replayed skip above draws nothing, so anything random
            # after it must not depend on how many draws came before.
            torch.manual_seed(seed_for(self.seed, self.rank, role, pos, 2))
            caption = _caption(sample, random.Random(seed_for(self.seed, self.rank, role, pos, 3)))
            if caption is None:
                raise SourceError(
                    f"{sample['__url__']}: sample {sample['__key__']} has no caption (.txt); "
                    "image-only shards cannot train a contrastive model"
                )
            try:
                image = self.transform(_image(sample))
            except Exception:  # noqa: BLE001  a corrupt member is skipped and counted
                errors += 1
                continue
            images.append(image)
            texts.append(caption)
            if len(images) == self.batch_size:
                yield {
                    "image": torch.stack(images),
                    "text": self.tokenizer(texts),
                    "__role__": role,
                    "__pos__": pos,
                    "__errors__": errors,
                }
                images, texts, errors = [], [], 0


class TrainLoader:
    """Infinite per-rank stream of equal-size batches with a resumable position."""

    def __init__(
        self,
        shards: ShardSet,
        transform: Callable,
        tokenizer: Callable,
        batch_size: int,
        seed: int,
        rank: int,
        workers: int,
        shuffle_buffer: int,
    ):
        if not shards.urls:
            raise SourceError("no shards to train on")
        self.args = dict(
            shards=shards,
            transform=transform,
            tokenizer=tokenizer,
            batch_size=batch_size,
            seed=seed,
            rank=rank,
            shuffle_buffer=shuffle_buffer,
        )
        self.workers = workers
        self.batches = 0
        self.positions = [0] * max(1, workers)
        self.errors = 0

    def state_dict(self) -> dict[str, Any]:
        return {"batches": self.batches, "positions": list(self.positions), "errors": self.errors}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["positions"]) != max(1, self.workers):
            raise ValueError(
                f"loader state has {len(state['positions'])} workers, this run {self.workers}: "
                "exact resume needs the same data.workers"
            )
        self.batches = state["batches"]
        self.positions = list(state["positions"])
        self.errors = state.get("errors", 0)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        nworkers = max(1, self.workers)
        # Positions are stored per role; the dataset maps worker -> role by the batch count.
        dataset = _ResampledBatches(
            **self.args, start_batches=self.batches, positions=list(self.positions)
        )
        loader = DataLoader(
            dataset,
            batch_size=None,
            num_workers=self.workers,
            persistent_workers=False,
            prefetch_factor=4 if self.workers else None,
            multiprocessing_context="fork" if self.workers else None,
        )
        for batch in loader:
            role = int(batch.pop("__role__"))
            self.positions[role % nworkers] = int(batch.pop("__pos__"))
            self.errors += int(batch.pop("__errors__"))
            self.batches += 1
            yield batch


def _eval_samples(shards: ShardSet) -> Iterator[dict[str, Any]]:
    for url in shards.urls:
        yield from iter_shard(url)


def count_samples(shards: ShardSet) -> int:
    if shards.samples is not None:
        return shards.samples
    return sum(1 for _ in _eval_samples(shards))


class EvalLoader:
    """Each sample once, in shard order; rank r takes batches r, r+W, ... . Every rank yields the
    same number of batches (ZeRO-3 needs every rank in every forward): a rank short of one gets
    a copy of its previous batch marked `pad`, whose results the caller drops."""

    def __init__(
        self, shards: ShardSet, transform: Callable, batch_size: int, rank: int = 0, world: int = 1
    ):
        self.shards, self.transform, self.batch_size = shards, transform, batch_size
        self.rank, self.world = rank, world
        n = count_samples(shards)
        self.num_batches = -(-n // batch_size)
        self.per_rank = -(-self.num_batches // world)

    def _collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = {
            "image": torch.stack([self.transform(_image(s)) for s in samples]),
            "key": [s["__key__"] for s in samples],
            "caption": [_caption(s, random.Random(0)) or "" for s in samples],
        }
        if all("cls" in s for s in samples):
            batch["cls"] = torch.tensor([int(s["cls"]) for s in samples])
        return batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        yielded, last, chunk, index = 0, None, [], 0
        for sample in _eval_samples(self.shards):
            chunk.append(sample)
            if len(chunk) == self.batch_size:
                if index % self.world == self.rank:
                    last = self._collate(chunk)
                    yielded += 1
                    yield {**last, "pad": False}
                chunk, index = [], index + 1
        if chunk and index % self.world == self.rank:
            last = self._collate(chunk)
            yielded += 1
            yield {**last, "pad": False}
        while yielded < self.per_rank:
            if last is None:  # more ranks than batches: any real batch will do as padding
                last = self._collate([next(_eval_samples(self.shards))])
            yielded += 1
            yield {**last, "pad": True}
