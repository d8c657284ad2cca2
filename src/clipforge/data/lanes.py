"""Lanes: where a worker's raw samples come from, one shard open per lane at a time.

A worker reads `shards_in_flight` lanes side by side in round robin, so a batch mixes shards.
PieceLane (epoch mode) reads the pieces of shards plan.py assigns it; DrawLane (resampled mode)
reads shards drawn with replacement. Both yield a Failed in place of each sample a broken or
short shard could not give, so stream positions never move when a shard breaks.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

from clipforge.data.plan import DRAW, seed_for
from clipforge.data.samples import Failed
from clipforge.data.shards import ShardSet, SourceError
from clipforge.data.tario import ShardReadError, iter_samples


class PieceLane:
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


class DrawLane:
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
