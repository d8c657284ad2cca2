"""Resume at another world size (docs/resume.md): ZeRO state re-partitioned, the global batch
kept, and in epoch mode the very global batches the old world would have made.

    .venv/bin/python -m pytest tests/test_resume_elastic.py -q --durations=0

- the loader, ranks simulated in one process: 2 ranks -> 1 -> 3 mid-epoch give the global
  batches of an uninterrupted run, sample for sample, and no key twice in the epoch; in
  resampled mode 2 ranks -> 3 or 1 keep the streams of the ranks that existed, and the new
  rank starts a fresh one;
- the engine, real DeepSpeed over gloo: ZeRO-1, 2, 3 (fp32, bf16) checkpoints of 2 ranks
  load on 1 with the same fp32 master, schedule and step counter, and train on alike;
- the trainer under torchrun, ZeRO-2, data.mode=epoch on real shards: a 2-rank run SIGKILLed
  after its step-10 checkpoint resumes on 1 rank (per-rank batch doubled) and then, from that run's
  step-15 checkpoint, on 2 ranks again: every loss and the final weights match the
  uninterrupted 2-rank run;
- a global batch that does not split over the new world is refused with one line.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from dist_utils import run_distributed
from test_loader import TRANSFORM, write_shards
from test_train import _ok, metrics, train, train_cmd

from clipforge import check
from clipforge import checkpoint as ckpt
from clipforge.config import Config, ConfigError, TrainLoopConfig, derive_batch, validate
from clipforge.data.plan import shares
from clipforge.data.shards import resolve
from clipforge.data.train_loader import TrainLoader

# ----------------------------------------------------------------------------- batch sizes


def test_the_global_batch_sets_the_per_rank_batch() -> None:
    cfg = Config(train=TrainLoopConfig(batch_size=4, global_batch_size=24))
    assert derive_batch(cfg, 3) == [] and cfg.train.batch_size == 8
    cfg = Config(train=TrainLoopConfig(batch_size=4))
    assert derive_batch(cfg, 1, saved_global=8) == [] and cfg.train.batch_size == 8
    assert derive_batch(cfg, 5, saved_global=None) == [] and cfg.train.batch_size == 8  # fresh
    cfg = Config(train=TrainLoopConfig(batch_size=4, accum_chunks=2))
    (problem,) = derive_batch(cfg, 4, saved_global=12)
    # 12 over 4 ranks is 3, not divisible by 2 chunks: worlds 1, 2, 3, 6 would; or 8 / 16.
    assert "(12)" in problem and "run on 1, 2, 3 or 6 ranks" in problem, problem
    assert "train.global_batch_size=8 or 16" in problem, problem
    cfg.data.synthetic = True
    with pytest.raises(ConfigError, match="does not split over 4 ranks"):
        validate(cfg, 4, saved_global=12)


def test_a_requeue_on_a_world_that_cannot_keep_the_batch_is_one_line(tmp_path, capsys) -> None:
    root = ckpt.ckpt_dir(tmp_path)
    ckpt.save_rank_state(root, "step_00000004", 0, {"step": 4})
    ckpt.mark_complete(root, "step_00000004", 2, global_batch=6)
    args = ["experiment=smoke_cpu", f"run_dir={tmp_path}", "resume=latest"]
    assert check.main(["--world-size", "4", *args]) == 2
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert "global batch (6) does not split over 4 ranks" in line and "1, 2, 3 or 6" in line
    assert check.main(["--world-size", "3", *args]) == 0  # 6 over 3: train.batch_size=2


# ----------------------------------------------------------------------------- the loader


def test_shares_lay_the_plans_batches_end_to_end() -> None:
    assert shares(0, 6, 3) == [(0, 0, 3), (1, 0, 3)]  # 2 plan ranks -> 1
    assert shares(1, 2, 6) == [(0, 2, 4)]  # 1 -> 3
    assert shares(1, 3, 2) == [(1, 1, 2), (2, 0, 2)]  # 3 -> 2: a piece of two plan ranks
    assert shares(2, 5, 5) == [(2, 0, 5)]  # same world: its own batch


def _loader(src: Path, rank: int, world: int, batch: int) -> TrainLoader:
    return TrainLoader(
        resolve(str(src)), TRANSFORM, lambda texts: list(texts), batch, seed=5, rank=rank,
        workers=0, shuffle_buffer=8, world=world, mode="epoch", shards_in_flight=2,
    )  # fmt: skip


def _global_batches(loaders: list[TrainLoader], steps: int) -> list[list[str]]:
    """Each step's keys, rank 0's first: the global batch as the gathered loss sees it."""
    its = [iter(loader) for loader in loaders]
    out = []
    for _ in range(steps):
        keys = []
        for it, loader in zip(its, loaders):
            next(it)
            keys += loader.keys
        out.append(keys)
    return out


def test_epoch_resume_on_another_world_gives_the_same_global_batches(tmp_path) -> None:
    """60 samples, global batch 6: 10 steps an epoch. 2 ranks read 3 steps, 1 rank the next 3,
    3 ranks the last 4; every global batch is the uninterrupted 2-rank run's, in order."""
    src = write_shards(tmp_path / "shards", [13, 7, 20, 4, 16])
    want = _global_batches([_loader(src, r, 2, 3) for r in range(2)], 10)
    first = [_loader(src, r, 2, 3) for r in range(2)]
    got = _global_batches(first, 3)
    one = _loader(src, 0, 1, 6)
    one.load_state_dict(first[1].state_dict())  # any rank's state resumes any rank
    got += _global_batches([one], 3)
    three = [_loader(src, r, 3, 2) for r in range(3)]
    for loader in three:
        loader.load_state_dict(one.state_dict())
    got += _global_batches(three, 4)
    assert got == want
    keys = [k for batch in got for k in batch]
    assert len(keys) == len(set(keys)) == 60  # the whole epoch, no sample twice
    # The epoch ends on time: the next batch is epoch 1's first.
    assert three[0].epoch == 1 and three[0].step == 0


