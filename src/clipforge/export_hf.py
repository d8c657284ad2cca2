"""Export a ViT run for Hugging Face transformers: CLIPModel weights, tokenizer, image processor.

    python -m clipforge.export RUN_DIR --format hf             # -> RUN_DIR/hf/
    python -m clipforge.export RUN_DIR --format hf --out DIR
    # then, with transformers 5.x and nothing of ours installed (5.24.0 checked by
    # tests/test_export_hf.py):
    #   model = CLIPModel.from_pretrained(DIR)
    #   tok = AutoTokenizer.from_pretrained(DIR)     # tok(texts, padding="max_length", truncation=True)
    #   proc = AutoImageProcessor.from_pretrained(DIR)         # or AutoProcessor for both

DIR holds what `save_pretrained` would write, produced with safetensors and json only (this
module imports neither transformers nor tokenizers, which are no dependencies of clipforge):
  config.json                CLIPConfig: both towers' sizes, GELU (exact), LayerNorm eps read off
                             the model, our special ids (pad 0, bos 2, eos 3)
  model.safetensors          fp32, CLIPModel's names; fused q/k/v split in three
  tokenizer.json             the run's sentencepiece model as a `tokenizers` pipeline (below)
  tokenizer_config.json      model_max_length = context_length, so truncation=True cuts there
  preprocessor_config.json   CLIPImageProcessor: data/transforms.py's eval_transform (below)

Why each part maps exactly:
- Image tower: timm's `vit_*_clip_*` is CLIP's ViT (class token, pre-LN `norm_pre`, final norm
  then the class token, bias-free patch embedding and projection). Anything else timm can build
  into that class (register tokens, layer scale, q/k norms, other pooling...) is refused.
- Text tower: HF's CLIPTextModel pools at the first position holding `eos_token_id` (for any id
  but 2, which it keeps for old checkpoints' argmax). Our rows hold one EOS, the last non-pad
  token, where our tower pools. HF masks padding on top of the causal mask; positions up to EOS
  never see padding either way, so the pooled features agree.
- Tokenizer: `SentencePieceProcessor.encode` as a `tokenizers` pipeline, the way transformers'
  own converter builds it (`SpmConverter.build_tokenizer_from_spm_proto`): the model's
  precompiled normalization map (NFKC + case folding for data_tools.tokenizer's models), space
  trimming and collapsing, `▁` for spaces and as a dummy prefix; BPE merges ranked by piece score
  (sentencepiece merges the highest-scoring pair first) with runs of unknown characters fused into
  one unk id as sentencepiece does; or the Unigram pieces and scores. Then `[bos] ... [eos]`,
  truncation to context_length - 2 pieces, padding with 0 on the right: our rows.
  `split_special_tokens` keeps a caption's literal "<s>" or "</s>" text, as sentencepiece does.
  Two departures from that converter, each where it differs from sentencepiece: trailing "▁"
  characters are dropped as sentencepiece drops them, and a Unigram model's special tokens get
  names no text can match (vocab_strings).
- Image processor: convert to RGB with transparency on white, resize the short side (bicubic),
  center crop with the offset rounded down, x / 255, (x - mean) / std: data/transforms.py's
  eval_transform step for step (it crops and composites as CLIPImageProcessor does, which no
  CLIPImageProcessor setting could have matched to torchvision's half-to-even CenterCrop).
  The default torchvision backend resizes a uint8 tensor where we resize with PIL (pixels
  within one uint8 level); the "pil" backend (`AutoImageProcessor.from_pretrained(DIR,
  backend="pil")`) resizes exactly as we do.

Not exported (UnsupportedArchitecture, one line): CLIP ResNet image towers (CLIPModel has only a
ViT) and SigLIP runs (a learned logit bias: transformers' SiglipModel pools images with a
MAP head and text at the last position, so neither tower maps; CLIPModel has no bias).
The open_clip format covers both.
"""

from __future__ import annotations

import base64
import json
import re
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from clipforge.config import Config, ModelConfig
from clipforge.export import Rule, UnsupportedArchitecture, rename
from clipforge.model import build_model

ESCAPE = "\u2581"  # sentencepiece's "▁": a space, escaped


