"""Train a CLIP model: setup -> build -> loop -> close.

    python -m clipforge.train experiment=smoke_cpu run_dir=/tmp/smoke
    torchrun --nproc_per_node 2 -m clipforge.train data.train=shards/ run_dir=runs/a
    ... resume=latest            # continue the newest checkpoint in run_dir, on any world
                                 # size whose ranks split its global batch (docs/resume.md)
    ... model.init_from=runs/a   # start from a run's (or open_clip's) weights, not from scratch

Configuration: conf/train.yaml and its groups, typed by clipforge/config.py.
"""

from __future__ import annotations

import math
import shutil
import sys
import time
from pathlib import Path

import fsspec
import hydra
from omegaconf import DictConfig, OmegaConf

from clipforge import checkpoint as ckpt
from clipforge import cli, init_from
from clipforge.config import Config, ConfigError, register, validate
from clipforge.data.shards import ShardSet, SourceError, resolve
from clipforge.data.synthetic import SyntheticLoader
from clipforge.data.tokenizer import Tokenizer
from clipforge.data.train_loader import TrainLoader
from clipforge.data.transforms import eval_transform, train_transform
from clipforge.engine import dist, precision
from clipforge.eval import suite
from clipforge.logging import Throughput, build_logger, memory_stats, print0, setup_console
from clipforge.loss import build_loss
from clipforge.model import build_model
from clipforge.model.clip import vocab_problem
from clipforge.preempt import Preemption
from clipforge.task import ContrastiveTask

register()


class TrainingDiverged(RuntimeError):
    pass


# -- build ---------------------------------------------------------------------------------------
def build_tokenizer(
    cfg: Config, shards: ShardSet | None, run_dir: Path, is_main: bool
) -> Tokenizer | None:
    if shards is None:
        return None
    path = cfg.data.tokenizer or shards.tokenizer
    if not path:
        raise SourceError(
            f"data.train={cfg.data.train} records no tokenizer: train one with "
            "`python -m data_tools.tokenizer --input SHARDS` or set data.tokenizer=PATH"
        )
    tokenizer = Tokenizer(path, cfg.model.text.context_length)
    if is_main:  # the run directory carries its tokenizer, so exported weights stand alone
        with fsspec.open(path, "rb") as src, open(run_dir / "tokenizer.model", "wb") as dst:
            shutil.copyfileobj(src, dst)
    return tokenizer


def build_loader(cfg: Config, shards: ShardSet | None, tokenizer, info: dist.DistInfo):
    if shards is None:
        return SyntheticLoader(
            cfg.train.batch_size,
            cfg.model.image.image_size,
            cfg.model.text.context_length,
            cfg.model.text.vocab_size,
            cfg.train.seed,
            info.rank,
        )
    return TrainLoader(
        shards,
        train_transform(cfg.model.image.image_size, cfg.data.augment),
        tokenizer,
        cfg.train.batch_size,
        cfg.train.seed,
        info.rank,
        cfg.data.workers,
        cfg.data.shuffle_buffer,
        world=info.world_size,
        mode=cfg.data.mode,
        weights=list(cfg.data.weights) if cfg.data.weights is not None else None,
        shards_in_flight=cfg.data.shards_in_flight,
        max_error_rate=cfg.data.max_error_rate,
    )


# -- checkpoints ---------------------------------------------------------------------------------
def save(engine, loader, cfg: Config, info: dist.DistInfo, step: int) -> str:
    root, tag = ckpt.ckpt_dir(cfg.run_dir), ckpt.tag_for(step)
    state = {"step": step, "loader": loader.state_dict(), "rng": ckpt.rng_state()}
    ckpt.save_rank_state(root, tag, info.rank, state)
    engine.save(root, tag, {"step": step})
    dist.barrier()  # every rank's files are on disk: only now may resume=latest pick the tag
    if info.is_main:
        ckpt.mark_complete(root, tag, info.world_size, cfg.train.batch_size * info.world_size)
        ckpt.prune(cfg.run_dir, cfg.checkpoint.keep)
    return tag


def export(engine, cfg: Config, info: dist.DistInfo, step: int) -> None:
    sd = engine.fp32_state_dict()  # every rank: ZeRO assembles the master weights collectively
    if info.is_main:
        path = ckpt.export_weights(Path(cfg.run_dir), sd, step)
        print0(f"exported fp32 weights to {path}")
    dist.barrier()


def read_init(cfg: Config) -> init_from.Source | None:
    """model.init_from's weights, unless the run resumes (its checkpoint holds the weights)."""
    if not cfg.model.init_from or ckpt.resolve_resume(cfg.run_dir, cfg.resume) is not None:
        return None
    return init_from.read(cfg.model.init_from)


