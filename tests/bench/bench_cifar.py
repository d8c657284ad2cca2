"""Does the pipeline learn real photos? CIFAR-10 zero-shot from scratch on this CPU: our
15-minute recipe (experiment=cifar10_15min) over seeds, and a same-architecture comparison with
open_clip 3.3.0 at equal wall time for both losses; plus a smoke check of retrieval on
coco-mini's real human captions.

    .venv/bin/python tests/bench/bench_cifar.py                 # 15 min of training per run
    .venv/bin/python -m pytest -q -s tests/bench/bench_cifar.py  # same, asserting the targets
    BENCH_SECONDS=120 .venv/bin/python tests/bench/bench_cifar.py       # a quick validation
    BENCH_SYSTEMS=recipe BENCH_SEEDS=0,1,2 .venv/bin/python tests/bench/bench_cifar.py

Steps (each cached under .bench/, which git ignores):
 1. CIFAR-10 JPEGs (../shared/data/cifar10) -> CSVs: training captions from TRAIN_TEMPLATES, a
    zero-shot test set scored with held-out ZEROSHOT_TEMPLATES -> data_tools.convert --cls-col
    -> shards (+ classnames.txt and zeroshot_classification_templates.txt) -> tokenizer.
 2. recipe: `experiment=cifar10_15min` as shipped (2 processes under torchrun), its steps set
    from a probe on the machine at hand: the probe's mean step time (x STEP_MARGIN) and its
    start-up cost, so that the whole training command (start-up and weight export included)
    fits BENCH_SECONDS (900). Trained once per seed in BENCH_SEEDS (default 0,1), mean and spread.
 3. same architecture (BENCH_LOSSES=clip,siglip, BENCH_COMPARE_SECONDS, default BENCH_SECONDS
    each): each system's step time is measured on short probe runs (BENCH_PROBE_ROUNDS
    alternating rounds, median window), and its steps set so that the real run fills the budget.
    ours: `experiment=cifar10_tiny` (+ `loss=siglip`), BENCH_NPROC processes under torchrun.
    open_clip 3.3.0: open_clip_train.main (+ `--siglip`, and a model config with SigLIP's
    scale 10 / bias -10), 1 process (its DDP passes device_ids, which torch rejects on CPU)
    with 1 or BENCH_NPROC torch threads, whichever probes faster, in its own venv
    (.bench/openclip-venv, needs webdataset 0.2.86: 1.0.x crashes it), a model config of our
    tiny model's size, the same global batch, lr, schedule, weight decay, clipping and crop
    scale.
 4. Every checkpoint is scored by clipforge.eval's zero-shot code on the 10,000 test photos
    with the same templates; figures land in docs/benchmarks.md ("Zero-shot quality").
 5. coco-mini: our tiny model on its 80 train images (5 captions each), recall@k on the 79
    captioned val images: a smoke check of retrieval on real captions, not a quality claim.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from functools import partial
from pathlib import Path

from clipforge.eval import benchmarks

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared" / "data"
BENCH = Path(os.environ.get("BENCH_DIR", REPO / ".bench"))
WORK = BENCH / "cifar10"
PY = sys.executable
SECONDS = float(os.environ.get("BENCH_SECONDS", "900"))
NPROC = int(os.environ.get("BENCH_NPROC", "2"))
COMPARE_SECONDS = float(os.environ.get("BENCH_COMPARE_SECONDS", SECONDS))
SYSTEMS = os.environ.get("BENCH_SYSTEMS", "recipe,ours,open_clip,coco").split(",")
SEEDS = [int(x) for x in os.environ.get("BENCH_SEEDS", "0,1").split(",")]
LOSSES = os.environ.get("BENCH_LOSSES", "clip,siglip").split(",")
RECIPE = "cifar10_15min"
TARGET_TOP1 = 0.70
MERGE = os.environ.get("BENCH_MERGE", "0") == "1"
DOC = REPO / "docs" / "benchmarks.md"

# The shipped CIFAR-10 names (clipforge/eval/benchmarks), which are also the photo folders' names.
CLASSES = list(benchmarks.load("cifar10").classnames)
TRAIN_TEMPLATES = [
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a small photo of a {}.",
    "a low resolution photo of a {}.",
    "this is a {}.",
    "a {} in the picture.",
    "{}",
]
# Held out: never a training caption, so the score says the model learnt the class words.
ZEROSHOT_TEMPLATES = [
    "a photo of the {}.",
    "a picture of the {}.",
    "an image showing a {}.",
    "a low resolution picture of the {}.",
    "the {}.",
]
# Global batch, the same for both systems (ours: BATCH // NPROC per process).
BATCH = 256
LR, WD, WARMUP_FRAC, CROP_MIN = 1e-3, 0.1, 0.05, 0.7
PROBE_STEPS = 20
PROBE_ROUNDS = int(os.environ.get("BENCH_PROBE_ROUNDS", "2"))


def log_every(steps: int) -> int:
    """Probes log every 5 steps (more windows to time); real runs about 20 times."""
    return 5 if steps <= PROBE_STEPS else min(50, max(10, steps // 20))


def sh(*args: str | Path, env: dict | None = None, log: Path | None = None, **kw) -> str:
    """Run a command; its output goes to `log` (and is returned); a failure shows its tail."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run([str(a) for a in args], cwd=REPO, env=full_env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw)  # fmt: skip
    if log:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(proc.stdout)
    if proc.returncode:
        raise RuntimeError(f"{args[:4]} failed ({proc.returncode}):\n{proc.stdout[-4000:]}")
    return proc.stdout


