"""The training loader over WebDataset shards (any fsspec URL or `pipe:`), with an exact, cheap
resume and every rank stepping the same number of times; what the eval loader (eval_loader.py)
shares with it: one sample's decoding and the start method of DataLoader workers.

    python -m clipforge.data.pipeline SHARDS --mode epoch --world 2 --batches 20   # samples/s

Two training modes (`data.mode`), both infinite streams of full batches of `batch_size`:

resampled (default): each (rank, worker) reads `shards_in_flight` lanes side by side; a lane
  reads shards drawn with replacement (probability: its source's `data.weights` share, spread
  by shard size), from a seed of (seed, rank, worker, lane, draw number). Lanes are taken in
  round robin and shuffled in seeded blocks of `shuffle_buffer` samples. No epochs: nothing
  can run dry, whatever the shard count, world size and worker count. A sample that fails to
  decode is skipped (the batch takes the next one) and counted.
epoch: every sample once per epoch across all ranks (plan.py has the arithmetic): a new shard
  order each epoch, samples (not shards) split into equal ranges per rank and worker, so each
  rank makes exactly floor(total / (batch * world)) batches per epoch whatever the shard sizes;
  the total % (batch * world) samples left over are not read that epoch (other ones each epoch,
  as the shard order changes). A sample that fails to decode is replaced in its batch by a
  copy of a good sample of the same batch and counted, so batch boundaries never move.

Position and resume (loader.state_dict(), saved per rank in the checkpoint; plain ints/lists):
  The DataLoader takes batches from its workers in strict round robin, so batch b comes from
  worker b % workers; on resume, worker w plays the part of worker (w + batches) % workers.
  - resampled: each worker's position is (block number, samples emitted from that block, and
    for each lane (draw number, offset in shard) at the block's start). Resume reopens those
    shards at those offsets (tar headers are walked, data is not read) and re-reads one block:
    cost <= shards_in_flight shard-prefix skips + shuffle_buffer raw samples, whatever the
    position. Guarantee: the same world size, workers, shuffle_buffer and shards_in_flight
    continue with the very next sample. With another world size each rank that existed keeps
    its own stream and new ranks start fresh ones; other changes start fresh streams (a new
    seed). Either way the stream is statistically the same, but not sample-for-sample.
  - epoch: the position is (epoch, step) plus the geometry of the run; everything else follows
    from plan.py's formulas. Same geometry: the very next sample. Another world size, worker
    count, batch size, buffer or lane count mid-epoch: the samples the old geometry had not
    read yet (computed, not replayed: O(ranks x workers x shuffle_buffer) integer work) are
    split anew, so the rest of the epoch reads exactly the unread samples, none twice, but
    `len(unread) % global batch` of them wait for the next epoch. The state of any rank is
    enough to resume every rank (it holds no per-rank position).
  Augmentation and caption choice are seeded per sample position, so they replay too.

Errors: a sample whose image fails to decode, or a shard that cannot be read (the rest of it
counts as failed), is logged once per shard and counted (`loader.errors`, logged by the
trainer as `data_errors`). Once a worker has read at least 100 samples, or at the end of an
epoch, a failed fraction above `max_error_rate` stops the run naming the worst shard. A sample
without a caption counts as failed (a torn shard); when a worker's first 8 samples all lack one
the run stops at once: image-only shards cannot train a contrastive model.

Workers (`data.workers`) start from a forkserver, not by fork (worker_context says why), so
what a worker needs, the StreamSpec with its transform and tokenizer, must pickle.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import multiprocessing
import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from clipforge.data.plan import (
    AUGMENT,
    BLOCK,
    CAPTION,
    DRAW,
    EpochPlan,
    Geometry,
    ShardOrder,
    build_epoch,
    rng,
    seed_for,
)
from clipforge.data.shards import ShardSet, SourceError, draw_weights
from clipforge.data.tario import ShardReadError, iter_samples

__all__ = ["IMAGE_EXTS", "TrainLoader", "iter_shard", "seed_for", "worker_context"]

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
MODES = ("resampled", "epoch")
# Below this many samples read, an error rate says little (one bad sample of the first ten).
MIN_SAMPLES_FOR_RATE = 100
# A worker whose first samples all lack a caption reads image-only shards: say so at once.
IMAGE_ONLY_AFTER = 8
# What DataLoader workers unpickle (loaders, transforms, tokenizer): imported once in the
# forkserver, which each worker is forked from, rather than once per worker.
WORKER_PRELOAD = [
    "clipforge.data.pipeline",
    "clipforge.data.eval_loader",
    "clipforge.data.transforms",
    "clipforge.data.tokenizer",
]
_log = logging.getLogger("clipforge.data")


def worker_context() -> multiprocessing.context.BaseContext:
    """The start method of every loader's DataLoader workers: forkserver, not fork.

    By the time the trainer iterates a loader, NCCL, DeepSpeed and wandb have started threads;
    a fork copies their locks in whatever state they are (held ones are never released in the
    child) and the parent's CUDA state, which a child cannot use. A forkserver is a clean
    process, started once with WORKER_PRELOAD imported, that forks each worker cheaply; the
    worker gets the dataset (spec, transform, tokenizer) pickled, so those must pickle.
    """
    ctx = multiprocessing.get_context("forkserver")
    # Each worker re-runs the parent's main module, as under spawn (`python -m clipforge.train`:
    # 10 s of imports, deepspeed's among them). With every clipforge module the parent has
    # imported already in the server, that re-run finds its imports cached. Not the main module
    # itself: runpy warns when the module it runs is imported already.
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    ours = {m for m in sys.modules if m.startswith("clipforge.")}
    preload = sorted({*WORKER_PRELOAD, *ours} - {getattr(spec, "name", None)})
    # Read only when the server starts (the first workers of this process); harmless after.
    ctx.set_forkserver_preload(["__main__", *preload])
    return ctx


def iter_shard(url: str) -> Iterator[dict[str, Any]]:
    """Samples of one tar: {"__key__", "__url__", "jpg": bytes, "txt": bytes, ...}."""
    return iter_samples(url)


# -- one sample ----------------------------------------------------------------------------------
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


def _caption(sample: dict[str, Any], rng_: random.Random) -> str | None:
    """The caption of a visit: one drawn from KEY.json's "captions" (COCO) or KEY.txt."""
    caps = json_captions(sample)
    if caps:
        return rng_.choice(caps)
    txt = sample.get("txt")
    return txt.decode("utf-8", errors="replace") if txt is not None else None


