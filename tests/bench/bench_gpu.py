"""GPU training throughput and MFU: clipforge's engine against open_clip 3.3.0 on the same GPU,
in one process, then the real loader feeding the same step (data-wait fraction).

    torchrun --nproc_per_node 1 tests/bench/bench_gpu.py          # a GPU machine (python works too)
    .venv/bin/python -m pytest -q -s -m gpu tests/bench/bench_gpu.py   # the same; skipped without CUDA
    BENCH_GPU_DRY=1 .venv/bin/python tests/bench/bench_gpu.py     # CPU dry run of the whole script
    .venv/bin/python tests/bench/bench_gpu.py --build-shards      # only build the loader's shards
    bash tests/bench/gpu_check.sh                                  # GPU tests + this, logs in $OUT

What runs (GPU): CLIP ViT-B/32 (conf/model/vit_b32.yaml, vocabulary 49,408) at 224 px, bf16,
one synthetic batch of BENCH_GPU_BATCH=256 pairs (pinned host memory, moved to the GPU every
step as a loader's batch would be), BENCH_GPU_WARMUP=10 untimed steps then BENCH_GPU_STEPS=30
timed ones, for each system:
- clipforge: build_model + ContrastiveTask + ContrastiveLoss + engine.deepspeed.Engine, the
  config composed by hydra exactly as the trainer composes it (deepspeed=zero2,
  train.precision=bf16), train.compile=false and =true; one step is Engine.train_step(batch).
- open_clip 3.3.0: create_model_and_transforms("ViT-B-32", pretrained=None) (nothing is
  downloaded), fp32 weights under torch.autocast(bf16), ClipLoss, torch AdamW with
  open_clip_train's parameter groups and hyper-parameters, clip_grad_norm_(1.0), logit-scale
  clamp: what open_clip_train does per batch; eager and torch.compile'd (its --torchcompile).
Then clipforge's compiled engine fed by the trainer's own loader (clipforge.train.build_loader:
TrainLoader + train_transform, BENCH_GPU_WORKERS workers, resampled) over 256 px JPEG shards
built by data_tools.convert from the COCO-mini photos: data-wait fraction = time blocked in
next(loader) / total time of the timed steps.

FLOPs per sample (matmuls only, the usual MFU convention; read off the built model):
    image forward = 2 * P * (3 * p^2) * d                     patch embedding, P patches of p px
                  + L_i * (n_i * (8 * d^2 + 4 * d * m_i)      q, k, v, out projections; MLP
                           + 4 * n_i^2 * d)                   Q K^T and A V
                  + 2 * d * E                                 projection of the class token
    text forward  = L_t * (n_t * (8 * w^2 + 4 * w * m_t) + 4 * n_t^2 * w) + 2 * w * E
                    (all n_t positions computed; the causal mask is not subtracted)
    loss          = 2 * (2 * N * E)                           image->text and text->image logits
    training      = 3 * (image + text + loss)                 backward = 2 x forward
ViT-B/32 at 224 px: P = 49, p = 32, n_i = 50 (49 patches + class token), d = 768, m_i = 3072,
L_i = 12; text n_t = 77, w = 512, m_t = 2048, L_t = 12; E = 512; N = 256:
image 8.82 + text 5.96 + loss 0.0005 GFLOP forward, 44.3 GFLOP per training sample.
Cross-checked against torch.utils.flop_counter.FlopCounterMode over one forward + backward of
each model (batch 4, the math attention kernel, which the counter sees as plain matmuls).

MFU = formula FLOPs per sample x samples/s / the GPU's peak dense bf16 FLOP/s: PEAK_TFLOPS by
device name (H100 SXM and H200 989, A100 312), or BENCH_PEAK_TFLOPS. The table is printed;
on a GPU it also replaces the "GPU" section of docs/benchmarks.md, and result.json plus the
section land in BENCH_GPU_OUT (default .bench/gpu).

Dry run (BENCH_GPU_DRY=1): the same code on CPU with gloo: conf/model/tiny.yaml (32 px), batch
8, 1 warm-up + 3 timed steps, fp32, 1 loader worker; nothing is written to docs/.
Other knobs: BENCH_GPU_SYSTEMS (comma list of ours, ours+compile, open_clip,
open_clip+compile, loader), BENCH_GPU_LOADER_STEPS, BENCH_GPU_DATA (the coco-mini folder).
The lent GPU machines are offline and start bare: build the shards here (--build-shards) and
carry .bench/gpu/shards_512 (about 19 MB) with the working tree.
"""

