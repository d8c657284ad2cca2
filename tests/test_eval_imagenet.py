"""The zero-shot benchmark kit: shipped class names and templates, `eval.zeroshot=NAME:PATH`,
and an ImageNet-layout folder (synset sub-folders of real photos) read in place, which must
score exactly as the shards the converter makes of it.

    .venv/bin/python -m pytest tests/test_eval_imagenet.py -q
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from importlib import resources
from pathlib import Path

import pytest
import timm
import torch
from eval_data import REPO, env, run, trained_run
from open_clip import zero_shot_metadata
from PIL import Image

from clipforge.config import EvalConfig, eval_problems
from clipforge.data.eval_loader import EvalLoader
from clipforge.data.shards import SourceError, resolve
from clipforge.eval import benchmarks, suite, zeroshot
from clipforge.eval.exported import load_run

# Synset -> the CIFAR-10 class whose test photos fill it (airliner <- airplane, ...).
SYNSETS = {
    "n02690373": "airplane",  # airliner
    "n02123045": "cat",  # tabby
    "n03095699": "ship",  # container ship
    "n04467665": "truck",  # trailer truck
}
PER_SYNSET = 5
TIMM_SYNSETS = (Path(timm.__file__).parent / "data" / "_info" / "imagenet_synsets.txt").read_text()


def _lines(name: str, file: str) -> list[str]:
    """A shipped file's lines, read as the package holds it (one per line, final newline)."""
    text = resources.files(benchmarks.__name__).joinpath(name, file).read_text(encoding="utf-8")
    assert text.endswith("\n") and "\r" not in text
    return text.split("\n")[:-1]


# -- the shipped files -------------------------------------------------------------------------
def test_shipped_imagenet_names_templates_and_synsets():
    inet = benchmarks.load("imagenet1k")
    assert list(inet.classnames) == list(zero_shot_metadata.IMAGENET_CLASSNAMES)
    assert inet.classnames[0] == "tench" and inet.classnames[999] == "toilet paper"
    want80 = [t("{c}") for t in zero_shot_metadata.OPENAI_IMAGENET_TEMPLATES]
    assert list(inet.templates) == want80 and len(want80) == 80
    seven = benchmarks.load("imagenet1k", "openai7").templates
    assert list(seven) == [t("{c}") for t in zero_shot_metadata.SIMPLE_IMAGENET_TEMPLATES]
    assert len(seven) == 7 and seven[0] == "itap of a {c}."
    # Class index order is the sorted wnids, as timm (and torchvision's ImageFolder) have it.
    assert list(inet.synsets) == TIMM_SYNSETS.split() and list(inet.synsets) == sorted(inet.synsets)
    assert benchmarks.template_sets("imagenet1k") == ["openai7"]


def test_shipped_cifar_names_and_templates():
    c10, c100 = benchmarks.load("cifar10"), benchmarks.load("cifar100")
    assert c10.classnames[:3] == ("airplane", "automobile", "bird") and len(c10.classnames) == 10
    assert c10.classnames[9] == "truck" and list(c10.classnames) == sorted(c10.classnames)
    assert len(c100.classnames) == 100 == len(set(c100.classnames))
    # CIFAR-100's label order: its fine_label_names (underscored) sorted.
    underscored = [c.replace(" ", "_") for c in c100.classnames]
    assert underscored == sorted(underscored) and "aquarium fish" in c100.classnames
    assert (
        len(c10.templates) == len(c100.templates) == 18 and c10.templates[0] == "a photo of a {c}."
    )
    assert c10.synsets == () and benchmarks.names() == ["cifar10", "cifar100", "imagenet1k"]


def test_shipped_files_are_clip_benchmark_layout():
    for name in benchmarks.names():
        for file in (benchmarks.CLASSNAMES, benchmarks.TEMPLATES):
            lines = _lines(name, file)
            assert lines and all(line == line.strip() and line for line in lines), (name, file)
        templates = _lines(name, benchmarks.TEMPLATES)
        assert all(t.count("{") == 1 and "{c}" in t for t in templates), name
        assert zeroshot.fill(templates[0], "cat") == templates[0].replace("{c}", "cat")


