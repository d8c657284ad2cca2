"""The training engine through real DeepSpeed on CPU: accumulation, precision, clipping, ZeRO.

    .venv/bin/python -m pytest tests/test_engine.py -q

Engine tests run in spawned processes joined by gloo (tests/dist_utils.py), one spawn per
scenario, on a ~60k-parameter CLIP so that DeepSpeed's start-up dominates. Gradients are read at
the optimizer (a step pre-hook under ZeRO-0), or, under ZeRO-2/3 where they are partitioned, from
the parameter change of one AdamW step with eps=1: then the change is -lr * g / (|g| + 1), a
smooth function of the gradient, so equal changes mean equal gradients.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os

import pytest
import torch
import torch.distributed as dist
from dist_utils import run_distributed

from clipforge.config import (
    Config,
    ImageTowerConfig,
    ModelConfig,
    OptimConfig,
    SchedConfig,
    TextTowerConfig,
    TrainLoopConfig,
)
from clipforge.data.synthetic import SyntheticLoader
from clipforge.engine.accumulate import split_batch
from clipforge.engine.optim import lr_lambda, param_groups
from clipforge.engine.precision import supports
from clipforge.loss import ContrastiveLoss, SigLipLoss
from clipforge.model import build_model
from clipforge.task import ContrastiveTask

VOCAB, CONTEXT, IMAGE = 64, 8, 16
BATCH, CHUNKS = 8, 4
# fp16 on a CPU needs oneDNN's fp16 kernels (AVX-512 FP16 / AMX); AVX2-only machines lack them
# and DeepSpeed refuses fp16 there. Such cases skip with the reason instead of failing.
FP16 = supports("fp16", torch.device("cpu"))
NO_FP16 = "this CPU has no oneDNN fp16 kernels (AVX-512 FP16 or AMX): DeepSpeed refuses fp16"
# ZeRO stage and precision of the resume checks (stages 1-3 pickle DeepSpeed objects; fp16
# adds the dynamic loss scaler): together they cover every class the loader admits.
RESUME_CASES = [(0, "fp32"), (2, "fp16"), (3, "fp32")]
# What one process can run here (the spawned worker skips the others).
HALF = ("bf16", "fp16") if FP16 else ("bf16",)


# ----------------------------------------------------------------------------- helpers


def tiny_model_cfg(dropout: bool = False, **kw) -> ModelConfig:
    """Two-block towers, width 32; with `dropout`, every stochastic layer the ViT has."""
    timm_kwargs = dict(patch_size=4, embed_dim=32, depth=2, num_heads=2)
    if dropout:
        timm_kwargs.update(proj_drop_rate=0.2, attn_drop_rate=0.2, drop_path_rate=0.2)
    return ModelConfig(
        embed_dim=32,
        image=ImageTowerConfig(
            image_size=IMAGE, timm_kwargs=timm_kwargs, patch_dropout=0.5 if dropout else 0.0
        ),
        text=TextTowerConfig(context_length=CONTEXT, vocab_size=VOCAB, width=32, layers=2, heads=2),
        **kw,
    )


def engine_cfg(stage: int = 0, **train) -> Config:
    """lr 1 and AdamW eps 1, no decay, no warmup: one step moves each weight by -g/(|g|+1)."""
    cfg = Config(
        model=tiny_model_cfg(),
        optim=OptimConfig(lr=1.0, weight_decay=0.0, eps=1.0),
        sched=SchedConfig(warmup_steps=0, min_lr_ratio=1.0),
        train=TrainLoopConfig(steps=10, batch_size=BATCH, grad_clip=0.0, **train),
        deepspeed={"zero_optimization": {"stage": stage}},
    )
    cfg.data.synthetic = True
    return cfg


def make_task(model_cfg: ModelConfig, seed: int = 0, loss: str = "clip") -> ContrastiveTask:
    """The tiny task with the softmax loss, or with loss="siglip" the sigmoid loss (ring form)
    and a model with SigLIP's learned bias."""
    torch.manual_seed(seed)
    if loss == "siglip":
        model_cfg = dataclasses.replace(
            model_cfg, init_logit_scale=math.log(10.0), init_logit_bias=-10.0
        )
        return ContrastiveTask(build_model(model_cfg), SigLipLoss(dist_impl="ring"))
    return ContrastiveTask(build_model(model_cfg), ContrastiveLoss())


def make_engine(task: ContrastiveTask, cfg: Config):
    from clipforge.engine import dist as cf_dist
    from clipforge.engine.deepspeed import Engine  # imports deepspeed: inside the workers only

    return Engine(task, cfg, cf_dist.setup())


def batch_for(rank: int, index: int = 0) -> dict[str, torch.Tensor]:
    return SyntheticLoader(BATCH, IMAGE, CONTEXT, VOCAB, seed=3, rank=rank).make_batch(index)