# Our names -> CLIPModel's. Both sides store Linear weights [out, in], so nothing is
# transposed; fused q/k/v projections are split by _QKV instead (below).
_TEXT: list[Rule] = [
    (r"text\.token_embedding\.weight", "text_model.embeddings.token_embedding.weight", None),
    (r"text\.positional_embedding", "text_model.embeddings.position_embedding.weight", None),
    (r"text\.resblocks\.(\d+)\.ln_([12])\.(weight|bias)", r"text_model.encoder.layers.\1.layer_norm\2.\3", None),
    (r"text\.resblocks\.(\d+)\.attn\.out_proj\.(weight|bias)", r"text_model.encoder.layers.\1.self_attn.out_proj.\2", None),
    (r"text\.resblocks\.(\d+)\.mlp\.c_fc\.(weight|bias)", r"text_model.encoder.layers.\1.mlp.fc1.\2", None),
    (r"text\.resblocks\.(\d+)\.mlp\.c_proj\.(weight|bias)", r"text_model.encoder.layers.\1.mlp.fc2.\2", None),
    (r"text\.ln_final\.(weight|bias)", r"text_model.final_layer_norm.\1", None),
    (r"text\.text_projection\.weight", "text_projection.weight", None),
    (r"logit_scale", "logit_scale", lambda x: x.reshape(())),  # both store the log
]  # fmt: skip

_VIT: list[Rule] = [
    (r"visual\.trunk\.cls_token", "vision_model.embeddings.class_embedding", lambda x: x.reshape(-1)),
    (r"visual\.trunk\.pos_embed", "vision_model.embeddings.position_embedding.weight", lambda x: x[0]),
    (r"visual\.trunk\.patch_embed\.proj\.weight", "vision_model.embeddings.patch_embedding.weight", None),
    (r"visual\.trunk\.norm_pre\.(weight|bias)", r"vision_model.pre_layrnorm.\1", None),
    (r"visual\.trunk\.blocks\.(\d+)\.norm([12])\.(weight|bias)", r"vision_model.encoder.layers.\1.layer_norm\2.\3", None),
    (r"visual\.trunk\.blocks\.(\d+)\.attn\.proj\.(weight|bias)", r"vision_model.encoder.layers.\1.self_attn.out_proj.\2", None),
    (r"visual\.trunk\.blocks\.(\d+)\.mlp\.fc([12])\.(weight|bias)", r"vision_model.encoder.layers.\1.mlp.fc\2.\3", None),
    (r"visual\.trunk\.norm\.(weight|bias)", r"vision_model.post_layernorm.\1", None),
    (r"visual\.proj\.weight", "visual_projection.weight", None),
]  # fmt: skip

# Fused q/k/v Linear layers -> CLIPModel's attention module, which has q_proj, k_proj, v_proj:
# timm's and our rows are [q; k; v] (each then split into heads), so the thirds are q, k, v.
_QKV = [
    (r"text\.resblocks\.(\d+)\.attn\.qkv\.(weight|bias)", r"text_model.encoder.layers.\1.self_attn"),
    (r"visual\.trunk\.blocks\.(\d+)\.attn\.qkv\.(weight|bias)", r"vision_model.encoder.layers.\1.self_attn"),
]  # fmt: skip


def to_hf_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our model's state dict (ViT image tower) -> transformers CLIPModel's, fp32, every key."""
    check_state(state)
    out, unmapped = {}, []
    for name, value in state.items():
        value = value.detach().float().cpu()
        split = _qkv_names(name)
        if split:
            out.update(zip(split, (third.contiguous() for third in value.chunk(3, dim=0))))
            continue
        hit = rename(name, _TEXT + _VIT)
        if hit is None:
            unmapped.append(name)
            continue
        new, fn = hit
        out[new] = (fn(value) if fn else value).contiguous()
    if unmapped:
        raise UnsupportedArchitecture(
            f"no transformers CLIPModel name for {len(unmapped)} tensors, e.g. {unmapped[:3]}"
        )
    return out


def _qkv_names(name: str) -> list[str] | None:
    """CLIPModel's q, k, v names for one of our fused q/k/v tensors; None for other tensors."""
    for pattern, attn in _QKV:
        m = re.fullmatch(pattern, name)
        if m:
            return [f"{m.expand(attn)}.{part}_proj.{m.group(2)}" for part in "qkv"]
    return None