def resume(engine, loader, cfg: Config, info: dist.DistInfo) -> int:
    found = ckpt.resolve_resume(cfg.run_dir, cfg.resume)
    if found is None:
        if cfg.resume and cfg.resume != "latest":
            raise FileNotFoundError(f"resume={cfg.resume}: no checkpoint found")
        return 0
    root, tag = found
    saved_world, _ = ckpt.saved_layout(root, tag)
    if saved_world != info.world_size:
        print0(
            f"resuming a checkpoint of {saved_world} ranks on {info.world_size}: ZeRO state "
            f"re-partitioned, train.batch_size={cfg.train.batch_size} per rank keeps the "
            f"global batch of {cfg.train.batch_size * info.world_size}"
        )
    engine.load(root, tag, saved_world)
    own = ckpt.has_rank_state(root, tag, info.rank)
    if own:
        state = ckpt.load_rank_state(root, tag, info.rank)
        ckpt.restore_rng(state["rng"])
    else:
        # A rank the checkpoint did not have (the world grew). The loader's state names the
        # layout it was written with, so rank 0's lets an epoch-mode loader take its share of
        # the rest of the epoch, and a resampled one start streams of its own (docs/resume.md);
        # this rank's RNG starts from the seed.
        state = ckpt.load_rank_state(root, tag, 0)
    loader.load_state_dict(state["loader"], own=own)
    print0(f"resumed from {root / tag} at step {state['step']}")
    return int(state["step"])


# -- eval ----------------------------------------------------------------------------------------
def maybe_eval(engine, tokenizer, cfg: Config, info: dist.DistInfo, logger, step: int, final: bool):
    """eval.zeroshot / eval.retrieval every eval.every steps and at the end (clipforge/eval/)."""
    due = final or (cfg.eval.every and step % cfg.eval.every == 0)
    if not due or tokenizer is None or not suite.has_sets(cfg.eval):
        return
    encoders = suite.Encoders(
        lambda x: engine.forward_eval("encode_image", x),
        lambda t: engine.forward_eval("encode_text", t),
        tokenizer,
        eval_transform(cfg.model.image.image_size, cfg.data.augment),
    )
    results = suite.run_sets(
        encoders, cfg.eval, info.rank, info.world_size, draw=info.is_main, strict=False
    )
    suite.log_results(results, logger, step)


# -- loop ----------------------------------------------------------------------------------------
def train_loop(
    engine,
    loader,
    logger,
    cfg: Config,
    info: dist.DistInfo,
    tokenizer,
    step: int,
    preempt: Preemption,
) -> tuple[int, bool]:
    """Run to train.steps; returns (step, preempted)."""
    meter = Throughput()
    last_logged, last_tag = step, (ckpt.complete_tags(cfg.run_dir) or [None])[-1]
    it = iter(loader)
    while step < cfg.train.steps:
        t0 = time.perf_counter()
        batch = next(it)
        meter.add(cfg.train.batch_size * info.world_size, time.perf_counter() - t0)
        metrics = engine.train_step(batch, sync=_reads_metrics(cfg, step + 1))
        step += 1
        # Checked where metrics were read (see _reads_metrics). The loss (the mean over
        # ranks) and the grad norm are global: a NaN anywhere stops every rank.
        if "loss" in metrics and not all(
            math.isfinite(metrics.get(k, 0.0)) for k in ("loss", "grad_norm")
        ):
            raise TrainingDiverged(
                f"loss is {metrics['loss']} (grad norm {metrics.get('grad_norm')}) at a step in "
                f"({last_logged}, {step}]; last good checkpoint: {last_tag or 'none'}; "
                "nothing was saved after it"
            )
        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            rates = meter.read()
            rates["samples_per_s_per_gpu"] = rates["samples_per_s"] / info.world_size
            logger.log(step, {**metrics, **rates, **memory_stats(), **loader.metrics()})
            bias = f"bias {metrics['logit_bias']:.2f} " if "logit_bias" in metrics else ""
            print0(
                f"step {step}/{cfg.train.steps} loss {metrics['loss']:.4f} "
                f"lr {metrics['lr']:.2e} scale {metrics['logit_scale']:.2f} {bias}"
                f"{rates['samples_per_s']:.1f} samples/s"
            )
            last_logged = step
        if step < cfg.train.steps and preempt.requested(step):
            tag = save(engine, loader, cfg, info, step)
            print0(f"preempted: saved {tag} at step {step}; resume=latest continues from it")
            return step, True
        if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and step < cfg.train.steps:
            last_tag = save(engine, loader, cfg, info, step)
        if step < cfg.train.steps:
            maybe_eval(engine, tokenizer, cfg, info, logger, step, final=False)
    return step, False