from __future__ import annotations

import csv
import dataclasses
import gc
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

try:
    import pytest
except ImportError:  # a bare GPU machine may run the script without pytest; only the test needs it
    pytest = None  # type: ignore[assignment]

REPO = Path(__file__).resolve().parents[2]
DRY = os.environ.get("BENCH_GPU_DRY", "") == "1"
BENCH = Path(os.environ.get("BENCH_DIR", REPO / ".bench"))
WORK = BENCH / "gpu"
OUT = Path(os.environ.get("BENCH_GPU_OUT", WORK))
DOC = REPO / "docs" / "benchmarks.md"
BEGIN, END = "<!-- gpu:begin -->", "<!-- gpu:end -->"

BATCH = int(os.environ.get("BENCH_GPU_BATCH", 8 if DRY else 256))
STEPS = int(os.environ.get("BENCH_GPU_STEPS", 3 if DRY else 30))
WARMUP = int(os.environ.get("BENCH_GPU_WARMUP", 1 if DRY else 10))
LOADER_STEPS = int(os.environ.get("BENCH_GPU_LOADER_STEPS", 3 if DRY else 40))
# The loader's workers share the host with the main process, which feeds the GPU.
WORKERS = int(os.environ.get("BENCH_GPU_WORKERS", 1 if DRY else max(1, (os.cpu_count() or 2) - 2)))
# Resampled mode streams endlessly: the set only needs variety, and it travels to lent machines.
SAMPLES = int(os.environ.get("BENCH_GPU_SAMPLES", 64 if DRY else 512))
SYSTEMS = os.environ.get(
    "BENCH_GPU_SYSTEMS", "ours,ours+compile,open_clip,open_clip+compile,loader"
).split(",")
VOCAB = 49408  # CLIP's BPE vocabulary, open_clip's ViT-B-32 text tower
PRECISION = "fp32" if DRY else "bf16"
# open_clip_train's defaults for ViT-B-32 recipes, the same as our conf/optim + clipping.
LR, WD, BETAS, EPS, CLIP = 5e-4, 0.2, (0.9, 0.98), 1e-6, 1.0
# Peak dense bf16 tensor-core TFLOP/s (vendor data sheets, without sparsity); the first name
# found in torch.cuda.get_device_name() wins, so the specific names come first.
PEAK_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0, "A100": 312.0}
FLOP_CHECK_BATCH = 4