def _texts(loader: TrainLoader, steps: int) -> list[str]:
    out: list[list[str]] = []
    for batch in loader:
        out.append(list(batch["text"]))
        if len(out) == steps:
            return [t for texts in out for t in texts]
    raise AssertionError("the loader ran dry")


def _resampled(src: Path, rank: int, world: int, batch: int) -> TrainLoader:
    return TrainLoader(
        resolve(str(src)), TRANSFORM, lambda texts: list(texts), batch, seed=5, rank=rank,
        workers=0, shuffle_buffer=8, world=world, mode="resampled", shards_in_flight=2,
    )  # fmt: skip


def test_resampled_resume_on_another_world_keeps_the_streams_of_ranks_that_existed(
    tmp_path,
) -> None:
    """docs/resume.md's promise for data.mode=resampled: 2 ranks -> 3 (global batch 6 kept):
    ranks 0 and 1 go on with the very next samples of their own streams (with the new per-rank
    batch); rank 2 starts a stream of its own. 2 ranks -> 1: rank 0 goes on with its stream."""
    src = write_shards(tmp_path / "shards", [13, 7, 20, 4, 16])
    whole = [_texts(_resampled(src, r, 2, 3), 8) for r in range(2)]  # 24 samples per rank
    first = [_resampled(src, r, 2, 3) for r in range(2)]
    head = [_texts(loader, 4) for loader in first]
    states = [loader.state_dict() for loader in first]
    three = [_resampled(src, r, 3, 2) for r in range(3)]
    for r, loader in enumerate(three):  # rank 2 gets rank 0's state, as train.py gives it
        loader.load_state_dict(states[min(r, 1)] if r < 2 else states[0], own=r < 2)
    tail = [_texts(loader, 6) for loader in three]  # 12 samples per rank
    for r in range(2):
        assert head[r] + tail[r] == whole[r], r
    # Rank 2's streams are fresh ones of the next seed, not rank 0's positions in its own.
    fresh = _resampled(src, 2, 3, 2)
    fresh.restarts = 1
    assert tail[2] == _texts(fresh, 6)
    assert three[2].state_dict()["restarts"] == 1 and three[0].state_dict()["restarts"] == 0
    one = _resampled(src, 0, 1, 6)
    one.load_state_dict(states[0])
    assert head[0] + _texts(one, 2) == whole[0]


