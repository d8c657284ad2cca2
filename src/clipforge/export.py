"""Export a run's weights for open_clip (default) or transformers: renamed tensors plus configs.

    python -m clipforge.export RUN_DIR                 # -> RUN_DIR/open_clip/
    python -m clipforge.export RUN_DIR --out DIR
    python -m clipforge.export RUN_DIR --format hf     # -> RUN_DIR/hf/ (see export_hf.py)
    # then, in any environment with open_clip (3.3.0 checked by tests/test_export.py):
    #   model = open_clip.create_model("local-dir:DIR")

DIR holds `open_clip_model.safetensors` (fp32, no pickle) and `open_clip_config.json`
({"model_cfg", "preprocess_cfg"}), the layout open_clip's `local-dir:` loader reads. The state
dict alone also loads with `load_state_dict(strict=True)` into open_clip's own config of the
same architecture (ViT-B-32, ViT-B-16, ViT-L-14, RN50) when the text vocabulary matches
(49408 for CLIP's BPE).

Supported image towers: timm's CLIP ViTs (`vit_*_clip_*`, GELU) and CLIP ResNets
(`resnet*_clip`); anything else raises UnsupportedArchitecture with the reason.

Text pooling: open_clip pools at the argmax token id by default, which is CLIP BPE's EOT. With
another tokenizer (ours: sentencepiece, EOS id 3, not the largest id) the config asks for
pool_type "eos" with that id, which for our tokens (one EOS, the last non-pad) is the same
position our text tower pools at.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from clipforge import cli
from clipforge.checkpoint import load_exported
from clipforge.config import ModelConfig
from clipforge.model import build_model

CLIP_BPE_VOCAB = 49408  # open_clip's default tokenizer: pool at argmax, EOT is the top id
OUR_EOS_ID = 3  # data_tools.tokenizer and the synthetic loader: pad 0, unk 1, bos 2, eos 3


class UnsupportedArchitecture(ValueError):
    """The model has no equivalent in the export format (the message says which part)."""


Rule = tuple[str, str, Callable[[Tensor], Tensor] | None]


def _t(x: Tensor) -> Tensor:
    return x.t().contiguous()


# Our names (timm trunk / our text tower) -> open_clip's. Each rule is a full-match regex, its
# replacement, and a tensor transform where the layouts differ (our projections are Linear
# weights [out, in]; open_clip stores them as [in, out] matrices used as x @ proj).
_TEXT: list[Rule] = [
    (r"text\.token_embedding\.weight", "token_embedding.weight", None),
    (r"text\.positional_embedding", "positional_embedding", None),
    (r"text\.resblocks\.(\d+)\.(ln_[12])\.(weight|bias)", r"transformer.resblocks.\1.\2.\3", None),
    (r"text\.resblocks\.(\d+)\.attn\.qkv\.(weight|bias)", r"transformer.resblocks.\1.attn.in_proj_\2", None),
    (r"text\.resblocks\.(\d+)\.attn\.out_proj\.(weight|bias)", r"transformer.resblocks.\1.attn.out_proj.\2", None),
    (r"text\.resblocks\.(\d+)\.mlp\.(c_fc|c_proj)\.(weight|bias)", r"transformer.resblocks.\1.mlp.\2.\3", None),
    (r"text\.ln_final\.(weight|bias)", r"ln_final.\1", None),
    (r"text\.text_projection\.weight", "text_projection", _t),
    (r"logit_scale", "logit_scale", lambda x: x.reshape(())),
    (r"logit_bias", "logit_bias", lambda x: x.reshape(())),  # SigLIP's (open_clip: 0-dim)
]  # fmt: skip

_VIT: list[Rule] = [
    (r"visual\.trunk\.cls_token", "visual.class_embedding", lambda x: x.reshape(-1)),
    (r"visual\.trunk\.pos_embed", "visual.positional_embedding", lambda x: x[0]),
    (r"visual\.trunk\.patch_embed\.proj\.weight", "visual.conv1.weight", None),
    (r"visual\.trunk\.norm_pre\.(weight|bias)", r"visual.ln_pre.\1", None),
    (r"visual\.trunk\.blocks\.(\d+)\.norm([12])\.(weight|bias)", r"visual.transformer.resblocks.\1.ln_\2.\3", None),
    (r"visual\.trunk\.blocks\.(\d+)\.attn\.qkv\.(weight|bias)", r"visual.transformer.resblocks.\1.attn.in_proj_\2", None),
    (r"visual\.trunk\.blocks\.(\d+)\.attn\.proj\.(weight|bias)", r"visual.transformer.resblocks.\1.attn.out_proj.\2", None),
    (r"visual\.trunk\.blocks\.(\d+)\.mlp\.fc1\.(weight|bias)", r"visual.transformer.resblocks.\1.mlp.c_fc.\2", None),
    (r"visual\.trunk\.blocks\.(\d+)\.mlp\.fc2\.(weight|bias)", r"visual.transformer.resblocks.\1.mlp.c_proj.\2", None),
    (r"visual\.trunk\.norm\.(weight|bias)", r"visual.ln_post.\1", None),
    (r"visual\.proj\.weight", "visual.proj", _t),
]  # fmt: skip

# timm's resnet*_clip (ByobNet) -> open_clip's ModifiedResNet. The attention pool's q/k/v/proj
# Linear layers keep their layout.
_RESNET: list[Rule] = [
    (r"visual\.trunk\.stem\.conv([123])\.conv\.weight", r"visual.conv\1.weight", None),
    (r"visual\.trunk\.stem\.conv([123])\.bn\.(\w+)", r"visual.bn\1.\2", None),
    (r"visual\.trunk\.stages\.(\d+)\.(\d+)\.conv1_1x1\.conv\.weight", r"visual.layer{\1}.\2.conv1.weight", None),
    (r"visual\.trunk\.stages\.(\d+)\.(\d+)\.conv1_1x1\.bn\.(\w+)", r"visual.layer{\1}.\2.bn1.\3", None),
    (r"visual\.trunk\.stages\.(\d+)\.(\d+)\.conv2_kxk\.conv\.weight", r"visual.layer{\1}.\2.conv2.weight", None),
    (r"visual\.trunk\.stages\.(\d+)\.(\d+)\.conv2_kxk\.bn\.(\w+)", r"visual.layer{\1}.\2.bn2.\3", None),
    (r"visual\.trunk\.stages\.(\d+)\.(\d+)\.conv3_1x1\.conv\.weight", r"visual.layer{\1}.\2.conv3.weight", None),
    (r"visual\.trunk\.stages\.(\d+)\.(\d+)\.conv3_1x1\.bn\.(\w+)", r"visual.layer{\1}.\2.bn3.\3", None),
    (r"visual\.trunk\.stages\.(\d+)\.(\d+)\.shortcut\.conv\.conv\.weight", r"visual.layer{\1}.\2.downsample.0.weight", None),
    (r"visual\.trunk\.stages\.(\d+)\.(\d+)\.shortcut\.conv\.bn\.(\w+)", r"visual.layer{\1}.\2.downsample.1.\3", None),
    (r"visual\.trunk\.head\.pos_embed", "visual.attnpool.positional_embedding", None),
    (r"visual\.trunk\.head\.([qkv])\.(weight|bias)", r"visual.attnpool.\1_proj.\2", None),
    (r"visual\.trunk\.head\.proj\.(weight|bias)", r"visual.attnpool.c_proj.\1", None),
]  # fmt: skip


def rename(name: str, rules: list[Rule]) -> tuple[str, Callable[[Tensor], Tensor] | None] | None:
    for pattern, repl, fn in rules:
        m = re.fullmatch(pattern, name)
        if m:
            new = m.expand(repl)
            # timm counts ResNet stages from 0, open_clip's layers from 1.
            new = re.sub(r"layer\{(\d+)\}", lambda s: f"layer{int(s.group(1)) + 1}", new)
            return new, fn
    return None


def image_kind(state: dict[str, Tensor]) -> str:
    if "visual.trunk.patch_embed.proj.weight" in state:
        return "vit"
    if "visual.trunk.stem.conv1.conv.weight" in state:
        return "resnet"
    raise UnsupportedArchitecture(
        "open_clip export supports timm's CLIP ViTs (vit_*_clip_*) and CLIP ResNets "
        "(resnet*_clip) as image towers"
    )


def to_open_clip_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our model's state dict (no `model.` prefix) -> open_clip CLIP's, fp32, every key mapped."""
    rules = _TEXT + (_VIT if image_kind(state) == "vit" else _RESNET)
    out, unmapped = {}, []
    for name, value in state.items():
        hit = rename(name, rules)
        if hit is None:
            unmapped.append(name)
            continue
        new, fn = hit
        value = value.detach().float().cpu()
        out[new] = (fn(value) if fn else value).contiguous()
    if unmapped:
        raise UnsupportedArchitecture(
            f"no open_clip name for {len(unmapped)} tensors, e.g. {unmapped[:3]}"
        )
    return out


