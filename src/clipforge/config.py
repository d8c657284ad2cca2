"""Typed configuration: dataclasses registered with hydra, validated once, all errors at once.

Every field a YAML file or a command-line override may set lives here, with its default and
a line saying what it means. Because these dataclasses are the schema of the composed config,
a typo such as `train.step=10` fails at compose time instead of being silently ignored.

    python -m clipforge.train experiment=smoke_cpu run_dir=/tmp/run
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import ListConfig

from clipforge.eval import benchmarks

IMAGE_INITS = ("clip", "timm")


@dataclass
class ImageTowerConfig:
    # timm architecture name; the projection to the joint space is ours, so timm's head is
    # always created with num_classes=0.
    timm_name: str = "vit_base_patch32_clip_224"
    image_size: int = 224
    # Extra keyword arguments for timm.create_model (depth, embed_dim, patch_size, ...).
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    # FLIP-style patch dropout: fraction of patch tokens dropped in training (ViT only).
    patch_dropout: float = 0.0
    # How a timm ViT trunk starts: "clip" re-initializes it as OpenAI CLIP and open_clip do
    # (PyTorch's layer defaults, xavier q/k/v, class token and position embedding of std
    # width**-0.5); "timm" keeps timm's own init (timm_kwargs.weight_init picks its flavour).
    # Other trunks (ResNets, ConvNeXts) always keep timm's init.
    init: str = "clip"


@dataclass
class TextTowerConfig:
    context_length: int = 77
    # 0 means "take it from the tokenizer"; tests and the parity check may pin it.
    vocab_size: int = 0
    width: int = 512
    layers: int = 12
    heads: int = 8
    mlp_ratio: float = 4.0


@dataclass
class ModelConfig:
    embed_dim: int = 512
    image: ImageTowerConfig = field(default_factory=ImageTowerConfig)
    text: TextTowerConfig = field(default_factory=TextTowerConfig)
    # The logit scale is learned in log space; CLIP starts at 1/0.07 and caps the scale at 100.
    init_logit_scale: float = math.log(1 / 0.07)
    max_logit_scale: float = 100.0
    # A learned logit bias, for the sigmoid loss (conf/loss/siglip.yaml starts it at -10, the
    # scale at 10, as the SigLIP paper). None: no bias (the softmax loss is blind to one).
    init_logit_bias: Optional[float] = None
    grad_checkpointing: bool = False
    # Start from existing weights instead of from scratch (clipforge/init_from.py): a run's
    # model.safetensors (or the run directory), or an open_clip CLIP checkpoint of the same
    # architecture (open_clip_model.safetensors, or a torch file as open_clip_train saves it,
    # read with weights_only). Any fsspec URL; the format is told from the tensor names. The
    # file's values replace every init above, the temperature included. Ignored when the run
    # resumes from a checkpoint of its own. None: from scratch.
    init_from: Optional[str] = None
    # Every tensor of the model must come from init_from with its shape and every tensor there
    # must be used, else the run stops naming the missing, unexpected and mismatched ones;
    # false loads what fits and logs what stayed at its init.
    init_strict: bool = True


@dataclass
class AugmentConfig:
    # Random resized crop area range for training (CLIP uses (0.9, 1.0)).
    scale_min: float = 0.9
    scale_max: float = 1.0
    mean: list[float] = field(default_factory=lambda: [0.48145466, 0.4578275, 0.40821073])
    std: list[float] = field(default_factory=lambda: [0.26862954, 0.26130258, 0.27577711])


@dataclass
class DataConfig:
    # A shard folder (with manifest.json), a manifest path, a brace pattern or a .txt list of
    # shard URLs; several sources joined with `::` (see clipforge/data/shards.py).
    # Left empty with synthetic=true, random tensors are used (smoke tests, launch checks).
    train: Optional[str] = None
    synthetic: bool = False
    # Sentencepiece model; empty means "the one recorded in the training manifest".
    tokenizer: Optional[str] = None
    workers: int = 2
    # Samples shuffled together (a seeded permutation per block of this many raw samples).
    shuffle_buffer: int = 1000
    # resampled: shards drawn with replacement, an endless stream (pretraining's default).
    # epoch: each sample once per epoch across all ranks (clipforge/data/stream.py).
    mode: str = "resampled"
    # One mixing weight per `::` source (resampled mode); empty: sources weighted by size.
    weights: Optional[list[float]] = None
    # Shards each worker reads side by side, so one batch mixes that many shards.
    shards_in_flight: int = 4
    # Fraction of samples that may fail to decode before the run stops naming the shard.
    max_error_rate: float = 0.1
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class LossConfig:
    # clip: softmax cross-entropy over the gathered N x N matrix, computed in local form.
    # siglip: the pairwise sigmoid loss (needs model.init_logit_bias; conf/loss/siglip.yaml).
    kind: str = "clip"
    # siglip across ranks: ring (texts passed round the ranks, O(B^2) memory per rank) or
    # gather (all texts at once, O(B x N)). The softmax loss always gathers.
    dist_impl: str = "ring"


@dataclass
class OptimConfig:
    lr: float = 5e-4
    weight_decay: float = 0.2
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6


@dataclass
class SchedConfig:
    warmup_steps: int = 100
    # Cosine decays to lr * min_lr_ratio (a floor, not zero).
    min_lr_ratio: float = 0.0


@dataclass
class TrainLoopConfig:
    steps: int = 1000
    # Per-rank micro batch; the global batch is batch_size * world_size. Derived when
    # global_batch_size is set, and when a run resumes at another world size (derive_batch).
    batch_size: int = 64
    # The global batch (all ranks). None: train.batch_size x the world size the run started
    # with, which a resume keeps (the checkpoint records it), so a run requeued on fewer or more
    # GPUs trains on the same batches; set it to change the global batch on purpose.
    global_batch_size: Optional[int] = None
    seed: int = 0
    log_every: int = 10
    grad_clip: float = 1.0
    # auto | fp32 | bf16 | fp16 (fp16 with DeepSpeed's dynamic loss scale); auto is bf16 on
    # GPUs that have it and fp32 on CPU. The whole policy: clipforge/engine/precision.py.
    precision: str = "auto"
    # Gradients are reduced across ranks in fp32, or in the compute dtype ("compute": half the
    # traffic, fewer bits in the sum).
    grad_reduce_dtype: str = "fp32"
    # TF32 tensor cores for fp32 matmuls and convolutions on GPUs (Ampere and later).
    tf32: bool = True
    # Split each rank's micro batch into K chunks that go through the towers one at a time
    # (activation memory of batch_size / K). The global contrastive batch stays
    # batch_size * world_size either way; see engine/accumulate.py.
    accum_chunks: int = 1
    # gradcache: exact, every sample of the global batch is a negative (one extra forward
    # per chunk). plain: DeepSpeed's accumulation, each chunk's loss sees only its own
    # negatives (batch_size / K * world_size): cheaper, but a weaker contrastive task.
    accum_mode: str = "gradcache"
    # torch.compile the towers (not the loss and its collectives); the first steps compile.
    compile: bool = False


@dataclass
class CheckpointConfig:
    # Save every N steps (0: only at the end) and keep the newest K (0: keep all).
    every: int = 0
    keep: int = 2
    # Ranks agree on a preemption request (SIGUSR1 or RUN_DIR/preempt.flag) every N steps: one
    # blocking host round trip each time, so not every step.
    preempt_poll_every: int = 10


@dataclass
class EvalConfig:
    # Zero-shot classification sets, one or a list (eval.zeroshot=[A,B]), each reported under
    # its folder's name: shards with .cls + classnames.txt (ours, or a CLIP_benchmark export),
    # or NAME[@TEMPLATES]:PATH for a shipped benchmark (imagenet1k, cifar10, cifar100: its class
    # names and templates, clipforge/eval/benchmarks/), where PATH may also be a folder of class
    # sub-folders (ImageNet's val/n01440764/...). imagenet1k@openai7: OpenAI's 7 templates.
    zeroshot: Any = None
    # Captioned retrieval sets, one or a list: KEY.txt, or KEY.json {"captions": [...]} for
    # several captions per image.
    retrieval: Any = None
    # Prompt templates with "{}" (or "{c}") for the class name; a templates file beside the
    # set, or a NAME: entry's shipped templates, win.
    templates: list[str] = field(default_factory=lambda: ["a photo of a {}."])
    # Evaluate every N steps (0: only at the end of training).
    every: int = 0
    batch_size: int = 256
    # DataLoader workers decoding each rank's share of an eval set (0: in the main process).
    workers: int = 2
    # The k of retrieval recall@k, both directions.
    recall_at: list[int] = field(default_factory=lambda: [1, 5, 10])
    # Render a confusion matrix and a retrieval strip at each eval (wandb, RUN_DIR/eval/).
    figures: bool = True


@dataclass
class LoggerConfig:
    # wandb | none ; every logger also writes RUN_DIR/metrics.jsonl.
    kind: str = "none"
    mode: str = "offline"
    project: str = "clipforge"
    name: Optional[str] = None


@dataclass
class Config:
    run_dir: str = "runs/default"
    # "latest" resumes from the newest checkpoint in run_dir, a path resumes from there.
    resume: Optional[str] = None
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    # A plain DeepSpeed config dict (conf/deepspeed/*.yaml); batch sizes, clipping and
    # precision are filled in from the fields above by engine/deepspeed.py.
    deepspeed: dict[str, Any] = field(default_factory=dict)


def register() -> None:
    """Make the schema known to hydra; conf/train.yaml lists `schema` first in its defaults."""
    cs = ConfigStore.instance()
    cs.store(name="schema", node=Config)


class ConfigError(ValueError):
    """An invalid configuration; its message lists every problem on one line."""


_LOGGERS = ("wandb", "none")


_ACCUM_MODES = ("gradcache", "plain")


def _accumulation_problems(cfg: Config) -> list[str]:
    """train.accum_* checks; DeepSpeed's gradient_accumulation_steps is derived from them."""
    problems = []
    chunks = cfg.train.accum_chunks
    if chunks < 1 or cfg.train.batch_size % max(1, chunks):
        problems.append(
            f"train.accum_chunks must be >= 1 and divide train.batch_size "
            f"({cfg.train.batch_size}), got {chunks}"
        )
    if cfg.train.accum_mode not in _ACCUM_MODES:
        problems.append(
            f"train.accum_mode must be one of {_ACCUM_MODES}, got {cfg.train.accum_mode!r}"
        )
    if "gradient_accumulation_steps" in cfg.deepspeed:
        problems.append(
            "deepspeed.gradient_accumulation_steps is derived: set train.accum_chunks=K "
            "(train.accum_mode=plain for DeepSpeed's own accumulation)"
        )
    return problems


