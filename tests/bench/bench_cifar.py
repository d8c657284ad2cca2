"""Does the pipeline learn real photos? A tiny CLIP from scratch on CIFAR-10, ours vs open_clip,
same architecture size, same data, same time budget, same zero-shot eval code; plus a smoke
check of retrieval on coco-mini's real human captions.

    .venv/bin/python tests/bench/bench_cifar.py                 # 15 min of training per system
    .venv/bin/python -m pytest -q -s tests/bench/bench_cifar.py  # same, asserting ours >= theirs
    BENCH_SECONDS=120 .venv/bin/python tests/bench/bench_cifar.py       # a quick validation
    BENCH_SYSTEMS=ours BENCH_SECONDS=60 .venv/bin/python tests/bench/bench_cifar.py

Steps (each cached under .bench/, which git ignores):
 1. CIFAR-10 JPEGs (../shared/data/cifar10) -> CSVs: training captions from TRAIN_TEMPLATES, a
    zero-shot test set scored with held-out ZEROSHOT_TEMPLATES -> data_tools.convert --cls-col
    -> shards (+ classnames.txt and zeroshot_classification_templates.txt) -> tokenizer.
 2. Each system's step time is measured on short probe runs (BENCH_PROBE_ROUNDS alternating
    rounds, best window), and its steps set so that the real run fills BENCH_SECONDS (a
    cosine schedule must know its length up front).
    ours: `experiment=cifar10_tiny`, BENCH_NPROC processes (default 2) under torchrun.
    open_clip 3.3.0: open_clip_train.main, 1 process (its DDP passes device_ids, which torch
    rejects on CPU) with 1 or BENCH_NPROC torch threads, whichever probes faster, in its own venv (.bench/openclip-venv,
    needs webdataset 0.2.86: 1.0.x crashes it), a model config of our tiny model's size, the
    same global batch, lr, schedule, weight decay, clipping and crop scale.
 3. Both checkpoints are scored by clipforge.eval's zero-shot code on the 10,000 test photos
    with the same templates; figures land in docs/benchmarks.md ("Zero-shot quality").
 4. coco-mini: our tiny model on its 80 train images (5 captions each), recall@k on the 79
    captioned val images: a smoke check of retrieval on real captions, not a quality claim.
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import time
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared" / "data"
BENCH = Path(os.environ.get("BENCH_DIR", REPO / ".bench"))
WORK = BENCH / "cifar10"
PY = sys.executable
SECONDS = float(os.environ.get("BENCH_SECONDS", "900"))
NPROC = int(os.environ.get("BENCH_NPROC", "2"))
SYSTEMS = os.environ.get("BENCH_SYSTEMS", "ours,open_clip,coco").split(",")
DOC = REPO / "docs" / "benchmarks.md"

CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
]  # fmt: skip
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
def train_ours(train: Path, steps: int, run_dir: Path, log: Path) -> float:
    shutil.rmtree(run_dir, ignore_errors=True)
    t0 = time.perf_counter()
    sh(PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", NPROC,
       "-m", "clipforge.train", "experiment=cifar10_tiny", f"data.train={train}",
       f"run_dir={run_dir}", f"train.steps={steps}", f"train.batch_size={BATCH // NPROC}",
       f"optim.lr={LR}", f"optim.weight_decay={WD}", f"data.augment.scale_min={CROP_MIN}",
       f"sched.warmup_steps={max(1, int(WARMUP_FRAC * steps))}",
       f"train.log_every={log_every(steps)}",
       env={"OMP_NUM_THREADS": "1"}, log=log)  # fmt: skip
    return time.perf_counter() - t0


def ours_step_times(train: Path) -> list[float]:
    """Seconds per step of a short run, one value per log window after the first (warm-up)."""
    run_dir = WORK / "probe_ours"
    train_ours(train, PROBE_STEPS, run_dir, WORK / "logs" / "probe_ours.log")
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [BATCH / r["samples_per_s"] for r in rows if "samples_per_s" in r][1:]


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


def openclip_model_dir() -> Path:
    """open_clip's `local-dir:` model: a config matching conf/model/tiny.yaml + cifar10_tiny
    (embed 128; ViT 4x128, 4 heads, 4 px patches on 32 px; text 4x128, 4 heads, 16 tokens).
    Its text tower keeps its own 49,408-token BPE vocabulary (bundled, offline)."""
    OC_MODEL.mkdir(parents=True, exist_ok=True)
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
    (OC_MODEL / "open_clip_config.json").write_text(json.dumps(cfg, indent=1))
    return OC_MODEL


def train_openclip(
    train: Path, steps: int, name: str, threads: int = NPROC
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
       "--model", f"local-dir:{openclip_model_dir()}", "--lr", LR, "--wd", WD,
       "--beta1", "0.9", "--beta2", "0.98", "--eps", "1e-6", "--grad-clip-norm", "1.0",
       "--warmup", max(1, int(WARMUP_FRAC * steps)), "--precision", "fp32", "--workers", "1",
       "--aug-cfg", f"scale=({CROP_MIN}, 1.0)", "--logs", logs, "--name", name,
       "--log-every-n-steps", log_every(steps), "--report-to", "none",
       "--save-frequency", "1", "--seed", "0", "--device", "cpu",
       env={"OMP_NUM_THREADS": str(threads)}, log=WORK / "logs" / f"{name}.log")  # fmt: skip
    wall = time.perf_counter() - t0
    return wall, logs / name / "checkpoints" / "epoch_1.pt", WORK / "logs" / f"{name}.log"


def openclip_step_times(train: Path, threads: int) -> list[float]:
    """Its log's "Batch (t)": the mean step time of each log window; the first is warm-up."""
    _, _, log = train_openclip(train, PROBE_STEPS, f"probe_t{threads}", threads)
    return [float(t) for t in re.findall(r"Batch \(t\): ([0-9.]+)", log.read_text())][1:]


