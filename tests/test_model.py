"""Model tests: output contract, gradients, EOS pooling, causality, parity with open_clip.

    PYTHONPATH=src:. HF_HUB_OFFLINE=1 .venv/bin/python -m pytest tests/test_model.py -q

Full-size models are built on the meta device, so counting their parameters costs no memory
and well under a second; forwards run on the tiny model (~1.8M parameters) and, once, on the
RN50 image tower at 64 px.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from clipforge.config import ModelConfig
from clipforge.model import CLIP, build_model
from clipforge.model.text_tower import TextTower

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"
VOCAB = 1000  # small vocabulary for the tiny model; parity tests use CLIP's 49408
OPENAI_VOCAB = 49408


def load_cfg(name: str) -> ModelConfig:
    """Merge conf/model/NAME.yaml into the typed schema, as hydra does at compose time."""
    merged = OmegaConf.merge(
        OmegaConf.structured(ModelConfig), OmegaConf.load(CONF / f"{name}.yaml")
    )
    return OmegaConf.to_object(merged)


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def random_tokens(batch: int, context: int, lengths: list[int], seed: int = 0) -> torch.Tensor:
    """Token rows following the tokenizer contract: ids >= 1, EOS last non-pad, pad 0 after."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(batch, context, dtype=torch.long)
    for row, n in enumerate(lengths):
        tokens[row, :n] = torch.randint(1, VOCAB, (n,), generator=g)
    return tokens


@pytest.fixture(scope="module")
def tiny() -> CLIP:
    torch.manual_seed(0)
    return build_model(load_cfg("tiny"), vocab_size=VOCAB)