def open_clip_model_cfg(cfg: ModelConfig, eos_id: int | None) -> dict[str, Any]:
    """open_clip's model_cfg for our architecture, read off the built model (meta device)."""
    vocab = cfg.text.vocab_size
    with torch.device("meta"):
        model = build_model(cfg, vocab_size=vocab)
    text_cfg: dict[str, Any] = {
        "context_length": cfg.text.context_length,
        "vocab_size": vocab,
        "width": cfg.text.width,
        "heads": cfg.text.heads,
        "layers": cfg.text.layers,
        "mlp_ratio": cfg.text.mlp_ratio,
    }
    if eos_id is not None:
        text_cfg.update(pool_type="eos", eos_id=eos_id)
    trunk = model.visual.trunk
    kind = image_kind(dict(model.state_dict()))
    vision_cfg = _vit_cfg(trunk, cfg) if kind == "vit" else _resnet_cfg(trunk, cfg)
    out = {"embed_dim": cfg.embed_dim, "vision_cfg": vision_cfg, "text_cfg": text_cfg}
    if cfg.init_logit_bias is not None:
        # open_clip creates its logit_bias parameter only when the config names one.
        out.update(init_logit_scale=cfg.init_logit_scale, init_logit_bias=cfg.init_logit_bias)
    return out


