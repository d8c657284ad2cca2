"""The training loader on fixture shards whose captions name their shard and index ("003_17"):
which samples each rank and worker sees, equal batch counts, exact resume, corrupt data.

    .venv/bin/python -m pytest -q tests/test_loader.py

Ranks are simulated in one process (TrainLoader(rank=r, world=W)); workers are real DataLoader
worker processes where a test says workers=2.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipforge.config import AugmentConfig
from clipforge.data import lanes, stream
from clipforge.data.plan import ShardOrder
from clipforge.data.shards import SourceError, resolve
from clipforge.data.train_loader import TrainLoader
from clipforge.data.transforms import eval_transform, train_transform

SIZES = [13, 7, 20, 4, 16]  # uneven on purpose: 60 samples
TRANSFORM = eval_transform(8, AugmentConfig())


def _jpeg(color: tuple[int, int, int], size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="JPEG")
    return buf.getvalue()


JPEG = _jpeg((200, 40, 90))


def write_shards(
    root: Path,
    sizes: list[int],
    corrupt: frozenset[tuple[int, int]] = frozenset(),
    broken: frozenset[int] = frozenset(),
    prefix: str = "",
    json_captions: dict[tuple[int, int], list[str]] | None = None,
) -> Path:
    """Shards NNNNN.tar whose sample i of shard s has caption f"{prefix}{s:03d}_{i}", plus a
    manifest. `corrupt` members get garbage instead of a JPEG; `broken` shards are cut short."""
    root.mkdir(parents=True, exist_ok=True)
    for s, n in enumerate(sizes):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for i in range(n):
                members = {
                    "jpg": b"not a jpeg" if (s, i) in corrupt else JPEG,
                    "txt": f"{prefix}{s:03d}_{i}".encode(),
                }
                if json_captions and (s, i) in json_captions:
                    members["json"] = json.dumps({"captions": json_captions[(s, i)]}).encode()
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"{s:03d}{i:05d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        data = buf.getvalue()
        (root / f"{s:05d}.tar").write_bytes(data[: len(data) // 3] if s in broken else data)
    manifest = {
        "format": "clipforge-shards/1",
        "samples": sum(sizes),
        "shards": [{"name": f"{s:05d}.tar", "samples": n} for s, n in enumerate(sizes)],
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_shards(tmp_path_factory.mktemp("shards"), SIZES)


def _texts(texts: list[str]) -> list[str]:
    return texts


def make(
    src: Path | str, *, rank=0, world=1, workers=0, batch=4, mode="epoch", **kw
) -> TrainLoader:
    kw.setdefault("shuffle_buffer", 8)
    kw.setdefault("shards_in_flight", 2)
    return TrainLoader(
        resolve(str(src)),
        kw.pop("transform", TRANSFORM),
        _texts,
        batch,
        kw.pop("seed", 0),
        rank,
        workers,
        kw.pop("shuffle_buffer"),
        world=world,
        mode=mode,
        **kw,
    )


def take(loader: TrainLoader, n: int) -> list[list[str]]:
    out = []
    for batch in loader:
        out.append(list(batch["text"]))
        if len(out) == n:
            return out
    return out


def flat(batches: list[list[str]]) -> list[str]:
    return [c for b in batches for c in b]


def saved(state: dict) -> dict:
    """The state as train.py stores it: torch.save, then torch.load(weights_only=True)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


ALL = {f"{s:03d}_{i}" for s, n in enumerate(SIZES) for i in range(n)}