# ----------------------------------------------------------------------------- the engine

# ZeRO-2 fp32 is the trainer test below.
CASES = [(1, "fp32"), (1, "bf16"), (2, "bf16"), (3, "fp32"), (3, "bf16")]


def _engine_cfg(stage: int, precision: str, world: int):
    from test_engine import BATCH, engine_cfg

    from clipforge.config import OptimConfig, SchedConfig

    cfg = engine_cfg(stage, precision=precision)
    cfg.train.batch_size = 2 * BATCH // world
    cfg.optim = OptimConfig(lr=1e-3)
    cfg.sched = SchedConfig(warmup_steps=2, min_lr_ratio=0.1)
    return cfg


def _global_batch(i: int, world: int, rank: int) -> dict[str, torch.Tensor]:
    """Batch i of the global batch of two synthetic ranks, as `rank` of `world` holds it."""
    from test_engine import batch_for

    parts = [batch_for(r, i) for r in range(2)]
    whole = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    n = len(whole["image"]) // world
    return {k: v[rank * n : (rank + 1) * n] for k, v in whole.items()}


def _elastic_worker(rank: int, world: int, ckpt_dir: str, saved_world: int | None) -> dict:
    """saved_world None: train 3 steps, save, train 2 more. Else: load what `saved_world`
    ranks saved and train the same 2 steps."""
    from test_engine import make_engine, make_task

    out = {}
    for stage, precision in CASES:
        cfg, tag = _engine_cfg(stage, precision, world), f"s{stage}{precision}"
        engine = make_engine(make_task(cfg.model, seed=0 if saved_world is None else 1), cfg)
        if saved_world is None:
            for i in range(3):
                engine.train_step(_global_batch(i, world, rank))
            engine.save(Path(ckpt_dir), tag, {"step": 3})
        else:
            engine.load(Path(ckpt_dir), tag, saved_world)
        loaded = engine.fp32_state_dict()
        lr, counter = engine.scheduler.get_last_lr()[0], engine.ds.global_steps
        steps = [engine.train_step(_global_batch(i, world, rank)) for i in (3, 4)]
        out[(stage, precision)] = {
            "loaded": loaded, "lr": lr, "global_steps": counter,
            "losses": [s["loss"] for s in steps], "final": engine.fp32_state_dict(),
        }  # fmt: skip
    return out


def _rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    diff = sum(float((a[k] - b[k]).pow(2).sum()) for k in a) ** 0.5
    return diff / sum(float(a[k].pow(2).sum()) for k in a) ** 0.5


@pytest.mark.multiproc
def test_zero_1_2_3_fp32_and_bf16_checkpoints_load_on_another_world(tmp_path) -> None:
    (saved, _) = run_distributed(_elastic_worker, 2, str(tmp_path), None, timeout=600)
    (loaded,) = run_distributed(_elastic_worker, 1, str(tmp_path), 2, timeout=600)
    for case in CASES:
        a, b = saved[case], loaded[case]
        # What was loaded is the saved fp32 master, bit for bit (not the seed-1 init).
        assert all(torch.equal(a["loaded"][k], b["loaded"][k]) for k in a["loaded"]), case
        assert (b["lr"], b["global_steps"]) == (a["lr"], a["global_steps"]) == (a["lr"], 3)
        # The moments came back too: two Adam steps on from there agree (lr 1e-3 would move
        # every weight by ~1e-3 from fresh moments, far outside these bounds).
        tol = 1e-4 if case[1] == "fp32" else 2e-3
        assert b["losses"] == pytest.approx(a["losses"], abs=tol), case
        assert _rel(a["final"], b["final"]) < tol, case
        assert (tmp_path / f"s{case[0]}{case[1]}" / "universal" / "zero").is_dir()