# -- setup -------------------------------------------------------------------------------------
def compose(compile_: bool) -> Any:
    """The clipforge Config the trainer would build from these overrides (hydra, typed)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    from clipforge.config import register

    register()
    overrides = [
        f"model={'tiny' if DRY else 'vit_b32'}",
        f"model.text.vocab_size={VOCAB}",
        "data=synthetic",
        "deepspeed=zero2",
        "logger=none",
        f"train.batch_size={BATCH}",
        f"train.precision={PRECISION}",
        f"train.compile={str(compile_).lower()}",
        "train.steps=100000",  # the schedule's length only; warmup keeps the lr moving
        f"train.grad_clip={CLIP}",
        f"optim.lr={LR}",
        f"optim.weight_decay={WD}",
    ]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        raw = hydra_compose(config_name="train", overrides=overrides)
    return OmegaConf.to_object(raw)


def synthetic_batch(cfg: Any, device: torch.device) -> dict[str, torch.Tensor]:
    from clipforge.data.synthetic import SyntheticLoader

    image_size, context = cfg.model.image.image_size, cfg.model.text.context_length
    batch = SyntheticLoader(BATCH, image_size, context, VOCAB, 0, 0).make_batch(0)
    # Pinned like a DataLoader's batches (pin_memory on GPUs): both systems copy it each step.
    return {k: v.pin_memory() for k, v in batch.items()} if device.type == "cuda" else batch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def peak_tflops(device: torch.device) -> tuple[float | None, str]:
    if os.environ.get("BENCH_PEAK_TFLOPS"):
        return float(os.environ["BENCH_PEAK_TFLOPS"]), "BENCH_PEAK_TFLOPS"
    if device.type != "cuda":
        return None, "no peak for a CPU (set BENCH_PEAK_TFLOPS)"
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_TFLOPS.items():
        if key in name:
            return value, f"{key} data sheet, dense bf16"
    return None, f"{name} is not in PEAK_TFLOPS (set BENCH_PEAK_TFLOPS)"


# -- FLOPs ---------------------------------------------------------------------------------------
def formula_flops(model: torch.nn.Module, cfg: Any, global_batch: int) -> dict[str, float]:
    """The docstring's per-sample formula, with the sizes read off our built model."""
    trunk = model.visual.trunk
    d, layers_i = trunk.embed_dim, len(trunk.blocks)
    m_i = trunk.blocks[0].mlp.fc1.out_features
    p = trunk.patch_embed.patch_size[0]
    patches = trunk.patch_embed.num_patches
    n_i = patches + trunk.num_prefix_tokens
    t = cfg.model.text
    w, layers_t, n_t, m_t = t.width, t.layers, t.context_length, int(t.width * t.mlp_ratio)
    e = cfg.model.embed_dim
    image = (
        2 * patches * 3 * p * p * d
        + layers_i * (n_i * (8 * d * d + 4 * d * m_i) + 4 * n_i * n_i * d)
        + 2 * d * e
    )
    text = layers_t * (n_t * (8 * w * w + 4 * w * m_t) + 4 * n_t * n_t * w) + 2 * w * e
    loss = 2 * 2 * global_batch * e
    return {
        "image_fwd": image,
        "text_fwd": text,
        "loss_fwd": loss,
        "train": 3 * (image + text + loss),
        "sizes": dict(P=patches, p=p, n_i=n_i, d=d, m_i=m_i, L_i=layers_i, n_t=n_t, w=w,
                      m_t=m_t, L_t=layers_t, E=e),
    }  # fmt: skip


def counted_flops(step: Callable[[], torch.Tensor]) -> float:
    """FlopCounterMode over one forward + backward, per sample of FLOP_CHECK_BATCH."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    # The math kernel is plain matmuls to the counter on every device (the fused CPU kernel
    # is not in its registry, so the attention would go uncounted there).
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        step().backward()
    return counter.get_total_flops() / FLOP_CHECK_BATCH


# -- the systems -------------------------------------------------------------------------------
def time_steps(
    step: Callable[[], float | torch.Tensor], device: torch.device, steps: int = STEPS
) -> tuple[float, list[float]]:
    """(seconds for `steps` timed steps after WARMUP, every step's loss)."""
    losses = [step() for _ in range(WARMUP)]
    sync(device)
    t0 = time.perf_counter()
    losses += [step() for _ in range(steps)]
    sync(device)
    elapsed = time.perf_counter() - t0
    return elapsed, [float(v) for v in losses]  # open_clip's tensors are read after the clock


def new_task(cfg: Any) -> torch.nn.Module:
    from clipforge.loss import ContrastiveLoss
    from clipforge.model import build_model
    from clipforge.task import ContrastiveTask

    torch.manual_seed(0)
    return ContrastiveTask(build_model(cfg.model), ContrastiveLoss())


def ours_engine(compile_: bool, info: Any) -> tuple[Any, Any]:
    from clipforge.config import validate
    from clipforge.engine.deepspeed import Engine

    cfg = compose(compile_)
    validate(cfg, info.world_size)
    return Engine(new_task(cfg), cfg, info), cfg


def open_clip_model(cfg: Any, device: torch.device, compile_: bool) -> tuple[Any, Any]:
    """(the module to call, the module holding the parameters)."""
    import open_clip

    name = "ViT-B-32"
    if DRY:  # the tiny model, built by open_clip from the config clipforge.export writes
        from clipforge.export import open_clip_model_cfg

        folder = WORK / "openclip-tiny"
        folder.mkdir(parents=True, exist_ok=True)
        config = {"model_cfg": open_clip_model_cfg(cfg.model, eos_id=None), "preprocess_cfg": {}}
        (folder / "open_clip_config.json").write_text(json.dumps(config, indent=1))
        name = f"local-dir:{folder}"
    torch.manual_seed(0)
    model, _, _ = open_clip.create_model_and_transforms(
        name, pretrained=None, device=device, output_dict=True
    )
    model.train()
    return (torch.compile(model) if compile_ else model), model


def open_clip_step(
    cfg: Any, device: torch.device, batch: dict[str, torch.Tensor], compile_: bool
) -> Callable[[], torch.Tensor]:
    from open_clip.loss import ClipLoss

    fwd, model = open_clip_model(cfg, device, compile_)
    # open_clip_train's groups: no weight decay on gains, biases and the logit scale.
    plain = [
        p
        for n, p in model.named_parameters()
        if p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n
    ]
    ids = {id(p) for p in plain}
    decayed = [p for p in model.parameters() if id(p) not in ids]
    groups = [{"params": plain, "weight_decay": 0.0}, {"params": decayed, "weight_decay": WD}]
    opt = torch.optim.AdamW(groups, lr=LR, betas=BETAS, eps=EPS)
    loss_fn = ClipLoss()

    def step() -> torch.Tensor:
        image = batch["image"].to(device, non_blocking=True)
        text = batch["text"].to(device, non_blocking=True)
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=PRECISION == "bf16"):
            loss = loss_fn(**fwd(image, text))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        return loss.detach()  # no host sync: open_clip_train reads the loss at log steps only

    return step