def _image(sample: dict[str, Any]) -> Image.Image:
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


class _Decoder:
    """Raw sample -> (image tensor, caption), with randomness seeded by the sample's position."""

    def __init__(self, transform: Callable, budget: ErrorBudget):
        # A transform with crop/normalize (transforms.TrainTransform) leaves the float work
        # to one pass per batch; any other callable is applied whole per image.
        self.transform = getattr(transform, "crop", transform)
        self.budget = budget
        self.uncaptioned = 0

    def __call__(self, raw: dict[str, Any] | Failed, key: tuple[int, ...]) -> tuple | None:
        if isinstance(raw, Failed):
            self.budget.fail(raw.url, raw.reason, raw.lost)
            return None
        caption = _caption(raw, random.Random(seed_for(*key, CAPTION)))
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
            image = self.transform(_image(raw))
        except Exception as e:  # noqa: BLE001  any decoder error: skip and count the sample
            self.budget.fail(raw["__url__"], f"{raw['__key__']}: {type(e).__name__}: {e}")
            return None
        self.budget.ok()
        return image, caption


# -- lanes: where raw samples come from ----------------------------------------------------------
class _PieceLane:
    """Epoch mode: reads (shard, first, end, x) pieces in order, one shard open at a time.
    Yields (x, raw or Failed), exactly end - first items per piece whatever the shard holds."""

    def __init__(self, urls: list[str], pieces: Iterator[tuple[int, int, int, int]]):
        self.urls, self._pieces = urls, pieces
        self._items = self._walk()

    def _walk(self) -> Iterator[tuple[int, dict[str, Any] | Failed]]:
        it, shard, pos, broken = None, -1, 0, ""
        for piece, first, end, x in self._pieces:
            if piece != shard or first < pos:  # pieces after a world change may revisit a shard
                if it is not None:
                    it.close()
                it, shard, pos = iter_samples(self.urls[piece], skip=first), piece, first
                broken = ""
            for offset in range(pos, end):
                item: dict[str, Any] | Failed
                try:
                    item = next(it) if it is not None else Failed(self.urls[piece], broken)
                except StopIteration:
                    broken = "fewer samples than its manifest says"
                    item, it = Failed(self.urls[piece], broken), None
                except ShardReadError as e:
                    broken = str(e)
                    item, it = Failed(self.urls[piece], broken), None
                if offset >= first:
                    yield x + offset - first, item
            pos = end
        if it is not None:
            it.close()

    def next(self) -> tuple[int, dict[str, Any] | Failed]:
        return next(self._items)