# -- 1. data -------------------------------------------------------------------------------------
def extract(split: str) -> Path:
    out = WORK / "raw"
    if not (out / split).is_dir():
        out.mkdir(parents=True, exist_ok=True)
        with tarfile.open(SHARED / "cifar10" / f"{split}.tar.gz") as tar:
            tar.extractall(out, filter="data")
    return out


def write_csv(split: str, templates: list[str], seed: int) -> Path:
    raw = extract(split)
    rows = [
        (f"{split}/{name}/{f.name}", CLASSES.index(name))
        for name in CLASSES
        for f in sorted((raw / split / name).iterdir())
    ]
    rng = random.Random(seed)
    rng.shuffle(rows)  # class-sorted shards would make one-class batches
    path = raw / f"{split}.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "caption", "label"])
        for p, label in rows:
            w.writerow([p, rng.choice(templates).format(CLASSES[label]), label])
    return path


def build_data() -> tuple[Path, Path]:
    train, test = WORK / "shards" / "train", WORK / "shards" / "test"
    for split, out, per_shard in (("train", train, 5000), ("test", test, 2500)):
        if (out / "manifest.json").is_file():
            continue
        csv_path = write_csv(split, TRAIN_TEMPLATES, seed=0 if split == "train" else 1)
        sh(PY, "-m", "data_tools.convert", "--input", csv_path, "--url-col", "path",
           "--caption-col", "caption", "--cls-col", "label", "--output", out, "--image-size", "32",
           "--resize-mode", "center_crop", "--samples-per-shard", per_shard, "--processes", "2",
           log=WORK / "logs" / f"convert_{split}.log")  # fmt: skip
    (test / "classnames.txt").write_text("\n".join(CLASSES) + "\n")
    (test / "zeroshot_classification_templates.txt").write_text(
        "\n".join(ZEROSHOT_TEMPLATES) + "\n"
    )
    if not (train / "tokenizer.model").is_file():
        sh(PY, "-m", "data_tools.tokenizer", "--input", train, "--vocab-size", "128",
           log=WORK / "logs" / "tokenizer.log")  # fmt: skip
    return train, test


# -- 2a. ours ------------------------------------------------------------------------------------
def torchrun_train(run_dir: Path, log: Path, *overrides: str) -> float:
    """clipforge.train under torchrun (NPROC processes, a thread each); its wall time."""
    shutil.rmtree(run_dir, ignore_errors=True)
    t0 = time.perf_counter()
    sh(PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", NPROC,
       "-m", "clipforge.train", f"run_dir={run_dir}", *overrides,
       env={"OMP_NUM_THREADS": "1"}, log=log)  # fmt: skip
    return time.perf_counter() - t0


