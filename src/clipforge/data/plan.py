"""Which sample each (rank, worker) reads, and in which order: index arithmetic only, no I/O.

    python -m clipforge.data.plan 1000 --world 3 --workers 2 --batch 8   # print an epoch's layout

Exact-epoch mode (stream.py reads what this module computes):

  X     the epoch's samples in a seeded shard order: shard pi(0)'s samples in file order, then
        shard pi(1)'s, ... (sizes from the manifest). A new shard order every epoch.
  Y     the samples still to be read this epoch, as runs of X positions. At the start of an
        epoch Y = X; after a change of world size (or workers, batch, buffer, lanes) mid-epoch,
        Y = what the previous geometry had not read yet (see EpochPlan.remaining).
  steps = len(Y) // (batch * world): batches per rank. The last len(Y) % (batch * world)
        samples of Y are not read this epoch; with a new shard order each epoch they are other
        samples every time (no sample is favoured), and none of them is ever read twice.
  rank r reads Y[r * steps * batch : (r + 1) * steps * batch): samples, not shards, are split,
        so uneven shards never leave a rank short and any number of shards serves any world.
  worker k of that rank makes its batches k, k + workers, ... (the DataLoader's round robin),
        so it reads a contiguous slice of the rank's range, of (its batch count) * batch samples.
  lanes the worker's slice is cut into `lanes` contiguous parts read side by side in round
        robin (stream position i -> lane i % lanes, offset i // lanes): that many shards in
        flight, so a batch mixes several shards.
  blocks stream positions are shuffled in blocks of `buffer` samples with a seeded permutation
        per block; batch i of the worker is emissions [i * batch, (i + 1) * batch).

Elastic resume: a run resumed at another world size with the same global batch, workers,
buffer and lanes keeps its plan (the geometry the plan was made for) and only re-maps the
ranks onto it (`shares`): global batch i is the same samples in the same order, whatever the
world size reading it. Any other change mid-epoch starts a new plan over the unread samples.

Every step above is a closed formula, so the position of a run is just (epoch, step) and the
samples a checkpoint had consumed are known exactly without reading anything.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from clipforge import cli

# Salts that keep the seeds of different uses apart.
SHARD_ORDER, BLOCK, DRAW, AUGMENT, CAPTION = 11, 12, 13, 14, 15


def seed_for(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (Python's hash of tuples is salted per process)."""
    return int(
        np.random.SeedSequence([abs(int(p)) for p in parts]).generate_state(1, np.uint64)[0] >> 1
    )


def rng(*parts: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(seed_for(*parts)))


@dataclass(frozen=True)
class Geometry:
    """What one run's loader looks like; a change of any field mid-epoch starts a new plan."""

    world: int
    workers: int  # DataLoader workers per rank; 0 (read in the main process) counts as 1
    batch: int  # per rank
    buffer: int  # shuffle block, in samples
    lanes: int  # shards each worker reads at once

    @property
    def nw(self) -> int:
        return max(1, self.workers)

    @property
    def global_batch(self) -> int:
        return self.batch * self.world

    def to_state(self) -> dict[str, int]:
        """Plain ints by field name, for a checkpoint (torch.load(weights_only=True) reads it)."""
        return asdict(self)

    @classmethod
    def from_state(cls, value: dict[str, Any] | Sequence[int]) -> Geometry:
        """From to_state's dict, or the [world, workers, batch, buffer, lanes] list that
        checkpoints written before the dict held."""
        if isinstance(value, dict):
            return cls(**{k: int(value[k]) for k in cls.__dataclass_fields__})
        return cls(*(int(v) for v in value[:5]))


@dataclass(frozen=True)
class PastGeometry:
    """A geometry that ran `steps` steps of the current epoch before the run changed it."""

    geo: Geometry
    steps: int

    @property
    def samples(self) -> int:
        """Samples it read across all ranks."""
        return self.steps * self.geo.global_batch

    def to_state(self) -> dict[str, Any]:
        return {"geometry": self.geo.to_state(), "steps": self.steps}

    @classmethod
    def from_state(cls, value: dict[str, Any] | Sequence[int]) -> PastGeometry:
        """From to_state's dict, or the [world, workers, batch, buffer, lanes, steps] list
        that checkpoints written before the dict held."""
        if isinstance(value, dict):
            return cls(Geometry.from_state(value["geometry"]), int(value["steps"]))
        return cls(Geometry.from_state(value[:5]), int(value[5]))