class _DrawLane:
    """Resampled mode: shards drawn with replacement, each read to its end; the position is
    (draw number, offset in that shard), enough to reopen the lane anywhere."""

    def __init__(self, shards: ShardSet, cum_weights: list[float], key: tuple[int, ...], pos: list):
        self.urls, self.counts, self.cum, self.key = shards.urls, shards.counts, cum_weights, key
        self.draw, self.offset = int(pos[0]), int(pos[1])
        self._it: Iterator[dict[str, Any]] | None = None

    def shard(self, draw: int) -> int:
        return random.Random(seed_for(*self.key, draw, DRAW)).choices(
            range(len(self.urls)), cum_weights=self.cum
        )[0]

    def next(self) -> dict[str, Any] | Failed:
        for _ in range(1000):  # a run of empty shards is fine; only empty ones is an error
            if self._it is None:
                self._shard = self.shard(self.draw)
                self._it = iter_samples(self.urls[self._shard], skip=self.offset)
            try:
                sample = next(self._it)
                self.offset += 1
                return sample
            except StopIteration:
                failed = self._short(None)
            except ShardReadError as e:
                failed = self._short(str(e))
            self._it.close()
            self._it, self.draw, self.offset = None, self.draw + 1, 0
            if failed is not None:
                return failed
        raise SourceError(f"1000 shards in a row held no sample (last: {self.urls[-1]})")

    def _short(self, error: str | None) -> Failed | None:
        """A shard that broke, or ended before the size its manifest gives, loses the rest."""
        url, count = self.urls[self._shard], self.counts[self._shard]
        lost = count - self.offset if count is not None else 0
        if error is not None:
            return Failed(url, error, max(1, lost))
        if lost > 0:
            return Failed(url, f"ended after {self.offset} of its {count} samples", lost)
        return None