def train_ours(train: Path, steps: int, run_dir: Path, log: Path, loss: str = "clip") -> float:
    """The same-architecture comparison's side: cifar10_tiny with the shared hyper-parameters."""
    return torchrun_train(
        run_dir, log, "experiment=cifar10_tiny", *(["loss=siglip"] if loss == "siglip" else []),
        f"data.train={train}", f"train.steps={steps}", f"train.batch_size={BATCH // NPROC}",
        f"optim.lr={LR}", f"optim.weight_decay={WD}", f"data.augment.scale_min={CROP_MIN}",
        f"sched.warmup_steps={max(1, int(WARMUP_FRAC * steps))}",
        f"train.log_every={log_every(steps)}",
    )  # fmt: skip


def ours_step_times(train: Path, loss: str = "clip") -> list[float]:
    """Seconds per step of a short run, one value per log window after the first (warm-up)."""
    run_dir = WORK / f"probe_ours_{loss}"
    train_ours(train, PROBE_STEPS, run_dir, WORK / "logs" / f"probe_ours_{loss}.log", loss)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [BATCH / r["samples_per_s"] for r in rows if "samples_per_s" in r][1:]


# -- 2. the recipe -------------------------------------------------------------------------------
RECIPE_PROBE_STEPS = 40
# A long run's steps were ~5 % slower than the probe's mean window (data loader settling,
# other jobs): plan at this much more, so the command fits the budget.
STEP_MARGIN = 1.10


def recipe_plan(train: Path) -> dict:
    """Steps for the recipe on this machine: a probe run of the shipped recipe gives the mean
    step time (the machine as it is, not at its best: the real run must fit) and the start-up
    cost (the probe's wall time less its steps); the steps fill what the budget leaves at
    STEP_MARGIN times the probe's step time. (Measured 2026-12-02: a 1,479-step run planned
    from the probe's median, 0.583 s, ran at 0.655 s a step and took 1,002 s; a 1,195-step run
    planned from the mean, 0.692 s, at 1.05x ran at 0.748 s a step and took 925 s.)"""
    run_dir = WORK / "probe_recipe"
    wall = torchrun_train(
        run_dir, WORK / "logs" / "probe_recipe.log", f"experiment={RECIPE}",
        f"data.train={train}", f"train.steps={RECIPE_PROBE_STEPS}", "train.log_every=5",
    )  # fmt: skip
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    stamps = [(r["step"], r["time"]) for r in rows if "samples_per_s" in r]
    # Per-step time from the log timestamps of the windows after the first (compile, warm-up).
    per_step = [(t1 - t0) / (s1 - s0) for (s0, t0), (s1, t1) in zip(stamps[1:], stamps[2:])]
    step_s = sum(per_step) / len(per_step)
    overhead = max(0.0, wall - RECIPE_PROBE_STEPS * step_s)
    steps = int((SECONDS - overhead) / (STEP_MARGIN * step_s))
    plan = {"probe_step_s": round(step_s, 3), "startup_s": round(overhead), "steps": steps}
    print(f"recipe plan: {plan} (window step times {[round(x, 3) for x in per_step]})", flush=True)
    return plan


def train_recipe(train: Path, test: Path, steps: int, seed: int) -> dict:
    run_dir = WORK / f"run_recipe_seed{seed}"
    wall = torchrun_train(
        run_dir, WORK / "logs" / f"recipe_seed{seed}.log", f"experiment={RECIPE}",
        f"data.train={train}", f"train.steps={steps}", f"train.seed={seed}",
    )  # fmt: skip
    return {
        **zeroshot_ours(run_dir, test, tag=f"recipe_seed{seed}"),
        "wall_s": wall,
        "steps": steps,
    }


# -- 2b. open_clip -------------------------------------------------------------------------------
OC_VENV = BENCH / "openclip-venv"
OC_MODEL = BENCH / "openclip-model"