def _precision_problems(train: TrainLoopConfig, device: Any) -> list[str]:
    import torch

    from clipforge.engine import precision

    problems = []
    if train.precision not in precision.PRECISIONS:
        problems.append(
            f"train.precision must be one of {precision.PRECISIONS}, got {train.precision!r}"
        )
    elif device is not None:
        problem = precision.precision_problem(train.precision, torch.device(device))
        if problem:
            problems.append(problem)
    if train.grad_reduce_dtype not in precision.GRAD_REDUCE_DTYPES:
        problems.append(
            f"train.grad_reduce_dtype must be one of {precision.GRAD_REDUCE_DTYPES}, "
            f"got {train.grad_reduce_dtype!r}"
        )
    return problems


# The DeepSpeed dict (conf/deepspeed/*.yaml, `deepspeed.*` overrides) is DeepSpeed's own schema,
# which accepts unknown keys silently: a typo such as deepspeed.zero_optimization.stag=3 would
# compose and be ignored. These are the keys a run may set (tests/test_configs.py checks each
# against DeepSpeed's config models); the rest of the dict is derived from train.* and optim.*.
DS_SECTIONS = frozenset(
    {
        "zero_optimization", "bf16", "fp16", "communication_data_type", "steps_per_print",
        "wall_clock_breakdown", "memory_breakdown", "activation_checkpointing", "flops_profiler",
        "comms_logger", "tensorboard", "wandb", "csv_monitor", "data_types", "checkpoint",
        "aio", "prescale_gradients", "gradient_predivide_factor", "dump_state", "seq_parallel_communication_data_type",
    }
)  # fmt: skip
DS_ZERO_KEYS = frozenset(
    {
        "stage", "overlap_comm", "contiguous_gradients", "reduce_bucket_size",
        "allgather_bucket_size", "allgather_partitions", "reduce_scatter", "round_robin_gradients",
        "offload_optimizer", "offload_param", "sub_group_size", "elastic_checkpoint",
        "load_from_fp32_weights", "ignore_unused_parameters", "use_multi_rank_bucket_allreduce",
        "stage3_gather_16bit_weights_on_model_save", "stage3_max_live_parameters",
        "stage3_max_reuse_distance", "stage3_prefetch_bucket_size",
        "stage3_param_persistence_threshold", "stage3_model_persistence_threshold",
        "zero_hpz_partition_size", "zero_quantized_weights", "zero_quantized_gradients",
        "memory_efficient_linear", "cpu_offload", "gather_16bit_weights_on_model_save",
    }
)  # fmt: skip
# Derived in engine/deepspeed.py from the typed config, so never set in the dict.
DS_DERIVED = {
    "train_batch_size": "train.batch_size (per rank) or train.global_batch_size",
    "train_micro_batch_size_per_gpu": "train.batch_size",
    "gradient_accumulation_steps": "train.accum_chunks",
    "gradient_clipping": "train.grad_clip",
    "optimizer": "optim.*",
    "scheduler": "sched.*",
}