def _empty(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A batch tensor; in a DataLoader worker, allocated in shared memory as torch's own collate
    does, so handing it to the main process copies nothing (38 MB at 64 x 224 px)."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    proto = torch.empty(0, dtype=dtype)
    storage = proto._typed_storage()._new_shared(int(np.prod(shape)), device="cpu")
    return proto.new(storage).view(shape)


# -- the worker side -----------------------------------------------------------------------------
@dataclass
class StreamSpec:
    """Everything a worker needs; pickled to each DataLoader worker (see worker_context)."""

    shards: ShardSet
    transform: Callable
    tokenizer: Callable
    seed: int
    rank: int
    geo: Geometry
    mode: str
    cum_weights: list[float]
    max_error_rate: float


class _TrainStream(IterableDataset):
    """Runs in each DataLoader worker; yields collated batches plus position metadata."""

    def __init__(self, spec: StreamSpec, start: dict[str, Any]):
        self.spec, self.start = spec, start

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        w, nw = (info.id, info.num_workers) if info else (0, 1)
        where = f"rank {self.spec.rank} worker {w}"
        decode = _Decoder(self.spec.transform, ErrorBudget(self.spec.max_error_rate, where))
        if self.spec.mode == "epoch":
            yield from self._epochs(w, nw, decode)
        else:
            yield from self._resampled((w + self.start["batches"]) % nw, decode)

    def _batch(self, images: list, texts: list[str], meta: dict[str, Any]) -> dict[str, Any]:
        normalize = getattr(self.spec.transform, "normalize", None)
        if normalize is None:
            shape = (len(images), *images[0].shape)
            image = torch.stack(images, out=_empty(shape, images[0].dtype))
        else:  # uint8 HWC crops -> float CHW, once per batch
            h, w, c = images[0].shape
            image = normalize(torch.stack(images), out=_empty((len(images), c, h, w)))
        return {"image": image, "text": self.spec.tokenizer(texts), "__meta__": meta}

    # resampled ------------------------------------------------------------------------------
    def _resampled(self, role: int, decode: _Decoder) -> Iterator[dict[str, Any]]:
        key = (self.spec.seed, self.start["restarts"], self.spec.rank, role)
        images, texts, errors, t0 = [], [], 0, time.perf_counter()
        for item, index, position in self._draws(key, self.start["roles"][role] or {}):
            out = decode(item, (*key, index))
            if out is None:
                continue
            images.append(out[0])
            texts.append(out[1])
            if len(images) == self.spec.geo.batch:
                meta = {"role": role, "position": position}
                meta["errors"], errors = decode.budget.failed - errors, decode.budget.failed
                batch = self._batch(images, texts, meta)
                meta["busy"] = time.perf_counter() - t0
                yield batch
                images, texts, t0 = [], [], time.perf_counter()

    def _draws(self, key: tuple[int, ...], pos: dict[str, Any]) -> Iterator[tuple]:
        """(raw sample, stream index, position after it) from `pos` on, block by block."""
        spec, geo = self.spec, self.spec.geo
        lanes = [
            _DrawLane(spec.shards, spec.cum_weights, (*key, j), lane_pos)
            for j, lane_pos in enumerate(pos.get("lanes", [[0, 0]] * geo.lanes))
        ]
        block, skip = pos.get("block", 0), pos.get("emitted", 0)
        while True:
            snapshot = [[lane.draw, lane.offset] for lane in lanes]
            first = block * geo.buffer
            raw = [lanes[i % geo.lanes].next() for i in range(first, first + geo.buffer)]
            order = rng(*key, block, BLOCK).permutation(geo.buffer).tolist()
            for e in range(skip, geo.buffer):
                item, raw[order[e]] = raw[order[e]], None  # let go of it once handed out
                yield item, first + order[e], {"block": block, "emitted": e + 1, "lanes": snapshot}
            block, skip = block + 1, 0

    # epoch ----------------------------------------------------------------------------------
    def _epochs(self, w: int, nw: int, decode: _Decoder) -> Iterator[dict[str, Any]]:
        spec = self.spec
        epoch, history = self.start["epoch"], self.start["history"]
        turn = self.start["step"] + w  # this worker's next batch index within the plan
        while True:
            order, plan = build_epoch(spec.shards.counts, spec.seed, epoch, history, spec.geo)  # type: ignore[arg-type]
            if turn < plan.steps:
                k = turn % nw
                yield from self._consumer(order, plan, epoch, k, turn // nw, decode)
                turn = k + plan.batches(k) * nw
            decode.budget.check(final=True)
            turn, epoch, history = turn - plan.steps, epoch + 1, []

    def _consumer(
        self, order: ShardOrder, plan: EpochPlan, epoch: int, k: int, first: int, decode: _Decoder
    ) -> Iterator[dict[str, Any]]:
        """Batches first, first + 1, ... of worker k's slice of the plan."""
        spec, geo = self.spec, self.spec.geo
        start, length = plan.consumer(spec.rank, k)
        block = first * geo.batch // geo.buffer
        lanes = []
        for j in range(geo.lanes):
            lane_start, lane_len = plan.lane(length, j)
            done = plan.lane_done(j, block * geo.buffer)
            runs = plan.y.slice(start + lane_start + done, start + lane_start + lane_len)
            lanes.append(_PieceLane(spec.shards.urls, order.pieces(runs)))
        emitted = self._emissions(plan, lanes, k, block, length)
        for _ in range(block * geo.buffer, first * geo.batch):
            next(emitted)
        for i in range(first, plan.batches(k)):
            t0 = time.perf_counter()
            errors = decode.budget.failed
            items = [next(emitted) for _ in range(geo.batch)]
            good = [decode(raw, (spec.seed, epoch, x)) for x, raw in items]
            step = k + i * geo.nw + 1
            meta = {
                "epoch": epoch,
                "step": step,
                "steps": plan.steps,
                "errors": decode.budget.failed - errors,
            }
            batch = self._batch(*self._fill(good, items), meta)
            meta["busy"] = time.perf_counter() - t0
            yield batch

    def _emissions(
        self, plan: EpochPlan, lanes: list[_PieceLane], k: int, block: int, length: int
    ) -> Iterator[tuple[int, dict[str, Any] | Failed]]:
        geo = plan.geo
        while block * geo.buffer < length:
            first = block * geo.buffer
            n = min(geo.buffer, length - first)
            raw = [lanes[i % geo.lanes].next() for i in range(first, first + n)]
            for idx in plan.block(self.spec.rank, k, block, length).tolist():
                item, raw[idx] = raw[idx], None  # let go of it once handed out
                yield item
            block += 1

    def _fill(self, good: list, items: list) -> tuple[list, list[str]]:
        """A failed sample's place goes to a copy of a good one (of this batch, else of the
        last batch), so batches stay full and batch boundaries stay where plan.py puts them."""
        ok = [g for g in good if g is not None] or getattr(self, "_last_ok", [])
        if not ok:
            url = next((raw.url for _, raw in items if isinstance(raw, Failed)), None)
            raise SourceError(f"{url or items[0][1]['__url__']}: every sample of a batch failed")
        self._last_ok = ok
        filled = [g if g is not None else ok[i % len(ok)] for i, g in enumerate(good)]
        return [f[0] for f in filled], [f[1] for f in filled]


# -- the main-process side -----------------------------------------------------------------------
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
        *,
        world: int = 1,
        mode: str = "resampled",
        weights: list[float] | None = None,
        shards_in_flight: int = 4,
        max_error_rate: float = 0.1,
    ):
        if not shards.urls:
            raise SourceError("no shards to train on")
        if mode not in MODES:
            raise SourceError(f"data.mode must be one of {MODES}, got {mode!r}")
        # workers=0 (the main process reads) plans like one worker: same geometry, same stream.
        self.geo = Geometry(
            world, max(1, workers), batch_size, max(1, shuffle_buffer), shards_in_flight
        )
        if mode == "epoch":
            _check_epoch(shards, weights, self.geo)
        cum, total = [], 0.0
        for p in draw_weights(shards, weights):
            total += p
            cum.append(total)
        self.spec = StreamSpec(
            shards, transform, tokenizer, seed, rank, self.geo, mode, cum, max_error_rate
        )
        self.workers, self.mode = workers, mode
        self.batches = self.errors = self.restarts = 0
        self.roles: list[dict[str, Any]] = [{} for _ in range(self.geo.nw)]
        self.epoch, self.step, self.steps = 0, 0, None
        self.history: list[list[int]] = []
        self._busy, self._decoded = 0.0, 0

    @property
    def steps_per_epoch(self) -> int:
        """Batches per rank in a full epoch (epoch mode): floor(total / (batch * world))."""
        return self.spec.shards.samples // self.geo.global_batch  # type: ignore[operator]

    # state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "mode": self.mode,
            "batches": self.batches,
            "errors": self.errors,
            "geometry": self.geo.to_list(),
        }
        if self.mode == "epoch":
            state.update(
                epoch=self.epoch,
                step=self.step,
                history=[list(h) for h in self.history],
                samples=self.spec.shards.samples,
            )
        else:
            state.update(restarts=self.restarts, roles=json.loads(json.dumps(self.roles)))
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("mode", "resampled") != self.mode:
            raise SourceError(
                f"the checkpoint's loader ran data.mode={state.get('mode', 'resampled')}, this run "
                f"data.mode={self.mode}: resume with the same mode"
            )
        self.batches, self.errors = int(state["batches"]), int(state.get("errors", 0))
        old = Geometry.from_list(state["geometry"]) if "geometry" in state else None
        if self.mode == "epoch":
            self._load_epoch(state, old)
        else:
            self._load_resampled(state, old)

    def _load_epoch(self, state: dict[str, Any], old: Geometry | None) -> None:
        if state["samples"] != self.spec.shards.samples:
            raise SourceError(
                f"the checkpoint's epoch covered {state['samples']} samples, data.train now "
                f"holds {self.spec.shards.samples}: exact epochs need the same shards"
            )
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.history = [list(h) for h in state["history"]]
        if old is not None and old != self.geo:
            # The rest of this epoch is re-split from what the old geometry had not read.
            self.history.append([*old.to_list(), self.step])
            self.step = 0

    def _load_resampled(self, state: dict[str, Any], old: Geometry | None) -> None:
        self.restarts = int(state.get("restarts", 0))
        same_streams = old is not None and (old.nw, old.buffer, old.lanes) == (
            self.geo.nw,
            self.geo.buffer,
            self.geo.lanes,
        )
        if same_streams and len(state["roles"]) == self.geo.nw:
            self.roles = [dict(r) for r in state["roles"]]
        else:  # positions of another layout mean nothing here: fresh streams, a new seed
            self.restarts += 1
            self.roles = [{} for _ in range(self.geo.nw)]

    # iteration -------------------------------------------------------------------------------
    def _start(self) -> dict[str, Any]:
        return {
            "batches": self.batches,
            "restarts": self.restarts,
            "roles": [dict(r) for r in self.roles],
            "epoch": self.epoch,
            "step": self.step,
            "history": [(Geometry.from_list(h[:5]), int(h[5])) for h in self.history],
        }

    def _record(self, meta: dict[str, Any], samples: int) -> None:
        self.batches += 1
        self.errors += int(meta["errors"])
        self._busy += float(meta["busy"])
        self._decoded += samples
        if self.mode == "epoch":
            self.epoch, self.step, self.steps = int(meta["epoch"]), int(meta["step"]), meta["steps"]
            if self.step == self.steps:  # the epoch is over: the next starts with a fresh plan
                self.epoch, self.step, self.history = self.epoch + 1, 0, []
        else:
            self.roles[int(meta["role"])] = meta["position"]

    def metrics(self) -> dict[str, float]:
        """Loader counters for the trainer's log line (names are stable)."""
        out: dict[str, float] = {"data_errors": self.errors}
        if self._busy > 0:
            # What this rank's workers decode per second of their own time, all together:
            # below samples_per_s_per_gpu means the loader, not the model, sets the pace.
            out["data_decode_samples_per_s"] = self._decoded / self._busy * self.geo.nw
        if self.mode == "epoch" and self.steps:
            # Samples read this epoch over samples it will read, across geometry changes.
            done = sum(h[0] * h[2] * h[5] for h in self.history) + self.step * self.geo.global_batch
            left = (self.steps - self.step) * self.geo.global_batch
            out["data_epoch"] = self.epoch + done / max(1, done + left)
        self._busy, self._decoded = 0.0, 0
        return out

    def __iter__(self) -> Iterator[dict[str, Any]]:
        loader = DataLoader(
            _TrainStream(self.spec, self._start()),
            batch_size=None,
            num_workers=self.workers,
            persistent_workers=False,
            prefetch_factor=2 if self.workers else None,
            multiprocessing_context=worker_context() if self.workers else None,
            pin_memory=torch.cuda.is_available(),
        )
        for batch in loader:
            self._record(batch.pop("__meta__"), len(batch["image"]))
            yield batch