class Runs:
    """A sequence of integers stored as runs [start, start + length), in sequence order."""

    def __init__(self, starts: Sequence[int] | np.ndarray, lens: Sequence[int] | np.ndarray):
        starts, lens = np.asarray(starts, np.int64), np.asarray(lens, np.int64)
        keep = lens > 0
        self.starts, self.lens = starts[keep], lens[keep]
        self.cum = np.concatenate([[0], np.cumsum(self.lens)]).astype(np.int64)

    @property
    def total(self) -> int:
        return int(self.cum[-1])

    def slice(self, a: int, b: int) -> Runs:
        """Elements [a, b) of the sequence, as runs."""
        a, b = max(0, a), min(b, self.total)
        if a >= b:
            return Runs([], [])
        i = int(np.searchsorted(self.cum, a, side="right")) - 1
        j = int(np.searchsorted(self.cum, b, side="left")) - 1
        starts, lens = self.starts[i : j + 1].copy(), self.lens[i : j + 1].copy()
        head = a - self.cum[i]
        starts[0] += head
        lens[0] -= head
        lens[-1] -= self.cum[j + 1] - b
        return Runs(starts, lens)

    def at(self, positions: np.ndarray) -> np.ndarray:
        """The elements at the given sequence positions."""
        i = np.searchsorted(self.cum, positions, side="right") - 1
        return self.starts[i] + (positions - self.cum[i])

    def values(self) -> np.ndarray:
        return self.at(np.arange(self.total, dtype=np.int64))

    @classmethod
    def points(cls, values: np.ndarray) -> Runs:
        """Runs of the given values, merging consecutive ones (values in the order given)."""
        values = np.asarray(values, np.int64)
        if not len(values):
            return cls([], [])
        breaks = np.flatnonzero(np.diff(values) != 1) + 1
        firsts = np.concatenate([[0], breaks])
        lens = np.diff(np.concatenate([firsts, [len(values)]]))
        return cls(values[firsts], lens)

    @classmethod
    def concat(cls, parts: Sequence[Runs]) -> Runs:
        if not parts:
            return cls([], [])
        return cls(
            np.concatenate([p.starts for p in parts]), np.concatenate([p.lens for p in parts])
        )


class ShardOrder:
    """X: an epoch's samples in a seeded shard order; maps X positions to (shard, offset)."""

    def __init__(self, counts: Sequence[int], seed: int, epoch: int):
        self.perm = rng(seed, epoch, SHARD_ORDER).permutation(len(counts))
        self.cum = np.concatenate([[0], np.cumsum(np.asarray(counts, np.int64)[self.perm])])

    @property
    def total(self) -> int:
        return int(self.cum[-1])

    def pieces(self, runs: Runs) -> Iterator[tuple[int, int, int, int]]:
        """(shard, first offset, end offset, X of the first) for each shard a run crosses."""
        for start, length in zip(runs.starts.tolist(), runs.lens.tolist()):
            x, end = start, start + length
            i = int(np.searchsorted(self.cum, x, side="right")) - 1
            while x < end:
                stop = min(end, int(self.cum[i + 1]))
                if stop > x:
                    yield int(self.perm[i]), x - int(self.cum[i]), stop - int(self.cum[i]), x
                x, i = stop, i + 1


class EpochPlan:
    """One geometry's share-out of Y; `key` seeds its block permutations."""

    def __init__(self, y: Runs, geo: Geometry, key: tuple[int, ...]):
        self.y, self.geo, self.key = y, geo, key
        self.steps = y.total // geo.global_batch

    def batches(self, k: int) -> int:
        """Batches worker k makes this epoch: its turns k, k + nw, ... below `steps`."""
        return len(range(k, self.steps, self.geo.nw))

    def consumer(self, rank: int, k: int) -> tuple[int, int]:
        """(start in Y, length) of the samples worker k of `rank` reads."""
        before = sum(self.batches(i) for i in range(k))
        start = (rank * self.steps + before) * self.geo.batch
        return start, self.batches(k) * self.geo.batch

    def lane(self, length: int, j: int) -> tuple[int, int]:
        """(start, length) of lane j inside a consumer slice of `length` samples."""
        q, r = divmod(length, self.geo.lanes)
        return j * q + min(j, r), q + (j < r)

    def lane_done(self, j: int, stream_pos: int) -> int:
        """How many samples lane j has given once the stream reached `stream_pos`."""
        return len(range(j, stream_pos, self.geo.lanes))

    def block(self, rank: int, k: int, b: int, length: int) -> np.ndarray:
        """Emission order of block b of a consumer slice of `length` samples."""
        n = min(self.geo.buffer, length - b * self.geo.buffer)
        return rng(*self.key, rank, k, b, BLOCK).permutation(n)

    def stream_to_x(self, rank: int, k: int, stream: np.ndarray) -> np.ndarray:
        start, length = self.consumer(rank, k)
        lanes = np.array([self.lane(length, j)[0] for j in range(self.geo.lanes)], np.int64)
        y_pos = start + lanes[stream % self.geo.lanes] + stream // self.geo.lanes
        return self.y.at(y_pos)

    def consumer_left(self, rank: int, k: int, consumed: int) -> Runs:
        """X runs a consumer has not read after emitting `consumed` samples."""
        start, length = self.consumer(rank, k)
        full, used = divmod(consumed, self.geo.buffer)
        stream_pos, parts = full * self.geo.buffer, []
        if used:  # the block in progress: the tail of its permutation is still unread
            rest = stream_pos + self.block(rank, k, full, length)[used:]
            parts.append(Runs.points(np.sort(self.stream_to_x(rank, k, rest))))
            stream_pos = min(stream_pos + self.geo.buffer, length)
        for j in range(self.geo.lanes):
            lane_start, lane_len = self.lane(length, j)
            done = self.lane_done(j, stream_pos)
            parts.append(self.y.slice(start + lane_start + done, start + lane_start + lane_len))
        return Runs.concat(parts)

    def remaining(self, step: int) -> Runs:
        """Y of the next plan: every sample of this Y not read in the first `step` steps."""
        parts = []
        for rank in range(self.geo.world):
            for k in range(self.geo.nw):
                consumed = len(range(k, step, self.geo.nw)) * self.geo.batch
                parts.append(self.consumer_left(rank, k, consumed))
        parts.append(self.y.slice(self.steps * self.geo.global_batch, self.y.total))
        return Runs.concat(parts)