def _vit_cfg(trunk: torch.nn.Module, cfg: ModelConfig) -> dict[str, Any]:
    block = trunk.blocks[0]
    act = type(block.mlp.act).__name__
    if act != "GELU":
        # open_clip's quick_gelu switch covers both towers; our text tower is always GELU.
        raise UnsupportedArchitecture(f"image MLP activation {act}: open_clip needs GELU here")
    if isinstance(trunk.norm_pre, torch.nn.Identity):
        raise UnsupportedArchitecture("a ViT without the pre-transformer LayerNorm (CLIP's ln_pre)")
    width = trunk.embed_dim
    heads = block.attn.num_heads
    return {
        "image_size": cfg.image.image_size,
        "layers": len(trunk.blocks),
        "width": width,
        "head_width": width // heads,
        "mlp_ratio": block.mlp.fc1.out_features / width,
        "patch_size": trunk.patch_embed.proj.kernel_size[0],
        "patch_dropout": cfg.image.patch_dropout,
    }


def _resnet_cfg(trunk: torch.nn.Module, cfg: ModelConfig) -> dict[str, Any]:
    width = trunk.stem.conv3.conv.out_channels
    heads = trunk.head.num_heads
    return {
        "image_size": cfg.image.image_size,
        "layers": [len(stage) for stage in trunk.stages],
        "width": width,
        # open_clip derives the attention pool's heads as width * 32 // head_width.
        "head_width": width * 32 // heads,
    }