def _check_epoch(shards: ShardSet, weights: list[float] | None, geo: Geometry) -> None:
    if weights is not None:
        raise SourceError(
            "data.weights needs data.mode=resampled: an exact epoch reads every sample once"
        )
    missing = [u for u, c in zip(shards.urls, shards.counts) if c is None]
    if missing:
        raise SourceError(
            f"{missing[0]}: size unknown; data.mode=epoch needs every shard's sample count "
            f"(a manifest.json or *_stats.json beside the shards; {len(missing)} shards lack one)"
        )
    if shards.samples < geo.global_batch:  # type: ignore[operator]
        raise SourceError(
            f"data.mode=epoch: {shards.samples} samples cannot fill one global batch of "
            f"{geo.batch} x {geo.world} ranks"
        )


# -- a quick throughput check --------------------------------------------------------------------
def _untokenized(texts: list[str]) -> list[str]:
    return texts  # module-level, so that it pickles to the forkserver's workers


def _main() -> None:
    from clipforge.config import AugmentConfig
    from clipforge.data.shards import resolve
    from clipforge.data.transforms import train_transform

    p = argparse.ArgumentParser(description="samples/s of the training loader on some shards")
    p.add_argument("source")
    p.add_argument("--mode", default="resampled", choices=MODES)
    p.add_argument("--world", type=int, default=1)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--size", type=int, default=224)
    a = p.parse_args()
    loader = TrainLoader(
        resolve(a.source),
        train_transform(a.size, AugmentConfig()),
        _untokenized,
        a.batch,
        0,
        0,
        a.workers,
        1000,
        world=a.world,
        mode=a.mode,
    )
    it = iter(loader)
    next(it)
    t0 = time.perf_counter()
    for _ in range(a.batches):
        next(it)
    rate = a.batches * a.batch / (time.perf_counter() - t0)
    print(f"{rate:.1f} samples/s {loader.metrics()}")


if __name__ == "__main__":
    _main()