def full_params(engine) -> dict[str, torch.Tensor]:
    """Every parameter, whole, under any ZeRO stage (3 partitions them: gather first)."""
    import deepspeed

    params = dict(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        return {k: v.detach().float().clone() for k, v in params.items()}


def reference_grads(task: ContrastiveTask, batch, world: int, seed: int) -> dict[str, torch.Tensor]:
    """Gradient of the whole batch's loss with the towers run chunk by chunk WITH autograd from
    the same RNG state as the engine: the same dropout masks, one loss, one backward; then the
    engine's average over ranks."""
    task.train()
    torch.manual_seed(seed)
    outs = [task.embed(c) for c in split_batch(batch, CHUNKS)]
    joined = {k: torch.cat([o[k] for o in outs]) for k in ("image_features", "text_features")}
    joined.update({k: outs[0][k] for k in task.shared_outputs})
    task.loss_from(joined)[0].backward()
    grads = {}
    for name, p in task.named_parameters():
        if world > 1:
            dist.all_reduce(p.grad)
        grads[name] = p.grad / world
    return grads


def captured_grads(engine) -> dict[int, torch.Tensor]:
    """Parameter gradients as the (ZeRO-0, fp32) optimizer sees them at its next step."""
    store: dict[int, torch.Tensor] = {}

    def hook(opt, args, kwargs):
        for group in opt.param_groups:
            for p in group["params"]:
                store[id(p)] = p.grad.detach().clone()

    engine.optimizer.register_step_pre_hook(hook)
    return store


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


# ----------------------------------------------------------------------------- unit tests


def test_param_groups_exempt_norms_biases_and_logit_scale() -> None:
    model = build_model(tiny_model_cfg())
    decay, no_decay = param_groups(model, 0.2)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.2 and no_decay["weight_decay"] == 0.0
    assert "logit_scale" in no_decay_names
    assert all(p.ndim >= 2 for p in decay["params"])
    assert not any(n.endswith(".bias") or "norm" in n or "ln_" in n for n in decay_names)
    assert any("ln_1" in n for n in no_decay_names) and any("norm1" in n for n in no_decay_names)
    assert "text.token_embedding.weight" in decay_names  # matrices are decayed
    assert len(decay_names) + len(no_decay_names) == len(names)


def test_schedule_warmup_then_cosine_to_floor() -> None:
    fn = lr_lambda(SchedConfig(warmup_steps=10, min_lr_ratio=0.1), total_steps=110)
    assert fn(0) == pytest.approx(0.1) and fn(4) == pytest.approx(0.5) and fn(9) == 1.0
    assert fn(10) == pytest.approx(1.0)
    assert fn(60) == pytest.approx(0.1 + 0.9 * 0.5)  # half way down the cosine
    assert fn(110) == pytest.approx(0.1) and fn(500) == pytest.approx(0.1)  # the floor holds
    values = [fn(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_split_batch_needs_equal_chunks() -> None:
    parts = split_batch({"image": torch.arange(8), "name": "x"}, 4)
    assert [p["image"].tolist() for p in parts] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert all(p["name"] == "x" for p in parts)
    with pytest.raises(ValueError, match="divisible"):
        split_batch({"image": torch.arange(6)}, 4)


# ----------------------------------------------------------------------------- accumulation


def _gradcache_worker(rank: int, world: int, loss: str = "clip") -> dict[str, float]:
    """ZeRO-0 engine with K=4 cached-embedding chunks and every dropout on, against the
    one-backward reference; then the same with the RNG replay switched off (must differ)."""
    from clipforge.engine import accumulate

    mcfg = tiny_model_cfg(dropout=True)
    task = make_task(mcfg, loss=loss)
    ref = copy.deepcopy(task)
    cfg = engine_cfg(0, accum_chunks=CHUNKS)
    cfg.model = mcfg
    cfg.optim.lr = 1e-12  # the weights stay put, so the second check sees the same model
    engine = make_engine(task, cfg)
    store = captured_grads(engine)
    names = {id(p): n for n, p in engine.module.named_parameters()}
    batch = batch_for(rank)
    out = {}

    want = reference_grads(ref, batch, world, seed=7 + rank)
    torch.manual_seed(7 + rank)
    metrics = engine.train_step(batch)
    got = {names[i]: g for i, g in store.items()}
    out["diff"] = max_diff(got, want)
    out["scale_grad"] = got["model.logit_scale"].item()
    out["want_scale_grad"] = want["model.logit_scale"].item()
    if "model.logit_bias" in want:
        out["bias_grad"] = got["model.logit_bias"].item()
        out["want_bias_grad"] = want["model.logit_bias"].item()
    out["loss"] = metrics["loss"]
    out["metrics"] = metrics

    # Without the replay the second pass draws new masks: the gradients must then be wrong.
    ref.zero_grad()
    want = reference_grads(ref, batch, world, seed=8 + rank)
    restore = accumulate.RngState.restore
    accumulate.RngState.restore = lambda self, device: None
    try:
        torch.manual_seed(8 + rank)
        engine.train_step(batch)
    finally:
        accumulate.RngState.restore = restore
    out["diff_without_replay"] = max_diff({names[i]: g for i, g in store.items()}, want)
    return out


def _one_process_worker(rank: int, world: int, ckpt_dir: str) -> dict[str, object]:
    """Every single-process scenario in one spawn: DeepSpeed's start-up is the main cost."""
    out: dict[str, object] = {"gradcache": _gradcache_worker(rank, world)}
    out["gradcache siglip"] = _gradcache_worker(rank, world, "siglip")
    for stage in (0, 1, 2):  # ZeRO-1/2: engine._grad_norm_without_fp64_copies
        out[f"clip zero{stage}"] = _clip_worker(rank, world, stage)
    for stage, precision in ((0, "fp32"), (0, "bf16"), (1, "bf16")):
        out[f"bounds {stage}-{precision}"] = _bounds_worker(rank, world, stage, precision)
    for stage, precision in ((0, "bf16"), (0, "fp32")):
        out[f"export {stage}-{precision}"] = _export_worker(rank, world, stage, precision)
    out["policy"] = _policy_worker(rank, world)
    out["ds_config"] = _ds_config_worker()
    for precision in HALF:
        out[precision] = _precision_worker(rank, world, precision)
    for stage, precision in RESUME_CASES:
        if precision not in HALF + ("fp32",):
            continue
        path = os.path.join(ckpt_dir, f"{stage}-{precision}")
        out[f"resume {stage}-{precision}"] = _resume_worker(rank, world, stage, precision, path)
    return out


def _two_process_worker(rank: int, world: int) -> dict[str, object]:
    out: dict[str, object] = {"gradcache": _gradcache_worker(rank, world)}
    out["gradcache siglip"] = _gradcache_worker(rank, world, "siglip")
    for stage in (2, 3):
        out[f"zero{stage}"] = _zero_worker(rank, world, stage)
        out[f"zero{stage} siglip"] = _zero_worker(rank, world, stage, "siglip")
    for stage, precision in ((2, "bf16"), (3, "fp32"), (3, "bf16")):
        out[f"bounds {stage}-{precision}"] = _bounds_worker(rank, world, stage, precision)
        out[f"export {stage}-{precision}"] = _export_worker(rank, world, stage, precision)
    return out


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    ckpt = tmp_path_factory.mktemp("ckpt")
    return run_distributed(_one_process_worker, 1, str(ckpt), timeout=400)[0]


@pytest.fixture(scope="module")
def two_processes() -> list[dict[str, object]]:
    return run_distributed(_two_process_worker, 2, timeout=400)


@pytest.mark.multiproc
def test_gradcache_gradients_equal_whole_batch_one_process(one_process) -> None:
    _check_gradcache([one_process])


@pytest.mark.multiproc
@pytest.mark.slow
def test_gradcache_gradients_equal_whole_batch_two_processes(two_processes) -> None:
    _check_gradcache(two_processes)


@pytest.mark.multiproc
def test_gradcache_with_siglip_counts_scale_and_bias_once_one_process(one_process) -> None:
    _check_gradcache([one_process], "gradcache siglip")


@pytest.mark.multiproc
@pytest.mark.slow
def test_gradcache_with_siglip_ring_two_processes(two_processes) -> None:
    _check_gradcache(two_processes, "gradcache siglip")


def _check_gradcache(results: list[dict[str, object]], key: str = "gradcache") -> None:
    for r in (res[key] for res in results):
        assert r["diff"] < 1e-5, r
        # The temperature is counted once: K-fold would be off by a factor of 4.
        assert r["scale_grad"] == pytest.approx(r["want_scale_grad"], rel=1e-4, abs=1e-7)
        if key.endswith("siglip"):  # and so is the bias
            assert abs(r["want_bias_grad"]) > 1e-3
            assert r["bias_grad"] == pytest.approx(r["want_bias_grad"], rel=1e-4, abs=1e-7)
            # The sigmoid loss's own metrics reach the engine's report.
            m = r["metrics"]
            assert m["logit_bias"] == pytest.approx(-10.0, abs=0.1)
            assert {"acc_i2t", "acc_t2i", "positive_logit", "negative_logit"} <= m.keys()
        else:
            assert {"acc_i2t", "acc_t2i", "loss_i2t", "loss_t2i"} <= r["metrics"].keys()
        assert math.isfinite(r["loss"])
        assert r["diff_without_replay"] > 1e-3, r  # the test can tell a missing replay


def _zero_worker(rank: int, world: int, stage: int, loss: str = "clip") -> dict[str, object]:
    """One step under ZeRO-`stage`: K=1 vs K=4 gradcache with gradient checkpointing, and K=4
    plain accumulation (weaker: its loss only sees a chunk's negatives)."""
    batch = batch_for(rank)
    results = {}
    for name, train, ckpt in (
        ("whole", {}, False),
        ("gradcache", {"accum_chunks": CHUNKS}, True),
        ("plain", {"accum_chunks": CHUNKS, "accum_mode": "plain"}, False),
    ):
        cfg = engine_cfg(stage, **train)
        cfg.model = tiny_model_cfg(grad_checkpointing=ckpt)
        engine = make_engine(make_task(cfg.model, loss=loss), cfg)
        before = full_params(engine)
        metrics = engine.train_step(batch)
        after = full_params(engine)
        results[name] = {
            "loss": metrics["loss"],
            "grad_norm": metrics.get("grad_norm"),
            "delta": {k: after[k] - before[k] for k in after},
            "zero_stage": engine.zero_stage,
        }
    return results


@pytest.mark.multiproc
@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_zero_gradcache_step_equals_whole_batch_step(two_processes, stage: int, loss: str) -> None:
    key = f"zero{stage}" + (" siglip" if loss == "siglip" else "")
    for r in (res[key] for res in two_processes):
        whole, cached, plain = r["whole"], r["gradcache"], r["plain"]
        assert whole["zero_stage"] == stage
        assert cached["loss"] == pytest.approx(whole["loss"], abs=1e-6)
        assert cached["grad_norm"] == pytest.approx(whole["grad_norm"], rel=1e-5)
        assert max_diff(cached["delta"], whole["delta"]) < 1e-5
        assert max(d.abs().max().item() for d in whole["delta"].values()) > 1e-3
        if loss == "clip":
            # Random features: the loss is about log(negatives); plain has 4x fewer of them.
            assert plain["loss"] < whole["loss"] - 0.5


# ----------------------------------------------------------------------------- temperature cap


class _Columns(torch.nn.Module):
    """A stand-in tower: its input's first D values (images) or the one-hot of the first token
    (texts), times a learned gain that normalization cancels. With these, the contrastive
    loss's pull on the temperature has a known sign: aligned pairs push the scale up,
    mismatched pairs push it down."""

    def __init__(self, dim: int, text: bool) -> None:
        super().__init__()
        self.dim, self.text = dim, text
        self.gain = torch.nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.text:
            return torch.nn.functional.one_hot(x[:, 0], self.dim).to(self.gain.dtype) * self.gain
        return x.flatten(1)[:, : self.dim] * self.gain


CAP = 5.0


def _columns_batch(aligned: bool) -> dict[str, torch.Tensor]:
    image = torch.zeros(BATCH, 3, 4, 4)
    image.view(BATCH, -1)[:, :BATCH] = torch.eye(BATCH)
    text = torch.zeros(BATCH, CONTEXT, dtype=torch.long)
    text[:, 0] = torch.arange(BATCH) if aligned else (torch.arange(BATCH) + 1) % BATCH
    return {"image": image, "text": text}


def _bounds_worker(rank: int, world: int, stage: int, precision: str) -> dict[str, object]:
    """A cap of 5 (low, so that the softmax is not saturated and the pull is strong), starting
    at 4.5: 12 steps of aligned pairs drive the scale into the cap (Adam keeps pushing), then
    12 steps of mismatched pairs must bring it back down."""
    from clipforge.model.clip import CLIP

    cfg = engine_cfg(stage, precision=precision)
    cfg.optim = OptimConfig(lr=0.05, weight_decay=0.0)
    cfg.sched = SchedConfig(warmup_steps=0, min_lr_ratio=1.0)
    torch.manual_seed(0)
    model = CLIP(_Columns(BATCH, False), _Columns(BATCH, True), math.log(4.5), CAP)
    engine = make_engine(ContrastiveTask(model, ContrastiveLoss()), cfg)
    up = [engine.train_step(_columns_batch(True))["logit_scale"] for _ in range(12)]
    raw_at_cap = full_params(engine)["model.logit_scale"].item()
    down = [engine.train_step(_columns_batch(False))["logit_scale"] for _ in range(12)]
    return {"up": up, "raw_at_cap": raw_at_cap, "down": down}


@pytest.mark.multiproc
@pytest.mark.parametrize("case", ["0-fp32", "0-bf16", "1-bf16"])
def test_temperature_cap_keeps_its_gradient(one_process, case: str) -> None:
    _check_bounds(one_process[f"bounds {case}"])


@pytest.mark.multiproc
@pytest.mark.slow
@pytest.mark.parametrize("case", ["2-bf16", "3-fp32", "3-bf16"])
def test_temperature_cap_keeps_its_gradient_under_zero(two_processes, case: str) -> None:
    for r in two_processes:
        _check_bounds(r[f"bounds {case}"])


def _check_bounds(r: dict[str, object]) -> None:
    up, down = r["up"], r["down"]
    # The cap holds in the forward (bf16 rounds the log-scale: the cap is within its ulp)...
    assert max(up) <= CAP * 1.02 and up[-1] == pytest.approx(CAP, rel=0.02), up
    # ... because the parameter itself is clamped, in the master copy too: it stays at log 5
    # (with a clamp in the forward only, Adam would carry it past, with zero gradient).
    assert r["raw_at_cap"] <= math.log(CAP) + 0.01, r
    # The gradient is live at the cap: mismatched pairs pull the scale back below it.
    assert down[-1] < 0.7 * CAP, down
    assert all(a >= b for a, b in zip(down, down[1:])), down


# ----------------------------------------------------------------------------- clipping, dtypes


def _clip_worker(rank: int, world: int, stage: int = 0) -> dict[str, float]:
    cfg = engine_cfg(stage)
    task = make_task(cfg.model)
    ref = copy.deepcopy(task)
    batch = batch_for(rank)
    ref.loss_from(ref.embed(batch))[0].backward()
    grads = {n: p.grad.clone() for n, p in ref.named_parameters()}
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values())).item()
    # AdamW's first step is -lr * g / (|g| + eps); with lr = eps = 1e4 that is nearly -g, so
    # a missing or wrong clip (1/4 here) could not hide in the normalisation.
    cfg.optim.eps = cfg.optim.lr = 1e4
    cfg.train.grad_clip = norm / 4
    engine = make_engine(task, cfg)
    before = full_params(engine)
    metrics = engine.train_step(batch)
    after = full_params(engine)
    delta = {k.removeprefix("model."): after[k] - before[k] for k in after}
    coef = cfg.train.grad_clip / (norm + 1e-6)
    want = {
        k.removeprefix("model."): -1e4 * g * coef / (g.abs() * coef + 1e4) for k, g in grads.items()
    }
    return {"norm": norm, "reported": metrics["grad_norm"], "diff": max_diff(delta, want)}


@pytest.mark.multiproc
@pytest.mark.parametrize("stage", [0, 1, 2])
def test_gradient_clipping_scales_the_step(one_process, stage: int) -> None:
    r = one_process[f"clip zero{stage}"]
    assert r["reported"] == pytest.approx(r["norm"], rel=1e-6)  # the norm before clipping
    assert r["diff"] < 1e-6, r


def _precision_worker(rank: int, world: int, precision: str) -> list[dict[str, float]]:
    cfg = engine_cfg(2, precision=precision, accum_chunks=2)
    cfg.optim = OptimConfig(lr=1e-3)
    engine = make_engine(make_task(cfg.model), cfg)
    return [engine.train_step(batch_for(rank, i)) for i in range(3)]


@pytest.mark.multiproc
@pytest.mark.parametrize(
    "precision", ["bf16", pytest.param("fp16", marks=pytest.mark.skipif(not FP16, reason=NO_FP16))]
)
def test_half_precisions_train(one_process, precision: str) -> None:
    steps = one_process[precision]
    assert all(math.isfinite(m["loss"]) for m in steps)
    applied = [m for m in steps if "grad_norm" in m]
    if precision == "bf16":
        assert len(applied) == 3
    else:  # the dynamic loss scale starts at 2**16 and may skip the first steps on overflow
        assert all("skipped_step" in m for m in steps if m not in applied)


# ----------------------------------------------------------------------------- precision policy


def _policy_worker(rank: int, world: int) -> dict[str, object]:
    """The same model, batches and seed in fp32 and in bf16 (ZeRO-2): dtypes at the model ->
    loss boundary, the DeepSpeed entries, and the two loss curves."""
    out: dict[str, object] = {}
    for precision in ("fp32", "bf16"):
        cfg = engine_cfg(2, precision=precision)
        cfg.optim = OptimConfig(lr=2e-3)
        engine = make_engine(make_task(cfg.model), cfg)
        engine.ds.eval()
        with torch.no_grad():
            emb = engine.ds(batch_for(rank), embed_only=True)
        out[precision] = {
            "dtypes": {k: str(v.dtype) for k, v in emb.items()},
            "tower_dtype": str(engine.module.compute_dtype),
            "comm": engine.ds_config.get("communication_data_type"),
            "losses": [engine.train_step(batch_for(rank, i))["loss"] for i in range(8)],
        }
    return out


@pytest.mark.multiproc
def test_precision_policy_fp32_at_the_loss_and_bf16_tracks_fp32(one_process) -> None:
    fp32, bf16 = one_process["policy"]["fp32"], one_process["policy"]["bf16"]
    assert bf16["tower_dtype"] == "torch.bfloat16"  # the towers compute in bf16 ...
    # ... normalization and temperature in fp32, so the loss gets fp32 inputs.
    assert set(bf16["dtypes"].values()) == {"torch.float32"}, bf16["dtypes"]
    assert bf16["comm"] == "fp32" and fp32["comm"] is None  # gradients reduced in fp32
    # The stated bound: bf16's loss within 0.05 of fp32's at every one of 8 steps (the loss is
    # ~log(8) = 2.1 here), while both train (the curve moves by more than that).
    diffs = [abs(a - b) for a, b in zip(fp32["losses"], bf16["losses"])]
    assert max(diffs) < 0.05, (fp32["losses"], bf16["losses"])
    assert fp32["losses"][0] - min(fp32["losses"]) > 0.05, fp32["losses"]


def _ds_config_worker() -> dict[str, object]:
    from clipforge.engine import precision
    from clipforge.engine.deepspeed import build_ds_config

    # As on an H100 (bf16 present), whatever GPU this machine has, if any.
    cpu_supports = precision.supports
    precision.supports = lambda p, d: d.type == "cuda" or cpu_supports(p, d)
    cfg = engine_cfg(2, precision="auto")
    return {device: build_ds_config(cfg, 8, torch.device(device)) for device in ("cpu", "cuda")} | {
        "bf16 compute": build_ds_config(
            engine_cfg(2, precision="bf16", grad_reduce_dtype="compute"), 8
        )
    }


@pytest.mark.multiproc
def test_deepspeed_dict_follows_the_device(one_process) -> None:
    r = one_process["ds_config"]
    gpu, cpu = r["cuda"], r["cpu"]
    # auto: bf16 on a GPU with bf16, fp32 on CPU; gradients reduced in fp32.
    assert gpu["bf16"]["enabled"] and gpu["communication_data_type"] == "fp32"
    assert not cpu["bf16"]["enabled"] and not cpu["fp16"]["enabled"]
    assert "communication_data_type" not in cpu
    assert gpu["zero_optimization"]["overlap_comm"] is True
    assert cpu["zero_optimization"]["overlap_comm"] is False
    assert gpu["zero_optimization"]["reduce_bucket_size"] == int(5e8)
    assert r["bf16 compute"]["communication_data_type"] == "bf16"


def test_tf32_for_fp32_matmuls_on_gpus_only() -> None:
    from clipforge.engine.precision import setup_matmul

    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        setup_matmul(torch.device("cpu"), True)
        assert not torch.backends.cuda.matmul.allow_tf32
        setup_matmul(torch.device("cuda", 0), True)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def _export_worker(rank: int, world: int, stage: int, precision: str) -> dict[str, object]:
    cfg = engine_cfg(stage, precision=precision)
    cfg.optim = OptimConfig(lr=1e-3)
    engine = make_engine(make_task(cfg.model), cfg)
    for i in range(3):
        engine.train_step(batch_for(rank, i))
    sd = engine.fp32_state_dict()  # every rank: a collective under ZeRO 1-3
    module = full_params(engine)
    lp_dtype = next(engine.module.parameters()).dtype
    return {
        "keys": sorted(sd) == sorted(engine.module.state_dict()),
        "dtypes": {str(v.dtype) for v in sd.values()},
        # float32 values whose low 16 mantissa bits are all zero: bf16 values upcast
        "upcast_only": all(
            bool((v.view(torch.int32) & 0xFFFF).eq(0).all()) for k, v in sd.items() if k in module
        ),
        # The module's (low-precision) weights are the export rounded to their dtype.
        "rounds_to_module": max(
            (sd[k].to(lp_dtype).float() - module[k]).abs().max().item() for k in module
        ),
        "moved": max(
            (sd[k] - v).abs().max().item()
            for k, v in make_task(cfg.model).state_dict().items()
            if k in sd
        ),
    }


@pytest.mark.multiproc
@pytest.mark.parametrize("case", ["0-bf16", "0-fp32"])
def test_export_is_the_fp32_master(one_process, case: str) -> None:
    _check_export(one_process[f"export {case}"], case)


@pytest.mark.multiproc
@pytest.mark.slow
@pytest.mark.parametrize("case", ["2-bf16", "3-fp32", "3-bf16"])
def test_export_is_the_fp32_master_under_zero(two_processes, case: str) -> None:
    for r in two_processes:
        _check_export(r[f"export {case}"], case)


def _check_export(r: dict[str, object], case: str) -> None:
    assert r["keys"] and r["dtypes"] == {"torch.float32"}, r
    assert r["rounds_to_module"] == 0.0, r
    assert r["moved"] > 1e-4, r  # trained weights, not the initial ones
    if case.endswith("bf16"):
        assert not r["upcast_only"], "exported the bf16 module upcast, not the fp32 master"


# ----------------------------------------------------------------------------- checkpoints


def _resume_worker(rank: int, world: int, stage: int, precision: str, ckpt_dir: str) -> dict:
    """Train 4 steps saving at 2; a fresh engine loads step 2 and redoes steps 3-4."""
    from pathlib import Path

    cfg = engine_cfg(stage, precision=precision)
    # fp16's dynamic loss scale would skip the first steps (and their lr updates) from 2**16.
    cfg.deepspeed["fp16"] = {"initial_scale_power": 4}
    cfg.train.steps = 6
    cfg.optim = OptimConfig(lr=1e-3)
    cfg.sched = SchedConfig(warmup_steps=2, min_lr_ratio=0.1)
    loads = []
    original = torch.load

    def spy(*args, **kwargs):
        loads.append(kwargs.get("weights_only"))
        return original(*args, **kwargs)

    run = []
    engine = make_engine(make_task(cfg.model), cfg)
    for i in range(4):
        if i == 2:
            engine.save(Path(ckpt_dir), "step_00000002", {"step": 2})
        run.append(engine.train_step(batch_for(rank, i)))
    resumed = make_engine(make_task(cfg.model, seed=1), cfg)  # other init: the load must win
    torch.load = spy
    try:
        resumed.load(Path(ckpt_dir), "step_00000002")
    finally:
        torch.load = original
    lr_after_load = resumed.scheduler.get_last_lr()[0]
    again = [resumed.train_step(batch_for(rank, i)) for i in (2, 3)]
    return {"run": run, "again": again, "lr_after_load": lr_after_load, "loads": loads}


@pytest.mark.multiproc
@pytest.mark.parametrize(
    "stage,precision",
    [
        pytest.param(*c, marks=pytest.mark.skipif(c[1] == "fp16" and not FP16, reason=NO_FP16))
        for c in RESUME_CASES
    ],
)
def test_resume_restores_scheduler_and_optimizer(one_process, stage: int, precision: str) -> None:
    r = one_process[f"resume {stage}-{precision}"]
    run, again = r["run"], r["again"]
    assert r["lr_after_load"] == pytest.approx(run[2]["lr"])  # the next step's, as saved
    for want, got in zip(run[2:], again):
        assert got["lr"] == pytest.approx(want["lr"], rel=1e-12)
        assert got["loss"] == pytest.approx(want["loss"], abs=1e-6)
    assert run[3]["lr"] != run[2]["lr"]  # the schedule moves, so equal lrs mean restored state
    # Every file DeepSpeed read went through torch.load(weights_only=True).
    assert r["loads"] and all(w is True for w in r["loads"]), r["loads"]


# ----------------------------------------------------------------------------- compile


def _compile_worker(rank: int, world: int) -> dict[str, object]:
    """ZeRO-2, eager against compiled, whole batch and GradCache (K=2): the same losses."""
    out: dict[str, object] = {}
    for name, train in (
        ("eager", {}),
        ("compiled", {"compile": True}),
        ("eager gradcache", {"accum_chunks": 2}),
        ("compiled gradcache", {"compile": True, "accum_chunks": 2}),
    ):
        cfg = engine_cfg(2, **train)
        cfg.optim = OptimConfig(lr=1e-3)
        engine = make_engine(make_task(cfg.model), cfg)
        losses = [engine.train_step(batch_for(rank, i))["loss"] for i in range(3)]
        out[name] = {"losses": losses, "compiled": engine.ds.is_compiled}
    return out


def _compiler_missing() -> str | None:
    import shutil

    if not any(shutil.which(c) for c in ("cc", "gcc", "clang", os.environ.get("CXX", "g++"))):
        return "torch.compile (inductor) needs a C/C++ compiler on CPU; none found"
    return None


@pytest.mark.multiproc
@pytest.mark.slow
def test_compile_under_zero2_matches_eager() -> None:
    reason = _compiler_missing()
    if reason:
        pytest.skip(reason)
    for r in run_distributed(_compile_worker, 2, timeout=600):
        # Compiled through DeepSpeed's engine.compile(), after initialize.
        assert r["compiled"]["compiled"] and r["compiled gradcache"]["compiled"]
        assert not r["eager"]["compiled"]
        for mode in ("", " gradcache"):
            eager, compiled = r[f"eager{mode}"]["losses"], r[f"compiled{mode}"]["losses"]
            assert compiled == pytest.approx(eager, abs=1e-4), (mode, eager, compiled)
            assert eager[0] != eager[-1]  # the steps moved the weights


# -- ZeRO-1/2 alone: DeepSpeed's gradient reduction is skipped (engine/deepspeed.py) --------------
LONE_CASES = [(2, "fp32", 1, "gradcache"), (2, "fp32", 2, "plain"), (1, "bf16", 2, "gradcache")]


def _lone_reduction_worker(rank: int, world: int) -> dict[str, object]:
    """Three steps per case, with the engine's skip of the one-process reduction and with
    DeepSpeed's own path (the skip switched off), from the same weights and dropout draws."""
    import clipforge.engine.deepspeed as eds

    out: dict[str, object] = {}
    skip = eds._skip_lone_zero12_reduction
    for case in LONE_CASES:
        stage, precision, chunks, mode = case
        for name in ("skip", "deepspeed"):
            eds._skip_lone_zero12_reduction = skip if name == "skip" else (lambda opt: False)
            try:
                cfg = engine_cfg(stage, precision=precision, accum_chunks=chunks, accum_mode=mode)
                cfg.train.grad_clip = 0.5  # clipping active: the step reads the global norm
                engine = make_engine(make_task(tiny_model_cfg(dropout=True)), cfg)
            finally:
                eds._skip_lone_zero12_reduction = skip
            overridden = "reduce_independent_p_g_buckets_and_remove_grads" in vars(engine.optimizer)
            metrics = []
            for i in range(3):
                torch.manual_seed(100 + i)
                metrics.append(engine.train_step(batch_for(rank, i)))
            out[f"{case} {name}"] = {
                "overridden": overridden,
                "metrics": metrics,
                "params": full_params(engine),
            }
    return out


@pytest.mark.multiproc
def test_lone_zero12_skips_reduction_with_identical_results() -> None:
    r = run_distributed(_lone_reduction_worker, 1, timeout=600)[0]
    for case in LONE_CASES:
        skip, ds = r[f"{case} skip"], r[f"{case} deepspeed"]
        assert skip["overridden"] and not ds["overridden"], case
        # Bit for bit: every pass the skip removes reproduced its input exactly.
        assert skip["metrics"] == ds["metrics"], case
        for name, value in ds["params"].items():
            assert torch.equal(skip["params"][name], value), (case, name)
        assert "grad_norm" in skip["metrics"][-1], case


def _two_rank_reduction_worker(rank: int, world: int) -> dict[str, object]:
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    engine = make_engine(make_task(tiny_model_cfg()), engine_cfg(2))
    opt = engine.optimizer
    # One backward: DeepSpeed has reduced and partitioned the gradients; compare the global
    # norm ours computes with DeepSpeed's float64 one on the same partitions.
    engine.ds.backward(engine.ds(batch_for(rank))[0])
    groups = range(len(opt.bit16_groups))
    args = [(opt.averaged_gradients[i], opt.params_in_partition[i]) for i in groups]
    return {
        "own reduction": "reduce_independent_p_g_buckets_and_remove_grads" in vars(opt),
        "own norm": "get_grad_norm_direct" in vars(opt),
        "norms": [opt.get_grad_norm_direct(*a).item() for a in args],
        "deepspeed norms": [
            DeepSpeedZeroOptimizer.get_grad_norm_direct(opt, *a).item() for a in args
        ],
        "partition": sum(t.numel() for grads, _ in args for t in grads),
    }


@pytest.mark.multiproc
def test_zero2_with_two_ranks_keeps_deepspeeds_reduction_and_global_norm() -> None:
    """With two ranks DeepSpeed's own gradient reduction stays; the gradient norm is ours
    (engine._grad_norm_without_fp64_copies) and equals DeepSpeed's float64 one, on each rank's
    half of the partition, summed over both."""
    ranks = run_distributed(_two_rank_reduction_worker, 2, timeout=600)
    assert [r["own reduction"] for r in ranks] == [False, False]
    assert [r["own norm"] for r in ranks] == [True, True]
    assert ranks[0]["partition"] > 0 and ranks[1]["partition"] > 0
    for r in ranks:
        assert r["norms"] == pytest.approx(r["deepspeed norms"], rel=1e-6), r
        assert r["norms"] == pytest.approx(ranks[0]["norms"], rel=1e-7), ranks


def test_sum_of_squares_keeps_float64_accuracy_without_float64_copies() -> None:
    """The gradient norm's sum (engine/deepspeed.py): one fp32 norm over a CLIP-sized token
    embedding gradient (49,408 x 512 here) is off by ~1e-4 on CPU; the chunked sum is not."""
    from clipforge.engine.deepspeed import sum_of_squares

    g = torch.Generator().manual_seed(0)
    grads = [
        torch.randn(49408, 512, generator=g) * 1e-3,  # a multiple of the chunk
        torch.randn(4097, generator=g),  # one chunk and one element
        torch.randn(3, 5, generator=g).t(),  # shorter than a chunk, not contiguous
        torch.zeros(0),
    ]
    want = sum((t.double() ** 2).sum() for t in grads)
    got = sum_of_squares(grads)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(want.item(), rel=1e-7)
    plain = sum(torch.linalg.vector_norm(t).double() ** 2 for t in grads)
    assert abs(plain.item() / want.item() - 1) > 10 * abs(got.item() / want.item() - 1)
    assert sum_of_squares([]).item() == 0.0
    bf16 = [t.bfloat16() for t in grads[:2]]
    want16 = sum((t.double() ** 2).sum() for t in bf16)
    assert sum_of_squares(bf16).item() == pytest.approx(want16.item(), rel=1e-5)