def _deepspeed_problems(ds: dict[str, Any]) -> list[str]:
    problems = []
    for key in ds:
        if key in DS_DERIVED and key != "gradient_accumulation_steps":  # that one: see below
            problems.append(f"deepspeed.{key} is derived: set {DS_DERIVED[key]}")
        elif key not in DS_SECTIONS and key not in DS_DERIVED:
            problems.append(
                f"deepspeed.{key} is not a DeepSpeed setting clipforge passes on"
                + _near(key, DS_SECTIONS)
            )
    zero = ds.get("zero_optimization", {})
    if not isinstance(zero, dict):
        return problems + ["deepspeed.zero_optimization must be a mapping"]
    for key in zero:
        if key not in DS_ZERO_KEYS:
            problems.append(
                f"deepspeed.zero_optimization.{key} is not a ZeRO option" + _near(key, DS_ZERO_KEYS)
            )
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        problems.append(f"deepspeed.zero_optimization.stage must be 0-3, got {stage}")
    return problems


def _near(key: str, known: frozenset[str]) -> str:
    import difflib

    close = difflib.get_close_matches(key, sorted(known), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def _image_tower_problems(model: ModelConfig) -> list[str]:
    """Whether the image tower builds: built on the meta device (no memory, no weights), so a
    wrong timm_name or a keyword timm does not take (model.image.timm_kwargs) is reported with
    the rest, before any process starts."""
    import torch

    from clipforge.model.image_tower import build_image_tower

    try:
        with torch.device("meta"):
            build_image_tower(model.image, model.embed_dim)
    except (RuntimeError, TypeError, ValueError, KeyError, AssertionError) as e:
        msg = " ".join(str(e).split()) or type(e).__name__
        return [
            f"model.image ({model.image.timm_name}, timm_kwargs {dict(model.image.timm_kwargs)}): {msg}"
        ]
    return []


_DATA_MODES = ("resampled", "epoch")


LOSS_KINDS = ("clip", "siglip")
SIGLIP_DIST_IMPLS = ("ring", "gather")


def _loss_problems(cfg: Config) -> list[str]:
    kind, bias = cfg.loss.kind, cfg.model.init_logit_bias
    if kind not in LOSS_KINDS:
        return [f"loss.kind must be one of {', '.join(LOSS_KINDS)}, got {kind!r}"]
    problems = []
    if cfg.loss.dist_impl not in SIGLIP_DIST_IMPLS:
        problems.append(
            f"loss.dist_impl must be one of {', '.join(SIGLIP_DIST_IMPLS)}, got "
            f"{cfg.loss.dist_impl!r}"
        )
    if kind == "siglip" and bias is None:
        problems.append(
            "loss.kind=siglip needs a learned bias: set model.init_logit_bias (SigLIP: -10), "
            "or select the whole recipe with loss=siglip"
        )
    if kind == "clip" and bias is not None:
        # The softmax is invariant to a constant added to every logit: the bias would never
        # get a gradient, which ZeRO's gradient partitioning does not allow.
        problems.append("model.init_logit_bias is only for loss.kind=siglip: set it to null")
    return problems


def _data_problems(data: DataConfig) -> list[str]:
    """data.* checks beyond the types (the loader itself checks what needs the shards)."""
    problems = []
    if data.mode not in _DATA_MODES:
        problems.append(f"data.mode must be one of {_DATA_MODES}, got {data.mode!r}")
    if data.weights is not None:
        sources = len([s for s in (data.train or "").split("::") if s.strip()])
        if data.mode == "epoch":
            problems.append(
                "data.weights needs data.mode=resampled (an epoch reads each sample once)"
            )
        if (
            len(data.weights) != sources
            or any(w < 0 for w in data.weights)
            or not sum(data.weights)
        ):
            problems.append(
                f"data.weights must be {sources} non-negative numbers (one per `::` source of "
                f"data.train), not all zero; got {list(data.weights)}"
            )
    if data.shuffle_buffer < 1 or data.shards_in_flight < 1:
        problems.append("data.shuffle_buffer and data.shards_in_flight must be >= 1")
    if not 0.0 <= data.max_error_rate <= 1.0:
        problems.append(f"data.max_error_rate must be in [0, 1], got {data.max_error_rate}")
    return problems


def eval_problems(ev: EvalConfig) -> list[str]:
    """What is wrong with an eval section (training's validate and the standalone eval)."""
    problems: list[str] = []
    for kind in ("zeroshot", "retrieval"):
        value = getattr(ev, kind)
        if not (value is None or isinstance(value, str) or _is_str_list(value)):
            problems.append(f"eval.{kind} must be a shard source or a list of them, got {value!r}")
    if isinstance(ev.zeroshot, str) or _is_str_list(ev.zeroshot):
        entries = [ev.zeroshot] if isinstance(ev.zeroshot, str) else list(ev.zeroshot)
        for entry in entries:
            problems += benchmarks.entry_problems(entry)
    if ev.every < 0 or ev.batch_size <= 0:
        problems.append("eval.every must be >= 0 and eval.batch_size > 0")
    if not ev.recall_at or any(k <= 0 for k in ev.recall_at):
        problems.append(f"eval.recall_at must be positive integers, got {ev.recall_at}")
    if not ev.templates or any("{}" not in t and "{c}" not in t for t in ev.templates):
        problems.append(
            "eval.templates must be non-empty, each with a {} or {c} for the class name"
        )
    return problems


def _is_str_list(value: Any) -> bool:
    return isinstance(value, (list, tuple, ListConfig)) and all(
        isinstance(v, str) and v for v in value
    )


def derive_batch(cfg: Config, world_size: int, saved_global: int | None = None) -> list[str]:
    """Set train.batch_size (per rank) from the global batch; return the problems, if any.

    The global batch is train.global_batch_size when set, else the one a resumed checkpoint
    ran with (`saved_global`), else train.batch_size x world_size. It must split into equal
    per-rank batches, each divisible by train.accum_chunks; if it does not, the problem names
    the world sizes and the global batches that would.
    """
    train = cfg.train
    if train.global_batch_size is not None:
        total, source = train.global_batch_size, "train.global_batch_size"
    elif saved_global:
        total, source = saved_global, "the checkpoint's global batch"
    else:
        return []
    if total <= 0:
        return [f"train.global_batch_size must be > 0, got {total}"]
    chunks = max(1, train.accum_chunks)
    if world_size >= 1 and total % (world_size * chunks) == 0:
        train.batch_size = total // world_size
        return []
    unit = max(1, world_size) * chunks
    below, above = total // unit * unit, (total // unit + 1) * unit
    worlds = [w for w in range(1, total + 1) if total % (w * chunks) == 0][:12]
    near = f"{below} or {above}" if below else f"{above}"
    return [
        f"{source} ({total}) does not split over {world_size} ranks into per-rank batches "
        f"divisible by train.accum_chunks={chunks}: run on {_or_list(worlds)} ranks, or set "
        f"train.global_batch_size={near} (a new global batch)"
    ]


def _or_list(values: list[int]) -> str:
    text = [str(v) for v in values]
    return text[0] if len(text) == 1 else ", ".join(text[:-1]) + " or " + text[-1]


def validate(
    cfg: Config, world_size: int = 1, device: Any = None, saved_global: int | None = None
) -> None:
    """Raise one ConfigError naming every problem, so a user fixes them all in one go.

    Derives train.batch_size first (derive_batch; `saved_global`: the global batch of the
    checkpoint the run resumes). `device` (the torch.device training will run on) adds the
    checks that need it: whether it can compute in train.precision."""
    problems: list[str] = derive_batch(cfg, world_size, saved_global)
    if not cfg.data.synthetic and not cfg.data.train:
        problems.append(
            "data.train is empty (give a shard folder/manifest/URL or data.synthetic=true)"
        )
    if cfg.train.steps <= 0:
        problems.append(f"train.steps must be > 0, got {cfg.train.steps}")
    if cfg.train.batch_size <= 0:
        problems.append(f"train.batch_size must be > 0, got {cfg.train.batch_size}")
    problems += _precision_problems(cfg.train, device)
    problems += _accumulation_problems(cfg)
    if cfg.logger.kind not in _LOGGERS:
        problems.append(f"logger.kind must be one of {_LOGGERS}, got {cfg.logger.kind!r}")
    if cfg.optim.lr <= 0:
        problems.append(f"optim.lr must be > 0, got {cfg.optim.lr}")
    if not 0.0 <= cfg.sched.min_lr_ratio <= 1.0:
        problems.append(f"sched.min_lr_ratio must be in [0, 1], got {cfg.sched.min_lr_ratio}")
    if cfg.sched.warmup_steps < 0:
        problems.append(f"sched.warmup_steps must be >= 0, got {cfg.sched.warmup_steps}")
    if cfg.checkpoint.every < 0 or cfg.checkpoint.keep < 0:
        problems.append("checkpoint.every and checkpoint.keep must be >= 0")
    if cfg.checkpoint.preempt_poll_every < 1:
        problems.append("checkpoint.preempt_poll_every must be >= 1")
    if (
        cfg.model.max_logit_scale <= 0
        or math.exp(cfg.model.init_logit_scale) > cfg.model.max_logit_scale
    ):
        problems.append("model.init_logit_scale must start at or below log(model.max_logit_scale)")
    text = cfg.model.text
    if text.width % text.heads:
        problems.append(
            f"model.text.width {text.width} is not divisible by model.text.heads {text.heads}"
        )
    if text.context_length < 3:
        problems.append("model.text.context_length must hold at least SOS, one token and EOS")
    if not 0.0 <= cfg.model.image.patch_dropout < 1.0:
        problems.append("model.image.patch_dropout must be in [0, 1)")
    if cfg.model.image.init not in IMAGE_INITS:
        problems.append(
            f"model.image.init={cfg.model.image.init!r} is not one of {', '.join(IMAGE_INITS)}"
        )
    if cfg.data.workers < 0:
        problems.append("data.workers must be >= 0")
    problems += _data_problems(cfg.data)
    problems += _deepspeed_problems(cfg.deepspeed)
    problems += _image_tower_problems(cfg.model)
    if world_size < 1:
        problems.append(f"world size must be >= 1, got {world_size}")
    problems += eval_problems(cfg.eval)
    problems += _loss_problems(cfg)
    if problems:
        raise ConfigError("invalid configuration: " + "; ".join(problems))
