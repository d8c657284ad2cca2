"""Start a model from existing weights (`model.init_from=PATH`) instead of from scratch.

    python -m clipforge.train model=vit_b32 model.init_from=runs/a/model.safetensors ...
    ... model.init_from=s3://bucket/open_clip/open_clip_model.safetensors
    ... model.init_from=logs/run/checkpoints/epoch_32.pt      # as open_clip_train saves it

Two formats, told apart by their tensor names (never by the file name):
- clipforge: a run's `model.safetensors` (checkpoint.export_weights), our own names; any image
  tower, since nothing is renamed.
- open_clip: a CLIP state dict in open_clip's names: `open_clip_model.safetensors` (the hub's
  and `python -m clipforge.export`'s), or a torch file read with weights_only=True, either a
  bare state dict or open_clip_train's {"epoch", "name", "state_dict", "optimizer"}, with or
  without DDP's `module.` prefix. Names and layouts go through export.py's rules backwards, so
  the model's image tower must be one export supports (timm CLIP ViTs and CLIP ResNets).
A directory stands for the file in it (`model.safetensors`, else open_clip's names); every path
may be an fsspec URL.

Strict by default: every tensor of the model must come from the file with its shape, and every
tensor of the file must be used, or the run stops with one line naming what is missing, what is
unexpected and which shapes disagree (in the file's names). `model.init_strict=false` loads
what fits and logs what stayed at its init. Two deliberate exceptions, logged: the sigmoid
loss's `logit_bias` starts at model.init_logit_bias when the file has none (a softmax-trained
source), and a file's bias is dropped when training with the softmax loss, which no constant
added to the logits can change; a derived `attn_mask` buffer (old open_clip files) is dropped.

What a strict load cannot see: settings that change no tensor's shape (attention heads, MLP
activation, the text tower's pooling). The temperature is loaded too: open_clip's 0-dim
`logit_scale` becomes our shape-[1] parameter.
"""

from __future__ import annotations

import io
import posixpath
import re
from collections.abc import Iterable
from dataclasses import dataclass

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import load_file
from torch import Tensor, nn

from clipforge.config import ConfigError
from clipforge.export import _RESNET, _TEXT, _VIT, UnsupportedArchitecture, image_kind, rename

CLIPFORGE, OPEN_CLIP = "clipforge", "open_clip"
# Looked for, in this order, when init_from names a directory: a run, an open_clip folder.
DIR_FILES = ("model.safetensors", "open_clip_model.safetensors", "open_clip_pytorch_model.bin")
# Wrappers around the model's own names: DDP's, torch.compile's, clipforge's task module.
_PREFIXES = ("module.", "_orig_mod.", "model.")
# Present in the model or the file only because of the loss (see the module docstring).
_LOSS_ONLY = "logit_bias"
_DERIVED = re.compile(r"(.*\.)?attn_mask")
# Names shown per kind of problem in the error line before "(+N more)".
_SHOWN = 6


class InitMismatch(ConfigError):
    """The file's tensors do not fit the model (the message names them, on one line)."""


@dataclass
class Source:
    """A weights file as read: its tensors, prefixes stripped, and the format of their names."""

    url: str
    format: str
    tensors: dict[str, Tensor]


def read(url: str) -> Source:
    """The weights at `url` (a file or a directory holding one); raises FileNotFoundError or
    ConfigError with one line when there is none or it is not a state dict we know."""
    fs, path = fsspec.core.url_to_fs(url)
    if fs.isdir(path):
        found = next((f for f in DIR_FILES if fs.isfile(posixpath.join(path, f))), None)
        if found is None:
            raise FileNotFoundError(f"model.init_from={url}: no {' or '.join(DIR_FILES)} there")
        path = posixpath.join(path, found)
    elif not fs.isfile(path):
        raise FileNotFoundError(f"model.init_from={url}: no such file")
    tensors = _unwrap(url, _load(fs, path, url))
    return Source(url, detect(url, tensors), tensors)


def _load(fs: fsspec.AbstractFileSystem, path: str, url: str) -> object:
    local = isinstance(fs, LocalFileSystem)
    with fs.open(path, "rb") as f:
        head = f.read(9)
    try:
        if _is_safetensors(head):
            if local:  # memory-mapped; other filesystems hand us bytes
                return load_file(path)
            return load_safetensors_bytes(fs.cat_file(path))
        source = path if local else io.BytesIO(fs.cat_file(path))
        return torch.load(source, map_location="cpu", weights_only=True)
    except Exception as err:  # safetensors' and pickle's errors have no common base
        raise ConfigError(
            f"model.init_from={url}: not a safetensors file or a torch file that loads with "
            f"weights_only=True ({_reason(err)})"
        ) from err