def _reads_metrics(cfg: Config, step: int) -> bool:
    """Whether step `step` reads its metrics back from the device (a host sync): at logging
    steps, and before anything is saved (checkpoint and preemption-poll steps, the last step),
    so that a diverged model is never checkpointed. A NaN in between is caught at the next of
    these, and the error names the range of steps it happened in."""
    every = (cfg.train.log_every, cfg.checkpoint.every, cfg.checkpoint.preempt_poll_every)
    return step >= cfg.train.steps or any(n and step % n == 0 for n in every)


def run(raw: DictConfig) -> None:
    info = dist.setup()
    setup_console(info.is_main)
    cfg: Config = OmegaConf.to_object(raw)  # type: ignore[assignment]
    # Before anything is built: a resumed run keeps its checkpoint's global batch, which sets
    # the per-rank batch at this world size (config.derive_batch).
    validate(
        cfg,
        info.world_size,
        info.device,
        saved_global=ckpt.resumed_global_batch(cfg.run_dir, cfg.resume),
    )
    cfg.train.precision = precision.resolve(cfg.train.precision, info.device)
    run_dir = Path(cfg.run_dir)
    if ckpt.list_tags(run_dir) and not cfg.resume:
        raise ConfigError(
            f"run_dir={run_dir} already holds checkpoints: add resume=latest to continue it, "
            "or choose a new run_dir"
        )
    shards = None if cfg.data.synthetic else resolve(cfg.data.train)
    init = read_init(cfg)  # before anything is written: a missing or unreadable file stops here
    if info.is_main:
        ckpt.snapshot_run(run_dir, raw, info.world_size)
    dist.barrier()
    tokenizer = build_tokenizer(cfg, shards, run_dir, info.is_main)
    vocab = tokenizer.vocab_size if tokenizer is not None else None
    problem = vocab_problem(cfg.model.text.vocab_size, vocab)
    if problem:  # before any weight exists: out-of-range ids are a device-side assert on GPU
        raise ConfigError(problem)
    # The same initial weights on every rank (ZeRO-3 partitions each rank's own copy) and in
    # every run of this seed; then a per-rank stream, so ranks draw different dropout masks.
    ckpt.seed_all(cfg.train.seed)
    model = build_model(cfg.model, vocab_size=vocab)
    if init is not None:  # into the full module on every rank: ZeRO-3 partitions it next
        print0(init_from.load_into(model, init, cfg.model.init_strict))
        del init
    engine = dist_engine(ContrastiveTask(model, build_loss(cfg.loss)), cfg, info)
    ckpt.seed_all(cfg.train.seed + 1 + info.rank)
    print0(
        f"world_size={info.world_size} ranks_per_node={info.local_world_size} "
        f"nodes={info.nodes} zero_stage={engine.zero_stage} backend={info.backend} "
        f"precision={engine.precision} "
        f"params={sum(p.numel() for p in model.parameters()):,}"
    )
    loader = build_loader(cfg, shards, tokenizer, info)
    step = resume(engine, loader, cfg, info)
    logger = build_logger(
        cfg.logger, run_dir, info.is_main, OmegaConf.to_container(raw, resolve=True)
    )
    preempt = Preemption(run_dir, info.is_main, cfg.checkpoint.preempt_poll_every)
    dist.barrier()
    try:
        step, preempted = train_loop(engine, loader, logger, cfg, info, tokenizer, step, preempt)
        if not preempted:
            save(engine, loader, cfg, info, step)
            export(engine, cfg, info, step)
            maybe_eval(engine, tokenizer, cfg, info, logger, step, final=True)
    finally:
        logger.close()
    dist.teardown()


def dist_engine(task, cfg: Config, info: dist.DistInfo):
    from clipforge.engine.deepspeed import Engine  # imports deepspeed: keep it off --help paths

    return Engine(task, cfg, info)


@hydra.main(version_base="1.3", config_path="pkg://clipforge.conf", config_name="train")
def _hydra_main(raw: DictConfig) -> None:
    try:
        run(raw)
    except (ConfigError, SourceError, FileNotFoundError, TrainingDiverged) as e:
        # One line a user can act on, not a traceback. Errors raised in a DataLoader worker
        # arrive wrapped with the worker's traceback: keep only their last line.
        line = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        print(f"error: {line.split('Error: ', 1)[-1]}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    from hydra._internal.utils import get_args_parser  # the parser hydra.main uses

    cli.check_flags(get_args_parser(), sys.argv[1:])
    _hydra_main()


if __name__ == "__main__":
    main()