def row(name: str, elapsed: float, steps: int, losses: list[float], device: torch.device,
        flops: float, peak: float | None, **extra: Any) -> dict[str, Any]:  # fmt: skip
    rate = steps * BATCH / elapsed
    tflops = flops * rate / 1e12
    return {
        "system": name,
        "samples_per_s": rate,
        "step_ms": elapsed / steps * 1e3,
        "tflops": tflops,
        "mfu": tflops / peak if peak else None,
        "peak_mem_gib": peak_gib(device),
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "losses_finite": all(math.isfinite(v) for v in losses),
        **extra,
    }


def add_row(result: dict[str, Any], r: dict[str, Any]) -> None:
    # Printed as it comes: a run cut off by its time limit still leaves what it measured.
    mfu = f", MFU {r['mfu']:.1%}" if r["mfu"] is not None else ""
    wait = f", data wait {r['data_wait_frac']:.1%}" if "data_wait_frac" in r else ""
    print(f"{r['system']}: {r['samples_per_s']:.1f} samples/s{mfu}{wait}", flush=True)
    result["rows"].append(r)


# -- the loader's shards -----------------------------------------------------------------------
def coco_folder() -> Path | None:
    candidates = [os.environ.get("BENCH_GPU_DATA", "")]
    candidates += [str(REPO.parent / "shared/data/coco-mini"), str(REPO / "shared/data/coco-mini")]
    return next((Path(c) for c in candidates if c and Path(c).is_dir()), None)


def build_shards() -> tuple[Path | None, str]:
    """SAMPLES (COCO-mini photo, one of its captions) rows -> 256 px shards + tokenizer, cached
    in .bench/gpu (what a lent machine gets carried); (folder, '') or (None, why not)."""
    out = WORK / f"shards_{SAMPLES}"
    if (out / "manifest.json").is_file() and (out / "tokenizer.model").is_file():
        return out, ""
    coco = coco_folder()
    if coco is None:
        return None, (
            f"no shards at {out} and no COCO-mini to build them (BENCH_GPU_DATA); build them "
            "elsewhere with --build-shards and carry .bench/gpu"
        )
    rows = []
    for split in ("train2017", "val2017"):
        ann = json.loads((coco / "annotations" / f"captions_{split}.json").read_text())
        files = {im["id"]: im["file_name"] for im in ann["images"]}
        for a in ann["annotations"]:
            path = coco / split / files[a["image_id"]]
            if path.is_file():
                rows.append((str(path), a["caption"].strip()))
    table = WORK / f"rows_{SAMPLES}.csv"
    table.parent.mkdir(parents=True, exist_ok=True)
    with open(table, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "caption"])
        writer.writerows(rows[i % len(rows)] for i in range(SAMPLES))
    # Subprocesses: the converter forks workers, which a process holding CUDA should not do.
    py, procs = sys.executable, str(min(8, os.cpu_count() or 1))
    for cmd in (
        [py, "-m", "data_tools.convert", "--input", str(table), "--url-col", "path",
         "--caption-col", "caption", "--output", str(out), "--image-size", "256",
         "--resize-mode", "center_crop", "--samples-per-shard", "128", "--processes", procs],
        [py, "-m", "data_tools.tokenizer", "--input", str(out), "--vocab-size", "2000"],
    ):  # fmt: skip
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if proc.returncode:
            return None, f"{' '.join(cmd[2:4])} failed: {proc.stderr.strip()[-500:]}"
    return out, ""


