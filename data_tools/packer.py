"""Ordered chunk results -> shards of exactly --samples-per-shard samples, reports and stats.

Runs in the converter's main process (``python -m data_tools.convert``). Chunks are fed in
input order, whatever order the workers finished them in; sample n of the stream of successes
goes to shard n // samples_per_shard. So every shard but the last is full, and the bytes depend
only on the input and the settings, never on --processes or timing.

Resume: a shard counts as finished when its ``NNNNN_stats.json`` exists (written after its tar
and report, each whole or not at all: store.py) and its tar has the size the stats record; a
tar of another size is never trusted (DamagedOutput). Replaying the stream after a crash skips
finished shards without reading their samples, and rewrites an unfinished one from the chunk
files, to the same bytes. OUT may be any fsspec URL; the chunk files are local. A chunk's
``.bin`` is deleted once every sample in it sits in a finished shard, so the work folder never
holds much more than the shard being written.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, BinaryIO

from data_tools import shards, store
from data_tools.chunks import DUPLICATE, OK, chunk_name

STATUSES = ("ok", "failed", "filtered", "duplicate", "opt-out")


class WorkFilesMissing(RuntimeError):
    """A chunk's samples are needed again but its work file is gone."""


class DamagedOutput(RuntimeError):
    """A finished shard's tar is missing or differs from its stats: changed after the fact."""


def category(error: str | None) -> str:
    return str(error).split(":", 1)[0]


class Packer:
    def __init__(
        self, out: str | Path, work: Path, samples_per_shard: int, dedupe_content: bool
    ) -> None:
        # out: a local folder or any fsspec URL; work: the local folder of chunk files.
        self.out, self.work = out, work
        # What an earlier run left, listed once (one request per 1,000 objects on S3) rather
        # than asked shard by shard; shards this run writes are never looked up again.
        self.existing = store.listing(out)
        self.per_shard = samples_per_shard
        self.dedupe_content = dedupe_content
        self.shard = 0  # index of the shard being filled
        self.in_shard = 0  # samples in it so far
        self.report: list[dict[str, Any]] = []  # rows reported with it so far
        self.writer: shards.ShardWriter | None = None
        self.seen: dict[str, str] = {}  # content sha256 -> key of its first sample
        self.infos: list[shards.ShardInfo] = []
        self.reports: list[str] = []
        self.status: Counter[str] = Counter()
        self.reasons: Counter[str] = Counter()
        self.consumed: list[int] = []  # chunks read to the end whose .bin may still be needed

    def _stem(self) -> str:
        return shards.shard_stem(self.shard)

    def _finished(self) -> dict[str, Any] | None:
        name = f"{self._stem()}_stats.json"
        if name not in self.existing:
            return None
        done = shards.read_json(store.join(self.out, name))
        if done["samples"]:
            size = self.existing.get(done["shard"], {}).get("size")
            if size != done["bytes"]:
                raise DamagedOutput(
                    f"{store.join(self.out, done['shard'])} holds {size} bytes where its stats "
                    f"say {done['bytes']}: it changed after it was written"
                )
        return done

    def _dedupe(self, outcome: dict[str, Any]) -> dict[str, Any]:
        if outcome["status"] != OK or not self.dedupe_content:
            return outcome
        first = self.seen.setdefault(outcome["sha256"], outcome["key"])
        if first == outcome["key"]:
            return outcome
        error = f"duplicate content: same bytes as {first}"
        return {**outcome, "status": DUPLICATE, "error": error, "length": 0}

    def add_chunk(self, index: int, outcomes: list[dict[str, Any]]) -> None:
        """Feed one chunk's outcomes (in row order); chunks must come in index order."""
        binary: BinaryIO | None = None
        offset = 0
        try:
            for raw in outcomes:
                outcome = self._dedupe(raw)
                if outcome["status"] == OK:
                    if self.in_shard == self.per_shard:
                        self._finish_shard()
                    if self._needs_writer():
                        binary = binary or self._open_bin(index)
                        binary.seek(offset)
                        self.writer.add_record(binary.read(outcome["length"]))  # type: ignore[union-attr]
                    self.in_shard += 1
                offset += raw.get("length", 0)  # a content duplicate's bytes are still there
                self._count(outcome)
        finally:
            if binary is not None:
                binary.close()
        self.consumed.append(index)

    def _needs_writer(self) -> bool:
        if self.writer is None and self.in_shard == 0 and self._finished() is None:
            self.writer = shards.ShardWriter(store.join(self.out, f"{self._stem()}.tar"))
        return self.writer is not None

    def _open_bin(self, index: int) -> BinaryIO:
        path = self.work / f"{chunk_name(index)}.bin"
        if not path.exists():
            raise WorkFilesMissing(f"{path} is gone but shard {self._stem()} needs it")
        return open(path, "rb")  # noqa: SIM115 - closed by add_chunk

    def _count(self, outcome: dict[str, Any]) -> None:
        self.report.append(outcome)
        self.status[outcome["status"]] += 1
        if outcome["status"] != OK:
            self.reasons[category(outcome.get("error"))] += 1

    def _finish_shard(self) -> None:
        """Commit the shard being filled (tar, report, then stats) and start the next one."""
        stem = self._stem()
        done = self._finished()
        if done is None:
            info = self.writer.close() if self.writer is not None else None
            shards.write_report(store.join(self.out, f"{stem}.parquet"), self.report)
            done = self._stats(info)
            shards.write_json(store.join(self.out, f"{stem}_stats.json"), done)
        if done["samples"]:
            self.infos.append(
                shards.ShardInfo(done["shard"], done["samples"], done["bytes"], done["sha256"])
            )
        self.reports.append(f"{stem}.parquet")
        self._drop_consumed_bins()
        self.shard += 1
        self.in_shard = 0
        self.report = []
        self.writer = None

    def _stats(self, info: shards.ShardInfo | None) -> dict[str, Any]:
        counts = Counter(r["status"] for r in self.report)
        reasons = Counter(category(r.get("error")) for r in self.report if r["status"] != OK)
        return {
            "shard": info.name if info else None,
            "samples": info.samples if info else 0,
            "rows": len(self.report),
            **{status: counts.get(status, 0) for status in STATUSES},
            "failure_reasons": dict(sorted(reasons.items())),
            "first_key": self.report[0]["key"] if self.report else None,
            "last_key": self.report[-1]["key"] if self.report else None,
            "bytes": info.bytes if info else 0,
            "sha256": info.sha256 if info else None,
        }

    def _drop_consumed_bins(self) -> None:
        # Every sample of a chunk read to its end now sits in a finished shard.
        for index in self.consumed:
            (self.work / f"{chunk_name(index)}.bin").unlink(missing_ok=True)
        self.consumed = []

    def finish(self) -> list[shards.ShardInfo]:
        """Commit the last (possibly short) shard; returns every shard, in order."""
        if self.in_shard or self.report:
            self._finish_shard()
        return self.infos
