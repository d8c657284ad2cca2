"""Exported weights load into open_clip 3.3.0 and compute the same embeddings.

    .venv/bin/python -m pytest tests/test_export.py -q

ViT-B/32 and RN50 go into open_clip's own configs with load_state_dict(strict=True); a tiny
custom model goes through the exported open_clip_config.json (`local-dir:`), with our
tokenizer's EOS id (3, not the largest id) as the pooling position.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from clipforge.checkpoint import export_weights
from clipforge.config import ModelConfig
from clipforge.export import (
    CLIP_BPE_VOCAB,
    UnsupportedArchitecture,
    main,
    open_clip_model_cfg,
    to_open_clip_state_dict,
)
from clipforge.model import build_model

open_clip = pytest.importorskip("open_clip")

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"
TOL = 1e-4


def model_cfg(name: str, vocab: int) -> ModelConfig:
    merged = OmegaConf.merge(
        OmegaConf.structured(ModelConfig), OmegaConf.load(CONF / f"{name}.yaml")
    )
    cfg: ModelConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    cfg.text.vocab_size = vocab
    return cfg


def tokens(rows: int, context: int, vocab: int, eos: int) -> torch.Tensor:
    """SOS, words, EOS, padding; words avoid the special ids so EOS marks one position."""
    g = torch.Generator().manual_seed(0)
    out = torch.zeros(rows, context, dtype=torch.long)
    for r, n in enumerate([5, context - 2][:rows]):
        out[r, 0] = vocab - 2 if eos == vocab - 1 else 2
        out[r, 1 : n + 1] = torch.randint(4, vocab - 2, (n,), generator=g)
        out[r, n + 1] = eos
    return out


def compare(ours, theirs, image_size: int, text: torch.Tensor) -> None:
    """Unnormalized image and text embeddings and the logit scale agree within TOL."""
    ours.eval()
    theirs.eval()
    images = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        mine_i = ours.encode_image(images, normalize=False)
        their_i = theirs.encode_image(images)
        mine_t = ours.encode_text(text, normalize=False)
        their_t = theirs.encode_text(text)
    torch.testing.assert_close(their_i, mine_i, atol=TOL, rtol=TOL)
    torch.testing.assert_close(their_t, mine_t, atol=TOL, rtol=TOL)
    assert theirs.logit_scale.exp().item() == pytest.approx(ours.scale().item())


def test_vit_b32_state_dict_loads_strict_into_open_clip() -> None:
    cfg = model_cfg("vit_b32", CLIP_BPE_VOCAB)
    torch.manual_seed(0)
    ours = build_model(cfg)
    theirs = open_clip.create_model("ViT-B-32")
    theirs.load_state_dict(to_open_clip_state_dict(ours.state_dict()), strict=True)
    compare(ours, theirs, 224, tokens(2, 77, CLIP_BPE_VOCAB, eos=CLIP_BPE_VOCAB - 1))
    # The generated config describes the same architecture as open_clip's own file.
    mine = open_clip_model_cfg(cfg, eos_id=None)
    theirs_cfg = open_clip.get_model_config("ViT-B-32")
    assert mine["embed_dim"] == theirs_cfg["embed_dim"]
    for tower in ("vision_cfg", "text_cfg"):
        for key, value in theirs_cfg[tower].items():
            assert mine[tower][key] == value, (tower, key)


def test_rn50_state_dict_loads_strict_into_open_clip() -> None:
    cfg = model_cfg("rn50", CLIP_BPE_VOCAB)
    torch.manual_seed(0)
    ours = build_model(cfg)
    theirs = open_clip.create_model("RN50")
    theirs.load_state_dict(to_open_clip_state_dict(ours.state_dict()), strict=True)
    compare(ours, theirs, 224, tokens(2, 77, CLIP_BPE_VOCAB, eos=CLIP_BPE_VOCAB - 1))
    mine = open_clip_model_cfg(cfg, eos_id=None)["vision_cfg"]
    assert mine["layers"] == [3, 4, 6, 3] and mine["width"] == 64 and mine["head_width"] == 64


def test_tiny_run_exports_a_folder_open_clip_builds(tmp_path: Path) -> None:
    """A run directory (weights + resolved config) -> `python -m clipforge.export` ->
    open_clip.create_model('local-dir:...'): same embeddings, pooled at our EOS id 3."""
    cfg = model_cfg("tiny", 512)
    torch.manual_seed(0)
    ours = build_model(cfg)
    run = tmp_path / "run"
    run.mkdir()
    export_weights(run, {f"model.{k}": v for k, v in ours.state_dict().items()}, step=1)
    OmegaConf.save(OmegaConf.create({"model": OmegaConf.structured(cfg)}), run / "config.yaml")
    assert main([str(run), "--out", str(tmp_path / "oc")]) == 0
    config = json.loads((tmp_path / "oc" / "open_clip_config.json").read_text())
    assert config["model_cfg"]["text_cfg"]["pool_type"] == "eos"
    assert config["model_cfg"]["text_cfg"]["eos_id"] == 3
    theirs = open_clip.create_model(f"local-dir:{tmp_path / 'oc'}")
    compare(ours, theirs, cfg.image.image_size, tokens(2, cfg.text.context_length, 512, eos=3))


def test_siglip_run_exports_its_bias_to_open_clip(tmp_path: Path) -> None:
    """A model trained with loss=siglip keeps its learned bias through the export: open_clip
    builds the parameter from the config and loads the trained value (strict)."""
    cfg = model_cfg("tiny", 512)
    cfg.init_logit_scale, cfg.init_logit_bias = math.log(10), -10.0
    torch.manual_seed(0)
    ours = build_model(cfg)
    with torch.no_grad():
        ours.logit_bias.fill_(-7.25)  # a trained value, not the init
    run = tmp_path / "run"
    run.mkdir()
    export_weights(run, {f"model.{k}": v for k, v in ours.state_dict().items()}, step=1)
    OmegaConf.save(OmegaConf.create({"model": OmegaConf.structured(cfg)}), run / "config.yaml")
    assert main([str(run), "--out", str(tmp_path / "oc")]) == 0
    theirs = open_clip.create_model(f"local-dir:{tmp_path / 'oc'}")
    assert theirs.logit_bias.item() == -7.25
    compare(ours, theirs, cfg.image.image_size, tokens(2, cfg.text.context_length, 512, eos=3))


def test_unsupported_image_tower_is_named() -> None:
    with pytest.raises(UnsupportedArchitecture, match="CLIP ViTs"):
        to_open_clip_state_dict({"visual.trunk.stem.0.weight": torch.zeros(1)})
    assert main(["/nonexistent/run"]) == 2
