"""Every shipped config composes against the typed schema and validates."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from clipforge.config import Config, ConfigError, register, validate

CONF = Path(__file__).resolve().parents[1] / "conf"
register()


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def _compose(*overrides: str) -> Config:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        raw = compose(config_name="train", overrides=list(overrides))
    return OmegaConf.to_object(raw)


GROUPS = ["model", "data", "loss", "optim", "sched", "deepspeed", "eval", "logger"]
CASES = [(g, o) for g in GROUPS for o in _options(g)] + [
    ("experiment", e) for e in _options("experiment")
]


@pytest.mark.parametrize(("group", "option"), CASES, ids=[f"{g}={o}" for g, o in CASES])
def test_config_composes_and_validates(group: str, option: str):
    cfg = _compose(f"{group}={option}", "data.train=/some/shards")
    assert isinstance(cfg, Config)
    validate(cfg, world_size=2)


def test_every_group_has_options():
    for group in GROUPS + ["experiment"]:
        assert _options(group), f"conf/{group}/ is empty"


def test_deepspeed_stage_follows_the_file():
    for stage in range(4):
        cfg = _compose(f"deepspeed=zero{stage}", "data.train=x")
        assert cfg.deepspeed["zero_optimization"]["stage"] == stage


def test_typo_fails_at_compose():
    with pytest.raises(ConfigCompositionException):
        _compose("train.stepz=3")


def test_validate_lists_every_problem():
    cfg = _compose("train.steps=0", "optim.lr=-1", "model.text.heads=7")
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    msg = str(err.value)
    for key in ("data.train", "train.steps", "optim.lr", "model.text.width"):
        assert key in msg


def test_precision_is_checked_against_the_device(monkeypatch):
    import torch

    from clipforge.engine import precision

    cfg = _compose("experiment=smoke_cpu", "train.precision=fp16")
    validate(cfg, 1)  # without a device only the name is checked
    monkeypatch.setattr(precision, "supports", lambda p, d: p != "fp16")
    with pytest.raises(ConfigError) as err:
        validate(cfg, 1, torch.device("cpu"))
    msg = str(err.value)
    assert "\n" not in msg and "train.precision=fp16" in msg and "fp32" in msg
    cfg.train.precision = "auto"  # resolves to what the device has: fp32 on a CPU
    validate(cfg, 1, torch.device("cpu"))
    assert precision.resolve("auto", torch.device("cpu")) == "fp32"


def test_deepspeed_and_timm_typos_are_reported_with_the_rest():
    cfg = _compose(
        "experiment=smoke_cpu",
        "+deepspeed.zero_optimization.stag=3",
        "+deepspeed.train_batch_size=64",
        "+model.image.timm_kwargs.depthh=3",
        "train.steps=0",
    )
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    msg = str(err.value)
    assert "\n" not in msg
    assert "deepspeed.zero_optimization.stag is not a ZeRO option (did you mean stage?)" in msg
    assert "deepspeed.train_batch_size is derived: set train.batch_size" in msg
    assert "depthh" in msg and "train.steps" in msg


def test_deepspeed_keys_we_pass_on_are_deepspeeds():
    """The allow-lists name real DeepSpeed settings (read from its sources, not imported)."""
    import importlib.util

    from clipforge.config import DS_SECTIONS, DS_ZERO_KEYS

    root = Path(importlib.util.find_spec("deepspeed").origin).parent
    zero = (root / "runtime" / "zero" / "config.py").read_text()
    for key in DS_ZERO_KEYS:
        assert f"{key}:" in zero or f'"{key}"' in zero, key
    sources = "".join(
        p.read_text() for p in root.rglob("*.py") if "config" in p.name or "constants" in p.name
    )
    for key in DS_SECTIONS:
        assert f'"{key}"' in sources, key


def test_loss_siglip_selects_the_sigmoid_loss_and_its_bias():
    cfg = _compose("loss=siglip", "data.train=x")
    assert (cfg.loss.kind, cfg.loss.dist_impl) == ("siglip", "ring")
    assert cfg.model.init_logit_scale == pytest.approx(math.log(10))
    assert cfg.model.init_logit_bias == -10.0
    validate(cfg)
    assert _compose("loss=siglip", "loss.dist_impl=gather", "data.train=x").loss.dist_impl == (
        "gather"
    )
    # The softmax default has no bias.
    assert _compose("data.train=x").model.init_logit_bias is None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["loss.kind=siglip"], "loss.kind=siglip needs a learned bias"),
        (["model.init_logit_bias=-10"], "model.init_logit_bias is only for loss.kind=siglip"),
        (["loss=siglip", "loss.dist_impl=bidir"], "loss.dist_impl must be one of ring, gather"),
        (["loss.kind=sigmoid"], "loss.kind must be one of clip, siglip"),
    ],
)
def test_loss_choices_are_checked(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(_compose(*overrides, "data.train=x"))