def check_state(state: dict[str, Tensor]) -> None:
    """Refuse what CLIPModel cannot hold, naming why: a SigLIP bias or a ResNet tower."""
    if "logit_bias" in state:
        raise UnsupportedArchitecture(
            "a SigLIP run (learned logit_bias) has no transformers equivalent: CLIPModel has no "
            "bias and SiglipModel pools differently (MAP head, last text token); use "
            "--format open_clip"
        )
    if "visual.trunk.patch_embed.proj.weight" not in state:
        if "visual.trunk.head.q.weight" in state:  # timm's resnet*_clip: CLIP's attention pool
            raise UnsupportedArchitecture(
                "transformers' CLIPModel has only a ViT image tower, this run has a CLIP "
                "ResNet (attention pool); use --format open_clip"
            )
        raise UnsupportedArchitecture(
            "transformers' CLIPModel takes timm's CLIP ViTs (vit_*_clip_*) as image tower, "
            "this run has another timm model"
        )


def _ln_eps(module: nn.Module, what: str) -> float:
    eps = {m.eps for m in module.modules() if isinstance(m, nn.LayerNorm)}
    if len(eps) != 1:
        raise UnsupportedArchitecture(f"{what}: LayerNorms with different eps {sorted(eps)}")
    return eps.pop()


def _vision_config(trunk: nn.Module, cfg: ModelConfig) -> dict[str, Any]:
    """CLIPVisionConfig for a timm ViT that is CLIP's ViT; refuses any other layout."""
    problems = []
    block = trunk.blocks[0]
    act = block.mlp.act
    if not (isinstance(act, nn.GELU) and act.approximate == "none"):
        problems.append(f"MLP activation {type(act).__name__} (CLIPModel here: exact GELU)")
    if getattr(trunk, "global_pool", None) != "token" or trunk.num_prefix_tokens != 1:
        problems.append("pooling other than one class token")
    if getattr(trunk, "no_embed_class", False) or getattr(trunk, "dynamic_img_size", False):
        problems.append("position embeddings without the class token or of dynamic size")
    if not isinstance(trunk.norm_pre, nn.LayerNorm) or not isinstance(trunk.norm, nn.LayerNorm):
        problems.append("no LayerNorm before the blocks (CLIP's ln_pre) or after them")
    for name in ("fc_norm", "head_drop", "head"):
        if not isinstance(getattr(trunk, name, nn.Identity()), (nn.Identity, nn.Dropout)):
            problems.append(f"a {name} after the class token")
    if getattr(trunk, "attn_pool", None) is not None:
        problems.append("an attention-pool head")
    pe = trunk.patch_embed
    if pe.proj.bias is not None or not isinstance(pe.norm, nn.Identity):
        problems.append("a patch embedding with bias or norm")
    for i, b in enumerate(trunk.blocks):
        extra = [
            n
            for n in ("ls1", "ls2", "attn.q_norm", "attn.k_norm", "attn.norm", "mlp.norm")
            if not isinstance(b.get_submodule(n), nn.Identity)
        ]
        if extra or type(b.mlp).__name__ != "Mlp" or b.attn.qkv.bias is None:
            problems.append(f"block {i}: {extra or 'MLP or q/k/v bias'} not in CLIP's block")
            break
    if problems:
        raise UnsupportedArchitecture("image tower is not CLIP's ViT: " + "; ".join(problems))
    width = trunk.embed_dim
    return {
        "model_type": "clip_vision_model",
        "hidden_size": width,
        "intermediate_size": block.mlp.fc1.out_features,
        "projection_dim": cfg.embed_dim,
        "num_hidden_layers": len(trunk.blocks),
        "num_attention_heads": block.attn.num_heads,
        "num_channels": pe.proj.in_channels,
        "image_size": cfg.image.image_size,
        "patch_size": pe.proj.kernel_size[0],
        "hidden_act": "gelu",
        "layer_norm_eps": _ln_eps(trunk, "image tower"),
    }


