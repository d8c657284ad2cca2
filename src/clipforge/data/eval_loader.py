"""The eval loader: every sample of a set once across all ranks, each rank reading only its own
share, decoded by DataLoader workers, and every rank stepping the same number of times.

    python tests/bench/loader_rate.py SHARDS --eval --world 8 --rank 3   # one rank's share, samples/s

Why a share per rank: at 512 ranks a loader that walks the whole set on every rank and keeps
every W-th batch reads an ImageNet-val from shared storage 512 times. Here rank r reads:
  - sizes known (manifest or *_stats.json): the set is cut into global batches of `batch_size`
    in shard order (the last one partial), the same batches whatever the world size, so the
    same images meet in one forward with 1 or N ranks; rank r takes a contiguous run of them
    (balanced: the runs differ by at most one batch) and opens its first shard at an offset
    (tar headers walked, data not read).
  - sizes unknown: rank r takes a contiguous block of shards. Batches then never cross a shard
    (a shard's last batch may be partial), again so that batch contents do not depend on the
    world size; before each step the ranks agree whether any still has a batch (one small
    collective per step), as no rank can know the others' counts up front.
Inside a rank each DataLoader worker takes a contiguous part of the rank's batches (or shards),
so every sample is read once; workers start from a forkserver (workers.worker_context).

Every rank yields the same number of batches (ZeRO-3 needs every rank in every forward): a short
rank yields padding batches marked `pad: True` (a copy of its last batch, or one blank image
when it has none), whose results callers drop. Batches arrive in worker round-robin order, not
shard order: each carries `start`, the (shard, offset in shard) of its first sample; sorting by
it restores the global order on any world size (retrieval.embed_images does).
"""

from __future__ import annotations

import bisect
import io
import logging
import random
from collections.abc import Callable, Iterator
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from clipforge.data.image_folder import ImageFolder
from clipforge.data.samples import choose_caption, open_image
from clipforge.data.shards import ShardSet
from clipforge.data.tario import iter_samples
from clipforge.data.workers import shared_empty, worker_context
from clipforge.engine.dist import any_rank

__all__ = ["EvalLoader"]

_log = logging.getLogger("clipforge.data")
# A piece of a batch: samples [first, end) of shard `shard`.
Piece = tuple[int, int, int]


def _blank_sample() -> dict[str, Any]:
    """The raw sample of a padding batch for a rank with no batch of its own: it reads nothing."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (128, 128, 128)).save(buf, format="PNG")
    return {"__key__": "", "__url__": "", "__index__": -1, "png": buf.getvalue()}


def _span(n: int, parts: int, i: int) -> range:
    """Part i of range(n) cut into `parts` contiguous parts whose sizes differ by at most one."""
    return range(i * n // parts, (i + 1) * n // parts)


class _Reader:
    """Reads pieces in order, keeping a shard open while a piece starts where the last ended."""

    def __init__(self, urls: list[str]):
        self.urls = urls
        self._it: Iterator[dict[str, Any]] | None = None
        self._at = (-1, -1)
        self._warned: set[int] = set()

    def read(self, shard: int, first: int, end: int) -> list[dict[str, Any]]:
        if (shard, first) != self._at or self._it is None:
            self.close()
            self._it = iter_samples(self.urls[shard], skip=first)
        out = [s for _, s in zip(range(first, end), self._it)]
        if len(out) < end - first and shard not in self._warned:
            # The set shrinks by the missing samples; the eval's sample count shows it.
            self._warned.add(shard)
            _log.warning(f"{self.urls[shard]}: fewer samples than its manifest says")
        self._at = (shard, end)
        return out

    def close(self) -> None:
        if self._it is not None:
            self._it.close()  # type: ignore[attr-defined]
            self._it = None


class _EvalStream(IterableDataset):
    """Runs in each DataLoader worker (pickled to it): this worker's part of the rank's units,
    read once, collated by the loader's `collate`."""

    def __init__(self, loader: EvalLoader):
        self.urls, self.units, self.batch_size = loader.shards.urls, loader.units, loader.batch_size
        self.known, self.collate = loader.per_rank is not None, loader._collate
        # An image folder reads its own files (one "shard" per class sub-folder).
        self.folder = loader.shards if isinstance(loader.shards, ImageFolder) else None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        w, nw = (info.id, info.num_workers) if info else (0, 1)
        reader = _Reader(self.urls)
        read = self.folder.read if self.folder is not None else reader.read
        try:
            for u in _span(len(self.units), nw, w):
                if self.known:  # a unit is one global batch: its pieces
                    pieces: list[Piece] = self.units[u]
                    samples = [s for p in pieces for s in read(*p)]
                    if samples:
                        yield {**self.collate(samples), "start": pieces[0][:2]}
                else:  # a unit is one shard, cut into batches that stay inside it
                    yield from self._shard(self.units[u])
        finally:
            reader.close()

    def _shard(self, shard: int) -> Iterator[dict[str, Any]]:
        chunk: list[dict[str, Any]] = []
        offset = 0
        for sample in iter_samples(self.urls[shard]):
            chunk.append(sample)
            if len(chunk) == self.batch_size:
                yield {**self.collate(chunk), "start": (shard, offset)}
                chunk, offset = [], offset + self.batch_size
        if chunk:
            yield {**self.collate(chunk), "start": (shard, offset)}