def loader_row(engine: Any, cfg: Any, info: Any, shards_dir: Path, flops: float,
               peak: float | None) -> dict[str, Any]:  # fmt: skip
    """The compiled engine fed by the trainer's own loader; data wait = time in next()."""
    from clipforge.data.shards import resolve
    from clipforge.data.tokenizer import Tokenizer
    from clipforge.train import build_loader

    cfg = dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, train=str(shards_dir), synthetic=False,
                                      workers=WORKERS, mode="resampled"),
    )  # fmt: skip
    shards = resolve(cfg.data.train)
    tokenizer = Tokenizer(shards.tokenizer, cfg.model.text.context_length)
    loader = build_loader(cfg, shards, tokenizer, info)
    it = iter(loader)
    # The warm-up also fills the workers' prefetch queues, so the wait measured is the
    # steady state, not the workers' start.
    losses = [engine.train_step(next(it))["loss"] for _ in range(WARMUP)]
    sync(info.device)
    wait, t0 = 0.0, time.perf_counter()
    for _ in range(LOADER_STEPS):
        t = time.perf_counter()
        batch = next(it)
        wait += time.perf_counter() - t
        losses.append(engine.train_step(batch)["loss"])
    sync(info.device)
    elapsed = time.perf_counter() - t0
    del it  # stops the workers
    name = f"clipforge, compiled, fed by TrainLoader ({WORKERS} workers, 256 px JPEG shards)"
    return row(name, elapsed, LOADER_STEPS, losses, info.device, flops, peak,
               data_wait_frac=wait / elapsed, decode=loader.metrics())  # fmt: skip


# -- the run -----------------------------------------------------------------------------------
def measure_flops(cfg: Any, batch: dict[str, torch.Tensor], world: int) -> dict[str, Any]:
    """The formula (at the timed batch and at the counter's) and the counter, for ours."""
    from clipforge.loss import ContrastiveLoss

    device = next(iter(batch.values())).device
    ours = new_task(cfg).model.to(device)
    loss = ContrastiveLoss()
    image, text = batch["image"][:FLOP_CHECK_BATCH], batch["text"][:FLOP_CHECK_BATCH]
    return {
        "flops": formula_flops(ours, cfg, BATCH * world),
        "formula_at_check_batch": formula_flops(ours, cfg, FLOP_CHECK_BATCH)["train"],
        "counted": {"ours": counted_flops(lambda: loss(**ours(image, text)))},
        "params": {"ours": sum(p.numel() for p in ours.parameters())},
    }


def measure_ours(
    result: dict[str, Any], info: Any, batch: dict[str, torch.Tensor], shards: tuple
) -> None:
    """Rows for our engine, compile off and on; the compiled engine then takes the loader."""
    peak, flops = result["peak_tflops"], result["flops"]["train"]
    for compile_ in (False, True):
        name = "ours+compile" if compile_ else "ours"
        wants_loader = compile_ and "loader" in SYSTEMS
        if name not in SYSTEMS and not wants_loader:
            continue
        reset_memory(info.device)
        engine, cfg = ours_engine(compile_, info)
        if name in SYSTEMS:
            elapsed, losses = time_steps(lambda e=engine: e.train_step(batch)["loss"], info.device)
            label = (
                f"clipforge, DeepSpeed ZeRO-2, {PRECISION}, compile {'on' if compile_ else 'off'}"
            )
            add_row(result, row(label, elapsed, STEPS, losses, info.device, flops, peak))
        if wants_loader and shards[0] is None:
            result["skipped"]["loader"] = shards[1]
        elif wants_loader:
            reset_memory(info.device)
            add_row(result, loader_row(engine, cfg, info, shards[0], flops, peak))
        del engine


