"""model.init_from: a run starts from a clipforge export or an open_clip checkpoint.

    .venv/bin/python -m pytest tests/test_init_from.py -q

In process: the loader (clipforge/init_from.py, what train.py calls) against our exports and
open_clip 3.3.0's own models and checkpoint files; end to end: a tiny training run's export
starts a 2-rank ZeRO-3 run whose weights are the source's bit for bit, and a wrong
architecture stops the run with one line before any training.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import fsspec
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save, save_file
from test_export import model_cfg, tokens
from test_train import _ok, train

from clipforge import init_from
from clipforge.checkpoint import export_weights, load_exported
from clipforge.config import ConfigError, ModelConfig
from clipforge.export import main as export_main
from clipforge.export import open_clip_model_cfg
from clipforge.model import build_model

open_clip = pytest.importorskip("open_clip")

VOCAB = 512  # smoke_cpu's model.text.vocab_size
TOL = 1e-5


def tiny(**text) -> ModelConfig:
    cfg = model_cfg("tiny", VOCAB)
    for key, value in text.items():
        setattr(cfg.text, key, value)
    return cfg


def model(cfg: ModelConfig, seed: int):
    torch.manual_seed(seed)
    return build_model(cfg)


def state(m) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], atol=0.0) -> None:
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].shape == want[k].shape and got[k].dtype == want[k].dtype, k
        assert (got[k] - want[k]).abs().max().item() <= atol, k


def write_run(run: Path, m, cfg: ModelConfig) -> Path:
    run.mkdir(parents=True)
    export_weights(run, {f"model.{k}": v for k, v in m.state_dict().items()}, step=7)
    OmegaConf.save(OmegaConf.create({"model": OmegaConf.structured(cfg)}), run / "config.yaml")
    return run


def load(m, url: str | Path, strict: bool = True) -> str:
    return init_from.load_into(m, init_from.read(str(url)), strict)


# -- our own exports -----------------------------------------------------------------------------
def test_our_export_and_its_open_clip_export_load_bit_for_bit(tmp_path: Path) -> None:
    """A run's model.safetensors (file, run directory, file:// URL) and `python -m
    clipforge.export`'s open_clip folder give back exactly the source's tensors."""
    cfg = tiny()
    source = model(cfg, seed=0)
    with torch.no_grad():
        source.logit_scale.fill_(2.5)  # not the init the target starts from
    run = write_run(tmp_path / "run", source, cfg)
    assert export_main([str(run), "--out", str(tmp_path / "oc")]) == 0
    cases = {
        run / "model.safetensors": "clipforge",
        run: "clipforge",
        f"file://{run / 'model.safetensors'}": "clipforge",
        tmp_path / "oc" / "open_clip_model.safetensors": "open_clip",
        tmp_path / "oc": "open_clip",
    }
    for url, fmt in cases.items():
        target = model(cfg, seed=1)
        line = load(target, url)
        assert line.startswith(f"initialized from {url} ({fmt}, "), line
        assert_same(state(target), state(source))
        assert target.logit_scale.shape == (1,)


def test_any_fsspec_url(tmp_path: Path) -> None:
    cfg = tiny()
    source = model(cfg, seed=0)
    with fsspec.open("memory://init/model.safetensors", "wb") as f:
        f.write(save(source.state_dict()))
    target = model(cfg, seed=1)
    load(target, "memory://init/model.safetensors")
    assert_same(state(target), state(source))


# -- open_clip's models and files ----------------------------------------------------------------
def open_clip_model(tmp_path: Path, cfg: ModelConfig, seed: int = 2):
    """open_clip's own model, with its own init, built from the config our export writes."""
    folder = tmp_path / "oc_cfg"
    folder.mkdir(parents=True)
    config = {"model_cfg": open_clip_model_cfg(cfg, eos_id=3), "preprocess_cfg": {}}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    torch.manual_seed(seed)
    theirs = open_clip.create_model(f"local-dir:{folder}", load_weights=False)
    with torch.no_grad():
        theirs.logit_scale.fill_(math.log(20.0))
    return theirs.eval()


def save_open_clip_train(theirs, path: Path) -> None:
    """open_clip_train's checkpoint: DDP's `module.` names, an optimizer that has stepped."""
    opt = torch.optim.AdamW(theirs.parameters(), lr=0.0)
    for p in theirs.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    sd = {f"module.{k}": v for k, v in theirs.state_dict().items()}
    torch.save({"epoch": 3, "name": "run", "state_dict": sd, "optimizer": opt.state_dict()}, path)


@pytest.mark.parametrize("kind", ["safetensors", "open_clip_train"])
def test_open_clip_checkpoint_gives_open_clips_embeddings(tmp_path: Path, kind: str) -> None:
    cfg = tiny()
    theirs = open_clip_model(tmp_path, cfg)
    if kind == "safetensors":
        path = tmp_path / "open_clip_model.safetensors"
        save_file(theirs.state_dict(), str(path))
    else:
        path = tmp_path / "epoch_3.pt"
        save_open_clip_train(theirs, path)
    ours = model(cfg, seed=1)
    assert f"(open_clip, {len(ours.state_dict())} tensors)" in load(ours, path)
    ours.eval()
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    text = tokens(2, cfg.text.context_length, VOCAB, eos=3)
    with torch.no_grad():
        for mine, their in [
            (ours.encode_image(images), theirs.encode_image(images, normalize=True)),
            (ours.encode_text(text), theirs.encode_text(text, normalize=True)),
            (ours.encode_image(images, normalize=False), theirs.encode_image(images)),
        ]:
            torch.testing.assert_close(mine, their, atol=TOL, rtol=TOL)
    assert ours.logit_scale.item() == theirs.logit_scale.item()


def test_logit_bias_rule_between_softmax_and_sigmoid_sources(tmp_path: Path) -> None:
    """A softmax-trained source starts a SigLIP model with the bias at model.init_logit_bias;
    a SigLIP source's bias loads into a SigLIP model and is dropped by a softmax one."""
    clip_cfg, sig_cfg = tiny(), tiny()
    sig_cfg.init_logit_bias = -10.0
    clip_src = open_clip_model(tmp_path / "a", clip_cfg)
    clip_file = tmp_path / "clip.safetensors"
    save_file(clip_src.state_dict(), str(clip_file))
    target = model(sig_cfg, seed=1)
    assert "logit_bias starts at model.init_logit_bias" in load(target, clip_file)
    assert target.logit_bias.item() == -10.0
    assert target.logit_scale.item() == clip_src.logit_scale.item()

    sig_src = open_clip_model(tmp_path / "b", sig_cfg)
    with torch.no_grad():
        sig_src.logit_bias.fill_(-7.25)
    sig_file = tmp_path / "siglip.safetensors"
    save_file(sig_src.state_dict(), str(sig_file))
    target = model(sig_cfg, seed=1)
    load(target, sig_file)
    assert target.logit_bias.shape == (1,) and target.logit_bias.item() == -7.25
    target = model(clip_cfg, seed=1)
    assert "dropped the file's logit_bias" in load(target, sig_file)


# -- refusals ------------------------------------------------------------------------------------
def test_wrong_depth_names_the_blocks_on_one_line(tmp_path: Path) -> None:
    src = write_run(tmp_path / "run", model(tiny(), seed=0), tiny())
    with pytest.raises(init_from.InitMismatch) as err:
        load(model(tiny(layers=2), seed=1), src)
    msg = str(err.value)
    assert "\n" not in msg
    assert "unexpected 24: text.resblocks.{2..3}.*" in msg, msg
    assert "missing" not in msg and "shape" not in msg
    with pytest.raises(
        init_from.InitMismatch, match=r"missing 24: text\.resblocks\.\{4\.\.5\}\.\*"
    ):
        load(model(tiny(layers=6), seed=1), src)


def test_wrong_width_names_the_shapes_in_the_files_names(tmp_path: Path) -> None:
    src = tmp_path / "open_clip_model.safetensors"
    save_file(open_clip_model(tmp_path, tiny()).state_dict(), str(src))
    with pytest.raises(init_from.InitMismatch) as err:
        load(model(tiny(width=64), seed=1), src)
    msg = str(err.value)
    assert "\n" not in msg and "shape mismatch 53 (file vs model): " in msg, msg
    assert "ln_final.weight [128] vs [64]" in msg and "(+47 more)" in msg, msg


def test_not_strict_loads_what_fits_and_says_what_was_kept(tmp_path: Path) -> None:
    source = model(tiny(), seed=0)
    src = write_run(tmp_path / "run", source, tiny())
    init = model(tiny(layers=6), seed=1)
    before, want = state(init), state(source)
    line = load(init, src, strict=False)
    assert "not loaded (kept at init): missing 24: text.resblocks.{4..5}.*" in line, line
    after = state(init)
    for k, v in after.items():
        assert torch.equal(v, want[k] if k in want else before[k]), k


def test_unreadable_or_foreign_files_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such file"):
        init_from.read(str(tmp_path / "nope.safetensors"))
    with pytest.raises(FileNotFoundError, match="no model.safetensors or"):
        init_from.read(str(tmp_path))
    (tmp_path / "junk.bin").write_bytes(b"not weights at all")
    with pytest.raises(ConfigError, match="weights_only=True"):
        init_from.read(str(tmp_path / "junk.bin"))
    torch.save({"fn": ModelConfig()}, tmp_path / "pickled.pt")  # code to run: refused
    with pytest.raises(ConfigError, match=r"weights_only=True \(Unsupported global: .*ModelConf"):
        init_from.read(str(tmp_path / "pickled.pt"))
    torch.save({"visual.conv1.weight": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ConfigError, match="neither a clipforge export nor an open_clip"):
        init_from.read(str(tmp_path / "other.pt"))
    custom = {"text.token_embedding.weight": torch.zeros(1), "text.transformer.x": torch.zeros(1)}
    save_file(custom, str(tmp_path / "custom.safetensors"))
    with pytest.raises(ConfigError, match="CustomTextCLIP"):
        init_from.read(str(tmp_path / "custom.safetensors"))
    # open_clip's names need an image tower export.py can map (a CLIP ViT or ResNet).
    oc = tmp_path / "oc.safetensors"
    save_file(open_clip_model(tmp_path, tiny()).state_dict(), str(oc))
    resnet = model_cfg("resnet_tiny", VOCAB)
    with pytest.raises(ConfigError, match="no open_clip layout"):
        load(model(resnet, seed=1), oc)


def test_a_resumed_run_takes_its_weights_from_its_checkpoint(tmp_path: Path) -> None:
    """init_from is read only for a fresh start: a resume never needs the file again."""
    from clipforge.checkpoint import mark_complete
    from clipforge.config import Config
    from clipforge.train import read_init

    cfg = Config(run_dir=str(tmp_path / "run"), resume="latest")
    cfg.model.init_from = str(tmp_path / "moved_away.safetensors")
    with pytest.raises(FileNotFoundError, match="moved_away"):
        read_init(cfg)  # nothing to resume yet: the file is read (and is missing)
    (tmp_path / "run" / "checkpoints" / "step_00000002").mkdir(parents=True)
    mark_complete(tmp_path / "run" / "checkpoints", "step_00000002", world_size=1)
    assert read_init(cfg) is None


# -- end to end ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def source_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny trained run: one step from the smoke recipe, then its exported weights."""
    run = tmp_path_factory.mktemp("init") / "source"
    _ok(train(run, "experiment=smoke_cpu", "train.steps=1", "model.init_logit_scale=2.0"))
    return run


@pytest.mark.multiproc
@pytest.mark.slow
def test_zero3_two_ranks_start_from_the_export_bit_for_bit(source_run: Path, tmp_path: Path):
    """A new 2-rank ZeRO-3 run from the source's export: with lr 1e-30 its one step moves no
    weight by a representable amount (only the few exact zeros, attention key biases whose
    gradient is zero up to rounding, move by ~1e-35), so its own export must equal the
    source's bit for bit, which holds only if every rank loaded the weights before ZeRO-3
    partitioned them."""
    run = tmp_path / "run"
    proc = train(
        run,
        "experiment=smoke_cpu",
        "deepspeed=zero3",
        "train.steps=1",
        "optim.lr=1e-30",
        f"model.init_from={source_run / 'model.safetensors'}",
        nproc=2,
    )
    _ok(proc)
    assert f"initialized from {source_run / 'model.safetensors'} (clipforge, " in proc.stdout
    got, _ = load_exported(run)
    want, _ = load_exported(source_run)
    assert_same(got, want, atol=1e-30)
    assert want["logit_scale"].item() != pytest.approx(2.0, abs=1e-6)  # trained, not the init


@pytest.mark.multiproc
@pytest.mark.slow
def test_wrong_architecture_stops_the_run_in_one_line(source_run: Path, tmp_path: Path):
    run = tmp_path / "run"
    proc = train(
        run,
        "experiment=smoke_cpu",
        "model.text.layers=2",
        "model.text.width=64",
        f"model.init_from={source_run}",
    )
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    assert "unexpected 24: text.resblocks.{2..3}.*" in errors[0], errors[0]
    assert "shape mismatch" in errors[0] and "text.ln_final.weight [128] vs [64]" in errors[0]
    # What any config error found once the model is built leaves (the tokenizer check's
    # precedent): hydra's and the run's config snapshot, no checkpoint, no weights.
    assert sorted(p.name for p in run.iterdir()) == [".hydra", "config.yaml", "meta.json"]