def elastic(plan: Geometry, geo: Geometry) -> bool:
    """Whether a loader of geometry `geo` can go on reading `plan` (a plan made for another
    world size) sample for sample: the same global batch, workers, buffer and lanes. Its ranks
    then make the very global batches `plan` would have made (see shares)."""
    return plan.global_batch == geo.global_batch and (plan.nw, plan.buffer, plan.lanes) == (
        geo.nw,
        geo.buffer,
        geo.lanes,
    )


def shares(rank: int, batch: int, plan_batch: int) -> list[tuple[int, int, int]]:
    """(plan rank, first, end) pieces of the plan ranks' batches that make up batch i of
    `rank`, for a world of `batch`-sample ranks reading a plan of `plan_batch`-sample ranks.

    The global batch i of a plan is its ranks' batches i laid end to end; rank r of the new
    world takes samples [r * batch, (r + 1) * batch) of it. Fewer ranks (2 -> 1): each takes
    whole plan ranks' batches. More ranks (1 -> 2): each takes a part of one plan rank's batch
    (it reads that plan rank's stream and decodes only its part). Same world: [(rank, 0, batch)].
    """
    a, b = rank * batch, (rank + 1) * batch
    return [
        (d, max(a, d * plan_batch) - d * plan_batch, min(b, (d + 1) * plan_batch) - d * plan_batch)
        for d in range(a // plan_batch, (b - 1) // plan_batch + 1)
    ]


def build_epoch(
    counts: Sequence[int],
    seed: int,
    epoch: int,
    history: Sequence[PastGeometry],
    geo: Geometry,
) -> tuple[ShardOrder, EpochPlan]:
    """The shard order of `epoch` and the plan in force after the geometry changes in
    `history` (in order): O(consumers x buffer) per change."""
    order = ShardOrder(counts, seed, epoch)
    y = Runs([0], [order.total])
    for p, past in enumerate(history):
        y = EpochPlan(y, past.geo, (seed, epoch, p)).remaining(past.steps)
    return order, EpochPlan(y, geo, (seed, epoch, len(history)))


def _main() -> None:
    p = cli.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("samples", type=int)
    p.add_argument("--shard-size", type=int, default=100)
    for name, default in (("world", 2), ("workers", 2), ("batch", 8), ("buffer", 64), ("lanes", 4)):
        p.add_argument(f"--{name}", type=int, default=default)
    a = p.parse_args()
    counts = [a.shard_size] * (a.samples // a.shard_size) + [a.samples % a.shard_size]
    geo = Geometry(a.world, a.workers, a.batch, a.buffer, a.lanes)
    order, plan = build_epoch([c for c in counts if c], 0, 0, [], geo)
    print(
        f"{order.total} samples, {plan.steps} steps per rank, {order.total % geo.global_batch} left over"
    )
    for rank in range(geo.world):
        for k in range(geo.nw):
            start, length = plan.consumer(rank, k)
            print(
                f"rank {rank} worker {k}: Y[{start}:{start + length}] ({plan.batches(k)} batches)"
            )


if __name__ == "__main__":
    _main()