# -- exact epochs --------------------------------------------------------------------------------
def test_epoch_order_per_rank_and_worker_is_the_planned_one(shards):
    """No shuffle (buffer 1, one lane): rank r reads its own contiguous range of the epoch's
    shard order; worker 0 makes batches 0, 2, ... from the first part of it, worker 1 the rest."""
    world, batch, workers = 3, 2, 2
    order = ShardOrder(SIZES, 0, 0)
    x = [f"{s:03d}_{i}" for s in order.perm.tolist() for i in range(SIZES[s])]
    steps = len(x) // (batch * world)  # 10
    for rank in range(world):
        loader = make(shards, rank=rank, world=world, workers=workers, batch=batch,
                      shuffle_buffer=1, shards_in_flight=1)  # fmt: skip
        got = take(loader, steps)
        mine = x[rank * steps * batch : (rank + 1) * steps * batch]
        w0 = len(range(0, steps, workers)) * batch
        want = [mine[(j // 2) * batch + (0 if j % 2 == 0 else w0) :][:batch] for j in range(steps)]
        assert got == want, rank


@pytest.mark.parametrize("world", [2, 3])
def test_epoch_reads_each_sample_once_across_ranks_and_workers(shards, world):
    batch = 3
    steps = sum(SIZES) // (batch * world)
    per_rank = [
        take(make(shards, rank=r, world=world, workers=2, batch=batch), steps) for r in range(world)
    ]
    seen = [c for batches in per_rank for c in flat(batches)]
    assert all(len(b) == steps for b in per_rank)
    assert len(seen) == len(set(seen)) == steps * batch * world
    assert set(seen) <= ALL  # the 60 % (batch * world) others wait for another epoch
    # A batch mixes shards (two in flight per worker) and each worker keeps to its own samples.
    for batches in per_rank:
        w0, w1 = set(flat(batches[0::2])), set(flat(batches[1::2]))
        assert not w0 & w1


def test_equal_batches_per_rank_with_fewer_shards_than_readers(tmp_path):
    """2 uneven shards, 3 ranks x 2 workers: every rank steps 4 times per epoch, in lock step."""
    src = write_shards(tmp_path, [3, 23])
    loaders = [make(src, rank=r, world=3, workers=0, batch=2) for r in range(3)]
    assert [lo.steps_per_epoch for lo in loaders] == [4, 4, 4]
    runs = [take(lo, 10) for lo in loaders]  # 2.5 epochs
    assert all(len(r) == 10 and all(len(b) == 2 for b in r) for r in runs)
    assert [lo.epoch for lo in loaders] == [2, 2, 2]
    epoch0 = [c for r in runs for c in flat(r[:4])]
    assert len(set(epoch0)) == 24  # 26 % 6 = 2 samples left over this epoch


def test_resampled_never_runs_dry_with_one_shard(tmp_path):
    src = write_shards(tmp_path, [5])
    for rank in range(3):
        got = take(make(src, rank=rank, world=3, workers=2, batch=4, mode="resampled"), 6)
        assert len(got) == 6 and all(len(b) == 4 for b in got)


def test_epochs_are_reshuffled_and_reproducible(shards):
    # 15 steps per epoch with 2 workers: epoch 1 starts on the other worker.
    a = take(make(shards, batch=4, workers=2), 30)
    b = take(make(shards, batch=4, workers=2), 30)
    other = take(make(shards, batch=4, seed=1), 15)
    assert a == b
    assert set(flat(a[:15])) == set(flat(a[15:])) == ALL  # 60 = 15 x 4: nothing left over
    assert flat(a[:15]) != flat(a[15:]) != flat(other)


# -- resampled -----------------------------------------------------------------------------------
def test_resampled_ranks_differ_and_mix_shards(shards):
    runs = [
        flat(take(make(shards, rank=r, world=2, batch=8, mode="resampled"), 10)) for r in range(2)
    ]
    assert runs[0] != runs[1]
    assert all(set(r) <= ALL for r in runs)
    assert len(set(runs[0])) > 30
    first = take(make(shards, rank=0, world=2, batch=8, mode="resampled", shards_in_flight=4), 1)
    assert len({c[:3] for c in first[0]}) >= 2  # four shards in flight: a batch mixes shards


def test_weights_mix_sources(tmp_path):
    a = write_shards(tmp_path / "a", [10, 30], prefix="a")
    b = write_shards(tmp_path / "b", [40], prefix="b")
    got = flat(take(make(f"{a}::{b}", batch=50, mode="resampled", weights=[0.8, 0.2]), 20))
    share = sum(c.startswith("a") for c in got) / len(got)
    assert 0.65 < share < 0.95, share
    with pytest.raises(SourceError, match="data.weights"):
        make(f"{a}::{b}", weights=[0.8, 0.2])  # epoch mode reads every sample once
    with pytest.raises(SourceError, match="2 sources"):
        make(f"{a}::{b}", mode="resampled", weights=[1.0])


def test_one_caption_of_several_is_drawn_per_visit(tmp_path):
    caps = [f"caption {i}" for i in range(5)]
    src = write_shards(tmp_path, [1], json_captions={(0, 0): caps})
    got = flat(take(make(src, batch=8, mode="resampled"), 5))
    assert set(got) <= set(caps) and len(set(got)) >= 3


# -- resume --------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["epoch", "resampled"])
@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_with_the_next_sample(shards, mode, workers):
    tf = train_transform(8, AugmentConfig(scale_min=0.2))  # random crops must replay too

    def run(loader, n):
        out = []
        for batch in loader:
            out.append((list(batch["text"]), batch["image"]))
            if len(out) == n:
                return out

    kw = dict(rank=1, world=2, workers=workers, batch=3, mode=mode, transform=tf)
    whole = run(make(shards, **kw), 13)  # epoch mode: 10 steps per epoch, so this crosses one
    first = make(shards, **kw)
    head = run(first, 7)
    second = make(shards, **kw)
    second.load_state_dict(saved(first.state_dict()))
    tail = run(second, 6)
    assert [t for t, _ in head + tail] == [t for t, _ in whole]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(head + tail, whole))


def test_resampled_resume_reads_a_bounded_window(shards, monkeypatch):
    """Resume reopens the shards in flight at their offsets and re-reads one block: the samples
    read before the first batch do not grow with the position."""
    read = Counter()

    def counting(url, skip=0):
        for s in real(url, skip):
            read["n"] += 1
            yield s

    real = lanes.iter_samples
    monkeypatch.setattr(lanes, "iter_samples", counting)
    for steps in (3, 40):
        first = make(shards, batch=4, mode="resampled", shuffle_buffer=16)
        take(first, steps)
        second = make(shards, batch=4, mode="resampled", shuffle_buffer=16)
        second.load_state_dict(first.state_dict())
        read.clear()
        take(second, 1)
        assert read["n"] <= 2 * 16 + 2, (steps, read["n"])


@pytest.mark.parametrize("new_world,new_batch,new_workers", [(2, 3, 1), (1, 6, 2)])
def test_epoch_resume_at_another_world_size_reads_exactly_the_unseen(
    shards, new_world, new_batch, new_workers
):
    old = [make(shards, rank=r, world=3, batch=2, workers=2) for r in range(3)]
    seen = [c for lo in old for c in flat(take(lo, 3))]  # 3 steps of 6: 18 samples
    state = saved(old[0].state_dict())  # any rank's state resumes every rank
    new = [
        make(shards, rank=r, world=new_world, batch=new_batch, workers=new_workers)
        for r in range(new_world)
    ]
    for lo in new:
        lo.load_state_dict(state)
    steps = 42 // (new_world * new_batch)  # 7 steps of 6 = 42: the whole rest of the epoch
    rest = [c for lo in new for c in flat(take(lo, steps))]
    assert len(rest) == len(set(rest)) == 42
    assert set(rest) == ALL - set(seen)
    assert all(lo.epoch == 1 and lo.step == 0 for lo in new)
    # A second change mid-epoch is planned from the chain of geometries the state records.
    again = make(shards, rank=0, world=1, batch=4)
    again.load_state_dict(saved(new[0].state_dict()))
    assert set(flat(take(again, 15))) == ALL  # epoch 1 in full


def test_mid_epoch_world_change_chain(shards):
    """3 ranks -> 2 ranks -> 1 rank inside one epoch: the union is still each sample once."""
    a = [make(shards, rank=r, world=3, batch=2) for r in range(3)]
    seen = [c for lo in a for c in flat(take(lo, 2))]  # 12
    b = [make(shards, rank=r, world=2, batch=2, shuffle_buffer=5) for r in range(2)]
    for lo in b:
        lo.load_state_dict(saved(a[2].state_dict()))
    seen += [c for lo in b for c in flat(take(lo, 3))]  # 12 more
    c = make(shards, rank=0, world=1, batch=4, shards_in_flight=3)
    c.load_state_dict(saved(b[1].state_dict()))
    seen += flat(take(c, 9))  # the 36 left
    assert len(seen) == len(set(seen)) == 60 and c.epoch == 1


def _as_written_before_records(state: dict) -> dict:
    """The state as checkpoints held it before named records: geometry as a list, each past
    geometry of the epoch as [world, workers, batch, buffer, lanes, steps]."""

    def listed(g: dict) -> list[int]:
        return [g["world"], g["workers"], g["batch"], g["buffer"], g["lanes"]]

    old = dict(state, geometry=listed(state["geometry"]))
    if "history" in state:
        old["history"] = [[*listed(h["geometry"]), h["steps"]] for h in state["history"]]
    return old


@pytest.mark.parametrize("mode", ["epoch", "resampled"])
def test_state_of_the_list_form_resumes_the_same(shards, mode):
    """Checkpoints written with the positional-list state still load, to the same samples."""
    a = [make(shards, rank=r, world=3, batch=2, mode=mode) for r in range(3)]
    for lo in a:
        take(lo, 2)
    b = make(shards, rank=0, world=2, batch=2, mode=mode)
    b.load_state_dict(saved(a[0].state_dict()))
    take(b, 1)
    state = saved(b.state_dict())
    if mode == "epoch":
        assert len(state["history"]) == 1 and state["history"][0]["steps"] == 2
    new, old = (make(shards, rank=0, world=2, batch=2, mode=mode) for _ in range(2))
    new.load_state_dict(state)
    old.load_state_dict(saved(_as_written_before_records(state)))
    assert take(new, 8) == take(old, 8)
    rates = "data_decode_samples_per_s"  # a timing, the one key that may differ
    assert {k: v for k, v in new.metrics().items() if k != rates} == {
        k: v for k, v in old.metrics().items() if k != rates
    }


# -- errors and counters -------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["epoch", "resampled"])
def test_corrupt_members_are_skipped_and_counted(tmp_path, mode):
    bad = frozenset({(2, 3), (2, 11)})
    src = write_shards(tmp_path, SIZES, corrupt=bad)
    loader = make(src, batch=4, mode=mode)
    got = take(loader, 15)
    assert all(len(b) == 4 for b in got)
    assert not {"002_3", "002_11"} & set(flat(got))
    assert loader.errors >= (2 if mode == "epoch" else 1)
    m = loader.metrics()
    assert m["data_errors"] == loader.errors and m["data_decode_samples_per_s"] > 0
    if mode == "epoch":
        # Replaced by copies of good samples, so the epoch's 15 batches still hold 60 samples.
        assert loader.errors == 2 and set(flat(got)) == ALL - {"002_3", "002_11"}


@pytest.mark.parametrize("mode,workers", [("resampled", 0), ("epoch", 0), ("resampled", 2)])
def test_error_rate_above_threshold_stops_naming_the_shard(tmp_path, mode, workers):
    src = write_shards(tmp_path, [40, 40, 40], broken=frozenset({1}))
    loader = make(src, batch=4, mode=mode, workers=workers, max_error_rate=0.05)
    with pytest.raises(SourceError, match=r"00001\.tar.*max_error_rate"):
        take(loader, 100)


def test_epoch_mode_needs_sizes(tmp_path):
    src = write_shards(tmp_path, [4, 4])
    (src / "manifest.json").unlink()
    with pytest.raises(SourceError, match="size unknown"):
        make(src)
    assert take(make(src, mode="resampled"), 1)  # resampled mode does without


def test_sources_as_pattern_list_and_pipe(shards, tmp_path):
    """A brace pattern and a URL list take their sizes from the manifest beside the shards;
    a pipe: shard is read from a command's stdout."""
    pattern = resolve(f"{shards}/{{00000..00004}}.tar")
    listed = tmp_path / "urls.txt"
    listed.write_text("".join(f"{shards}/{i:05d}.tar\n" for i in range(5)))
    assert pattern.counts == resolve(str(listed)).counts == SIZES
    assert set(flat(take(make(f"{shards}/{{00000..00004}}.tar", batch=4), 15))) == ALL
    piped = take(make(f"pipe:cat {shards}/00002.tar", batch=4, mode="resampled"), 3)
    assert set(flat(piped)) <= {f"002_{i}" for i in range(20)}


def test_state_is_plain_and_mode_is_checked(shards):
    loader = make(shards, mode="resampled")
    take(loader, 2)
    state = loader.state_dict()
    assert json.loads(json.dumps(state)) == state
    with pytest.raises(SourceError, match="same mode"):
        make(shards, mode="epoch").load_state_dict(state)


def test_uneven_stream_positions_map_back_to_shards(shards):
    """Sanity of the plan on the fixture: every X position names a real sample."""
    order = ShardOrder(SIZES, 0, 3)
    from clipforge.data.plan import Runs

    pieces = list(order.pieces(Runs([0], [60])))
    assert sum(e - f for _, f, e, _ in pieces) == 60
    assert sorted(p for p, *_ in pieces) == list(range(5))
    assert np.all(np.diff([x for *_, x in pieces]) > 0)


class _SeesParentState:
    """A transform that writes into the image whether the worker sees a marker the parent set
    on the stream module after start-up (defined here, at module level: it must pickle)."""

    def __call__(self, img) -> torch.Tensor:
        return torch.full((3, 4, 4), float(hasattr(stream, "clipforge_test_marker")))


@pytest.mark.parametrize("mode", ["epoch", "resampled"])
def test_workers_do_not_inherit_the_trainers_state(shards, mode, monkeypatch):
    """Workers start from a forkserver: a forked one would inherit the trainer's NCCL,
    DeepSpeed and wandb threads (their locks held or not) and, here, the marker."""
    monkeypatch.setattr(stream, "clipforge_test_marker", True, raising=False)
    loader = make(shards, workers=2, batch=4, mode=mode, transform=_SeesParentState())
    batches = [b for _, b in zip(range(4), loader)]
    assert len(batches) == 4
    assert all(float(b["image"].max()) == 0.0 for b in batches), "a worker saw the parent's state"