def tiny_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Four 32 px images and captions of 5, 12, 32 (no padding) and 1 (EOS only) tokens."""
    g = torch.Generator().manual_seed(1)
    return torch.randn(4, 3, 32, 32, generator=g), random_tokens(4, 32, [5, 12, 32, 1])


@pytest.mark.parametrize("name", ["tiny", "vit_b32", "vit_b16", "vit_l14", "rn50"])
def test_model_yaml_merges_into_schema(name: str) -> None:
    cfg = load_cfg(name)
    assert isinstance(cfg, ModelConfig) and cfg.image.timm_name


def test_forward_contract(tiny: CLIP) -> None:
    image, text = tiny_batch()
    out = tiny(image, text)
    assert set(out) == {"image_features", "text_features", "logit_scale"}
    assert out["image_features"].shape == (4, 128)
    assert out["text_features"].shape == (4, 128)
    for key in ("image_features", "text_features"):
        torch.testing.assert_close(out[key].norm(dim=-1), torch.ones(4))
    # The parameter is [1] (DeepSpeed rejects 0-dim params) and the output is the multiplier.
    assert tiny.logit_scale.shape == (1,)
    assert out["logit_scale"].shape == (1,)
    torch.testing.assert_close(out["logit_scale"], torch.tensor([1 / 0.07]))
    unnormalized = tiny.encode_text(text, normalize=False)
    torch.testing.assert_close(F.normalize(unnormalized, dim=-1), out["text_features"])


def test_logit_scale_is_bounded_as_a_parameter_not_in_forward() -> None:
    model = build_model(load_cfg("tiny"), vocab_size=VOCAB)
    with torch.no_grad():
        model.logit_scale.fill_(5.0)
    image, text = tiny_batch()
    scale = model(image, text)["logit_scale"]
    scale.sum().backward()
    # No clamp in the forward: past the cap the gradient is still there (the engine clamps
    # the parameter after each step, tests/test_engine.py).
    assert scale.item() == pytest.approx(math.exp(5.0)) and model.logit_scale.grad.item() > 0
    assert model.param_bounds() == {"logit_scale": (0.0, pytest.approx(math.log(100.0)))}


def test_bf16_towers_give_fp32_features_and_scale() -> None:
    model = build_model(load_cfg("tiny"), vocab_size=VOCAB).bfloat16()
    image, text = tiny_batch()
    out = model(image.bfloat16(), text)
    assert {k: v.dtype for k, v in out.items()} == dict.fromkeys(out, torch.float32)
    assert torch.allclose(out["image_features"].norm(dim=-1), torch.ones(len(image)))


def test_every_parameter_gets_gradient() -> None:
    torch.manual_seed(0)
    model = build_model(load_cfg("tiny"), vocab_size=VOCAB)
    image, text = tiny_batch()
    out = model(image, text)
    logits = out["logit_scale"] * out["image_features"] @ out["text_features"].T
    labels = torch.arange(logits.shape[0])
    loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    loss.backward()
    # Per parameter, not per element: embedding rows of ids absent from the batch get none.
    missing = [
        name
        for name, p in model.named_parameters()
        if p.grad is None or not torch.count_nonzero(p.grad)
    ]
    assert not missing, f"parameters without gradient: {missing}"


def test_text_features_pool_at_eos(tiny: CLIP) -> None:
    lengths = [6, 10, 20]
    text = random_tokens(3, 32, lengths)
    base = tiny.encode_text(text, normalize=False)
    # Features are the projected hidden state at EOS, the last non-pad token.
    hidden = tiny.text.forward_hidden(text)
    eos = torch.tensor(lengths) - 1
    torch.testing.assert_close(base, tiny.text.text_projection(hidden[torch.arange(3), eos]))
    # How much padding follows EOS must not matter: same captions, shorter pad area.
    torch.testing.assert_close(tiny.encode_text(text[:, :20], normalize=False), base)
    # A token before EOS changes that caption's features and no other caption's.
    changed = text.clone()
    changed[1, 3] = changed[1, 3] % (VOCAB - 1) + 1
    after = tiny.encode_text(changed, normalize=False)
    assert not torch.allclose(after[1], base[1])
    torch.testing.assert_close(after[[0, 2]], base[[0, 2]])


def test_text_ignores_padding_content() -> None:
    """Bypass the pad id: non-zero junk after EOS still cannot reach the EOS features."""
    torch.manual_seed(0)
    tower = TextTower(VOCAB, context_length=16, width=32, layers=2, heads=2, embed_dim=16)
    tokens = random_tokens(2, 16, [5, 9])
    hidden = tower.forward_hidden(tokens)
    junk = tokens.clone()
    junk[0, 5:] = torch.randint(1, VOCAB, (11,))
    junk_hidden = tower.forward_hidden(junk)
    # Causality: positions up to the last unchanged one are untouched by later tokens.
    torch.testing.assert_close(junk_hidden[0, :5], hidden[0, :5])
    assert not torch.allclose(junk_hidden[0, 5:], hidden[0, 5:])
    torch.testing.assert_close(junk_hidden[1], hidden[1])


@pytest.mark.parametrize("position", [0, 7, 14])
def test_text_is_causal(position: int) -> None:
    torch.manual_seed(0)
    tower = TextTower(VOCAB, context_length=16, width=32, layers=2, heads=2, embed_dim=16)
    tokens = random_tokens(1, 16, [16])
    hidden = tower.forward_hidden(tokens)
    changed = tokens.clone()
    # x % (VOCAB - 1) + 1 maps every id in [1, VOCAB) to a different id in the same range.
    changed[0, position + 1 :] = changed[0, position + 1 :] % (VOCAB - 1) + 1
    changed_hidden = tower.forward_hidden(changed)
    torch.testing.assert_close(changed_hidden[0, : position + 1], hidden[0, : position + 1])
    assert not torch.allclose(changed_hidden[0, position + 1 :], hidden[0, position + 1 :])


def test_grad_checkpointing_matches(tiny: CLIP) -> None:
    image, text = tiny_batch()
    expected = tiny(image, text)
    tiny.set_grad_checkpointing(True)
    try:
        got = tiny(image, text)
    finally:
        tiny.set_grad_checkpointing(False)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key])


def _full_forward(model: CLIP, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Both towers the long way: timm's own trunk forward and every text position through the
    last block (forward_hidden), then the pooled rows; [B, 2 * embed_dim]."""
    visual, tower = model.visual, model.text
    eos = ((text != 0).sum(-1) - 1).clamp(min=0)
    hidden = tower.forward_hidden(text)[torch.arange(len(text)), eos]
    return torch.cat([visual.proj(visual.trunk(image)), tower.text_projection(hidden)], dim=1)


