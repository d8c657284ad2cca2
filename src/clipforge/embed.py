"""Export a run's embeddings of a shard set, for a retrieval index (keys + unit-norm vectors).

    python -m clipforge.embed --checkpoint RUN_DIR --input SHARDS --kind image --out img.npy
    python -m clipforge.embed --checkpoint RUN_DIR --input SHARDS --kind text --out txt.parquet
    torchrun --nproc_per_node 2 -m clipforge.embed ...      # split over processes, same output

.npy: a float32 [N, D] array, with its keys one per line in FILE.keys.txt (same order).
.parquet: columns `key`, `embedding` (fixed-size list of float32) and, for text, `caption`.
Image keys are the samples' keys; text rows are every caption (KEY.json "captions", else
KEY.txt), keyed KEY for a single caption and KEY#i for the i-th of several.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from clipforge import cli
from clipforge.data.eval_loader import EvalLoader
from clipforge.data.shards import SourceError, resolve
from clipforge.eval import retrieval
from clipforge.eval.exported import ExportedRun, on_ranks


def embed_images(
    run: ExportedRun, source: str, batch_size: int, rank: int, world: int, workers: int = 2
):
    sset = resolve(source)
    loader = EvalLoader(sset, run.encoders().transform, batch_size, rank, world, workers)
    emb = retrieval.embed_images(run.encode_image, loader, rank, world)
    return emb.keys, emb.features, None


def embed_texts(run: ExportedRun, source: str, batch_size: int, rank: int, world: int):
    keys, texts = [], []
    for key, caps in retrieval.iter_captions(resolve(source)):
        for i, cap in enumerate(caps):
            keys.append(key if len(caps) == 1 else f"{key}#{i}")
            texts.append(cap)
    if not texts:
        raise SourceError(f"{source}: no captions (.txt or .json 'captions') to embed")
    feats = retrieval.embed_texts(run.encode_text, run.tokenizer, texts, batch_size, rank, world)
    return keys, feats, texts


def write(out: Path, keys: list[str], feats: torch.Tensor, captions: list[str] | None) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    array = feats.float().numpy().astype(np.float32)
    if out.suffix == ".npy":
        np.save(out, array)
        out.with_suffix(".keys.txt").write_text("".join(k + "\n" for k in keys))
        return
    dim = array.shape[1]
    columns = {
        "key": pa.array(keys, pa.string()),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(array.reshape(-1)), dim),
    }
    if captions is not None:
        columns["caption"] = pa.array(captions, pa.string())
    pq.write_table(pa.table(columns), out)


def build_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(prog="python -m clipforge.embed", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="run directory (model.safetensors, ...)")
    p.add_argument("--input", required=True, help="shard folder, manifest, pattern (:: joins)")
    p.add_argument("--kind", required=True, choices=["image", "text"])
    p.add_argument("--out", required=True, type=Path, help="FILE.npy or FILE.parquet")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=2, help="image decoding processes per rank")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.out.suffix not in (".npy", ".parquet"):
        print(f"error: --out must end in .npy or .parquet, got {args.out}", file=sys.stderr)
        return 2
    fn = embed_images if args.kind == "image" else embed_texts
    kw = {"workers": args.workers} if args.kind == "image" else {}
    done = on_ranks(
        args.checkpoint,
        args.device,
        lambda run, rank, world: fn(run, args.input, args.batch_size, rank, world, **kw),
    )
    if done is None:
        return 2
    rank, (keys, feats, captions) = done
    if rank == 0:
        write(args.out, keys, feats, captions)
        print(f"{len(keys)} {args.kind} embeddings of dim {feats.shape[1]} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