def openclip_python() -> Path:
    """A venv for open_clip's trainer: webdataset 0.2.86 and open-clip-torch 3.3.0 of its own,
    everything else (torch, timm, pandas, ...) seen through a .pth onto our venv, which saves
    gigabytes of a second torch; its own site-packages come first on sys.path."""
    py = OC_VENV / "bin" / "python"
    if not py.exists():
        sh(sys.executable, "-m", "venv", OC_VENV)
        ours = next(Path(sys.prefix, "lib").glob("python3*/site-packages"))
        theirs = next((OC_VENV / "lib").glob("python3*/site-packages"))
        (theirs / "zz_clipforge_venv.pth").write_text(str(ours) + "\n")
        sh(py, "-m", "pip", "install", "-q", "--no-deps", "webdataset==0.2.86",
           "open-clip-torch==3.3.0")  # fmt: skip
    return py


def openclip_model_dir(loss: str = "clip") -> Path:
    """open_clip's `local-dir:` model: a config matching conf/model/tiny.yaml + cifar10_tiny
    (embed 128; ViT 4x128, 4 heads, 4 px patches on 32 px; text 4x128, 4 heads, 16 tokens).
    Its text tower keeps its own 49,408-token BPE vocabulary (bundled, offline)."""
    folder = OC_MODEL / loss
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {
        "model_cfg": {
            "embed_dim": 128,
            "vision_cfg": {"image_size": 32, "layers": 4, "width": 128, "head_width": 32,
                           "patch_size": 4, "mlp_ratio": 4.0},
            "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 128, "heads": 4,
                         "layers": 4, "mlp_ratio": 4.0},
        },
        "preprocess_cfg": {},
    }  # fmt: skip
    if loss == "siglip":  # open_clip creates the bias only when the config names one
        cfg["model_cfg"].update(init_logit_scale=math.log(10), init_logit_bias=-10.0)
    (folder / "open_clip_config.json").write_text(json.dumps(cfg, indent=1))
    return folder


def train_openclip(
    train: Path, steps: int, name: str, threads: int = NPROC, loss: str = "clip"
) -> tuple[float, Path, Path]:
    logs = WORK / "openclip_logs"
    shutil.rmtree(logs / name, ignore_errors=True)
    shards = sorted(train.glob("*.tar"))
    first, last = shards[0].stem, shards[-1].stem
    urls = f"{train}/{{{first}..{last}}}.tar"
    t0 = time.perf_counter()
    sh(openclip_python(), "-m", "open_clip_train.main", "--train-data", urls,
       "--dataset-type", "webdataset", "--dataset-resampled",
       "--train-num-samples", steps * BATCH, "--epochs", "1", "--batch-size", BATCH,
       "--model", f"local-dir:{openclip_model_dir(loss)}", "--lr", LR, "--wd", WD,
       *(["--siglip"] if loss == "siglip" else []),
       "--beta1", "0.9", "--beta2", "0.98", "--eps", "1e-6", "--grad-clip-norm", "1.0",
       "--warmup", max(1, int(WARMUP_FRAC * steps)), "--precision", "fp32", "--workers", "1",
       "--aug-cfg", f"scale=({CROP_MIN}, 1.0)", "--logs", logs, "--name", name,
       "--log-every-n-steps", log_every(steps), "--report-to", "none",
       "--save-frequency", "1", "--seed", "0", "--device", "cpu",
       env={"OMP_NUM_THREADS": str(threads)}, log=WORK / "logs" / f"{name}.log")  # fmt: skip
    wall = time.perf_counter() - t0
    return wall, logs / name / "checkpoints" / "epoch_1.pt", WORK / "logs" / f"{name}.log"


def openclip_step_times(train: Path, threads: int, loss: str = "clip") -> list[float]:
    """Its log's "Batch (t)": the mean step time of each log window; the first is warm-up."""
    _, _, log = train_openclip(train, PROBE_STEPS, f"probe_{loss}_t{threads}", threads, loss)
    return [float(t) for t in re.findall(r"Batch \(t\): ([0-9.]+)", log.read_text())][1:]