def _reason(err: Exception) -> str:
    """The part of a load error that says what is wrong with the file, on one line: torch's
    weights_only refusal ends in it, after advice on how to run the file's code anyway."""
    msg = str(err)
    if "WeightsUnpickler error:" in msg:
        msg = msg.split("WeightsUnpickler error:", 1)[1].strip().split("\n\n")[0].split(". ")[0]
    return " ".join(msg.split())[:200] or type(err).__name__


def _is_safetensors(head: bytes) -> bool:
    """An 8-byte little-endian header length, then the JSON header."""
    return len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < 1 << 30


def _unwrap(url: str, obj: object) -> dict[str, Tensor]:
    """open_clip_train's checkpoint dict -> its state dict; wrapper prefixes stripped."""
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj:
        raise ConfigError(f"model.init_from={url}: holds no state dict ({type(obj).__name__})")
    odd = [k for k, v in obj.items() if not isinstance(k, str) or not torch.is_tensor(v)]
    if odd:
        raise ConfigError(
            f"model.init_from={url}: not a state dict (and no 'state_dict' in it): {odd[0]!r} "
            f"holds a {type(obj[odd[0]]).__name__}"
        )
    names = list(obj)
    for prefix in _PREFIXES:
        if all(n.startswith(prefix) for n in names):
            obj = {n.removeprefix(prefix): v for n, v in obj.items()}
            names = list(obj)
    return obj  # type: ignore[return-value]


def detect(url: str, tensors: dict[str, Tensor]) -> str:
    """clipforge or open_clip, from the text tower's names (ours: text.resblocks.N)."""
    if any(n.startswith("text.transformer.") for n in tensors):
        raise ConfigError(
            f"model.init_from={url}: an open_clip CustomTextCLIP state dict (text.transformer.*: "
            "SigLIP, CoCa, HF text towers); only CLIP's layout is read"
        )
    if "text.token_embedding.weight" in tensors:
        return CLIPFORGE
    if "token_embedding.weight" in tensors:
        return OPEN_CLIP
    first = ", ".join(list(tensors)[:3])
    raise ConfigError(
        f"model.init_from={url}: neither a clipforge export nor an open_clip CLIP state dict "
        f"(no token_embedding; its first tensors: {first})"
    )


# -- names and layouts ---------------------------------------------------------------------------
@dataclass
class _Slot:
    """Where one of the model's tensors is found in the file, and how to bring it back."""

    ours: str
    shape: torch.Size  # in the file's layout
    index: Tensor | None  # file tensor's flat position j holds our flat element index[j]


def _slots(model_state: dict[str, Tensor], fmt: str) -> dict[str, _Slot]:
    """{the file's name: slot} for every tensor of the model."""
    if fmt == CLIPFORGE:
        return {k: _Slot(k, v.shape, None) for k, v in model_state.items()}
    rules = _TEXT + (_VIT if image_kind(model_state) == "vit" else _RESNET)
    out = {}
    for name, value in model_state.items():
        hit = rename(name, rules)
        if hit is None:
            raise UnsupportedArchitecture(f"{name} has no open_clip name")
        theirs, fn = hit
        if fn is None:
            out[theirs] = _Slot(name, value.shape, None)
            continue
        # The export's transform (transpose, reshape, drop a leading 1) applied to element
        # indices says where each of our elements went: inverting it needs no per-rule code.
        moved = fn(torch.arange(value.numel()).reshape(value.shape))
        out[theirs] = _Slot(name, moved.shape, moved.reshape(-1))
    return out


def _bring_back(tensor: Tensor, slot: _Slot, our_shape: torch.Size) -> Tensor:
    if slot.index is None:
        return tensor
    flat = tensor.new_empty(slot.index.numel())
    flat[slot.index] = tensor.reshape(-1)
    return flat.reshape(our_shape)


@dataclass
class _Plan:
    load: dict[str, Tensor]  # our name -> tensor, in our layout
    expected: set[str]  # every tensor of the model, in the file's names
    missing: list[str]  # the file's names
    unexpected: list[str]
    mismatched: list[str]  # "name [file shape] vs [model shape]"
    notes: list[str]  # deliberate exceptions, logged


