"""Run-directory layout, resume resolution, client state and exported weights.

    RUN_DIR/
      config.yaml          resolved config of the run (rewritten at each start)
      meta.json            git revision, world size, clipforge version
      metrics.jsonl        one line per logged step
      tokenizer.model      the sentencepiece model the text tower was trained with
      checkpoints/         DeepSpeed tags step_00000100/ ... and DeepSpeed's `latest` pointer;
                           a tag counts only once it holds COMPLETE (written after every rank
                           saved), so a save cut short by a crash is never resumed from
                           step_N/universal/: step_N converted for another world size, made
                           by the first resume that needs it
      model.safetensors    fp32 weights of the newest checkpoint (model only, no optimizer)

Client state saved beside DeepSpeed's shards, per rank: the step, the loader's position
(which implies the samples seen) and the RNG states of python, numpy and torch, so a resumed
run continues exactly where it stopped. COMPLETE records the world size and global batch; a
resume at another world size keeps that global batch (config.derive_batch) and has the engine
re-partition the ZeRO shards (engine/deepspeed.py, Engine.load; docs/resume.md).
"""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

import clipforge
from clipforge.config import Config

_TAG = re.compile(r"^step_(\d{8})$")
# Written by rank 0 after every rank has finished writing the tag (train.save's barrier).
COMPLETE = "COMPLETE"
# TAG/universal/: the tag converted for loading at another world size (engine/deepspeed.py).
UNIVERSAL = "universal"


def ckpt_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def git_revision() -> str:
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            timeout=10,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if rev.returncode:
        return "unknown"
    return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def snapshot_run(run_dir: Path, cfg: Any, world_size: int) -> None:
    """Resolved config and git revision into the run directory (rank 0 only)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    meta = {
        "git_revision": git_revision(),
        "clipforge_version": clipforge.__version__,
        "world_size": world_size,
        "torch": torch.__version__,
    }
    (run_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


def list_tags(run_dir: str | Path) -> list[str]:
    root = ckpt_dir(run_dir)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and _TAG.match(p.name))


def is_complete(root: Path, tag: str) -> bool:
    return (Path(root) / tag / COMPLETE).is_file()


def complete_tags(run_dir: str | Path) -> list[str]:
    root = ckpt_dir(run_dir)
    return [t for t in list_tags(run_dir) if is_complete(root, t)]


def mark_complete(root: Path, tag: str, world_size: int, global_batch: int | None = None) -> None:
    """Call on one rank once every rank's files of `tag` are on disk (after a barrier). The
    mark records the layout the tag was written with, which a resume on another world size
    reads before it builds anything (saved_layout)."""
    path = Path(root) / tag / COMPLETE
    tmp = path.with_suffix(".tmp")
    record: dict[str, Any] = {"tag": tag, "world_size": world_size}
    if global_batch is not None:
        record["global_batch"] = global_batch
    tmp.write_text(json.dumps(record) + "\n")
    tmp.replace(path)


def saved_layout(root: Path, tag: str) -> tuple[int, int | None]:
    """(world size, global batch) a complete tag was written with. The global batch is None for
    tags written before it was recorded, unless rank 0's loader state gives it."""
    record = json.loads((Path(root) / tag / COMPLETE).read_text())
    world, total = int(record["world_size"]), record.get("global_batch")
    if total is None and has_rank_state(root, tag, 0):
        geo = load_rank_state(root, tag, 0).get("loader", {}).get("geometry")
        if isinstance(geo, dict):
            total = int(geo["batch"]) * int(geo["world"])
    return world, (int(total) if total is not None else None)


def resumed_global_batch(run_dir: str | Path, resume: str | None) -> int | None:
    """The global batch of the checkpoint `resume` names in run_dir (None: a fresh run, or a
    tag from before the global batch was recorded); raises FileNotFoundError as resolve_resume."""
    found = resolve_resume(run_dir, resume)
    return saved_layout(*found)[1] if found is not None else None


def unmark_complete(root: Path, tag: str) -> None:
    """Before (re)writing a tag: until it is marked again it is not a resume candidate."""
    (Path(root) / tag / COMPLETE).unlink(missing_ok=True)