def count_open_clip(
    result: dict[str, Any], cfg: Any, device: torch.device, batch: dict, loss: Any
) -> None:
    _, model = open_clip_model(cfg, device, False)
    image = batch["image"][:FLOP_CHECK_BATCH].to(device)
    text = batch["text"][:FLOP_CHECK_BATCH].to(device)
    result["counted"]["open_clip"] = counted_flops(lambda: loss(**model(image, text)))
    result["params"]["open_clip"] = sum(p.numel() for p in model.parameters())


def measure_open_clip(
    result: dict[str, Any], cfg: Any, device: torch.device, batch: dict[str, torch.Tensor]
) -> None:
    """Rows for open_clip's training step, eager and compiled (plus its FLOP count)."""
    for compile_ in (False, True):
        name = "open_clip+compile" if compile_ else "open_clip"
        if name not in SYSTEMS:
            continue
        reset_memory(device)
        try:
            from open_clip.loss import ClipLoss
        except ImportError as e:
            result["skipped"][name] = f"open_clip not importable: {e}"
            continue
        if "open_clip" not in result["counted"]:
            count_open_clip(result, cfg, device, batch, ClipLoss())
        step = open_clip_step(cfg, device, batch, compile_)
        elapsed, losses = time_steps(step, device)
        autocast = "autocast bf16" if PRECISION == "bf16" else "fp32"
        label = f"open_clip 3.3.0, {autocast}, AdamW, {'compiled' if compile_ else 'eager'}"
        flops = result["flops"]["train"]
        add_row(result, row(label, elapsed, STEPS, losses, device, flops, result["peak_tflops"]))
        del step


def measure() -> dict[str, Any]:
    from clipforge.engine import dist

    # Before any CUDA or process group: the converter forks.
    shards = build_shards() if "loader" in SYSTEMS else (None, "not asked")
    info = dist.setup()  # fills torchrun's variables when plain python started us
    device = info.device
    if not DRY and device.type != "cuda":
        raise RuntimeError("no CUDA device: run with BENCH_GPU_DRY=1 for the CPU dry run")
    peak, peak_src = peak_tflops(device)
    cfg = compose(False)
    batch = synthetic_batch(cfg, device)
    on_device = {k: v[:FLOP_CHECK_BATCH].to(device) for k, v in batch.items()}
    result: dict[str, Any] = {
        "rows": [],
        "skipped": {},
        "peak_tflops": peak,
        "peak_source": peak_src,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
        "world_size": info.world_size,
        "versions": versions(),
        **measure_flops(cfg, on_device, info.world_size),
    }
    measure_ours(result, info, batch, shards)
    measure_open_clip(result, cfg, device, batch)
    dist.teardown()
    return result


