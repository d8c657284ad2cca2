"""The worker side of the training loader: what each DataLoader worker runs to turn shards
into full batches of `batch_size`, in one of two modes (`data.mode`), both infinite streams.

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

Each batch carries `__meta__`, the position after it, which TrainLoader (train_loader.py)
records in the main process; the stream starts from the position TrainLoader hands it.
Augmentation and caption choice are seeded per sample position, so they replay on resume.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from torch.utils.data import IterableDataset, get_worker_info

from clipforge.data.lanes import DrawLane, PieceLane
from clipforge.data.plan import BLOCK, EpochPlan, Geometry, ShardOrder, build_epoch, rng, shares
from clipforge.data.samples import Decoder, ErrorBudget, Failed
from clipforge.data.shards import ShardSet, SourceError
from clipforge.data.transforms import BatchTransform
from clipforge.data.workers import shared_empty


@dataclass
class StreamSpec:
    """Everything a worker needs; pickled to each DataLoader worker (see workers.worker_context)."""

    shards: ShardSet
    transform: BatchTransform
    tokenizer: Callable
    seed: int
    rank: int
    geo: Geometry
    mode: str
    cum_weights: list[float]
    max_error_rate: float


class TrainStream(IterableDataset):
    """Runs in each DataLoader worker; yields collated batches plus position metadata."""

    def __init__(self, spec: StreamSpec, start: dict[str, Any]):
        self.spec, self.start = spec, start
        self._last_ok: list = []  # the last batch with good samples (see _fill)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        w, nw = (info.id, info.num_workers) if info else (0, 1)
        where = f"rank {self.spec.rank} worker {w}"
        decode = Decoder(self.spec.transform.image, ErrorBudget(self.spec.max_error_rate, where))
        if self.spec.mode == "epoch":
            yield from self._epochs(w, nw, decode)
        else:
            yield from self._resampled((w + self.start["batches"]) % nw, decode)

    def _batch(self, images: list, texts: list[str], meta: dict[str, Any]) -> dict[str, Any]:
        image = self.spec.transform.batch(images, shared_empty)
        return {"image": image, "text": self.spec.tokenizer(texts), "__meta__": meta}

    # resampled ------------------------------------------------------------------------------
    def _resampled(self, role: int, decode: Decoder) -> Iterator[dict[str, Any]]:
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
            DrawLane(spec.shards, spec.cum_weights, (*key, j), lane_pos)
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
    def _epochs(self, w: int, nw: int, decode: Decoder) -> Iterator[dict[str, Any]]:
        spec = self.spec
        epoch, history = self.start["epoch"], self.start["history"]
        plan_geo = (
            self.start.get("plan_geo") or spec.geo
        )  # another world's, after an elastic resume
        turn = self.start["step"] + w  # this worker's next batch index within the plan
        while True:
            order, plan = build_epoch(spec.shards.counts, spec.seed, epoch, history, plan_geo)  # type: ignore[arg-type]
            if turn < plan.steps:
                k = turn % nw
                yield from self._consumer(order, plan, epoch, k, turn // nw, decode)
                turn = k + plan.batches(k) * nw
            decode.budget.check(final=True)
            turn, epoch, history = turn - plan.steps, epoch + 1, []

    def _consumer(
        self, order: ShardOrder, plan: EpochPlan, epoch: int, k: int, first: int, decode: Decoder
    ) -> Iterator[dict[str, Any]]:
        """Batches first, first + 1, ... of worker k's slice of the plan: this rank's part of
        the plan's global batches, from the plan ranks plan.shares names (just this rank's own
        slice when the plan is this world's)."""
        spec, pg = self.spec, plan.geo
        parts = shares(spec.rank, spec.geo.batch, pg.batch)
        streams = [self._consumer_stream(order, plan, d, k, first) for d, _, _ in parts]
        for i in range(first, plan.batches(k)):
            t0 = time.perf_counter()
            errors = decode.budget.failed
            items = []
            for stream, (_, a, b) in zip(streams, parts):
                drawn = [next(stream) for _ in range(pg.batch)]
                items += drawn[a:b]  # the rest belongs to other ranks: read, never decoded
            good = [decode(raw, (spec.seed, epoch, x)) for x, raw in items]
            step = k + i * pg.nw + 1
            meta = {
                "epoch": epoch,
                "step": step,
                "steps": plan.steps,
                "errors": decode.budget.failed - errors,
                "keys": [raw.get("__key__") if isinstance(raw, dict) else None for _, raw in items],
            }
            batch = self._batch(*self._fill(good, items), meta)
            meta["busy"] = time.perf_counter() - t0
            yield batch

    def _consumer_stream(
        self, order: ShardOrder, plan: EpochPlan, rank: int, k: int, first: int
    ) -> Iterator[tuple[int, dict[str, Any] | Failed]]:
        """The raw samples of plan rank `rank`'s worker k, from its batch `first` on."""
        geo = plan.geo
        start, length = plan.consumer(rank, k)
        block = first * geo.batch // geo.buffer
        lanes = []
        for j in range(geo.lanes):
            lane_start, lane_len = plan.lane(length, j)
            done = plan.lane_done(j, block * geo.buffer)
            runs = plan.y.slice(start + lane_start + done, start + lane_start + lane_len)
            lanes.append(PieceLane(self.spec.shards.urls, order.pieces(runs)))
        emitted = self._emissions(plan, lanes, rank, k, block, length)
        for _ in range(block * geo.buffer, first * geo.batch):
            next(emitted)
        return emitted

    def _emissions(
        self, plan: EpochPlan, lanes: list[PieceLane], rank: int, k: int, block: int, length: int
    ) -> Iterator[tuple[int, dict[str, Any] | Failed]]:
        geo = plan.geo
        while block * geo.buffer < length:
            first = block * geo.buffer
            n = min(geo.buffer, length - first)
            raw = [lanes[i % geo.lanes].next() for i in range(first, first + n)]
            for idx in plan.block(rank, k, block, length).tolist():
                item, raw[idx] = raw[idx], None  # let go of it once handed out
                yield item
            block += 1

    def _fill(self, good: list, items: list) -> tuple[list, list[str]]:
        """A failed sample's place goes to a copy of a good one (of this batch, else of the
        last batch), so batches stay full and batch boundaries stay where plan.py puts them."""
        ok = [g for g in good if g is not None] or self._last_ok
        if not ok:
            url = next((raw.url for _, raw in items if isinstance(raw, Failed)), None)
            raise SourceError(f"{url or items[0][1]['__url__']}: every sample of a batch failed")
        self._last_ok = ok
        filled = [g if g is not None else ok[i % len(ok)] for i, g in enumerate(good)]
        return [f[0] for f in filled], [f[1] for f in filled]