def plan(model: nn.Module, source: Source) -> _Plan:
    """Match the file's tensors to the model's; nothing is loaded yet."""
    state = model.state_dict()
    try:
        slots = _slots(state, source.format)
    except UnsupportedArchitecture as err:
        raise ConfigError(
            f"model.init_from={source.url}: an open_clip state dict, but this model has no "
            f"open_clip layout ({err})"
        ) from err
    tensors = dict(source.tensors)
    notes = []
    for name in [n for n in tensors if _DERIVED.fullmatch(n)]:
        tensors.pop(name)
        notes.append(f"dropped the derived buffer {name}")
    if _LOSS_ONLY in slots and _LOSS_ONLY not in tensors:
        slots.pop(_LOSS_ONLY)
        notes.append("logit_bias starts at model.init_logit_bias (the file has none)")
    if _LOSS_ONLY in tensors and _LOSS_ONLY not in slots:
        tensors.pop(_LOSS_ONLY)
        notes.append("dropped the file's logit_bias (the softmax loss has none)")
    missing, unexpected = sorted(set(slots) - set(tensors)), sorted(set(tensors) - set(slots))
    out = _Plan({}, set(slots), missing, unexpected, [], notes)
    for name in sorted(set(slots) & set(tensors)):
        slot, value = slots[name], tensors[name]
        if value.shape != slot.shape:
            out.mismatched.append(f"{name} {list(value.shape)} vs {list(slot.shape)}")
            continue
        out.load[slot.ours] = _bring_back(value, slot, state[slot.ours].shape)
    return out


# -- loading -------------------------------------------------------------------------------------
def load_into(model: nn.Module, source: Source, strict: bool = True) -> str:
    """Copy the file's weights into `model` (its full, unpartitioned module: before ZeRO-3
    partitions it, on every rank); returns the line to log. Strict: all or nothing."""
    p = plan(model, source)
    problems = _problems(p, source)
    if problems and strict:
        raise InitMismatch(
            f"model.init_from={source.url}: the {source.format} weights do not fit this model "
            f"({'; '.join(problems)}); check model.* against the "
            "source's architecture, or set model.init_strict=false to load only what fits"
        )
    model.load_state_dict(p.load, strict=False)  # plan() chose what fits: nothing unexpected
    line = f"initialized from {source.url} ({source.format}, {len(p.load)} tensors)"
    if problems:
        line += "; not loaded (kept at init): " + "; ".join(problems)
    return line + "".join(f"; {n}" for n in p.notes)


def _problems(p: _Plan, source: Source) -> list[str]:
    out = []
    if p.missing:
        out.append(f"missing {len(p.missing)}: {summarize(p.missing, p.expected)}")
    if p.unexpected:
        out.append(f"unexpected {len(p.unexpected)}: {summarize(p.unexpected, source.tensors)}")
    if p.mismatched:
        shown = ", ".join(p.mismatched[:_SHOWN])
        more = len(p.mismatched) - _SHOWN
        out.append(
            f"shape mismatch {len(p.mismatched)} (file vs model): {shown}"
            + (f" (+{more} more)" if more > 0 else "")
        )
    return out


_BLOCK = re.compile(r"^(.*?\.)(\d+)\.(.+)$")


def summarize(names: list[str], universe: Iterable[str], limit: int = _SHOWN) -> str:
    """Tensor names for one line: a numbered block listed in full becomes `prefix.{4..11}.*`,
    one tensor across blocks `prefix.{0..3}.rest`; after `limit` entries, (+N more)."""
    names_set = set(names)
    per_block: dict[tuple[str, int], set[str]] = {}
    for n in set(universe) | names_set:
        m = _BLOCK.match(n)
        if m:
            per_block.setdefault((m[1], int(m[2])), set()).add(m[3])
    groups: dict[tuple[str, str], list[int]] = {}
    singles = []
    for n in sorted(names_set):
        m = _BLOCK.match(n)
        if not m:
            singles.append(n)
            continue
        prefix, i, rest = m[1], int(m[2]), m[3]
        listed = {r for r in per_block[(prefix, i)] if f"{prefix}{i}.{r}" in names_set}
        whole = listed == per_block[(prefix, i)]
        groups.setdefault((prefix, "*" if whole else rest), []).append(i)
    entries = singles + [
        f"{prefix}{_indices(sorted(set(idx)))}.{rest}" for (prefix, rest), idx in groups.items()
    ]
    entries = sorted(entries)
    more = len(entries) - limit
    return ", ".join(entries[:limit]) + (f" (+{more} more)" if more > 0 else "")


def _indices(idx: list[int]) -> str:
    if len(idx) == 1:
        return str(idx[0])
    if idx == list(range(idx[0], idx[-1] + 1)):
        return f"{{{idx[0]}..{idx[-1]}}}"
    return "{" + ",".join(map(str, idx)) + "}"
