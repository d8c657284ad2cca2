"""Train a CLIP model: setup -> build -> loop -> close.

    python -m clipforge.train experiment=smoke_cpu run_dir=/tmp/smoke
    torchrun --nproc_per_node 2 -m clipforge.train data.train=shards/ run_dir=runs/a
    ... resume=latest            # continue the newest checkpoint in run_dir

Configuration: conf/train.yaml and its groups, typed by clipforge/config.py.
"""

from __future__ import annotations

import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import fsspec
import hydra
from omegaconf import DictConfig, OmegaConf

from clipforge import checkpoint as ckpt
from clipforge.config import Config, ConfigError, register, validate
from clipforge.data.pipeline import EvalLoader, TrainLoader
from clipforge.data.shards import ShardSet, SourceError, resolve
from clipforge.data.synthetic import SyntheticLoader
from clipforge.data.tokenizer import Tokenizer
from clipforge.data.transforms import eval_transform, train_transform
from clipforge.engine import dist
from clipforge.eval import zeroshot
from clipforge.logging import Throughput, build_logger, print0, setup_console
from clipforge.loss import ContrastiveLoss
from clipforge.model import build_model
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
    )


# -- checkpoints ---------------------------------------------------------------------------------
def save(engine, loader, cfg: Config, info: dist.DistInfo, step: int) -> str:
    root, tag = ckpt.ckpt_dir(cfg.run_dir), ckpt.tag_for(step)
    state = {"step": step, "loader": loader.state_dict(), "rng": ckpt.rng_state()}
    ckpt.save_rank_state(root, tag, info.rank, state)
    engine.save(root, tag, {"step": step})
    dist.barrier()
    if info.is_main:
        ckpt.prune(cfg.run_dir, cfg.checkpoint.keep)
    return tag


def export(engine, cfg: Config, info: dist.DistInfo, step: int, tag: str) -> None:
    if info.is_main:
        sd = engine.fp32_state_dict(ckpt.ckpt_dir(cfg.run_dir), tag)
        path = ckpt.export_weights(Path(cfg.run_dir), sd, step)
        print0(f"exported fp32 weights to {path}")
    dist.barrier()


def resume(engine, loader, cfg: Config, info: dist.DistInfo) -> int:
    found = ckpt.resolve_resume(cfg.run_dir, cfg.resume)
    if found is None:
        if cfg.resume and cfg.resume != "latest":
            raise FileNotFoundError(f"resume={cfg.resume}: no checkpoint found")
        return 0
    root, tag = found
    engine.load(root, tag)
    state = ckpt.load_rank_state(root, tag, info.rank)
    loader.load_state_dict(state["loader"])
    ckpt.restore_rng(state["rng"])
    print0(f"resumed from {root / tag} at step {state['step']}")
    return int(state["step"])


# -- eval ----------------------------------------------------------------------------------------
def run_zeroshot(engine, tokenizer, cfg: Config, info: dist.DistInfo) -> dict[str, Any]:
    sset = resolve(cfg.eval.zeroshot)
    if not sset.classnames:
        raise SourceError(f"eval.zeroshot={cfg.eval.zeroshot}: no classnames.txt beside the shards")
    templates = sset.templates or list(cfg.eval.templates)
    classifier = zeroshot.build_classifier(
        lambda t: engine.forward_eval("encode_text", t), tokenizer, sset.classnames, templates
    )
    batches = EvalLoader(
        sset,
        eval_transform(cfg.model.image.image_size, cfg.data.augment),
        cfg.eval.batch_size,
        info.rank,
        info.world_size,
    )
    return zeroshot.evaluate(lambda x: engine.forward_eval("encode_image", x), batches, classifier)


def maybe_eval(engine, tokenizer, cfg, info, logger, step: int, final: bool) -> None:
    due = final or (cfg.eval.every and step % cfg.eval.every == 0)
    if not cfg.eval.zeroshot or tokenizer is None or not due:
        return
    res = run_zeroshot(engine, tokenizer, cfg, info)
    k5 = "top5" if "top5" in res else next(k for k in res if k.startswith("top") and k != "top1")
    print0(
        f"zero-shot step {step}: top1 {res['top1']:.4f} {k5} {res[k5]:.4f} "
        f"mean-per-class-recall {res['mean_per_class_recall']:.4f} ({res['samples']} images)"
    )
    logger.log(step, {f"zeroshot/{k}": v for k, v in res.items() if k != "confusion"})


