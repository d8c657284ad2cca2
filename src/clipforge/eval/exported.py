"""A trained run's exported model, ready to encode: RUN_DIR/model.safetensors + config.yaml +
tokenizer.model (checkpoint.load_exported). No DeepSpeed, no optimizer state, any device.

    from clipforge.eval.exported import load_run
    run = load_run("runs/a"); feats = run.encode_text(run.tokenizer(["a photo of a cat."]))
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch

from clipforge.checkpoint import load_exported
from clipforge.config import Config
from clipforge.data.shards import SourceError
from clipforge.data.tokenizer import Tokenizer
from clipforge.data.transforms import eval_transform
from clipforge.engine import dist
from clipforge.eval.suite import Encoders
from clipforge.model import build_model
from clipforge.model.clip import CLIP

T = TypeVar("T")


@dataclass
class ExportedRun:
    model: CLIP
    tokenizer: Tokenizer
    cfg: Config
    device: torch.device

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images.to(self.device))

    @torch.no_grad()
    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(tokens.to(self.device))

    def logit_scale(self) -> float:
        return float(self.model.scale())

    def encoders(self) -> Encoders:
        transform = eval_transform(self.cfg.model.image.image_size, self.cfg.data.augment)
        return Encoders(self.encode_image, self.encode_text, self.tokenizer, transform)


def pick_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    if name == "auto":
        return (
            torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
        )
    return torch.device(name)


def load_run(run_dir: str | Path, device: torch.device | str = "cpu") -> ExportedRun:
    """Rebuild the model from the run's resolved config and load its exported fp32 weights."""
    run_dir = Path(run_dir)
    tok_path = run_dir / "tokenizer.model"
    if not tok_path.is_file():
        raise FileNotFoundError(f"{run_dir}: no tokenizer.model (was it trained on shards?)")
    state, cfg = load_exported(run_dir)
    tokenizer = Tokenizer(str(tok_path), cfg.model.text.context_length)
    model = build_model(cfg.model, vocab_size=tokenizer.vocab_size)
    model.load_state_dict(state)
    device = torch.device(device)
    return ExportedRun(model.to(device).eval(), tokenizer, cfg, device)


def on_ranks(
    checkpoint: str | Path, device: str, work: Callable[[ExportedRun, int, int], T]
) -> tuple[int, T] | None:
    """The command-line tools' frame: load the run and call work(run, rank, world_size).

    Under torchrun (WORLD_SIZE > 1) this joins the process group first, each rank on its own
    device, and leaves it afterwards; one process needs none. Returns (rank, result), or None
    once a bad input (missing files, an unusable set) has been printed as one error line.
    """
    info = dist.setup() if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
    rank, world = (info.rank, info.world_size) if info else (0, 1)
    try:
        run = load_run(checkpoint, info.device if info else pick_device(device))
        return rank, work(run, rank, world)
    except (SourceError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return None
    finally:
        if info:
            dist.teardown()