class EvalLoader:
    """This rank's share of an eval set in batches of `batch_size`, each sample read once across
    ranks; every rank yields the same number of batches, padding ones marked `pad`.

    workers=0 decodes in the main process (tests, small sets); world > 1 without a process
    group (ranks simulated in one process) works when the shard sizes are known. An image
    folder (data.image_folder) is read like shards of known sizes, one per class sub-folder.
    """

    def __init__(
        self,
        shards: ShardSet | ImageFolder,
        transform: Callable,
        batch_size: int,
        rank: int = 0,
        world: int = 1,
        workers: int = 0,
    ):
        self.shards, self.transform, self.batch_size = shards, transform, batch_size
        self.rank, self.world, self.workers = rank, world, workers
        total = shards.samples
        # units: global batches (as pieces) when sizes are known, else whole shards.
        self.units: list[Any]
        self.per_rank: int | None
        if total is not None:
            self._ends = list(_cumsum(shards.counts))  # type: ignore[arg-type]
            num_batches = -(-total // batch_size)
            self.per_rank = -(-num_batches // world)
            self.units = [self._pieces(b) for b in _span(num_batches, world, rank)]
        else:
            self.per_rank = None
            self.units = list(_span(len(shards.urls), world, rank))

    def _pieces(self, b: int) -> list[Piece]:
        """Global batch b as pieces of shards: samples [b * batch, (b + 1) * batch) of the set."""
        counts: list[int] = self.shards.counts  # type: ignore[assignment]
        ends = self._ends
        g, end = b * self.batch_size, min((b + 1) * self.batch_size, ends[-1])
        s = bisect.bisect_right(ends, g)  # the first shard ending after g (skips empty ones)
        pieces = []
        while g < end:
            first = g - (ends[s] - counts[s])
            take = min(end, ends[s]) - g
            pieces.append((s, first, first + take))
            g, s = g + take, s + 1
        return pieces

    def _collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        images = [self.transform(open_image(s)) for s in samples]
        # In a worker, into shared memory: handing the batch over copies nothing.
        image = torch.stack(
            images, out=shared_empty((len(images), *images[0].shape), images[0].dtype)
        )
        batch: dict[str, Any] = {
            "image": image,
            "key": [s["__key__"] for s in samples],
            "caption": [choose_caption(s, random.Random(0)) or "" for s in samples],
        }
        if all("cls" in s for s in samples):
            batch["cls"] = torch.tensor([int(s["cls"]) for s in samples])
        return batch

    def _more(self, mine: bool, yielded: int) -> bool:
        """Whether every rank takes another step: known from the sizes, else agreed on."""
        if self.per_rank is not None:
            if mine and yielded >= self.per_rank:
                raise RuntimeError(f"rank {self.rank} read more than its {self.per_rank} batches")
            return yielded < self.per_rank
        return any_rank(mine)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        loader = DataLoader(
            _EvalStream(self),
            batch_size=None,
            num_workers=self.workers,
            persistent_workers=False,
            prefetch_factor=2 if self.workers else None,
            multiprocessing_context=worker_context() if self.workers else None,
        )
        real: Iterator[dict[str, Any]] | None = iter(loader)
        last, yielded = None, 0
        while True:
            batch = next(real, None) if real is not None else None
            if batch is None:
                real = None  # this rank is done reading; it may still pad
            if not self._more(batch is not None, yielded):
                return
            yielded += 1
            if batch is not None:
                last = {**batch, "start": tuple(batch["start"])}  # the DataLoader makes it a list
                yield {**last, "pad": False}
            else:
                if last is None:
                    last = {**self._collate([_blank_sample()]), "start": (-1, -1)}
                yield {**last, "pad": True}


def _cumsum(counts: list[int]) -> Iterator[int]:
    total = 0
    for c in counts:
        total += c
        yield total