# ----------------------------------------------------------------------------- the trainer

STEPS = 20


def _overrides(shards: Path, *extra: str) -> list[str]:
    return [
        "experiment=smoke_cpu",
        "deepspeed=zero2",
        "data.synthetic=false",
        f"data.train={shards}",
        "data.mode=epoch",
        "data.workers=0",
        "data.shuffle_buffer=16",
        f"train.steps={STEPS}",
        "train.batch_size=4",  # per rank at 2 ranks: the global batch is 8 throughout
        "checkpoint.keep=0",
        "optim.lr=2e-3",
        *extra,
    ]


def _run(run: Path, shards: Path, nproc: int, *extra: str) -> str:
    proc = train(run, *_overrides(shards, *extra), nproc=nproc, timeout=400)
    _ok(proc)
    return proc.stdout


def _cut(src: Path, dst: Path, step: int) -> None:
    """A run directory as a kill right after `step`'s checkpoint leaves it (a copy of that
    checkpoint: the first leg of the test kills a real run)."""
    tag = ckpt.tag_for(step)
    shutil.copytree(src / "checkpoints" / tag, dst / "checkpoints" / tag)


@pytest.mark.multiproc
@pytest.mark.slow
def test_zero2_epoch_run_resumes_on_one_rank_and_back_on_two(tmp_path) -> None:
    from eval_data import captioned_shards
    from test_faults import kill_after_checkpoint

    shards = captioned_shards(tmp_path)  # 60 samples: 7 steps an epoch, step 10 mid-epoch
    full = tmp_path / "full"
    _run(full, shards, 2)
    # The same 2-rank run, SIGKILLed (torchrun and both workers) once step 10 is checkpointed.
    one = tmp_path / "one"
    cmd = train_cmd(one, *_overrides(shards, "checkpoint.every=10"), nproc=2)
    kill_after_checkpoint(cmd, one, 10)
    assert not (one / "model.safetensors").exists(), "the run finished before it was killed"
    out = _run(one, shards, 1, "resume=latest", "checkpoint.every=5")
    assert "resuming a checkpoint of 2 ranks on 1" in out and "train.batch_size=8" in out, out
    assert "at step 10" in out
    two = tmp_path / "two"
    _cut(one, two, 15)
    out = _run(two, shards, 2, "resume=latest")
    assert "resuming a checkpoint of 1 ranks on 2" in out and "at step 15" in out, out

    want = {r["step"]: r for r in metrics(full)}
    for run, first in ((one, 1), (two, 16)):
        rows = metrics(run)  # the killed run's rows, then the resumed run's
        assert sorted({r["step"] for r in rows}) == list(range(first, STEPS + 1)), run.name
        for r in rows:  # steps 1-10 of the killed run, and 11-20 on the new world
            s = r["step"]
            assert r["loss"] == pytest.approx(want[s]["loss"], abs=1e-4), (run.name, s)
            assert r["lr"] == pytest.approx(want[s]["lr"], rel=1e-9), (run.name, s)
        assert rows[-1]["step"] == STEPS
        assert rows[-1]["data_epoch"] == pytest.approx(want[STEPS]["data_epoch"])
        from safetensors.torch import load_file

        a, b = load_file(full / "model.safetensors"), load_file(run / "model.safetensors")
        assert _rel(a, b) < 1e-4, run.name
    # The recorded layout: what the next resume reads before it builds anything.
    done = json.loads((two / "checkpoints" / "step_00000020" / ckpt.COMPLETE).read_text())
    assert done == {"tag": "step_00000020", "world_size": 2, "global_batch": 8}