# -- loop ----------------------------------------------------------------------------------------
def train_loop(
    engine, loader, logger, cfg: Config, info: dist.DistInfo, tokenizer, step: int
) -> int:
    meter = Throughput()
    last_logged, last_tag = step, None
    it = iter(loader)
    while step < cfg.train.steps:
        t0 = time.perf_counter()
        batch = next(it)
        meter.add(cfg.train.batch_size * info.world_size, time.perf_counter() - t0)
        metrics = engine.train_step(batch)
        step += 1
        if not math.isfinite(metrics["loss"]):
            raise TrainingDiverged(
                f"loss is {metrics['loss']} at a step in ({last_logged}, {step}]; "
                f"last good checkpoint: {last_tag or 'none'}; nothing was saved after it"
            )
        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            rates = meter.read()
            rates["samples_per_s_per_gpu"] = rates["samples_per_s"] / info.world_size
            logger.log(step, {**metrics, **rates, "data_errors": loader.errors})
            print0(
                f"step {step}/{cfg.train.steps} loss {metrics['loss']:.4f} "
                f"lr {metrics['lr']:.2e} scale {metrics['logit_scale']:.2f} "
                f"{rates['samples_per_s']:.1f} samples/s"
            )
            last_logged = step
        if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and step < cfg.train.steps:
            last_tag = save(engine, loader, cfg, info, step)
        if step < cfg.train.steps:
            maybe_eval(engine, tokenizer, cfg, info, logger, step, final=False)
    return step


def run(raw: DictConfig) -> None:
    info = dist.setup()
    setup_console(info.is_main)
    cfg: Config = OmegaConf.to_object(raw)  # type: ignore[assignment]
    validate(cfg, info.world_size)
    run_dir = Path(cfg.run_dir)
    if ckpt.list_tags(run_dir) and not cfg.resume:
        raise ConfigError(
            f"run_dir={run_dir} already holds checkpoints: add resume=latest to continue it, "
            "or choose a new run_dir"
        )
    shards = None if cfg.data.synthetic else resolve(cfg.data.train)
    if info.is_main:
        ckpt.snapshot_run(run_dir, raw, info.world_size)
    dist.barrier()
    tokenizer = build_tokenizer(cfg, shards, run_dir, info.is_main)
    vocab = tokenizer.vocab_size if tokenizer is not None else None
    model = build_model(cfg.model, vocab_size=cfg.model.text.vocab_size or vocab)
    engine = dist_engine(ContrastiveTask(model, ContrastiveLoss()), cfg, info)
    print0(
        f"world_size={info.world_size} ranks_per_node={info.local_world_size} "
        f"nodes={info.nodes} zero_stage={engine.zero_stage} backend={info.backend} "
        f"params={sum(p.numel() for p in model.parameters()):,}"
    )
    loader = build_loader(cfg, shards, tokenizer, info)
    step = resume(engine, loader, cfg, info)
    logger = build_logger(
        cfg.logger, run_dir, info.is_main, OmegaConf.to_container(raw, resolve=True)
    )
    try:
        step = train_loop(engine, loader, logger, cfg, info, tokenizer, step)
        tag = save(engine, loader, cfg, info, step)
        export(engine, cfg, info, step, tag)
        maybe_eval(engine, tokenizer, cfg, info, logger, step, final=True)
    finally:
        logger.close()
    dist.teardown()


def dist_engine(task, cfg: Config, info: dist.DistInfo):
    from clipforge.engine.deepspeed import Engine  # imports deepspeed: keep it off --help paths

    return Engine(task, cfg, info)


@hydra.main(version_base="1.3", config_path="../../conf", config_name="train")
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
    _hydra_main()


if __name__ == "__main__":
    main()