def step_times(train: Path, systems: list[str], loss: str = "clip") -> dict[str, float]:
    """Each system's median step time over PROBE_ROUNDS alternating probes (all windows).

    The comparison is at equal wall time, so each system's steps must fill the budget as the
    machine is, not at its best: planning from the best window made ours overshoot (302 s for
    a 240-s budget) while open_clip finished early (237 s) on 2026-12-02. The same rule for
    both systems; the best windows are printed beside the medians."""
    probes = {
        "ours": partial(ours_step_times, loss=loss),
        # One process, so its only way to both cores is intra-op threads; on a busy machine
        # one thread can be the faster, so both are tried and the faster median counts.
        **{
            f"open_clip@{t}": partial(openclip_step_times, threads=t, loss=loss) for t in {1, NPROC}
        },
    }
    systems = [p for p in probes if p.split("@")[0] in systems]
    seen: dict[str, list[float]] = {s: [] for s in systems}
    for _ in range(PROBE_ROUNDS):
        for system in systems:
            seen[system] += probes[system](train)
    medians = {s: statistics.median(t) for s, t in seen.items()}
    best = {s: round(min(t), 3) for s, t in seen.items()}
    print(f"probe step times ({loss}, s): {seen}; best {best}", flush=True)
    return medians


# -- 3. zero-shot, the same code for both ---------------------------------------------------------
def zeroshot_ours(run_dir: Path, test: Path, tag: str = "ours") -> dict:
    from clipforge.config import EvalConfig
    from clipforge.eval import suite
    from clipforge.eval.exported import load_run

    run = load_run(run_dir)
    res = suite.run_zeroshot(str(test), run.encoders(), EvalConfig(batch_size=500), 0, 1, True)
    res.figures["confusion"].save(WORK / f"confusion_{tag}.png")
    return res.metrics


def zeroshot_openclip(ckpt: Path, test: Path, loss: str = "clip") -> dict:
    import open_clip
    import torch

    from clipforge.config import AugmentConfig, EvalConfig
    from clipforge.data.transforms import eval_transform
    from clipforge.eval import suite

    name = f"local-dir:{openclip_model_dir(loss)}"
    model = open_clip.create_model(name)
    model.load_state_dict(open_clip.factory.load_state_dict(str(ckpt)))
    model.eval()
    tok = open_clip.get_tokenizer(name)
    nograd = torch.no_grad()
    enc = suite.Encoders(
        lambda x: nograd(model.encode_image)(x, normalize=True),
        lambda t: nograd(model.encode_text)(t, normalize=True),
        tok,
        # open_clip's eval preprocessing for this config is this very transform: resize 32
        # (bicubic), center crop 32, OpenAI mean/std.
        eval_transform(32, AugmentConfig()),
    )
    res = suite.run_zeroshot(str(test), enc, EvalConfig(batch_size=500), 0, 1, True)
    res.figures["confusion"].save(WORK / f"confusion_open_clip_{loss}.png")
    return res.metrics


# -- 4. coco-mini retrieval smoke check ----------------------------------------------------------
def coco_shards() -> tuple[Path, Path, Path]:
    """KEY.jpg (64 px centre crop), KEY.txt (first caption), KEY.json {"captions": all five}."""
    from PIL import Image

    out = BENCH / "coco-mini"
    tok_txt = out / "train_captions.txt"
    for split in ("train", "val"):
        folder = out / split
        if (folder / "00000.tar").is_file():
            continue
        folder.mkdir(parents=True, exist_ok=True)
        ann = json.loads(
            (SHARED / "coco-mini" / "annotations" / f"captions_{split}2017.json").read_text()
        )
        caps: dict[int, list[str]] = {}
        for a in ann["annotations"]:
            caps.setdefault(a["image_id"], []).append(a["caption"].strip())
        images = [im for im in ann["images"] if im["id"] in caps
                  and (SHARED / "coco-mini" / f"{split}2017" / im["file_name"]).is_file()]  # fmt: skip
        with tarfile.open(folder / "00000.tar", "w") as tar:
            for im in sorted(images, key=lambda im: im["id"]):
                img = Image.open(SHARED / "coco-mini" / f"{split}2017" / im["file_name"]).convert(
                    "RGB"
                )
                side = min(img.size)
                left, top = (img.width - side) // 2, (img.height - side) // 2
                img = img.crop((left, top, left + side, top + side)).resize((64, 64), Image.BICUBIC)
                buf = io.BytesIO()
                img.save(buf, format="JPEG", quality=95)
                key = f"{im['id']:012d}"
                meta = json.dumps({"captions": caps[im["id"]], "image_id": im["id"]}).encode()
                for ext, data in (("jpg", buf.getvalue()), ("txt", caps[im["id"]][0].encode()),
                                  ("json", meta)):  # fmt: skip
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        (folder / "00000_stats.json").write_text(json.dumps({"samples": len(images)}))
        if split == "train":
            tok_txt.write_text("\n".join(c for im in images for c in caps[im["id"]]) + "\n")
    tok = out / "tokenizer.model"
    if not tok.is_file():
        sh(PY, "-m", "data_tools.tokenizer", "--input", tok_txt, "--output", tok,
           "--vocab-size", "400", log=out / "tokenizer.log")  # fmt: skip
    return out / "train", out / "val", tok