def resolve_resume(run_dir: str | Path, resume: str | None) -> tuple[Path, str] | None:
    """`latest` -> newest complete tag in run_dir; a path -> that tag directory; None -> fresh.

    DeepSpeed's own `latest` pointer is not trusted: it names the tag as soon as rank 0 has
    written it, while other ranks may still be writing (or have been killed) mid-save.
    """
    if not resume:
        return None
    if resume == "latest":
        tags = complete_tags(run_dir)
        return (ckpt_dir(run_dir), tags[-1]) if tags else None
    path = Path(resume)
    if not path.is_dir():
        raise FileNotFoundError(f"resume={resume}: no such checkpoint directory")
    if _TAG.match(path.name):
        if not is_complete(path.parent, path.name):
            raise FileNotFoundError(
                f"resume={resume}: incomplete checkpoint (no {COMPLETE}: its save was cut "
                "short); resume from an earlier one"
            )
        return path.parent, path.name
    if (path / "checkpoints").is_dir():
        return resolve_resume(path, "latest")
    raise FileNotFoundError(f"resume={resume}: not a run directory or a step_NNNNNNNN checkpoint")


def seed_all(seed: int) -> None:
    """Seed python, numpy and torch (all devices): a run's start is a function of its seed."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    # numpy's key array travels as a tensor so that loading needs no pickle (weights_only).
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_rank_state(root: Path, tag: str, rank: int, state: dict[str, Any]) -> None:
    """Per-rank client state (loader position and RNG differ by rank; DeepSpeed's client_state
    is written by rank 0 only). Written before DeepSpeed's shards; rank 0 first removes the
    tag's COMPLETE mark, in case an older save of the same tag is being overwritten."""
    path = Path(root) / tag / f"client_rank{rank:05d}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        unmark_complete(root, tag)
        # A conversion of the old contents for another world size (engine/deepspeed.py) would
        # outlive them: it goes with the mark.
        shutil.rmtree(path.parent / UNIVERSAL, ignore_errors=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def has_rank_state(root: Path, tag: str, rank: int) -> bool:
    return (Path(root) / tag / f"client_rank{rank:05d}.pt").is_file()


def load_rank_state(root: Path, tag: str, rank: int) -> dict[str, Any]:
    path = Path(root) / tag / f"client_rank{rank:05d}.pt"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} missing: resuming needs the world size the checkpoint was written with"
        )
    return torch.load(path, weights_only=True)


def prune(run_dir: str | Path, keep: int) -> list[str]:
    """Delete all but the newest `keep` complete tags (0 keeps everything), and incomplete
    tags older than the newest complete one (left by a crash mid-save); returns them."""
    complete = complete_tags(run_dir)
    removed = complete[:-keep] if keep > 0 else []
    if complete:
        removed += [t for t in list_tags(run_dir) if t < complete[-1] and t not in complete]
    if not removed:
        return []
    for tag in removed:
        shutil.rmtree(ckpt_dir(run_dir) / tag, ignore_errors=True)
    return removed


def export_weights(run_dir: Path, state_dict: dict[str, torch.Tensor], step: int) -> Path:
    """fp32 safetensors of the model (the task's `model.` prefix stripped), atomically."""
    sd = {
        k.removeprefix("model."): v.contiguous()
        for k, v in state_dict.items()
        if k.startswith("model.")
    }
    path = Path(run_dir) / "model.safetensors"
    tmp = path.with_suffix(".tmp")
    save_file(sd, str(tmp), metadata={"step": str(step), "format": "clipforge/1"})
    tmp.replace(path)
    return path


def run_config(run_dir: str | Path) -> Config:
    """RUN_DIR/config.yaml as the typed Config: merged over the schema, so a run saved before a
    field existed loads with that field's default, and a key the schema lacks is an error."""
    raw = OmegaConf.load(Path(run_dir) / "config.yaml")
    if "model" in raw and "name" in raw.model:  # a field of runs saved before 2026-12-01
        raw.model.pop("name")
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), raw))  # type: ignore[return-value]


def load_exported(run_dir: str | Path) -> tuple[dict[str, torch.Tensor], Config]:
    """Weights and typed config of a run: safetensors, so nothing is unpickled."""
    run_dir = Path(run_dir)
    path = run_dir / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(
            f"{run_dir}: no model.safetensors (has the run saved a checkpoint?)"
        )
    return load_file(str(path)), run_config(run_dir)