def step_times(train: Path, systems: list[str]) -> dict[str, float]:
    """Each system's best (least disturbed) step time over PROBE_ROUNDS alternating probes.

    The machine is shared: other people's jobs come and go within a minute and can make one
    probe's windows several times slower than another's. The best window is what the system
    does on the machine it asked for, which is the budget this bench compares; the medians
    are printed beside it to show how noisy the machine was."""
    probes = {
        "ours": ours_step_times,
        # One process, so its only way to both cores is intra-op threads; on a busy machine
        # one thread can be the faster, so both are tried and the best counts.
        **{f"open_clip@{t}": partial(openclip_step_times, threads=t) for t in {1, NPROC}},
    }
    systems = [p for p in probes if p.split("@")[0] in systems]
    seen: dict[str, list[float]] = {s: [] for s in systems}
    for _ in range(PROBE_ROUNDS):
        for system in systems:
            seen[system] += probes[system](train)
    medians = {s: round(sorted(t)[len(t) // 2], 3) for s, t in seen.items()}
    print(f"probe step times (s): {seen}; medians {medians}", flush=True)
    return {s: min(t) for s, t in seen.items()}


# -- 3. zero-shot, the same code for both ---------------------------------------------------------
def zeroshot_ours(run_dir: Path, test: Path) -> dict:
    from clipforge.config import EvalConfig
    from clipforge.eval import suite
    from clipforge.eval.exported import load_run

    run = load_run(run_dir)
    res = suite.run_zeroshot(str(test), run.encoders(), EvalConfig(batch_size=500), 0, 1, True)
    res.figures["confusion"].save(WORK / "confusion_ours.png")
    return res.metrics


def zeroshot_openclip(ckpt: Path, test: Path) -> dict:
    import open_clip
    import torch

    from clipforge.config import AugmentConfig, EvalConfig
    from clipforge.data.transforms import eval_transform
    from clipforge.eval import suite

    name = f"local-dir:{openclip_model_dir()}"
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
    res.figures["confusion"].save(WORK / "confusion_open_clip.png")
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
        f"Measured {time.strftime('%Y-%m-%d')} by `tests/bench/bench_cifar.py` "
        f"(BENCH_SECONDS={SECONDS:g}, BENCH_NPROC={NPROC}) on a shared 2-core CPU. A tiny CLIP "
        "(ViT 4x128 on 32 px with 4 px patches, text 4x128, embed 128; both towers initialized "
        "as open_clip's, our default `model.image.init=clip`) from scratch on the 50,000 "
        "CIFAR-10 training photos, captions from 8 templates; zero-shot on the 10,000 test photos "
        "with 5 held-out templates (ensembled), both checkpoints scored by clipforge.eval's code. "
        f"Same global batch ({BATCH}), lr, warmup + cosine, weight decay, clipping and crop scale; "
        "each system's steps are set from its own best step time on alternating probe runs, "
        "to fill the budget (train wall time: the whole training command, start-up and weight "
        "export included; the shared CPU makes it noisy). "
        "Chance is 10 %.",
        "",
        "| system | processes x threads | best probe s/step | steps | samples seen | train wall time | top-1 "
        "| top-5 | mean per-class recall |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.get("cifar", {}).items():
        lines.append(
            f"| {name} | {r.get('layout', r.get('processes'))} | {r.get('probe_step_s', float('nan')):.2f} | {r['steps']} | {r['steps'] * BATCH:,} | {r['wall_s']:.0f} s "
            f"| {100 * r['top1']:.1f} % | {100 * r['top5']:.1f} % | {100 * r['mean_per_class_recall']:.1f} % |"
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
        "Reproduce: `.venv/bin/python tests/bench/bench_cifar.py` (training seconds per system: "
        "`BENCH_SECONDS`, default 900; `BENCH_SYSTEMS=ours,open_clip,coco`), or "
        "`.venv/bin/python -m pytest -q -s tests/bench/bench_cifar.py`, which also asserts "
        "ours >= open_clip top-1 (1 point of slack). Data, venvs and runs are cached in .bench/.",
        END,
        "",
    ]
    return "\n".join(lines)


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
    results: dict = {"cifar": {}}
    t0 = time.perf_counter()
    if {"ours", "open_clip"} & set(SYSTEMS):
        train, test = build_data()
        print(f"data ready ({time.perf_counter() - t0:.0f} s)", flush=True)
    systems = [s for s in ("ours", "open_clip") if s in SYSTEMS]
    times = step_times(train, systems) if systems else {}
    print(f"step times (s): {times}", flush=True)
    for system in systems:
        # open_clip runs with the thread count whose probe was fastest
        key = min((k for k in times if k.split("@")[0] == system), key=times.get)
        steps = max(PROBE_STEPS, int(SECONDS / times[key]))
        if system == "ours":
            wall = train_ours(train, steps, WORK / "run_ours", WORK / "logs" / "ours.log")
            name, r, layout = (
                "clipforge (ours)",
                zeroshot_ours(WORK / "run_ours", test),
                f"{NPROC} x 1",
            )
        else:
            threads = int(key.split("@")[1])
            wall, ckpt, _ = train_openclip(train, steps, "run", threads)
            name, r, layout = "open_clip 3.3.0", zeroshot_openclip(ckpt, test), f"1 x {threads}"
        results["cifar"][name] = {
            **r, "steps": steps, "wall_s": wall, "layout": layout,
            "probe_step_s": round(times[key], 3),
        }  # fmt: skip
        print(name, results["cifar"][name], flush=True)
    if "coco" in SYSTEMS:
        results["coco"] = coco_retrieval(min(SECONDS, 120))
        print("coco", results["coco"], flush=True)
    (WORK / "results.json").write_text(json.dumps(results, indent=1))
    write_doc(results)
    print(f"done in {time.perf_counter() - t0:.0f} s; section written to {DOC}")
    return results


def test_cifar_zero_shot_quality():
    """`pytest -s tests/bench/bench_cifar.py`: the bench, then ours at least as good as
    open_clip's top-1 (within 1 point: the shared CPU makes the step counts noisy)."""
    import pytest

    if not SHARED.is_dir():
        pytest.skip(f"third-party data not found at {SHARED}")
    cifar = main()["cifar"]
    if len(cifar) == 2:
        ours, theirs = cifar["clipforge (ours)"], cifar["open_clip 3.3.0"]
        assert ours["top1"] >= theirs["top1"] - 0.01, cifar


if __name__ == "__main__":
    if not SHARED.is_dir():
        sys.exit(f"skip: third-party data not found at {SHARED}")
    main()
