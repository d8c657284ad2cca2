"""The training loader over WebDataset shards (any fsspec URL or `pipe:`): the main-process
side that starts the workers' streams (stream.py), records where they are, and resumes there
exactly and cheaply, every rank stepping the same number of times.

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
    `len(unread) % global batch` of them wait for the next epoch. Exception, the elastic
    resume: another world size with the same global batch (and workers, buffer, lanes) keeps
    the plan and maps the new ranks onto it (plan.shares), so every global batch is the one the
    old world would have made. The state of any rank is enough to resume every rank (it holds
    no per-rank position).

    python tests/bench/loader_rate.py SHARDS --mode epoch --world 2 --batches 20   # samples/s
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader

from clipforge.data.plan import Geometry, PastGeometry, elastic
from clipforge.data.shards import ShardSet, SourceError, draw_weights
from clipforge.data.stream import StreamSpec, TrainStream
from clipforge.data.transforms import batch_transform
from clipforge.data.workers import worker_context

__all__ = ["MODES", "TrainLoader"]

MODES = ("resampled", "epoch")


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
            shards,
            batch_transform(transform),
            tokenizer,
            seed,
            rank,
            self.geo,
            mode,
            cum,
            max_error_rate,
        )
        # Epoch mode: the geometry this epoch's plan was made for; another world size's plan
        # when the run resumed elastically (same global batch, workers, buffer, lanes).
        self.plan_geo = self.geo
        self.workers, self.mode = workers, mode
        self.batches = self.errors = self.restarts = 0
        self.keys: list[str] | None = None
        self.roles: list[dict[str, Any]] = [{} for _ in range(self.geo.nw)]
        self.epoch, self.step, self.steps = 0, 0, None
        self.history: list[PastGeometry] = []  # this epoch's geometries before the current one
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
            "geometry": self.geo.to_state(),
        }
        if self.mode == "epoch":
            state.update(
                plan_geometry=self.plan_geo.to_state(),
                epoch=self.epoch,
                step=self.step,
                history=[h.to_state() for h in self.history],
                samples=self.spec.shards.samples,
            )
        else:
            state.update(restarts=self.restarts, roles=json.loads(json.dumps(self.roles)))
        return state

    def load_state_dict(self, state: dict[str, Any], own: bool = True) -> None:
        """Resume from `state`; own=False: another rank's state, for a rank the checkpoint did
        not have (the world grew): epoch mode needs no state of its own, resampled mode starts
        this rank's streams fresh (a new seed) rather than at the other rank's positions."""
        if state.get("mode", "resampled") != self.mode:
            raise SourceError(
                f"the checkpoint's loader ran data.mode={state.get('mode', 'resampled')}, this run "
                f"data.mode={self.mode}: resume with the same mode"
            )
        self.batches, self.errors = int(state["batches"]), int(state.get("errors", 0))
        old = Geometry.from_state(state["geometry"]) if "geometry" in state else None
        if self.mode == "epoch":
            plan = state.get("plan_geometry")
            self._load_epoch(state, Geometry.from_state(plan) if plan is not None else old)
        else:
            self._load_resampled(state, old, own)

    def _load_epoch(self, state: dict[str, Any], plan: Geometry | None) -> None:
        if state["samples"] != self.spec.shards.samples:
            raise SourceError(
                f"the checkpoint's epoch covered {state['samples']} samples, data.train now "
                f"holds {self.spec.shards.samples}: exact epochs need the same shards"
            )
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.history = [PastGeometry.from_state(h) for h in state["history"]]
        if plan is None or plan == self.geo:
            self.plan_geo = self.geo
        elif elastic(plan, self.geo):
            # Another world size, the same global batch: the same plan, read by other ranks;
            # the step goes on (plan.shares maps this rank onto the plan's ranks).
            self.plan_geo = plan
        else:
            # The rest of this epoch is re-split from what the old plan had not read.
            self.history.append(PastGeometry(plan, self.step))
            self.plan_geo, self.step = self.geo, 0

    def _load_resampled(self, state: dict[str, Any], old: Geometry | None, own: bool) -> None:
        self.restarts = int(state.get("restarts", 0))
        geo = self.geo
        layout = (geo.nw, geo.buffer, geo.lanes)
        same_streams = own and old is not None and (old.nw, old.buffer, old.lanes) == layout
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
            "history": list(self.history),
            "plan_geo": self.plan_geo,
        }

    def _record(self, meta: dict[str, Any], samples: int) -> None:
        self.batches += 1
        self.errors += int(meta["errors"])
        self._busy += float(meta["busy"])
        self._decoded += samples
        self.keys = meta.get("keys")  # the samples of the batch just handed out (epoch mode)
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
            done = sum(h.samples for h in self.history) + self.step * self.geo.global_batch
            left = (self.steps - self.step) * self.geo.global_batch
            out["data_epoch"] = self.epoch + done / max(1, done + left)
        self._busy, self._decoded = 0.0, 0
        return out

    def __iter__(self) -> Iterator[dict[str, Any]]:
        loader = DataLoader(
            TrainStream(self.spec, self._start()),
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