def hf_config(cfg: ModelConfig, special: dict[str, int], logit_scale: float) -> dict[str, Any]:
    """config.json for CLIPModel, read off our model built on the meta device."""
    with torch.device("meta"):
        model = build_model(cfg, vocab_size=cfg.text.vocab_size)
    check_state(dict(model.state_dict()))
    text = model.text
    vision = _vision_config(model.visual.trunk, cfg)
    text_cfg = {
        "model_type": "clip_text_model",
        "vocab_size": text.token_embedding.num_embeddings,
        "hidden_size": cfg.text.width,
        "intermediate_size": text.resblocks[0].mlp.c_fc.out_features,
        "projection_dim": cfg.embed_dim,
        "num_hidden_layers": cfg.text.layers,
        "num_attention_heads": cfg.text.heads,
        "max_position_embeddings": cfg.text.context_length,
        "hidden_act": "gelu",  # nn.GELU() in text_tower.Mlp: exact, as transformers' "gelu"
        "layer_norm_eps": _ln_eps(text, "text tower"),
        "pad_token_id": special["pad"],
        "bos_token_id": special["bos"],
        "eos_token_id": special["eos"],
    }
    if special["eos"] == 2:
        # CLIPTextModel pools at the argmax id for eos_token_id 2 (old checkpoints' value).
        raise UnsupportedArchitecture("tokenizer EOS id 2: CLIPTextModel would pool at argmax")
    return {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": cfg.embed_dim,
        "logit_scale_init_value": logit_scale,
        "text_config": text_cfg,
        "vision_config": vision,
        "dtype": "float32",
    }


# --- sentencepiece model proto (the few fields the conversion needs), without protobuf ----


def _fields(buf: bytes) -> list[tuple[int, Any]]:
    """(field number, value) of one protobuf message: ints for varints, bytes otherwise."""
    out, i = [], 0
    while i < len(buf):
        key, i = _varint(buf, i)
        num, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 1:
            value, i = buf[i : i + 8], i + 8
        elif wire == 2:
            n, i = _varint(buf, i)
            value, i = buf[i : i + n], i + n
        elif wire == 5:
            value, i = buf[i : i + 4], i + 4
        else:
            raise ValueError(f"sentencepiece model: unexpected protobuf wire type {wire}")
        out.append((num, value))
    return out


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, i


# sentencepiece_model.proto: piece types and the fields read here (with the proto's defaults).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
UNIGRAM, BPE = 1, 2


def read_spm(proto: bytes) -> dict[str, Any]:
    """Pieces (text, score, type), trainer and normalizer settings of a sentencepiece model."""
    pieces, trainer, norm = [], {}, {}
    for num, value in _fields(proto):
        if num == 1:
            p = dict(_fields(value))
            score = struct.unpack("<f", p[2])[0] if 2 in p else 0.0
            pieces.append((p.get(1, b"").decode("utf-8"), score, p.get(3, NORMAL)))
        elif num == 2:
            trainer = dict(_fields(value))
        elif num == 3:
            norm = dict(_fields(value))
    return {
        "pieces": pieces,
        "model_type": trainer.get(3, UNIGRAM),
        "byte_fallback": bool(trainer.get(35, 0)),
        "whitespace_suffix": bool(trainer.get(24, 0)),
        "charsmap": norm.get(2, b""),
        "add_dummy_prefix": bool(norm.get(3, 1)),
        "remove_extra_whitespaces": bool(norm.get(4, 1)),
        "escape_whitespaces": bool(norm.get(5, 1)),
    }


def special_ids(spm: dict[str, Any]) -> dict[str, int]:
    """pad/unk/bos/eos ids by their pieces' types and names (data_tools: 0, 1, 2, 3)."""
    ids = {"unk": next(i for i, p in enumerate(spm["pieces"]) if p[2] == UNKNOWN)}
    control = {p[0]: i for i, p in enumerate(spm["pieces"]) if p[2] == CONTROL}
    for name, piece in (("pad", "<pad>"), ("bos", "<s>"), ("eos", "</s>")):
        if piece not in control:
            raise UnsupportedArchitecture(f"tokenizer has no {piece} control piece ({name})")
        ids[name] = control[piece]
    return ids