def versions() -> dict[str, str]:
    out = {"torch": torch.__version__, "python": platform.python_version()}
    for mod in ("deepspeed", "timm", "open_clip"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception as e:  # report, never fail, on a missing or broken peer
            out[mod] = f"n/a ({type(e).__name__})"
    return out


# -- the report --------------------------------------------------------------------------------
def render(r: dict[str, Any]) -> str:
    f, s = r["flops"], r["flops"]["sizes"]
    check = r["formula_at_check_batch"]
    counted = ", ".join(
        f"{k} {v / 1e9:.3f} GFLOP ({v / check:.3f}x the formula)" for k, v in r["counted"].items()
    )
    lines = [
        BEGIN,
        "Written by `tests/bench/bench_gpu.py` (run by `tests/bench/gpu_check.sh`); one process, "
        "one GPU, every system on the same device in the same run.",
        "",
        f"Device: {r['device']}; peak {r['peak_tflops'] or 'n/a'} TFLOP/s ({r['peak_source']}). "
        + "; ".join(f"{k} {v}" for k, v in r["versions"].items())
        + ".",
        "",
        f"Model: {'tiny (conf/model/tiny.yaml)' if DRY else 'CLIP ViT-B/32 at 224 px'}, "
        f"vocabulary {VOCAB}; parameters "
        + ", ".join(f"{k} {v:,}" for k, v in r["params"].items())
        + f". Batch {BATCH} per GPU x {r['world_size']}, {PRECISION}, synthetic batch in pinned "
        f"memory copied every step; {WARMUP} warm-up then {STEPS} timed steps "
        f"(loader row: {LOADER_STEPS}). AdamW lr {LR}, wd {WD}, clipping at {CLIP} on both sides; "
        "the losses are a sanity check only (ours warms the lr up as conf/sched says, open_clip "
        "runs at a constant lr, and a fixed batch is memorized).",
        "",
        "FLOPs per sample (matmuls; training = 3 x forward): image forward "
        f"2*P*3*p^2*d + L_i*(n_i*(8d^2 + 4*d*m_i) + 4*n_i^2*d) + 2*d*E = {f['image_fwd'] / 1e9:.3f} "
        f"GFLOP, text forward L_t*(n_t*(8w^2 + 4*w*m_t) + 4*n_t^2*w) + 2*w*E = "
        f"{f['text_fwd'] / 1e9:.3f} GFLOP, loss 4*N*E = {f['loss_fwd'] / 1e9:.4f} GFLOP; "
        f"training {f['train'] / 1e9:.2f} GFLOP/sample with "
        + ", ".join(f"{k}={v}" for k, v in s.items())
        + f". FlopCounterMode, one forward + backward at batch {FLOP_CHECK_BATCH} (math "
        f"attention kernel): {counted}.",
        "",
        "| system | samples/s | step ms | model TFLOP/s | MFU | data wait | peak GiB | loss first -> last |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for x in r["rows"]:
        mfu = f"{x['mfu']:.1%}" if x["mfu"] is not None else "n/a"
        wait = f"{x['data_wait_frac']:.1%}" if "data_wait_frac" in x else "-"
        mem = f"{x['peak_mem_gib']:.1f}" if x["peak_mem_gib"] is not None else "n/a"
        lines.append(
            f"| {x['system']} | {x['samples_per_s']:.1f} | {x['step_ms']:.1f} | "
            f"{x['tflops']:.2f} | {mfu} | {wait} | {mem} | "
            f"{x['loss_first']:.3f} -> {x['loss_last']:.3f} |"
        )
    for name, why in r["skipped"].items():
        lines.append(f"| {name}: not run | {why} | | | | | | |")
    lines += [
        "",
        "Reproduce: `bash tests/bench/gpu_check.sh` on a GPU machine, or "
        "`torchrun --nproc_per_node 1 tests/bench/bench_gpu.py` (BENCH_GPU_BATCH, "
        "BENCH_GPU_STEPS, BENCH_GPU_WARMUP, BENCH_GPU_WORKERS, BENCH_PEAK_TFLOPS).",
        END,
    ]
    return "\n".join(lines)


def write_doc(section: str) -> None:
    text = DOC.read_text() if DOC.is_file() else "# Benchmarks\n"
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text)
    else:
        text = text.rstrip("\n") + "\n\n## GPU\n\n" + section + "\n"
    DOC.write_text(text)


def main() -> dict[str, Any]:
    result = measure()
    section = render(result)
    print("\n" + section)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "result.json").write_text(json.dumps(result, indent=1, default=str))
    (OUT / "gpu_section.md").write_text(section + "\n")
    if not DRY and torch.cuda.is_available():  # figures from a real GPU only
        write_doc(section)
    return result


def check(result: dict[str, Any]) -> None:
    """What must hold for the figures to mean anything."""
    assert result["rows"], "no system ran"
    for x in result["rows"]:
        assert x["losses_finite"], f"{x['system']}: a loss was not finite"
    if not DRY:
        assert not result["skipped"], f"systems not run: {result['skipped']}"
        # The formula is what MFU is computed from: the counter must agree with it.
        for name, value in result["counted"].items():
            ratio = value / result["formula_at_check_batch"]
            assert 0.95 < ratio < 1.05, f"{name}: FlopCounterMode / formula = {ratio:.3f}"


if pytest is not None:

    @pytest.mark.gpu
    @pytest.mark.skipif(
        not (torch.cuda.is_available() or DRY),
        reason="needs a CUDA device: torch.cuda.is_available() is False "
        "(BENCH_GPU_DRY=1 runs the CPU dry run)",
    )
    def test_gpu_throughput() -> None:
        check(main())


if __name__ == "__main__":
    if sys.argv[1:] == ["--build-shards"]:
        folder, why = build_shards()
        print(folder or f"not built: {why}")
        sys.exit(0 if folder else 1)
    check(main())
