"""Label images with a trained run, from label words alone (zero-shot).

    python -m clipforge.predict --checkpoint RUN_DIR --labels "cat,dog,ship" a.jpg b.png
    python -m clipforge.predict --checkpoint RUN_DIR --labels cat,dog --json --top 2 *.jpg
    ... --templates "a photo of a {}.|a blurry photo of a {}."     (or a file, one per line; {c} too)

Each label is embedded through every prompt template and the embeddings averaged (the CLIP
paper's ensemble); probabilities are the softmax of the model's own scaled cosine similarities.
Default templates: the run's eval.templates.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from clipforge import cli
from clipforge.eval.exported import load_run, pick_device
from clipforge.eval.zeroshot import build_classifier


def parse_templates(text: str | None) -> list[str] | None:
    """A file with one template per line, or templates joined with `|`; each needs a {} (or
    CLIP_benchmark's {c}) for the label."""
    if not text:
        return None
    path = Path(text)
    lines = path.read_text().splitlines() if path.is_file() else text.split("|")
    templates = [t.strip() for t in lines if t.strip()]
    bad = [t for t in templates if "{}" not in t and "{c}" not in t]
    if not templates or bad:
        raise ValueError(
            f"--templates: every template needs a {{}} or {{c}} for the label, got {bad or text!r}"
        )
    return templates


def build_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(prog="python -m clipforge.predict", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="run directory (model.safetensors, ...)")
    p.add_argument("--labels", required=True, help="comma-separated label words")
    p.add_argument("--templates", default=None, help="file, or templates joined with |")
    p.add_argument("--top", type=int, default=3, help="labels shown per image")
    p.add_argument("--json", action="store_true", help="one JSON object per image")
    p.add_argument("--device", default="auto")
    p.add_argument("images", nargs="+", help="image files")
    return p


@torch.no_grad()
def predict(run, labels: list[str], templates: list[str], paths: list[str], top: int) -> list[dict]:
    """[{"image": path, "labels": [{"label", "prob"}, ...]}] best first; errors per image."""
    classifier = build_classifier(run.encode_text, run.tokenizer, labels, templates)
    transform = run.encoders().transform
    out = []
    for path in paths:
        try:
            with Image.open(path) as img:
                x = transform(img)[None]
        except (OSError, UnidentifiedImageError) as e:
            out.append({"image": path, "error": str(e)})
            continue
        feats = torch.nn.functional.normalize(run.encode_image(x).float().cpu(), dim=-1)
        probs = (run.logit_scale() * feats @ classifier).softmax(dim=-1)[0]
        best = probs.topk(min(top, len(labels)))
        out.append(
            {
                "image": path,
                "labels": [
                    {"label": labels[i], "prob": round(float(p), 6)}
                    for p, i in zip(best.values.tolist(), best.indices.tolist())
                ],
            }
        )
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    labels = [x.strip() for x in args.labels.split(",") if x.strip()]
    try:
        if len(labels) < 2:
            raise ValueError("--labels needs at least two labels, comma-separated")
        run = load_run(args.checkpoint, pick_device(args.device))
        templates = parse_templates(args.templates) or list(run.cfg.eval.templates)
        rows = predict(run, labels, templates, args.images, args.top)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for row in rows:
        if args.json:
            print(json.dumps(row))
        elif "error" in row:
            print(f"{row['image']}: error: {row['error']}")
        else:
            best = ", ".join(f"{x['label']} {x['prob']:.3f}" for x in row["labels"])
            print(f"{row['image']}: {best}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
