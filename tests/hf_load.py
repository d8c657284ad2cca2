"""What a transformers user does with an hf export, with no code of ours importable.

    python tests/hf_load.py EXPORT_DIR INPUTS.json OUT.npz

INPUTS.json: {"captions": [...], "images": [paths]}. OUT.npz: token ids (max_length padding and
truncation, from AutoTokenizer and from AutoProcessor), normalized text embeddings (padded to
the longest caption, with the attention mask), pixel values and normalized image embeddings
from AutoImageProcessor's default (torchvision) and "pil" backends and from AutoProcessor, and
the logit scale; OUT.json: the loading info and the classes transformers picked. Run by
tests/test_export_hf.py in a subprocess, so clipforge and data_tools are blocked from import.
"""

from __future__ import annotations

import importlib.abc
import json
import sys


class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("clipforge", "data_tools", "open_clip"):
            raise ImportError(f"{name} must not be needed to load an export")
        return None


sys.meta_path.insert(0, _Block())

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import (  # noqa: E402
    AutoImageProcessor,
    AutoProcessor,
    AutoTokenizer,
    CLIPModel,
)


def unit(x: torch.Tensor) -> np.ndarray:
    return (x / x.norm(dim=-1, keepdim=True)).numpy()


def main(export: str, inputs: str, out: str) -> None:
    with open(inputs, encoding="utf-8") as f:
        spec = json.load(f)
    captions = spec["captions"]
    images = [Image.open(p) for p in spec["images"]]
    model, info = CLIPModel.from_pretrained(export, output_loading_info=True)
    model.eval()
    tok = AutoTokenizer.from_pretrained(export)
    proc = AutoProcessor.from_pretrained(export)
    arrays = {}
    arrays["ids"] = tok(captions, padding="max_length", truncation=True)["input_ids"]
    both = proc(text=captions, images=images, padding="max_length", truncation=True)
    arrays["processor_ids"] = both["input_ids"]
    arrays["processor_pixels"] = np.asarray(both["pixel_values"])
    with torch.no_grad():
        batch = tok(captions, padding=True, truncation=True, return_tensors="pt")
        arrays["text"] = unit(model.get_text_features(**batch).pooler_output)
        backends = {}
        for name, kwargs in (("torchvision", {}), ("pil", {"backend": "pil"})):
            improc = AutoImageProcessor.from_pretrained(export, **kwargs)
            backends[name] = type(improc).__name__
            pixels = improc(images=images, return_tensors="pt")["pixel_values"]
            arrays[f"pixels_{name}"] = pixels.numpy()
            arrays[f"image_{name}"] = unit(
                model.get_image_features(pixel_values=pixels).pooler_output
            )
        arrays["logit_scale"] = model.logit_scale.exp().numpy()
    np.savez(out, **{k: np.asarray(v) for k, v in arrays.items()})
    meta = {
        "loading": {k: sorted(map(str, v)) for k, v in info.items()},
        "tokenizer": type(tok).__name__,
        "model_max_length": tok.model_max_length,
        "processor": [type(proc).__name__, type(proc.tokenizer).__name__],
        "image_processors": backends,
        "layer_norm_eps": {
            tower: sorted({m.eps for m in sub.modules() if isinstance(m, torch.nn.LayerNorm)})
            for tower, sub in (("vision", model.vision_model), ("text", model.text_model))
        },
    }
    with open(out.removesuffix(".npz") + ".json", "w") as f:
        json.dump(meta, f)


if __name__ == "__main__":
    main(*sys.argv[1:4])