# -- entries -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "source, want",
    [
        ("imagenet1k:/data/imagenet/val", ("imagenet1k", None, "/data/imagenet/val")),
        ("imagenet1k@openai7:s3://b/val", ("imagenet1k", "openai7", "s3://b/val")),
        ("cifar10:rel/test", ("cifar10", None, "rel/test")),
        ("s3://bucket/shards", (None, None, "s3://bucket/shards")),
        ("simplecache::s3://bucket/x", (None, None, "simplecache::s3://bucket/x")),
        ("pipe:cat a.tar", (None, None, "pipe:cat a.tar")),
        ("/data/shards", (None, None, "/data/shards")),
    ],
)
def test_entries_parse(source, want):
    e = benchmarks.parse_entry(source)
    assert (e.benchmark, e.templates, e.path) == want


def test_unknown_benchmark_or_template_set_fails_validation():
    problems = eval_problems(EvalConfig(zeroshot=["imagenet:/x", "cifar10@openai7:/y", "/z"]))
    assert len(problems) == 2, problems
    assert "unknown benchmark 'imagenet' (known: cifar10, cifar100, imagenet1k)" in problems[0]
    assert "cifar10 has no template set 'openai7'" in problems[1]
    assert eval_problems(EvalConfig(zeroshot="imagenet1k@openai7:/x")) == []


def test_entry_set_names():
    assert suite.set_names(["imagenet1k:/a/val", "imagenet1k@openai7:/a/val"]) == [
        "imagenet1k",
        "imagenet1k_openai7",
    ]
    assert suite.set_names(["imagenet1k:/a/val", "imagenet1k:/b/shards"]) == [
        "imagenet1k_val",
        "imagenet1k_shards",
    ]


# -- a CLIP_benchmark export -------------------------------------------------------------------
def _webp(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (seed * 40 % 256, 90, 30)).save(buf, format="WEBP")
    return buf.getvalue()