def _outputs_and_grads(model: CLIP, forward) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    image, text = tiny_batch()
    model.zero_grad(set_to_none=True)
    out = forward(model, image, text)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    (out * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads


def _pooled_forward(model: CLIP, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    return torch.cat([model.visual(image), model.text(text)], dim=1)


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("vit", ["plain", "qk_norm+layer_scale+registers"])
def test_last_block_for_the_pooled_token_only_equals_the_full_block(
    vit: str, checkpointing: bool
) -> None:
    """model/pooled.py: the last block of each tower, computed for the class / EOS token only,
    gives the full forward's features and every parameter's gradient (captions of 5, 12, 32
    and 1 tokens: EOS at different positions, one with no padding, one EOS only)."""
    cfg = load_cfg("tiny")
    if vit != "plain":
        cfg.image.timm_kwargs = {
            **cfg.image.timm_kwargs, "qk_norm": True, "init_values": 0.1, "reg_tokens": 2,
        }  # fmt: skip
    torch.manual_seed(0)
    model = build_model(cfg, vocab_size=VOCAB).train()
    assert model.visual.last_block_pooled_only
    model.set_grad_checkpointing(checkpointing)
    got, got_grads = _outputs_and_grads(model, _pooled_forward)
    want, want_grads = _outputs_and_grads(model, _full_forward)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (
        got_grads.keys()
        == want_grads.keys()
        == {n for n, _ in model.named_parameters()} - {"logit_scale"}
    )
    # Per parameter, relative to its gradient's norm: the two orders of summation differ by
    # float32 rounding (~1e-6 relative here), an element near zero has no relative scale. The
    # floor is for gradients that are zero but for rounding (k_norm's bias shifts every key
    # alike, which no softmax sees).
    off = {n: ((got_grads[n] - g).norm() / (g.norm() + 0.1)).item() for n, g in want_grads.items()}
    assert max(off.values()) < 1e-5, sorted(off.items(), key=lambda kv: -kv[1])[:3]


def test_last_block_for_the_pooled_token_only_saves_a_fifth_of_the_work() -> None:
    """FLOPs of forward + backward on the tiny model (torch's own counter, not a timer): the
    pooled last block must spare ~18 %; the full forward is the reference."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model = build_model(load_cfg("tiny"), vocab_size=VOCAB)

    def flops(forward) -> int:
        with FlopCounterMode(display=False) as counter:
            _outputs_and_grads(model, forward)
        return counter.get_total_flops()

    ratio = flops(_pooled_forward) / flops(_full_forward)
    assert 0.78 < ratio < 0.85, ratio


def test_other_vit_poolings_keep_the_full_forward() -> None:
    """Average pooling reads every token of the last block: no shortcut, timm's forward."""
    cfg = load_cfg("tiny")
    cfg.image.timm_kwargs = {**cfg.image.timm_kwargs, "global_pool": "avg"}
    model = build_model(cfg, vocab_size=VOCAB)
    assert not model.visual.last_block_pooled_only
    image, _ = tiny_batch()
    torch.testing.assert_close(model.visual(image), model.visual.proj(model.visual.trunk(image)))


def test_patch_dropout_only_in_training() -> None:
    cfg = load_cfg("tiny")
    cfg.image.patch_dropout = 0.5
    model = build_model(cfg, vocab_size=VOCAB)
    image, text = tiny_batch()
    model.eval()
    first = model.encode_image(image)
    torch.testing.assert_close(model.encode_image(image), first)
    model.train()
    torch.manual_seed(0)
    assert not torch.allclose(model.encode_image(image), first)


def test_patch_dropout_rejected_for_resnet() -> None:
    cfg = load_cfg("rn50")
    cfg.image.patch_dropout = 0.5
    with torch.device("meta"), pytest.raises(ValueError, match="patch_dropout"):
        build_model(cfg, vocab_size=OPENAI_VOCAB)


def test_vocab_size_required() -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        build_model(load_cfg("tiny"))
    cfg = load_cfg("tiny")
    cfg.text.vocab_size = 500
    with torch.device("meta"):
        assert build_model(cfg).text.token_embedding.num_embeddings == 500
        with pytest.raises(ValueError, match="501 pieces but model.text.vocab_size is 500"):
            build_model(cfg, vocab_size=501)


def test_resnet_attention_pool_projects_to_embed_dim() -> None:
    cfg = load_cfg("rn50")
    cfg.image.image_size = 64  # the attention pool's position table follows the input size
    model = build_model(cfg, vocab_size=VOCAB)
    model.eval()
    with torch.no_grad():
        features = model.encode_image(torch.randn(1, 3, 64, 64))
    assert features.shape == (1, 1024)
    assert isinstance(model.visual.proj, torch.nn.Identity)


OPEN_CLIP_NAMES = {
    "vit_b32": "ViT-B-32",
    "rn50": "RN50",
    "vit_b16": "ViT-B-16",
    "vit_l14": "ViT-L-14",
}


@pytest.mark.parametrize("name", list(OPEN_CLIP_NAMES))
def test_parameter_count_parity_with_open_clip(name: str) -> None:
    open_clip = pytest.importorskip("open_clip")
    cfg = load_cfg(name)
    cfg.text.vocab_size = OPENAI_VOCAB
    assert cfg.text.context_length == 77
    # Meta tensors: shapes without storage, so even ViT-L/14 builds in a fraction of a second.
    # device="meta" too: open_clip's factory ends with model.to(device), and meta tensors
    # cannot be copied to the CPU default.
    with torch.device("meta"):
        ours = build_model(cfg)
        reference = open_clip.create_model(OPEN_CLIP_NAMES[name], pretrained=None, device="meta")
    ref_text = sum(
        p.numel()
        for key, p in reference.named_parameters()
        if key.split(".")[0]
        in ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection")
    )
    assert count(ours.visual) == count(reference.visual)
    assert count(ours.text) == ref_text
    assert count(ours) == count(reference)


def test_init_logit_scale_default() -> None:
    assert math.exp(ModelConfig().init_logit_scale) == pytest.approx(1 / 0.07)


# timm ViT name -> open_clip VisionTransformer name, for the tensors whose init differs.
VIT_INIT_NAMES = {
    "trunk.patch_embed.proj.weight": "conv1.weight",
    "trunk.cls_token": "class_embedding",
    "trunk.pos_embed": "positional_embedding",
    "trunk.blocks.0.attn.qkv.weight": "transformer.resblocks.0.attn.in_proj_weight",
    "trunk.blocks.0.attn.qkv.bias": "transformer.resblocks.0.attn.in_proj_bias",
    "trunk.blocks.0.attn.proj.weight": "transformer.resblocks.0.attn.out_proj.weight",
    "trunk.blocks.3.mlp.fc1.weight": "transformer.resblocks.3.mlp.c_fc.weight",
    "trunk.blocks.3.mlp.fc2.weight": "transformer.resblocks.3.mlp.c_proj.weight",
    "trunk.blocks.3.mlp.fc2.bias": "transformer.resblocks.3.mlp.c_proj.bias",
    "proj.weight": "proj",
}


@pytest.mark.parametrize("init", ["clip", "timm"])
def test_vit_init_matches_open_clip(init: str) -> None:
    """init=clip draws every ViT tensor at open_clip's scale; timm's own init does not (its
    class token starts at std 1e-6, its position embedding at 0.02 instead of width**-0.5)."""
    open_clip = pytest.importorskip("open_clip")
    cfg = load_cfg("tiny")
    cfg.image.init = init
    torch.manual_seed(0)
    ours = dict(build_model(cfg, vocab_size=VOCAB).visual.named_parameters())
    vision = {"image_size": 32, "layers": 4, "width": 128, "head_width": 32, "patch_size": 4}
    text = {"context_length": 16, "vocab_size": VOCAB, "width": 128, "heads": 4, "layers": 4}
    theirs = dict(open_clip.model.CLIP(128, vision, text).visual.named_parameters())
    stds = {ours_name: (ours[ours_name].std().item(), theirs[ref].std().item())
            for ours_name, ref in VIT_INIT_NAMES.items()}  # fmt: skip
    for name, ref in VIT_INIT_NAMES.items():
        assert ours[name].numel() == theirs[ref].numel(), name
    close = {n: a == b == 0 or a == pytest.approx(b, rel=0.1) for n, (a, b) in stds.items()}
    if init == "clip":
        assert all(close.values()), stds
    else:
        assert not close["trunk.cls_token"] and not close["trunk.pos_embed"], stds


def test_image_init_validated() -> None:
    from clipforge.config import Config, ConfigError, validate

    cfg = Config()
    cfg.data.synthetic = True
    cfg.model.image.init = "xavier"
    with pytest.raises(ConfigError, match="model.image.init='xavier' is not one of clip, timm"):
        validate(cfg)


def test_siglip_bias_is_a_learned_parameter_returned_beside_the_scale():
    cfg = load_cfg("tiny")
    assert "logit_bias" not in build_model(cfg, vocab_size=VOCAB)(*_inputs(cfg))
    cfg.init_logit_scale, cfg.init_logit_bias = math.log(10), -10.0
    model = build_model(cfg, vocab_size=VOCAB)
    assert model.logit_bias.shape == (1,)  # [1], not 0-dim: ZeRO partitions it
    out = model(*_inputs(cfg))
    assert out["logit_bias"].dtype == torch.float32 and out["logit_bias"].item() == -10.0
    assert out["logit_scale"].item() == pytest.approx(10.0)
    assert "logit_bias" in dict(model.named_parameters())
    # bf16 towers: the bias reaches the loss in float32 like the scale.
    assert model.bfloat16()(*_inputs(cfg, torch.bfloat16))["logit_bias"].dtype == torch.float32


def _inputs(cfg, dtype=torch.float32):
    size = cfg.image.image_size
    return (
        torch.randn(2, 3, size, size, dtype=dtype),
        torch.randint(0, VOCAB, (2, cfg.text.context_length)),
    )