def default_eos_id(run_dir: Path, vocab: int) -> int | None:
    """None (argmax pooling) for CLIP's BPE vocabulary, else the run's tokenizer's EOS id."""
    tok = Path(run_dir) / "tokenizer.model"
    if tok.is_file():
        import sentencepiece as spm

        return spm.SentencePieceProcessor(model_file=str(tok)).eos_id()
    return None if vocab == CLIP_BPE_VOCAB else OUR_EOS_ID


def write_open_clip(
    out_dir: Path,
    state: dict[str, Tensor],
    cfg: ModelConfig,
    eos_id: int | None,
    mean: list[float] | None = None,
    std: list[float] | None = None,
) -> Path:
    """Write open_clip_model.safetensors + open_clip_config.json into out_dir (atomically)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    config = {
        "model_cfg": open_clip_model_cfg(cfg, eos_id),
        "preprocess_cfg": {
            "size": cfg.image.image_size,
            "mean": mean,
            "std": std,
            # As data/transforms.py's eval_transform, but for its crop offset: open_clip's
            # torchvision CenterCrop rounds half to even, ours down (one pixel along the long
            # side when resized long side - size = 3 mod 4).
            "interpolation": "bicubic",
            "resize_mode": "shortest",
        },
    }
    weights = out_dir / "open_clip_model.safetensors"
    tmp = weights.with_suffix(".tmp")
    save_file(to_open_clip_state_dict(state), str(tmp), metadata={"source": "clipforge"})
    tmp.replace(weights)
    (out_dir / "open_clip_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out_dir


def export_run(
    run_dir: str | Path, out_dir: str | Path | None = None, fmt: str = "open_clip"
) -> Path:
    """RUN_DIR/model.safetensors + config.yaml (+ tokenizer.model) -> `fmt` files in out_dir
    (default RUN_DIR/open_clip or RUN_DIR/hf)."""
    run_dir = Path(run_dir)
    state, run = load_exported(run_dir)
    cfg = run.model
    cfg.text.vocab_size = state["text.token_embedding.weight"].shape[0]
    out = Path(out_dir) if out_dir else run_dir / fmt
    if fmt == "hf":
        # Imported here: export_hf imports this module (its rules' helpers and the error).
        from clipforge.export_hf import check_state, write_hf

        check_state(state)  # before asking for a tokenizer a refused run does not need
        tok = run_dir / "tokenizer.model"
        if not tok.is_file():
            raise FileNotFoundError(f"{run_dir}: no tokenizer.model (the hf export ships it)")
        return write_hf(out, state, run, tok.read_bytes())
    aug = run.data.augment
    eos = default_eos_id(run_dir, cfg.text.vocab_size)
    return write_open_clip(out, state, cfg, eos, list(aug.mean), list(aug.std))


def main(argv: list[str] | None = None) -> int:
    ap = cli.ArgumentParser(
        prog="python -m clipforge.export", description=(__doc__ or "").split("\n")[0]
    )
    ap.add_argument("run_dir", help="a run directory holding model.safetensors and config.yaml")
    ap.add_argument(
        "--format",
        default="open_clip",
        choices=["open_clip", "hf"],
        help="open_clip (ViTs and ResNets) or hf: transformers' CLIPModel (ViTs)",
    )
    ap.add_argument("--out", default=None, help="output folder (default: RUN_DIR/FORMAT)")
    args = ap.parse_args(argv)
    try:
        out = export_run(args.run_dir, args.out, args.format)
    except (FileNotFoundError, UnsupportedArchitecture) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {', '.join(sorted(p.name for p in out.iterdir()))} to {out}")
    return 0


if __name__ == "__main__":
    # `python -m` runs this file as __main__, a second copy of the module: export_hf raises the
    # importable copy's UnsupportedArchitecture, so run that copy's main, which catches it.
    from clipforge.export import main as _main

    sys.exit(_main())