def _clip_benchmark_export(root: Path) -> Path:
    """CLIP_benchmark's layout: ROOT/test/{0,1}.tar (.webp + .cls), test/nshards.txt, and the
    class names and `{c}` templates in ROOT."""
    (root / "test").mkdir(parents=True)
    for s in range(2):
        with tarfile.open(root / "test" / f"{s}.tar", "w") as tar:
            for i in range(3):
                key, label = f"s{s}_{i:04d}", (3 * s + i) % 10
                for ext, data in (("webp", _webp(label)), ("cls", str(label).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    (root / "test" / "nshards.txt").write_text("2\n")
    (root / "classnames.txt").write_text("\n".join(benchmarks.load("cifar10").classnames) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\nart of {c}.\n")
    (root / "dataset_type.txt").write_text("classification\n")
    return root


def test_clip_benchmark_export_is_read_from_its_root_or_split(tmp_path):
    root = _clip_benchmark_export(tmp_path / "wds_cifar10")
    for source in (root, root / "test"):
        sset = resolve(str(source))
        assert [Path(u).name for u in sset.urls] == ["0.tar", "1.tar"]
        assert sset.classnames[0] == "airplane" and sset.templates[1] == "art of {c}."
    zs = suite.zeroshot_set(str(root), EvalConfig())
    assert zs.templates == ["a photo of a {c}.", "art of {c}."] and zs.label_map is None
    named = suite.zeroshot_set(f"cifar10:{root}", EvalConfig())  # the shipped 18 templates
    assert len(named.templates) == 18 and named.label_map is None
    batches = list(EvalLoader(named.data, lambda im: torch.zeros(1), 4))
    assert sorted(int(c) for b in batches for c in b["cls"]) == [0, 1, 2, 3, 4, 5]


# -- the folder, in place and converted --------------------------------------------------------
def _cifar_photos(shared_data: Path, classes: set[str], per_class: int) -> dict[str, list[bytes]]:
    """The first `per_class` CIFAR-10 test JPEGs of each class, as bytes."""
    found: dict[str, list[bytes]] = {c: [] for c in classes}
    with tarfile.open(shared_data / "cifar10" / "test.tar.gz") as tar:
        for m in tar:
            parts = m.name.split("/")
            cls = parts[-2] if m.isfile() and len(parts) >= 3 else None
            if cls in found and len(found[cls]) < per_class:
                found[cls].append(tar.extractfile(m).read())  # type: ignore[union-attr]
            if all(len(v) == per_class for v in found.values()):
                break
    assert all(len(v) == per_class for v in found.values()), {k: len(v) for k, v in found.items()}
    return found


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    # The folder test_predict.py trains in: one tiny run per session.
    return trained_run(tmp_path_factory.getbasetemp() / "eval_run")


@pytest.fixture(scope="module")
def imagenet_val(tmp_path_factory, shared_data) -> Path:
    """val/<synset>/ILSVRC2012_val_*.JPEG: CIFAR-10 test photos, plus two COCO photos (640 px,
    so the eval transform really resizes) in the first synset."""
    val = tmp_path_factory.mktemp("imagenet") / "val"
    photos = _cifar_photos(shared_data, set(SYNSETS.values()), PER_SYNSET)
    n = 0
    for wnid, cifar in SYNSETS.items():
        (val / wnid).mkdir(parents=True)
        for data in photos[cifar]:
            n += 1
            (val / wnid / f"ILSVRC2012_val_{n:08d}.JPEG").write_bytes(data)
    coco = sorted((shared_data / "coco-mini" / "val2017").glob("*.jpg"))[:2]
    for path in coco:
        n += 1
        (val / "n02690373" / f"ILSVRC2012_val_{n:08d}.JPEG").write_bytes(path.read_bytes())
    return val


def _convert(folder: Path, out: Path) -> Path:
    # Bytes kept as they are (no resize, no re-encode): the shards hold the very same JPEGs.
    run("-m", "data_tools.convert", "--input", str(folder), "--caption-template",
        "a photo of a {label}", "--output", str(out), "--resize-mode", "no", "--reencode", "never",
        "--samples-per-shard", "7", "--processes", "1", "--no-progress")  # fmt: skip
    return out


def _eval_cli(*args: str) -> subprocess.CompletedProcess:
    script = Path(sys.executable).parent / "clipforge-eval"
    cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "clipforge.eval"]
    return subprocess.run(
        [*cmd, *args], cwd=REPO, env=env(), capture_output=True, text=True, timeout=600
    )


def test_imagenet_folder_and_its_shards_give_the_same_numbers(run_dir, imagenet_val, tmp_path):
    shards = _convert(imagenet_val, tmp_path / "shards")
    assert (shards / "classnames.txt").read_text().split() == sorted(SYNSETS)  # labels 0..3
    results = {}
    # The 7 templates keep the text side to 7,000 prompts (the 80 would be 80,000 through the
    # tiny text tower at eval.batch_size; test_folder_entry_* checks the 80 are the default).
    # Batches of 16 cross the 5-image synset folders.
    for kind, path in (("folder", imagenet_val), ("shards", shards)):
        proc = _eval_cli(f"checkpoint={run_dir}", f"eval.zeroshot=imagenet1k@openai7:{path}",
                         "eval.retrieval=null", f"out={tmp_path / kind}", "eval.batch_size=16",
                         "eval.workers=2", "eval.figures=false")  # fmt: skip
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        (out_line,) = proc.stdout.strip().splitlines()
        line = json.loads(out_line)
        details = json.loads((tmp_path / kind / "zeroshot_imagenet1k_openai7.json").read_text())
        assert line == {k: details[k] for k in line}
        results[kind] = details
    folder, converted = results["folder"], results["shards"]
    print({k: folder[k] for k in ("top1", "top5", "mean_per_class_recall", "samples")})
    for key in ("top1", "top5", "mean_per_class_recall", "samples", "per_class_recall"):
        assert folder[key] == converted[key], key
    # Every image predicted the same class by both (rows: the true class); the predictions
    # differ between images, so equal matrices say more than "all guessed one class".
    assert folder["confusion"] == converted["confusion"]
    predicted = {j for row in folder["confusion"] for j, n in enumerate(row) if n}
    assert len(predicted) > 1, predicted
    # Scored against all 1000 classes; each synset's images sit in the row timm's sorted wnid
    # list gives it (checked against timm, not the shipped copy).
    assert folder["set"] == "imagenet1k_openai7"
    assert folder["samples"] == PER_SYNSET * len(SYNSETS) + 2
    assert len(folder["classnames"]) == 1000 and folder["templates"][0] == "itap of a {c}."
    index = {w: i for i, w in enumerate(TIMM_SYNSETS.split())}
    rows = {i: sum(r) for i, r in enumerate(folder["confusion"]) if sum(r)}
    assert rows == {index[w]: PER_SYNSET + 2 * (w == "n02690373") for w in SYNSETS}
    assert folder["classnames"][index["n02690373"]] == "airliner"


def test_cifar_folder_and_its_shards_score_alike_in_process(run_dir, shared_data, tmp_path):
    """A 10-class set, where the tiny run scores above zero: class folders named as CIFAR
    names them, read in place and converted, through suite.run_zeroshot with 2 workers."""
    test = tmp_path / "test"
    for cls, photos in _cifar_photos(shared_data, {"cat", "ship", "truck"}, 6).items():
        (test / cls).mkdir(parents=True)
        for i, data in enumerate(photos):
            (test / cls / f"{i:04d}.jpg").write_bytes(data)
    shards = _convert(test, tmp_path / "shards")
    enc, cfg = load_run(run_dir).encoders(), EvalConfig(batch_size=5, workers=2, figures=False)
    a = suite.run_zeroshot(f"cifar10:{test}", enc, cfg, 0, 1, False)
    b = suite.run_zeroshot(f"cifar10:{shards}", enc, cfg, 0, 1, False)
    print(a.metrics)
    assert a.metrics == b.metrics and a.details == b.details
    assert a.metrics["samples"] == 18 and len(a.details["templates"]) == 18
    assert [sum(r) for r in a.details["confusion"]] == [0, 0, 0, 6, 0, 0, 0, 0, 6, 6]


def test_folder_entry_reads_every_image_with_the_default_80_templates(imagenet_val):
    zs = suite.zeroshot_set(f"imagenet1k:{imagenet_val}", EvalConfig())
    assert len(zs.classnames) == 1000 and len(zs.templates) == 80 and zs.label_map is None
    index = {w: i for i, w in enumerate(TIMM_SYNSETS.split())}
    assert zs.data.labels == [index[w] for w in sorted(SYNSETS)]
    got = [
        (k, int(c))
        for b in EvalLoader(zs.data, lambda im: torch.zeros(1), 3, rank=1, world=2)
        if not b["pad"]
        for k, c in zip(b["key"], b["cls"])
    ]
    # Rank 1 of 2 reads the second half of the 22 images, in folder order, with their classes.
    assert [k for k, _ in got] == [
        f"{w}/{p.stem}" for w in sorted(SYNSETS) for p in sorted((imagenet_val / w).iterdir())
    ][12:]
    assert all(c == index[k.split("/")[0]] for k, c in got)


def test_unknown_sub_folder_is_one_error_line(run_dir, imagenet_val, tmp_path):
    bad = tmp_path / "val"
    for wnid in ("n01440764", "n99999999", "tench"):
        (bad / wnid).mkdir(parents=True)
        (bad / wnid / "a.JPEG").write_bytes(
            next((imagenet_val / "n02123045").iterdir()).read_bytes()
        )
    proc = _eval_cli(
        f"checkpoint={run_dir}", f"eval.zeroshot=imagenet1k:{bad}", "eval.retrieval=null"
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        f"error: {bad}: sub-folder 'n99999999', 'tench' names no imagenet1k synset (e.g. n01440764)"
    ]


def test_folder_without_a_benchmark_and_unknown_classnames_are_refused(imagenet_val, tmp_path):
    with pytest.raises(SourceError, match="needs a benchmark for its class names"):
        suite.zeroshot_set(str(imagenet_val), EvalConfig())
    shards = tmp_path / "s"
    shards.mkdir()
    (shards / "00000.tar").write_bytes(b"")
    (shards / "classnames.txt").write_text("n02690373\ngoldfish\n")
    with pytest.raises(
        SourceError, match=r"'goldfish' \(classnames.txt line 2\) names no imagenet1k synset"
    ):
        suite.zeroshot_set(f"imagenet1k:{shards}", EvalConfig())
