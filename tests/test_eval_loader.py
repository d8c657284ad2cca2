"""The eval loader reads each sample once across ranks (not once per rank), every rank steps
the same number of times, and its workers start from a forkserver. The numbers it leads to,
with 1 and N processes: tests/test_eval_dist.py.

    .venv/bin/python -m pytest -q tests/test_eval_loader.py
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from dist_utils import run_distributed
from eval_data import write_eval_set

from clipforge.config import AugmentConfig
from clipforge.data import eval_loader
from clipforge.data.eval_loader import EvalLoader
from clipforge.data.shards import resolve
from clipforge.data.transforms import eval_transform

TRANSFORM = eval_transform(8, AugmentConfig())
SAMPLES = 15  # write_eval_set(per_class=5): 3 shards of 5, keys "000_red" .. "014_blue"
KEYS = sorted(f"{i:03d}_{('red', 'green', 'blue')[i % 3]}" for i in range(SAMPLES))
MARKER = "clipforge_test_marker"


def eval_set(root: Path, known: bool) -> Path:
    """The test eval set, with a manifest (sizes known) or without (sizes unknown)."""
    folder = write_eval_set(root, per_class=5)
    if known:
        shards = [{"name": p.name, "samples": 5} for p in sorted(folder.glob("*.tar"))]
        (folder / "manifest.json").write_text(json.dumps({"samples": SAMPLES, "shards": shards}))
    return folder


@pytest.fixture(scope="module", params=[True, False], ids=["sizes_known", "sizes_unknown"])
def folder(request, tmp_path_factory) -> Path:
    return eval_set(tmp_path_factory.mktemp("set"), request.param)


def counting_reads(monkeypatch) -> Counter:
    """Counts the samples the loader pulls out of the shards (workers=0: in this process)."""
    read: Counter = Counter()
    real = eval_loader.iter_samples

    def counting(url, skip=0):
        for s in real(url, skip):
            read[s["__key__"]] += 1
            yield s

    monkeypatch.setattr(eval_loader, "iter_samples", counting)
    return read


def real_keys(batches: list[dict]) -> list[str]:
    return [k for b in batches if not b["pad"] for k in b["key"]]


@pytest.mark.parametrize("world", [2, 3])
def test_each_rank_reads_only_its_share(folder, world, monkeypatch):
    """W ranks (simulated in one process) read the set once between them, not W times."""
    read = counting_reads(monkeypatch)
    sset = resolve(str(folder))
    assert (sset.samples is not None) == (folder / "manifest.json").exists()
    keys = []
    for rank in range(world):
        keys += real_keys(list(EvalLoader(sset, TRANSFORM, 6, rank, world, workers=0)))
    assert sorted(keys) == KEYS
    assert sorted(read) == KEYS and set(read.values()) == {1}, read


def _rank_share(rank: int, world: int, folder: str, batch_size: int) -> dict:
    read = Counter()
    real = eval_loader.iter_samples

    def counting(url, skip=0):
        for s in real(url, skip):
            read[s["__key__"]] += 1
            yield s

    eval_loader.iter_samples = counting  # a process of its own: nothing to restore
    batches = list(EvalLoader(resolve(folder), TRANSFORM, batch_size, rank, world, workers=0))
    return {"steps": len(batches), "keys": real_keys(batches), "read": dict(read)}


@pytest.mark.multiproc
def test_ranks_step_together_reading_once(tmp_path):
    """4 gloo ranks over 3 shards (a rank with nothing to read) and batches of 4: every rank
    takes the same number of steps, padding included, and the set is read once."""
    for known in (True, False):
        folder = str(eval_set(tmp_path / f"set_{known}", known))
        ranks = run_distributed(_rank_share, 4, folder, 4)
        assert len({r["steps"] for r in ranks}) == 1, ranks
        assert sorted(k for r in ranks for k in r["keys"]) == KEYS
        read = Counter()
        for r in ranks:
            read.update(r["read"])
        assert sorted(read) == KEYS and set(read.values()) == {1}, (known, read)


class SeesParentState:
    """An eval transform that writes into the image whether the worker sees the marker the
    parent process set on the loader module after start-up (module-level: it must pickle)."""

    def __call__(self, img) -> torch.Tensor:
        return torch.full((3, 4, 4), float(hasattr(eval_loader, MARKER)))


def test_workers_share_a_rank_and_start_clean(folder, monkeypatch):
    """Two workers read rank 1's share once between them; sorting by `start` gives shard
    order; and the workers do not inherit the parent's state (forkserver, not fork)."""
    monkeypatch.setattr(eval_loader, MARKER, True, raising=False)
    sset = resolve(str(folder))
    batches = list(EvalLoader(sset, SeesParentState(), 2, rank=1, world=2, workers=2))
    real = sorted((b for b in batches if not b["pad"]), key=lambda b: b["start"])
    keys = [k for b in real for k in b["key"]]
    alone = real_keys(list(EvalLoader(sset, TRANSFORM, 2, rank=1, world=2, workers=0)))
    assert keys == alone and len(keys) == len(set(keys)) > 4
    assert all(float(b["image"].max()) == 0.0 for b in real), "a worker saw the parent's state"
