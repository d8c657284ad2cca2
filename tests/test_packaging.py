"""The package as users get it: a wheel, installed away from the source tree, configs inside.

    .venv/bin/python -m pytest tests/test_packaging.py -q

The wheel is built from this checkout and installed with `pip install --target` into a
temporary folder; every command then runs from another temporary folder with only that folder
on PYTHONPATH (dependencies come from the test environment), so nothing can reach the
repository's src/ or conf/.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = [
    "clipforge-train",
    "clipforge-check",
    "clipforge-eval",
    "clipforge-predict",
    "clipforge-embed",
    "clipforge-export",
    "clipforge-convert",
    "clipforge-tokenizer",
    "clipforge-inspect",
    "clipforge-merge-manifests",
    "clipforge-filter",
    "clipforge-report",
]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder the wheel was installed into (its bin/ holds the console scripts)."""
    dist, target = tmp_path_factory.mktemp("dist"), tmp_path_factory.mktemp("site")
    # Built from a copy of the tracked files: an in-tree build leaves build/lib behind, whose
    # stale modules (a file deleted since) the next wheel would still ship.
    src = tmp_path_factory.mktemp("src") / "clipforge"
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    for name in files:
        if (REPO / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist), str(src)],
        check=True,
        timeout=300,
    )
    (wheel,) = dist.glob("clipforge-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "clipforge/conf/train.yaml" in names and "clipforge/conf/model/tiny.yaml" in names
    # The zero-shot benchmarks' class names and templates (eval.zeroshot=imagenet1k:PATH).
    bench = "clipforge/eval/benchmarks/"
    shipped = {
        f"{bench}{name}/{file}"
        for name in ("imagenet1k", "cifar10", "cifar100")
        for file in ("classnames.txt", "zeroshot_classification_templates.txt")
    }
    shipped |= {f"{bench}imagenet1k/synsets.txt", f"{bench}README.md", f"{bench}__init__.py"}
    shipped.add(f"{bench}imagenet1k/zeroshot_classification_templates_openai7.txt")
    assert shipped <= set(names), sorted(shipped - set(names))
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True)
    return target


def _run(installed: Path, cwd: Path, *cmd: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.update(PYTHONPATH=str(installed), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_wheel_is_imported_not_the_source_tree(installed: Path, tmp_path: Path) -> None:
    proc = _run(
        installed,
        tmp_path,
        sys.executable,
        "-c",
        "import clipforge, clipforge.conf, data_tools; "
        "print(clipforge.__file__, clipforge.conf.__file__, data_tools.__file__)",
    )
    assert proc.returncode == 0, proc.stderr
    assert all(p.startswith(str(installed)) for p in proc.stdout.split()), proc.stdout


def test_benchmark_files_load_from_the_wheel(installed: Path, tmp_path: Path) -> None:
    proc = _run(
        installed,
        tmp_path,
        sys.executable,
        "-c",
        "from clipforge.eval import benchmarks as b; i = b.load('imagenet1k'); "
        "print(b.__file__, len(i.classnames), len(i.templates), len(i.synsets), "
        "len(b.load('imagenet1k', 'openai7').templates), len(b.load('cifar100').classnames))",
    )
    assert proc.returncode == 0, proc.stderr
    path, *counts = proc.stdout.split()
    assert path.startswith(str(installed)) and counts == ["1000", "80", "1000", "7", "100"]


def test_train_two_steps_from_another_folder(installed: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = _run(
        installed,
        tmp_path,
        str(installed / "bin" / "clipforge-train"),
        "experiment=smoke_cpu",
        "train.steps=2",
        "checkpoint.every=0",
        f"run_dir={run_dir}",
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "step 2/2" in proc.stdout
    assert (run_dir / "model.safetensors").is_file()


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_console_script_runs_from_another_folder(
    installed: Path, tmp_path: Path, script: str
) -> None:
    proc = _run(installed, tmp_path, str(installed / "bin" / script), "--help", timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.strip()
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_console_script_reports_a_bad_flag_in_one_line(
    installed: Path, tmp_path: Path, script: str
) -> None:
    """Not argparse's (or hydra's) usage block: one line, exit 2, nothing written."""
    proc = _run(installed, tmp_path, str(installed / "bin" / script), "--no-such-flag", timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_convert_then_report_from_another_folder(installed: Path, tmp_path: Path) -> None:
    """The dataset builder's console scripts on real files: clipforge-convert writes shards,
    clipforge-report a page about them."""
    from test_convert import make_images, write_csv

    make_images(tmp_path / "img")
    table = write_csv(tmp_path / "rows.csv")
    bin_ = installed / "bin"
    convert = [str(bin_ / "clipforge-convert"), "--input", str(table), "--images", "img"]
    convert += ["--output", "shards", "--image-size", "64", "--processes", "2", "--no-progress"]
    proc = _run(installed, tmp_path, *convert)
    assert proc.returncode == 0 and "wrote 7 samples" in proc.stderr, proc.stderr[-3000:]
    proc = _run(installed, tmp_path, str(bin_ / "clipforge-report"), "shards", "-o", "r.html")
    assert proc.returncode == 0, proc.stderr[-3000:]
    page = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert "row 0" in page and "decode failed" in page  # a caption, a failure reason
