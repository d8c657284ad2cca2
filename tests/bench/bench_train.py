"""Training throughput: our trainer vs open_clip 3.3.0's, same model, batch, data kind, threads.

    .venv/bin/python -m pytest -q -s tests/bench/bench_train.py   # writes docs/benchmarks.md
    .venv/bin/python tests/bench/bench_train.py                   # prints only
    BENCH_TRAIN_STEPS=8 BENCH_TRAIN_ROUNDS=1 .venv/bin/python tests/bench/bench_train.py  # quick

Both trainers run as ONE process (ours: DeepSpeed ZeRO-2, the default; BENCH_TRAIN_ZERO) with
the same torch threads (OMP_NUM_THREADS=BENCH_THREADS, default 2), fp32, batch BENCH_TRAIN_BATCH
(default 128), synthetic data made in the training process (ours: data.synthetic=true, tensors; open_clip: --dataset-type synthetic --workers 0,
one blank image through its PIL preprocessing and one tokenized caption per sample), AdamW with
the same hyper-parameters and clipping at norm 1, every step logged.

The model is conf/model/tiny.yaml with CLIP's 49,408-token vocabulary (open_clip's synthetic
captions use its BPE tokenizer): ViT 4 x 128 on 32 px with 4 px patches, text 4 x 128 over 32
tokens, embed 128; open_clip builds it from the config clipforge.export writes for it, so the
two are the same architecture by construction (tests/test_export.py checks the mapping).

Step time: each trainer logs every step (ours RUN_DIR/metrics.jsonl samples_per_s, open_clip
"Batch (t)"; both measure wall time from the end of one step to the end of the next, data and
logging included; each also logs the step's data time, giving a second, data-excluded figure).
The first BENCH_TRAIN_WARMUP steps are dropped; a round's figure is the median of the rest; rounds alternate ours / theirs, and each side's best round counts
(the machine is shared, its load varies by the minute).

Because wall-clock rounds on this shared 2-core machine differ up to 10x by the minute, the
bench also measures CPU seconds per step in one process with one thread (both models, the
same batch, steps interleaved, min of BENCH_TRAIN_CPU_REPEATS): time other jobs take is not
counted there. The target (ours >= 1.15x open_clip) is asserted on that figure for the DEFAULT
path: the engine as `clipforge.train` builds it from conf/train.yaml (ZeRO-2), reading its
metrics back at logging steps only, as the training loop does. That figure is taken with this
machine's own kernels and, on an AVX-512 machine, again with torch's kernels, MKL and oneDNN
held to AVX2 (ATEN_CPU_CAPABILITY, MKL_ENABLE_INSTRUCTIONS, ONEDNN_MAX_CPU_ISA): the slower
AVX2-only machines the target must hold on too; the lower of the two is asserted.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from unittest import mock

import torch
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[2]
BENCH = Path(os.environ.get("BENCH_DIR", REPO / ".bench"))
WORK = BENCH / "train"
DOC = REPO / "docs" / "benchmarks.md"
OC_VENV = BENCH / "openclip-venv"  # shared with bench_cifar.py

BATCH = int(os.environ.get("BENCH_TRAIN_BATCH", "128"))
STEPS = int(os.environ.get("BENCH_TRAIN_STEPS", "14"))
WARMUP = int(os.environ.get("BENCH_TRAIN_WARMUP", "4"))
ROUNDS = int(os.environ.get("BENCH_TRAIN_ROUNDS", "2"))
THREADS = int(os.environ.get("BENCH_THREADS", "2"))
# The wall-clock runs use `clipforge.train`'s default ZeRO stage (conf/train.yaml: zero2) unless
# told otherwise; the CPU-time target is asserted on the default path (DEFAULT_ROW).
ZERO = int(os.environ.get("BENCH_TRAIN_ZERO", "2"))
DEFAULT_ROW = "clipforge: Engine step, default path (ZeRO-2, as clipforge.train builds it)"
FWD_BWD_ROW = "clipforge: forward + backward"
FULL_ROW = "clipforge: forward + backward, every token through the last blocks (as open_clip)"
OC_ROW = "open_clip: trainer step (+ clip, default AdamW)"
OC_FWD_BWD_ROW = "open_clip: forward + backward"
OURS_STEP_ALONE = "ours, step alone"  # not table rows: DeepSpeed's step() inside DEFAULT_ROW
THEIR_STEP_ALONE = "theirs, step alone"  # and clip_grad_norm_ + AdamW inside OC_ROW
# The CPU-time table is measured on this machine's own instruction set and, where that is
# AVX-512, again with torch's kernels, MKL and oneDNN held to AVX2: the slower 2-core AVX2
# machines this bench must also pass on (BENCH_TRAIN_ISAS="native" skips the second).
AVX2_ENV = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
}
ISAS = os.environ.get("BENCH_TRAIN_ISAS", "native,avx2").split(",")
NATIVE = torch.backends.cpu.get_cpu_capability().lower()  # "avx512", "avx2", "default", ...
VOCAB = 49408
TARGET = 1.15  # ours / open_clip samples per second (per CPU second, see the test)
# The same hyper-parameters on both sides (ours: conf defaults + smoke_cpu's 1 warmup step).
LR, WD, BETAS, EPS, CLIP = 5e-4, 0.2, (0.9, 0.98), 1e-6, 1.0


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS), MKL_NUM_THREADS=str(THREADS))
    env.update(HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", WANDB_MODE="disabled")
    return env


def _sh(cmd: list[str], log: Path, cwd: Path = REPO) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as f:
        proc = subprocess.run(cmd, cwd=cwd, env=_env(), stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed; log: {log}\n{log.read_text()[-3000:]}")


def openclip_python() -> Path:
    """open_clip's trainer needs webdataset 0.2.86 (1.0.x crashes it with KeyError 'fname'):
    a venv of its own under .bench/, seeing the rest (torch, open_clip, pandas) of our venv
    through a .pth file placed after its own site-packages."""
    py = OC_VENV / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(OC_VENV)], check=True)
        ours = next(Path(sys.prefix, "lib").glob("python3*/site-packages"))
        theirs = next((OC_VENV / "lib").glob("python3*/site-packages"))
        (theirs / "zz_clipforge_venv.pth").write_text(str(ours) + "\n")
        pip = [str(py), "-m", "pip", "install", "-q", "--no-deps"]
        subprocess.run([*pip, "webdataset==0.2.86", "open-clip-torch==3.3.0"], check=True)
    return py


def model_cfg():
    from clipforge.config import ModelConfig

    merged = OmegaConf.merge(
        OmegaConf.structured(ModelConfig), OmegaConf.load(REPO / "conf/model/tiny.yaml")
    )
    cfg = OmegaConf.to_object(merged)
    cfg.text.vocab_size = VOCAB
    return cfg


def openclip_model_dir() -> Path:
    from clipforge.export import open_clip_model_cfg

    folder = WORK / "openclip-model"
    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": open_clip_model_cfg(model_cfg(), eos_id=None), "preprocess_cfg": {}}
    (folder / "open_clip_config.json").write_text(json.dumps(config, indent=1))
    return folder


def run_ours(name: str) -> list[tuple[float, float]]:
    """(step time, data time) of every step, in seconds."""
    run = WORK / name
    shutil.rmtree(run, ignore_errors=True)
    _sh(
        [
            sys.executable, "-m", "clipforge.train", f"run_dir={run}", "experiment=smoke_cpu",
            f"model.text.vocab_size={VOCAB}", f"train.batch_size={BATCH}",
            f"train.steps={STEPS}", "train.log_every=1", "checkpoint.every=0",
            f"deepspeed=zero{ZERO}",
            f"optim.lr={LR}", f"optim.weight_decay={WD}", f"train.grad_clip={CLIP}",
        ],
        WORK / f"{name}.log",
    )  # fmt: skip
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [BATCH / r["samples_per_s"] for r in rows]
    return [(t, t * r["data_wait_frac"]) for t, r in zip(steps, rows)]


def run_openclip(name: str) -> list[tuple[float, float]]:
    """(step time, data time) of every step, in seconds."""
    logs = WORK / "openclip-logs"
    shutil.rmtree(logs / name, ignore_errors=True)
    log = WORK / f"{name}.log"
    _sh(
        [
            str(openclip_python()), "-m", "open_clip_train.main",
            "--dataset-type", "synthetic", "--train-data", "synthetic",
            "--train-num-samples", str(STEPS * BATCH), "--epochs", "1",
            "--batch-size", str(BATCH), "--workers", "0",
            "--model", f"local-dir:{openclip_model_dir()}", "--precision", "fp32",
            "--lr", str(LR), "--wd", str(WD), "--beta1", str(BETAS[0]), "--beta2", str(BETAS[1]),
            "--eps", str(EPS), "--grad-clip-norm", str(CLIP), "--warmup", "1",
            "--log-every-n-steps", "1", "--report-to", "none", "--save-frequency", "0",
            "--logs", str(logs), "--name", name, "--device", "cpu", "--seed", "0",
        ],
        log,
        cwd=WORK,
    )  # fmt: skip
    # Logged every step, its meters are reset after each line: the step's own times.
    found = re.findall(r"Data \(t\): ([0-9.]+) Batch \(t\): ([0-9.]+)", log.read_text())
    return [(float(batch), float(data)) for data, batch in found]


def measure() -> dict[str, list[tuple[float, float]]]:
    """Per system, per round: (median step time, median step time without data), seconds."""
    WORK.mkdir(parents=True, exist_ok=True)
    rounds: dict[str, list[tuple[float, float]]] = {"ours": [], "open_clip": []}
    for r in range(ROUNDS):
        for system, fn in (("ours", run_ours), ("open_clip", run_openclip)):
            times = fn(f"{system}-{r}")[WARMUP:STEPS]
            assert len(times) == STEPS - WARMUP, f"{system}: {len(times)} timed steps"
            total = statistics.median(t for t, _ in times)
            compute = statistics.median(t - d for t, d in times)
            rounds[system].append((total, compute))
            print(f"round {r} {system}: median step {total:.3f} s, {compute:.3f} s without data")
    return rounds


CPU_REPEATS = int(os.environ.get("BENCH_TRAIN_CPU_REPEATS", "8"))


def _cpu_worker(rank: int, world: int, model_dir: str) -> dict[str, float]:
    """Single-thread CPU seconds per step (min of CPU_REPEATS), both sides in one process:
    process time does not count the time other jobs of a shared machine hold the core."""
    import time

    import open_clip
    from open_clip.loss import ClipLoss

    from clipforge.config import Config, OptimConfig, TrainLoopConfig
    from clipforge.data.synthetic import SyntheticLoader
    from clipforge.engine import dist
    from clipforge.engine.deepspeed import Engine
    from clipforge.engine.optim import build_optimizer
    from clipforge.loss import ContrastiveLoss
    from clipforge.model import build_model
    from clipforge.task import ContrastiveTask

    batch = SyntheticLoader(BATCH, 32, 32, VOCAB, 0, 0).make_batch(0)
    optim = OptimConfig(lr=LR, weight_decay=WD, beta1=BETAS[0], beta2=BETAS[1], eps=EPS)
    steps = {}

    def new_task() -> ContrastiveTask:
        torch.manual_seed(0)
        return ContrastiveTask(build_model(model_cfg()), ContrastiveLoss()).train()

    task = new_task()
    opt = build_optimizer(task, optim)

    def ours_fwd_bwd() -> None:
        task.zero_grad(set_to_none=True)
        task(batch)[0].backward()

    def ours_plain() -> None:
        ours_fwd_bwd()
        torch.nn.utils.clip_grad_norm_(task.parameters(), CLIP)
        opt.step()

    full_task = new_task()  # every token through the last block of each tower, as open_clip
    full_task.model.visual.last_block_pooled_only = False
    full_task.model.text.last_block_pooled_only = False

    def ours_full_fwd_bwd() -> None:
        full_task.zero_grad(set_to_none=True)
        full_task(batch)[0].backward()

    steps[FULL_ROW] = ours_full_fwd_bwd
    steps[FWD_BWD_ROW] = ours_fwd_bwd
    steps["clipforge: plain torch step (+ clip, fused AdamW)"] = ours_plain
    for stage in (0, 2):
        cfg = Config(
            model=model_cfg(),
            optim=optim,
            train=TrainLoopConfig(batch_size=BATCH, grad_clip=CLIP),
            deepspeed={"zero_optimization": {"stage": stage}},
        )
        engine = Engine(new_task(), cfg, dist.setup())
        steps[f"clipforge: Engine step, ZeRO-{stage}"] = lambda e=engine: e.train_step(batch)
    default = default_engine()
    sync = default.cfg.train.log_every  # the loop reads metrics back at logging steps only
    counter = iter(range(1, 10**9))
    steps[DEFAULT_ROW] = lambda: default.train_step(batch, sync=next(counter) % sync == 0)
    # The optimizer step alone on each side, timed inside the full steps above (a difference
    # of two rows' minima would carry both rows' noise).
    alone: dict[str, list[float]] = {OURS_STEP_ALONE: [], THEIR_STEP_ALONE: []}
    ds_step = default.ds.step

    def timed_ds_step(*args, **kwargs):
        t0 = time.process_time()
        ds_step(*args, **kwargs)
        alone[OURS_STEP_ALONE].append(time.process_time() - t0)

    default.ds.step = timed_ds_step

    theirs = open_clip.create_model(f"local-dir:{model_dir}")
    theirs.output_dict = True
    theirs.train()
    clip_loss = ClipLoss()
    their_opt = torch.optim.AdamW(theirs.parameters(), lr=LR, betas=BETAS, eps=EPS)

    def oc_fwd_bwd() -> None:
        theirs.zero_grad(set_to_none=True)
        clip_loss(**theirs(batch["image"], batch["text"])).backward()

    def oc_step() -> None:  # open_clip_train's step: default AdamW, clip_grad_norm_
        oc_fwd_bwd()
        t0 = time.process_time()
        torch.nn.utils.clip_grad_norm_(theirs.parameters(), CLIP)
        their_opt.step()
        alone[THEIR_STEP_ALONE].append(time.process_time() - t0)

    steps[OC_FWD_BWD_ROW] = oc_fwd_bwd
    steps[OC_ROW] = oc_step
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(CPU_REPEATS):  # interleaved, so a slow minute hits every row alike
        for name, fn in steps.items():
            t0 = time.process_time()
            fn()
            times[name].append(time.process_time() - t0)
    return {k: min(v) for k, v in {**times, **alone}.items()}


def default_engine():
    """The engine as `clipforge.train` builds it from conf/train.yaml's defaults (deepspeed=zero2,
    precision auto, clipping at 1, model tiny, loss clip), overriding only what this bench sets
    for both trainers: batch, vocabulary, optimizer hyper-parameters, synthetic data."""
    from hydra import compose, initialize_config_dir

    from clipforge import train
    from clipforge.config import register, validate
    from clipforge.engine import dist, precision
    from clipforge.loss import build_loss
    from clipforge.model import build_model
    from clipforge.task import ContrastiveTask

    register()
    overrides = [
        f"train.batch_size={BATCH}", f"model.text.vocab_size={VOCAB}", "data.synthetic=true",
        f"optim.lr={LR}", f"optim.weight_decay={WD}", f"train.grad_clip={CLIP}",
        f"optim.beta1={BETAS[0]}", f"optim.beta2={BETAS[1]}", f"optim.eps={EPS}",
    ]  # fmt: skip
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = OmegaConf.to_object(compose(config_name="train", overrides=overrides))
    info = dist.setup()
    validate(cfg, info.world_size, info.device)
    cfg.train.precision = precision.resolve(cfg.train.precision, info.device)  # as train.run
    assert cfg.deepspeed["zero_optimization"]["stage"] == 2, "the default stage moved"
    torch.manual_seed(0)
    task = ContrastiveTask(build_model(cfg.model), build_loss(cfg.loss)).train()
    return train.dist_engine(task, cfg, info)


def measure_cpu() -> dict[str, dict[str, float]]:
    """{instruction set the kernels ran with: {row: CPU s}}, one spawned process per set."""
    sys.path.insert(0, str(REPO / "tests"))
    from dist_utils import run_distributed  # one thread per process, gloo group of one

    out = {}
    for isa in ISAS:
        if isa == "avx2" and NATIVE != "avx512":
            continue  # an AVX2 machine: "native" already is what this pass holds the kernels to
        # The spawned process's torch, MKL and oneDNN read these at start-up.
        with mock.patch.dict(os.environ, AVX2_ENV if isa == "avx2" else {}):
            model_dir = str(openclip_model_dir())
            rows = run_distributed(_cpu_worker, 1, model_dir, timeout=1200)[0]
        out[NATIVE if isa == "native" else isa] = rows
    return out


def _cpu_table(isa: str, cpu: dict[str, float]) -> list[str]:
    cpu = dict(cpu)
    ours_alone, theirs_alone = cpu.pop(OURS_STEP_ALONE), cpu.pop(THEIR_STEP_ALONE)
    their_step = cpu[OC_ROW]
    label = (
        "this machine's own"
        if isa == NATIVE
        else "held to AVX2 (`" + " ".join(f"{k}={v}" for k, v in AVX2_ENV.items()) + "`)"
    )
    return [
        f"Kernels {isa.upper()}, {label}: **{their_step / cpu[DEFAULT_ROW]:.2f}x** on the "
        "default path.",
        "",
        "| step | CPU s | open_clip trainer step / this |",
        "| --- | ---: | ---: |",
        *(f"| {name} | {t:.3f} | {their_step / t:.2f}x |" for name, t in cpu.items()),
        "",
        "The optimizer step alone, timed inside those steps: ours (the default path's "
        f"DeepSpeed ZeRO-2 step: norm, clip, fused AdamW, flat-buffer copies) {ours_alone:.3f} s, "
        f"open_clip's trainer (clip_grad_norm_ + AdamW) {theirs_alone:.3f} s.",
        "",
    ]


def render(
    rounds: dict[str, list[tuple[float, float]]], cpus: dict[str, dict[str, float]]
) -> tuple[str, float]:
    ours, theirs = (BATCH / min(t for t, _ in rounds[k]) for k in ("ours", "open_clip"))
    ours_c, theirs_c = (BATCH / min(c for _, c in rounds[k]) for k in ("ours", "open_clip"))
    ratio = ours / theirs
    per_round = "; ".join(
        f"{k} [{', '.join(f'{BATCH / t:.1f}' for t, _ in v)}]" for k, v in rounds.items()
    )
    ratios = {isa.lower(): cpu[OC_ROW] / cpu[DEFAULT_ROW] for isa, cpu in cpus.items()}
    cpu_ratio = min(ratios.values())
    headline = ", ".join(f"{r:.2f}x with {isa.upper()} kernels" for isa, r in ratios.items())
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    block = "\n".join(
        [
            "<!-- trainer:begin -->",
            "Written by `make bench` (`tests/bench/bench_train.py`); figures from a shared "
            "machine are noisy: wall-clock rounds alternate and each side's best counts, and "
            "a second table counts CPU time, which other jobs do not inflate.",
            "",
            f"**Headline: {cpu_ratio:.2f}x** open_clip's training step throughput by CPU time "
            "per step (our engine on its default path, ZeRO-2 as `clipforge.train` builds it, "
            f"vs open_clip_train's step; {headline}); "
            f"wall clock in this run: {ratio:.2f}x (best rounds, see the caveat below the "
            "table).",
            "",
            f"Training samples/s, one process each with {THREADS} torch threads, fp32, batch "
            f"{BATCH}, synthetic data made in the training process, the same tiny CLIP "
            "(conf/model/tiny.yaml: ViT 4x128 on 32 px, 4 px patches; text 4x128, 32 tokens; "
            "vocabulary 49,408; open_clip builds it from the config `clipforge.export` "
            "writes), AdamW (lr 5e-4, wd 0.2, betas 0.9/0.98, eps 1e-6), clipping at 1. "
            f"Median step time of steps {WARMUP + 1}-{STEPS} (per-step logging included), best "
            "of the alternating rounds; the data-excluded column subtracts each step's logged "
            "data time (open_clip preprocesses its synthetic samples with PIL, ~35 ms a step "
            "here; ours makes tensors, ~4 ms).",
            "",
            "| trainer | samples/s | ratio | samples/s, data time excluded | ratio |",
            "| --- | ---: | ---: | ---: | ---: |",
            f"| clipforge (DeepSpeed ZeRO-{ZERO}, 1 process) | {ours:.1f} | {ratio:.2f}x "
            f"| {ours_c:.1f} | {ours_c / theirs_c:.2f}x |",
            f"| open_clip 3.3.0 (`open_clip_train.main`, 1 process) | {theirs:.1f} | 1.00x "
            f"| {theirs_c:.1f} | 1.00x |",
            "",
            f"All rounds (samples/s): {per_round}. Load average (1, 5, 15 min) at the end: "
            f"{load}; our best step took {BATCH / ours:.2f} s here, and other jobs on a shared "
            "machine can make a step up to 10x slower, so compare rows of one run only.",
            "",
            f"CPU seconds per training step, one thread, min of {CPU_REPEATS} interleaved "
            "repeats, both in one process (same batch; open_clip's step is what its trainer "
            "does per batch: forward, ClipLoss, backward, clip_grad_norm_, torch's default "
            "AdamW). The 2-core AVX2 machines this must also hold on are stood in for by the "
            "same process with every kernel library held to AVX2, where this machine has "
            "AVX-512 (the instruction set only: not another machine's caches, memory or "
            "MKL's code paths on AMD processors):",
            "",
            *(line for isa, cpu in cpus.items() for line in _cpu_table(isa.lower(), cpu)),
            "What the profile showed and what changed: (1) torch's AdamW runs with "
            "`fused=True` (one precompiled kernel; the default per-tensor loop, which "
            "open_clip's trainer uses on CPU, costs 5x the CPU time, and with 2 threads on a "
            "loaded machine its hundreds of small parallel regions took 1.5 s of a 5 s step); "
            "(2) a ZeRO-0 run alone skips DeepSpeed's gradient all-reduce (it flattened, "
            "reduced and copied back every gradient); (3) a ZeRO-1/2 run alone skips "
            "DeepSpeed's per-gradient reduction (a copy into its bucket, a division by the "
            "world size of 1, an all-reduce copied back over itself, a copy into the partition "
            "buffer: four passes over every gradient that each reproduced its input bit for "
            "bit); with more ranks DeepSpeed's path is unchanged; (4) ZeRO-1/2's gradient norm, "
            "at any world size, sums fp32 norms of 4096-element chunks in float64 instead of "
            "converting every gradient to float64 first (~20 ms of the ~40 ms optimizer step "
            "here; the 6.3M-element token embedding dominates), with the same accuracy "
            "(~1e-8); (5) each tower runs its last block for the one token the loss reads "
            "(the ViT's class token, the text's EOS): keys and values from every token, "
            "attention, projection and MLP for one row (src/clipforge/model/pooled.py; the "
            "same features and gradients, ~18 % fewer FLOPs, compare the first two rows). "
            "What ZeRO-2 still adds alone: flattening the gradients for its flat fp32 "
            "partition and copying the updated master back into the module. Our towers also "
            "call fused scaled-dot-product attention directly.",
            "",
            "GPU: not measured — no GPU machine was lent to this session.",
            "",
            f"Machine: {os.cpu_count()} CPUs, {platform.machine()}, {_cpu_model()}; "
            f"torch {torch.__version__}. "
            "Reproduce: `.venv/bin/python -m pytest -q -s tests/bench/bench_train.py` "
            "(`BENCH_TRAIN_STEPS`, `BENCH_TRAIN_ROUNDS`, `BENCH_TRAIN_BATCH`, `BENCH_THREADS`, "
            "`BENCH_TRAIN_ZERO`, `BENCH_TRAIN_CPU_REPEATS`, `BENCH_TRAIN_ISAS`).",
            "<!-- trainer:end -->",
        ]
    )
    return block, cpu_ratio


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def write_doc(block: str) -> None:
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    pattern = re.compile(r"<!-- trainer:begin -->.*?<!-- trainer:end -->", re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = text.rstrip("\n") + "\n\n## Trainer\n\n" + block + "\n"
    DOC.write_text(text)


def test_trainer_faster_than_open_clip() -> None:
    block, ratio = render(measure(), measure_cpu())
    write_doc(block)
    print(block)
    # Asserted on CPU time: wall-clock rounds on a shared machine can differ 10x by the minute;
    # on the slowest of the instruction sets measured.
    assert ratio >= TARGET, f"ours / open_clip = {ratio:.2f}x by CPU time, target {TARGET}x"


if __name__ == "__main__":
    print(render(measure(), measure_cpu())[0])