def coco_retrieval(seconds: float) -> dict:
    from clipforge.config import EvalConfig
    from clipforge.eval import suite
    from clipforge.eval.exported import load_run

    train, val, tok = coco_shards()
    run_dir = BENCH / "coco-mini" / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    steps = max(20, int(seconds / 0.5))  # ~0.5 s a step at 64 px, batch 80, on 2 cores
    t0 = time.perf_counter()
    sh(PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", NPROC,
       "-m", "clipforge.train", "experiment=cifar10_tiny", f"data.train={train}",
       f"data.tokenizer={tok}", f"run_dir={run_dir}", f"train.steps={steps}",
       f"train.batch_size={80 // NPROC}", "data.shuffle_buffer=80", "model.image.image_size=64",
       "model.image.timm_kwargs.patch_size=8", "model.text.context_length=32",
       f"sched.warmup_steps={max(1, steps // 20)}", "train.log_every=20",
       env={"OMP_NUM_THREADS": "1"}, log=BENCH / "coco-mini" / "train.log")  # fmt: skip
    wall = time.perf_counter() - t0
    run = load_run(run_dir)
    res = suite.run_retrieval(str(val), run.encoders(), EvalConfig(batch_size=100), 0, 1, True)
    res.figures["retrieval"].save(BENCH / "coco-mini" / "retrieval_strip.png")
    return {**res.metrics, "steps": steps, "wall_s": round(wall)}


# -- report --------------------------------------------------------------------------------------
START, END = "<!-- zero-shot-quality:start -->", "<!-- zero-shot-quality:end -->"