def tokenizer_json(proto: bytes) -> dict[str, Any]:
    """`tokenizers`' serialized Tokenizer that encodes as SentencePieceProcessor.encode, plus
    [bos] ... [eos] around it (our rows; truncation and padding are set per call)."""
    spm = read_spm(proto)
    pieces = spm["pieces"]
    if spm["model_type"] not in (BPE, UNIGRAM):
        raise UnsupportedArchitecture("tokenizer: only sentencepiece BPE and Unigram models map")
    if spm["whitespace_suffix"] or not spm["escape_whitespaces"]:
        raise UnsupportedArchitecture("tokenizer: whitespace as suffix or unescaped is not mapped")
    if any(p[2] == USER_DEFINED for p in pieces):
        raise UnsupportedArchitecture("tokenizer: user-defined pieces are not mapped")
    ids = special_ids(spm)
    names = vocab_strings(spm)
    if spm["model_type"] == BPE:
        model = {
            "type": "BPE",
            "dropout": None,
            "unk_token": names[ids["unk"]],
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,  # sentencepiece emits one unk for a run of unknown characters
            "byte_fallback": spm["byte_fallback"],
            "ignore_merges": False,
            "vocab": {name: i for i, name in enumerate(names)},
            "merges": _bpe_merges(pieces),
        }
    else:
        model = {
            "type": "Unigram",
            "unk_id": ids["unk"],
            "vocab": [[name, p[1]] for name, p in zip(names, pieces)],
            "byte_fallback": spm["byte_fallback"],
        }
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": i,
                "content": names[i],
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
            for i in sorted(ids.values())
        ],
        "normalizer": {"type": "Sequence", "normalizers": _normalizers(spm)},
        "pre_tokenizer": (
            {"type": "Metaspace", "replacement": ESCAPE, "prepend_scheme": "always", "split": False}
            if spm["add_dummy_prefix"]
            else None
        ),
        "post_processor": _post_processor(names[ids["bos"]], names[ids["eos"]], ids),
        "decoder": _decoder(spm),
        "model": model,
    }


def vocab_strings(spm: dict[str, Any]) -> list[str]:
    """The token string of each id: the pieces, except a Unigram model's control and unknown
    pieces, which get a leading space ("<s>" -> " <s>", also as the special tokens' names).
    sentencepiece's Unigram lattice skips those pieces; `tokenizers`' matches every vocabulary
    string, so a caption saying "<s>" would get the control id (score 0, the best there is).
    No space survives the normalizer (each becomes "▁"), so no text can match " <s>". (The
    special tokens cannot keep the plain names: an added token takes its id from the model's
    vocabulary. BPE needs none of this: merges never build a control piece.)"""
    if spm["model_type"] != UNIGRAM:
        return [p[0] for p in spm["pieces"]]
    return [" " + text if kind in (CONTROL, UNKNOWN) else text for text, _, kind in spm["pieces"]]


def _bpe_merges(pieces: list[tuple[str, float, int]]) -> list[list[str]]:
    """Every split of every normal piece into two normal pieces, best merged score first:
    sentencepiece's BPE merges, at each step, the adjacent pair whose union scores highest."""
    normal = {p: (score, i) for i, (p, score, kind) in enumerate(pieces) if kind == NORMAL}
    ranked = []
    for piece, (score, i) in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((-score, i, left, right))
    return [[left, right] for _, _, left, right in sorted(ranked)]