def render(results: dict) -> str:
    lines = [
        "## Zero-shot quality",
        "",
        START,
        f"Measured {time.strftime('%Y-%m-%d')} by `tests/bench/bench_cifar.py` on a shared "
        f"2-core CPU ({platform_line()}). From scratch on the 50,000 CIFAR-10 training photos, "
        "captions from 8 templates; zero-shot on the 10,000 test photos with 5 held-out "
        "templates (ensembled), every checkpoint scored by clipforge.eval's code. Train wall "
        "time is the whole training command (start-up and weight export included). Chance is "
        "10 %.",
        "",
    ]
    recipe = results.get("recipe") or {}
    if recipe:
        plan = results.get("recipe_plan", {})
        top1 = [r["top1"] for r in recipe.values()]
        mean = sum(top1) / len(top1)
        lines += [
            f"### The 15-minute recipe: `experiment={RECIPE}`",
            "",
            f"2 processes x 1 thread. Steps from a probe of the recipe on this machine: mean "
            f"step {plan.get('probe_step_s', float('nan')):.3f} s, start-up "
            f"{plan.get('startup_s', 0)} s, so {plan.get('steps')} steps (global batch 256: "
            f"{plan.get('steps', 0) * 256:,} samples) planned for BENCH_SECONDS={SECONDS:g} "
            f"at {STEP_MARGIN}x the probe's step; the train wall time column says whether a run "
            f"fitted. Mean top-1 over {len(top1)} seeds: **{100 * mean:.1f} %** "
            f"(spread {100 * (max(top1) - min(top1)):.1f} points; target "
            f"{100 * TARGET_TOP1:.0f} %). {results.get('recipe_note', '')}",
            "",
            "| seed | steps | train wall time | top-1 | top-5 | mean per-class recall |",
            "|---|---|---|---|---|---|",
        ]
        for seed, r in recipe.items():
            lines.append(
                f"| {seed} | {r.get('steps', plan.get('steps'))} | {r['wall_s']:.0f} s | "
                f"{100 * r['top1']:.1f} % | "
                f"{100 * r['top5']:.1f} % | {100 * r['mean_per_class_recall']:.1f} % |"
            )
        lines.append("")
    cifar = results.get("cifar") or {}
    if cifar:
        budgets = "/".join(
            sorted({f"{r.get('budget_s', COMPARE_SECONDS):g}" for r in cifar.values()})
        )
        lines += [
            "### Same architecture as open_clip, equal wall time, both losses",
            "",
            "A tiny CLIP (`experiment=cifar10_tiny`: ViT 4x128 on 32 px with 4 px patches, text "
            "4x128, embed 128, both towers initialized as open_clip's) in both trainers; "
            f"BENCH_COMPARE_SECONDS={budgets} of training each. Same global batch "
            f"({BATCH}), lr, warmup + cosine, weight decay, clipping and crop scale; each "
            "system's steps are set from its own median step time on alternating probe runs. "
            "siglip: ours `loss=siglip` (ring form over the 2 ranks), open_clip `--siglip`, "
            f"both starting at scale 10 and bias -10. {results.get('compare_note', '')}",
            "",
            "| loss | system | processes x threads | median probe s/step | steps | samples seen "
            "| train wall time | top-1 | top-5 | mean per-class recall |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for key, r in cifar.items():
            name = key.split("|")[0]
            lines.append(
                f"| {r.get('loss', 'clip')} | {name} | {r.get('layout')} | "
                f"{r.get('probe_step_s', float('nan')):.2f} | {r['steps']} | "
                f"{r['steps'] * BATCH:,} | {r['wall_s']:.0f} s | {100 * r['top1']:.1f} % | "
                f"{100 * r['top5']:.1f} % | {100 * r['mean_per_class_recall']:.1f} % |"
            )
    if "coco" in results:
        c = results["coco"]
        lines += [
            "",
            f"Retrieval smoke check, coco-mini: ours trained {c['steps']} steps ({c['wall_s']} s) on "
            "its 80 train images (5 human captions each, 64 px), scored on the 79 captioned val "
            f"images ({c['captions']} captions). Chance: text->image R@k = k/79.",
            "",
            "| direction | R@1 | R@5 | R@10 |",
            "|---|---|---|---|",
        ]
        for d, label in (("text_to_image", "text -> image"), ("image_to_text", "image -> text")):
            lines.append(
                f"| {label} | "
                + " | ".join(f"{100 * c[f'{d}_R@{k}']:.1f} %" for k in (1, 5, 10))
                + " |"
            )
    lines += [
        "",
        "Reproduce: `.venv/bin/python tests/bench/bench_cifar.py` (`BENCH_SECONDS`, default "
        "900, the recipe's budget; `BENCH_SEEDS=0,1`; `BENCH_COMPARE_SECONDS`, default the "
        "same, per comparison run; `BENCH_LOSSES=clip,siglip`; "
        "`BENCH_SYSTEMS=recipe,ours,open_clip,coco`; `BENCH_MERGE=1` keeps the parts an "
        "earlier invocation measured), or `.venv/bin/python -m pytest -q -s "
        "tests/bench/bench_cifar.py`, which also asserts the recipe's mean top-1 >= 70 % and "
        "ours >= open_clip top-1 per loss (1 point of slack). Data, venvs and runs are cached "
        "in .bench/.",
        END,
        "",
    ]
    return "\n".join(lines)


def platform_line() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end"


def write_doc(results: dict) -> None:
    """Replace only this bench's section of docs/benchmarks.md (other benches own the rest)."""
    section = render(results)
    text = DOC.read_text() if DOC.is_file() else "# Benchmarks\n\n"
    if START in text and END in text:
        head = text[: text.index(START)].rstrip()
        head = (
            head[: head.rindex("## Zero-shot quality")]
            if "## Zero-shot quality" in head
            else head + "\n\n"
        )
        rest = text[text.index(END) + len(END) :].lstrip("\n")
        text = head + section + ("\n" + rest if rest else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(text)


def main() -> dict:
    WORK.mkdir(parents=True, exist_ok=True)
    results: dict = {"cifar": {}, "recipe": {}}
    t0 = time.perf_counter()
    if {"recipe", "ours", "open_clip"} & set(SYSTEMS):
        train, test = build_data()
        print(f"data ready ({time.perf_counter() - t0:.0f} s)", flush=True)
    if "recipe" in SYSTEMS:
        plan = recipe_plan(train)
        results["recipe_plan"] = plan
        for seed in SEEDS:
            r = train_recipe(train, test, plan["steps"], seed)
            results["recipe"][seed] = r
            print(f"recipe seed {seed}", r, flush=True)
    systems = [s for s in ("ours", "open_clip") if s in SYSTEMS]
    for loss in LOSSES if systems else []:
        times = step_times(train, systems, loss)
        print(f"step times ({loss}, s): {times}", flush=True)
        for system in systems:
            # open_clip runs with the thread count whose probe was fastest
            key = min((k for k in times if k.split("@")[0] == system), key=times.get)
            steps = max(PROBE_STEPS, int(COMPARE_SECONDS / times[key]))
            if system == "ours":
                run_dir = WORK / f"run_ours_{loss}"
                wall = train_ours(train, steps, run_dir, WORK / "logs" / f"ours_{loss}.log", loss)
                name, layout = "clipforge (ours)", f"{NPROC} x 1"
                r = zeroshot_ours(run_dir, test, tag=f"ours_{loss}")
            else:
                threads = int(key.split("@")[1])
                wall, ckpt, _ = train_openclip(train, steps, f"run_{loss}", threads, loss)
                name, r, layout = (
                    "open_clip 3.3.0",
                    zeroshot_openclip(ckpt, test, loss),
                    f"1 x {threads}",
                )
            results["cifar"][f"{name}|{loss}"] = {
                **r, "steps": steps, "wall_s": wall, "layout": layout, "loss": loss,
                "probe_step_s": round(times[key], 3), "budget_s": COMPARE_SECONDS,
            }  # fmt: skip
            print(name, loss, results["cifar"][f"{name}|{loss}"], flush=True)
    if "coco" in SYSTEMS:
        results["coco"] = coco_retrieval(min(SECONDS, 120))
        print("coco", results["coco"], flush=True)
    saved = WORK / "results.json"
    if MERGE and saved.is_file():
        # Parts measured by an earlier invocation (BENCH_SYSTEMS=recipe, then =ours,open_clip)
        # stay in the report unless this one measured them again.
        old = json.loads(saved.read_text())
        results = {**old, **{k: v for k, v in results.items() if v}}
        results["cifar"] = {**old.get("cifar", {}), **results.get("cifar", {})}
    saved.write_text(json.dumps(results, indent=1))
    write_doc(results)
    print(f"done in {time.perf_counter() - t0:.0f} s; section written to {DOC}")
    return results


def test_cifar_zero_shot_quality():
    """`pytest -s tests/bench/bench_cifar.py`: the bench, then the recipe's mean top-1 at the
    target with every seed's training command within the budget, and ours at least as good as
    open_clip's top-1 for each loss (within 1 point: the shared CPU makes the step counts
    noisy) without more wall time than open_clip had (10 % slack)."""
    import pytest

    if not SHARED.is_dir():
        pytest.skip(f"third-party data not found at {SHARED}")
    results = main()
    recipe = [r["top1"] for r in results["recipe"].values()]
    if recipe:
        assert sum(recipe) / len(recipe) >= TARGET_TOP1, results["recipe"]
        assert all(r["wall_s"] <= SECONDS for r in results["recipe"].values()), results["recipe"]
    cifar = results["cifar"]
    for loss in LOSSES:
        ours, theirs = cifar.get(f"clipforge (ours)|{loss}"), cifar.get(f"open_clip 3.3.0|{loss}")
        if ours and theirs:
            assert ours["top1"] >= theirs["top1"] - 0.01, (loss, cifar)
            assert ours["wall_s"] <= 1.1 * theirs["wall_s"], (loss, cifar)


if __name__ == "__main__":
    if not SHARED.is_dir():
        sys.exit(f"skip: third-party data not found at {SHARED}")
    main()