def _normalizers(spm: dict[str, Any]) -> list[dict[str, Any]]:
    """sentencepiece's normalizer in its order: the character map, then spaces."""
    out: list[dict[str, Any]] = []
    if spm["charsmap"]:
        out.append(
            {
                "type": "Precompiled",
                "precompiled_charsmap": base64.b64encode(spm["charsmap"]).decode(),
            }
        )
    if spm["remove_extra_whitespaces"]:
        # Spaces only: sentencepiece leaves other whitespace the map did not turn into spaces.
        # It skips leading spaces and collapses runs as it reads, then drops every trailing
        # "▁" of its output: escaped spaces and a caption's own "▁" alike.
        out += [
            {"type": "Replace", "pattern": {"Regex": r"\A +"}, "content": ""},
            {"type": "Replace", "pattern": {"Regex": rf"[ {ESCAPE}]+\z"}, "content": ""},
            {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "},
        ]
    out.append({"type": "Replace", "pattern": {"String": " "}, "content": ESCAPE})
    if spm["add_dummy_prefix"]:
        # Metaspace adds no prefix to text that starts with "▁"; sentencepiece always does.
        # (Only reachable where the map keeps a caption's own "▁": nmt_nfkc makes it a space.)
        out.append({"type": "Replace", "pattern": {"Regex": rf"\A{ESCAPE}"}, "content": ESCAPE * 2})
    return out


def _post_processor(bos: str, eos: str, ids: dict[str, int]) -> dict[str, Any]:
    def seq(name: str) -> dict[str, Any]:
        return {"Sequence": {"id": name, "type_id": 0}}

    def tok(piece: str) -> dict[str, Any]:
        return {"SpecialToken": {"id": piece, "type_id": 0}}

    return {
        "type": "TemplateProcessing",
        "single": [tok(bos), seq("A"), tok(eos)],
        "pair": [tok(bos), seq("A"), tok(eos), seq("B"), tok(eos)],
        "special_tokens": {
            bos: {"id": bos, "ids": [ids["bos"]], "tokens": [bos]},
            eos: {"id": eos, "ids": [ids["eos"]], "tokens": [eos]},
        },
    }


def _decoder(spm: dict[str, Any]) -> dict[str, Any]:
    steps: list[dict[str, Any]] = [
        {"type": "Replace", "pattern": {"String": ESCAPE}, "content": " "}
    ]
    if spm["byte_fallback"]:
        steps.append({"type": "ByteFallback"})
    steps.append({"type": "Fuse"})
    if spm["add_dummy_prefix"]:
        steps.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    return {"type": "Sequence", "decoders": steps}


def tokenizer_config(proto: bytes, context_length: int) -> dict[str, Any]:
    spm = read_spm(proto)
    ids = special_ids(spm)
    names = vocab_strings(spm)
    piece = {name: names[i] for name, i in ids.items()}
    return {
        # The generic tokenizers-backed class: it runs tokenizer.json as written. (CLIPTokenizer,
        # what model_type "clip" would pick, rebuilds OpenAI's byte-level BPE pipeline.)
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": context_length,
        "padding_side": "right",
        "truncation_side": "right",
        "bos_token": piece["bos"],
        "eos_token": piece["eos"],
        "unk_token": piece["unk"],
        "pad_token": piece["pad"],
        # sentencepiece never reads "<s>" in a caption as the control id; neither should this.
        "split_special_tokens": True,
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
    }


def preprocessor_config(size: int, mean: list[float], std: list[float]) -> dict[str, Any]:
    """CLIPImageProcessor settings of data/transforms.py's eval_transform."""
    return {
        "image_processor_type": "CLIPImageProcessor",
        "processor_class": "CLIPProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"shortest_edge": size},
        "resample": 3,  # PIL.Image.BICUBIC, as T.Resize(size, BICUBIC)
        "do_center_crop": True,
        "crop_size": {"height": size, "width": size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(mean),
        "image_std": list(std),
    }


def write_hf(out_dir: Path, state: dict[str, Tensor], run: Config, proto: bytes) -> Path:
    """Write the five files into out_dir; the weights atomically, after every check passed."""
    cfg = run.model
    special = special_ids(read_spm(proto))
    config = hf_config(cfg, special, float(state["logit_scale"].reshape(())))
    weights = to_hf_state_dict(state)
    files = {
        "config.json": config,
        "tokenizer.json": tokenizer_json(proto),
        "tokenizer_config.json": tokenizer_config(proto, cfg.text.context_length),
        "preprocessor_config.json": preprocessor_config(
            cfg.image.image_size, list(run.data.augment.mean), list(run.data.augment.std)
        ),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "model.safetensors"
    tmp = path.with_suffix(".tmp")
    save_file(weights, str(tmp), metadata={"format": "pt", "source": "clipforge"})
    tmp.replace(path)
    for name, content in files.items():
        (out_dir / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n")
    return out_dir
