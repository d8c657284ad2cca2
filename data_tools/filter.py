"""Score image-text pairs with a trained model, keep the best, drop near-duplicate images.

    python -m data_tools.filter shards/ --checkpoint runs/a --keep-fraction 0.5 --output kept/
    python -m data_tools.filter 's3://b/{00000..00099}.tar' --checkpoint runs/a/open_clip \\
        --min-score 0.25 --dedupe-threshold 0.95 --output s3://b/kept/ --processes 8

SHARDS: a shard folder (manifest.json, or img2dataset's tars + _stats.json), a manifest, a brace
pattern, a .txt list, several joined with `::`; local or any fsspec URL (clipforge.data.shards).
--checkpoint: a clipforge run directory (model.safetensors, config.yaml, tokenizer.model) or an
open_clip export folder (open_clip_config.json + open_clip_model.safetensors; read by the
open_clip package; a clipforge-made export takes the run's tokenizer.model from beside it).

How it works:
  1. Everything is checked first (flags, checkpoint files, the shard list): a bad one is a single
     `error: ...` line, exit 2, and nothing is written. Nothing is written until every shard is
     scored, so a shard that breaks while scoring also leaves nothing behind.
  2. --processes scoring processes (default: one per GPU, else one per CPU core) each take a
     contiguous share of the shards, load the model once and embed images and captions in
     batches of --batch-size (the loader is clipforge's eval loader; --workers decoding
     processes each). Batches start at every shard's first sample and never cross a shard, so a
     sample meets the same batch whatever --processes is, and the scores come out the same.
  3. score = cosine(image embedding, caption embedding); the caption is KEY.txt (else KEY.json
     "captions"[0]). --min-score S keeps score >= S; --keep-fraction F keeps the round(F * n)
     best of the n scored samples of the whole set (ties: earlier first); the threshold used is
     the lowest kept score.
  4. --dedupe-threshold T, among the samples the score kept, in set order (shard order, then
     position): an image whose cosine similarity to an earlier kept image is above T is dropped
     as a duplicate of it. Exact (blockwise matrix products, on the first GPU when there is one),
     so the kept set depends only on the input and settings; O(n^2 d) work: fine for millions.
  5. Reports: per source shard i, `{i:05d}_scores.parquet` (one row per sample: key, source,
     status ok|filtered|duplicate|failed, error, sha256, note, score, duplicate_of, similarity)
     and `filter.json` (settings, the threshold used, counts, score quantiles) in --output, else
     in --reports, else beside the shards (`X_scores.parquet` next to `X.tar`, filter.json in the
     first shard's folder).
  6. --output DIR (any fsspec URL): shard i's kept samples as `{i:05d}.tar`, every member's bytes
     as they were (names too; tar headers normalized as convert writes them), `_stats.json` per
     shard, the source's tokenizer.model / classnames.txt / templates, and manifest.json (last),
     as data_tools.convert writes them, so the trainer reads it with `data.train=DIR`. A shard
     whose samples were all dropped gets reports but no tar.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import posixpath
import sys
import tarfile
import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem

from clipforge import cli
from clipforge.data.eval_loader import EvalLoader
from clipforge.data.samples import open_image
from data_tools import shards
from data_tools.convert import positive_int, tool_version

EXIT_USAGE = 2
SUMMARY = "filter.json"
SCORES_SUFFIX = shards.SCORES_SUFFIX
OPEN_CLIP_FILES = ("open_clip_config.json", "open_clip_model.safetensors")
RUN_FILES = ("config.yaml", "model.safetensors", "tokenizer.model")
# Rows of the similarity matrix at once in the dedupe, and kept images per product: bounds the
# product to BLOCK x KEPT_CHUNK floats (256 MiB) however many images are kept.
BLOCK, KEPT_CHUNK = 4096, 16384


class UsageError(ValueError):
    """One `error:` line, exit 2, before anything is written."""


# -- the model ------------------------------------------------------------------------------------
def checkpoint_kind(path: str) -> str:
    """'clipforge' (a run directory) or 'open_clip' (an export folder); UsageError otherwise."""
    p = Path(path)
    if not p.is_dir():
        raise UsageError(f"--checkpoint {path}: no such directory")
    if all((p / f).is_file() for f in OPEN_CLIP_FILES):
        return "open_clip"
    missing = [f for f in RUN_FILES if not (p / f).is_file()]
    if missing:
        raise UsageError(
            f"--checkpoint {path}: neither a clipforge run (missing {', '.join(missing)}) nor "
            f"an open_clip export ({' + '.join(OPEN_CLIP_FILES)})"
        )
    return "clipforge"


def _open_clip_tokenizer(path: Path, model_cfg: dict[str, Any]):
    """Our sentencepiece model when the export has one beside it (clipforge's exports: in the
    folder or the run directory above it), else open_clip's own tokenizer for that config."""
    import open_clip

    for tok in (path / "tokenizer.model", path.parent / "tokenizer.model"):
        if tok.is_file():
            from clipforge.data.tokenizer import Tokenizer

            return Tokenizer(str(tok), model_cfg["text_cfg"]["context_length"])
    if model_cfg.get("text_cfg", {}).get("vocab_size", 49408) != 49408:
        raise UsageError(
            f"--checkpoint {path}: its text vocabulary is not CLIP's BPE and no tokenizer.model "
            "is beside it"
        )
    return open_clip.get_tokenizer(f"local-dir:{path}")


def load_encoders(path: str, device: str):
    """clipforge.eval.suite.Encoders of the checkpoint, on `device` (eval mode, no grad)."""
    import torch

    from clipforge.eval.suite import Encoders

    if checkpoint_kind(path) == "clipforge":
        from clipforge.eval.exported import load_run

        return load_run(path, device).encoders()
    try:
        import open_clip
    except ImportError:
        raise UsageError(
            f"--checkpoint {path} is an open_clip export: pip install open-clip-torch to read it"
        ) from None
    model_cfg = json.loads((Path(path) / OPEN_CLIP_FILES[0]).read_text())["model_cfg"]
    tokenizer = _open_clip_tokenizer(Path(path), model_cfg)
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{path}", device=device)
    model.eval()

    @torch.no_grad()
    def image(x):
        return model.encode_image(x.to(device))

    @torch.no_grad()
    def text(t):
        return model.encode_text(t.to(device))

    return Encoders(image, text, tokenizer, preprocess)


# -- scoring --------------------------------------------------------------------------------------
@dataclass
class ShardScores:
    """One shard's samples, in tar order."""

    keys: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)  # nan where failed
    errors: list[str | None] = field(default_factory=list)
    sha256: list[str | None] = field(default_factory=list)
    features: list[Any] = field(default_factory=list)  # [n, d] float32 arrays per batch


def _caption(sample: dict[str, Any]) -> str | None:
    from clipforge.data.samples import json_captions

    txt = sample.get("txt")
    if txt is not None:
        return txt.decode("utf-8", errors="replace")
    caps = json_captions(sample)
    return caps[0] if caps else None


def _sha(sample: dict[str, Any]) -> str | None:
    try:
        value = json.loads(sample["json"]).get("sha256")
    except (KeyError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


class ScoringLoader(EvalLoader):
    """The eval loader whose batches say which samples failed instead of stopping; a module-level
    class, since the decoding workers (--workers) get the loader pickled."""

    def _collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        import torch
        from PIL import Image

        images, errors, captions = [], [], []
        for s in samples:
            cap, err, img = _caption(s), None, None
            try:
                img = self.transform(open_image(s))
            except Exception as e:  # PIL raises anything on a corrupt image
                err = f"image: {type(e).__name__}: {e}"
            if err is None and not cap:
                err = "no caption (KEY.txt or KEY.json captions)"
            images.append(img)
            errors.append(err)
            captions.append(cap or "")
        blank = next((i for i in images if i is not None), None)
        if blank is None:
            blank = self.transform(Image.new("RGB", (8, 8)))
        image = torch.stack([i if i is not None else torch.zeros_like(blank) for i in images])
        return {
            "image": image,
            "key": [s["__key__"] for s in samples],
            "caption": captions,
            "error": errors,
            "sha256": [_sha(s) for s in samples],
        }


def score_share(
    checkpoint: str,
    device: str,
    threads: int,
    workers: int,
    urls: list[str],
    batch_size: int,
    keep_features: bool = True,
) -> list[ShardScores]:
    """Score every sample of `urls` (one process's share), each shard's samples in order;
    the image embeddings come back too when `keep_features` (the dedupe needs them)."""
    import torch
    import torch.nn.functional as F

    from clipforge.data.shards import ShardSet

    if not urls:
        return []
    if device == "cpu":
        torch.set_num_threads(threads)
    enc = load_encoders(checkpoint, device)
    # Sizes left unknown on purpose: the loader then cuts batches inside each shard from its
    # first sample, the same batches for any share of the shards.
    sset = ShardSet(list(urls), [None] * len(urls))
    loader = ScoringLoader(sset, enc.transform, batch_size, workers=workers)
    parts: dict[tuple[int, int], dict[str, Any]] = {}
    with torch.no_grad():
        for batch in loader:
            if batch.get("pad"):
                continue
            img = F.normalize(enc.encode_image(batch["image"]).float(), dim=-1)
            txt = F.normalize(enc.encode_text(enc.tokenizer(batch["caption"])).float(), dim=-1)
            score = (img * txt).sum(-1).cpu().numpy().astype(np.float32)
            batch["score"], batch["features"] = score, img.cpu().numpy().astype(np.float32)
            parts[tuple(batch["start"])] = batch
    out = [ShardScores() for _ in urls]
    for (shard, _), b in sorted(parts.items()):
        s = out[shard]
        bad = np.array([e is not None for e in b["error"]])
        s.keys += b["key"]
        s.scores += np.where(bad, np.nan, b["score"]).tolist()
        s.errors += b["error"]
        s.sha256 += b["sha256"]
        if keep_features:
            s.features.append(b["features"])
    return out


def shares(counts: list[int | None], parts: int) -> list[range]:
    """Contiguous runs of shards, balanced by sample counts where all are known."""
    n = len(counts)
    if any(c is None for c in counts) or not n:
        return [range(i * n // parts, (i + 1) * n // parts) for i in range(parts)]
    cum = np.cumsum([0, *counts], dtype=np.float64)
    total = cum[-1] or 1.0
    bounds = [0] + [int(np.searchsorted(cum, total * i / parts)) for i in range(1, parts)] + [n]
    bounds = list(np.maximum.accumulate(bounds))
    return [range(bounds[i], bounds[i + 1]) for i in range(parts)]


def score_all(args: argparse.Namespace, urls: list[str], counts: list[int | None]):
    devices, threads = plan_devices(args.processes, args.device)
    workers = args.workers
    if workers is None:  # a GPU outruns one decoding process; on CPU the cores are the scorers
        workers = 0 if devices[0] == "cpu" else max(1, min(8, _cores() // len(devices) - 1))
    runs = [r for r in shares(counts, len(devices)) if len(r)]
    dedupe = args.dedupe_threshold is not None
    jobs = [(args.checkpoint, devices[i], threads, workers, [urls[j] for j in r],
             args.batch_size, dedupe) for i, r in enumerate(runs)]  # fmt: skip
    if len(jobs) == 1:
        return score_share(*jobs[0])
    import multiprocessing

    # spawn: a clean interpreter per process (no forked torch/CUDA state); not daemonic, so the
    # loader's decoding workers (--workers) can start under it.
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(len(jobs), mp_context=ctx) as pool:
        results = list(pool.map(score_share, *zip(*jobs)))
    return [s for part in results for s in part]


def _cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def plan_devices(processes: int | None, device: str) -> tuple[list[str], int]:
    """(device of each scoring process, torch threads each on CPU)."""
    import torch

    cores = _cores()
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        gpus = torch.cuda.device_count()
        n = processes or gpus
        return [f"cuda:{i % gpus}" for i in range(n)], 1
    n = processes or cores
    return ["cpu"] * n, max(1, cores // n)


# -- deciding -------------------------------------------------------------------------------------
def threshold_mask(scores: np.ndarray, keep_fraction: float | None, min_score: float | None):
    """(passes the score, threshold used) over the whole set; nan scores never pass."""
    valid = ~np.isnan(scores)
    if min_score is not None:
        return valid & (scores >= min_score), float(min_score)
    idx = np.flatnonzero(valid)
    k = int(round(keep_fraction * len(idx)))  # type: ignore[operator]
    # Best first; equal scores in set order, so the cut is the same on every run.
    order = idx[np.lexsort((idx, -scores[idx]))]
    passes = np.zeros(len(scores), bool)
    passes[order[:k]] = True
    return passes, float(scores[order[k - 1]]) if k else math.inf


def dedupe(features: np.ndarray, threshold: float, device: str = "cpu"):
    """Greedy in row order: a row whose cosine to an earlier kept row is above `threshold` is a
    duplicate of its most similar one. Returns (duplicate_of: index or -1, that similarity)."""
    import torch

    n = len(features)
    dup = np.full(n, -1, np.int64)
    sim = np.full(n, np.nan, np.float32)
    x_all = torch.from_numpy(features).to(device)
    kept_rows: list[int] = []
    kept = x_all[:0]
    for s in range(0, n, BLOCK):
        x = x_all[s : s + BLOCK]
        best = torch.full((len(x),), -2.0, device=device)
        arg = torch.zeros(len(x), dtype=torch.long, device=device)
        for c in range(0, len(kept), KEPT_CHUNK):
            v, i = (x @ kept[c : c + KEPT_CHUNK].T).max(dim=1)
            better = v > best
            best, arg = torch.where(better, v, best), torch.where(better, i + c, arg)
        inner = (x @ x.T).cpu().numpy()
        best_np, arg_np = best.cpu().numpy(), arg.cpu().numpy()
        local: list[int] = []
        for i in range(len(x)):
            b, j = float(best_np[i]), kept_rows[arg_np[i]] if best_np[i] > -2 else -1
            if local:
                row = inner[i, local]
                m = int(row.argmax())
                if row[m] > b:
                    b, j = float(row[m]), s + local[m]
            if b > threshold:
                dup[s + i], sim[s + i] = j, b
            else:
                local.append(i)
        kept_rows += [s + i for i in local]
        kept = torch.cat([kept, x[local]])
    return dup, sim


@dataclass
class Decision:
    status: list[np.ndarray]  # per shard: "ok" | "filtered" | "duplicate" | "failed"
    note: list[list[str | None]]
    dup_key: list[list[str | None]]
    similarity: list[np.ndarray]
    threshold: float


def decide(results: list[ShardScores], args: argparse.Namespace, device: str) -> Decision:
    sizes = [len(r.keys) for r in results]
    scores = np.array([v for r in results for v in r.scores], np.float64)
    keys = [k for r in results for k in r.keys]
    passes, thr = threshold_mask(scores, args.keep_fraction, args.min_score)
    status = np.where(np.isnan(scores), "failed", np.where(passes, "ok", "filtered")).astype(object)
    note: list[str | None] = [
        None if p or math.isnan(v) else f"score {v:.4f}, kept from {thr:.4f}"
        for p, v in zip(passes, scores)
    ]
    dup_key: list[str | None] = [None] * len(keys)
    similarity = np.full(len(keys), np.nan, np.float32)
    if args.dedupe_threshold is not None and passes.any():
        feats = np.concatenate([f for r in results for f in r.features])
        rows = np.flatnonzero(passes)
        dup, sim = dedupe(np.ascontiguousarray(feats[rows]), args.dedupe_threshold, device)
        for r, d, v in zip(rows, dup, sim):
            if d >= 0:
                g = rows[d]
                status[r], dup_key[r], similarity[r] = "duplicate", keys[g], v
                note[r] = f"near-duplicate of {keys[g]} (cosine {v:.4f})"
    ends = np.cumsum([0, *sizes])
    cut = [slice(ends[i], ends[i + 1]) for i in range(len(sizes))]
    return Decision(
        [status[c] for c in cut],
        [note[c] for c in cut],
        [dup_key[c] for c in cut],
        [similarity[c] for c in cut],
        thr,
    )


# -- writing --------------------------------------------------------------------------------------
class Dest:
    """A folder on any fsspec filesystem; every file appears whole (tmp + rename locally, one
    upload per object elsewhere)."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self.local = isinstance(self.fs, LocalFileSystem)

    def path(self, rel: str) -> str:
        return posixpath.join(self.root, rel)

    def makedirs(self, rel: str = "") -> None:
        self.fs.makedirs(posixpath.dirname(self.path(rel)) if rel else self.root, exist_ok=True)

    def put_bytes(self, rel: str, data: bytes) -> None:
        self.makedirs(rel)
        if self.local:
            shards.write_bytes(self.path(rel), data)
        else:
            self.fs.pipe_file(self.path(rel), data)

    def put_json(self, rel: str, obj: Any) -> None:
        self.put_bytes(rel, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode())


def raw_samples(url: str) -> Iterator[list[tuple[str, bytes]]]:
    """Each sample's (member name, bytes), as clipforge.data.tario groups them (same skips)."""
    from clipforge.data.tario import split_name

    with fsspec.open(url, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        current, members = None, []
        for info in tar:
            key, ext = split_name(info.name)
            if not info.isfile() or not ext or key.rpartition("/")[2].startswith("."):
                continue
            if members and key != current:
                yield members
                members = []
            current = key
            members.append((info.name, tar.extractfile(info).read()))  # type: ignore[union-attr]
            tar.members.clear()
        if members:
            yield members


def write_shard(dest: Dest, name: str, url: str, keep: np.ndarray) -> shards.ShardInfo | None:
    """The kept samples of `url` as dest/name, members copied byte for byte."""
    if not keep.any():
        return None
    with tempfile.TemporaryDirectory(prefix="filter-") as tmp:
        path = Path(dest.path(name)) if dest.local else Path(tmp) / name
        with shards.ShardWriter(path) as w:
            for i, members in enumerate(raw_samples(url)):
                if i < len(keep) and keep[i]:
                    parts = []
                    for member, data in members:
                        head, _, base = member.rpartition("/")
                        stem, _, ext = base.partition(".")
                        key = f"{head}/{stem}" if head else stem
                        parts.append(shards.tar_record(key, {ext: data}))
                    w.add_record(b"".join(parts))
            info = w.close()
        if not dest.local:
            dest.fs.put_file(str(path), dest.path(name))
    return info


def report_table(r: ShardScores, d: Decision, i: int, url: str) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = len(r.keys)
    cols = {
        "key": r.keys,
        "source": [url] * n,
        "status": list(d.status[i]),
        "error": r.errors,
        "sha256": r.sha256,
        "note": d.note[i],
        "duplicate_of": d.dup_key[i],
    }
    table = pa.table({c: pa.array(v, pa.string()) for c, v in cols.items()})
    score = np.asarray(r.scores, np.float32)  # null where the sample failed
    table = table.append_column("score", pa.array(score, mask=np.isnan(score)))
    sim = d.similarity[i]
    table = table.append_column("similarity", pa.array(sim, pa.float32(), mask=np.isnan(sim)))
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def summary(results, d: Decision, args, urls: list[str]) -> dict[str, Any]:
    scores = np.array([v for r in results for v in r.scores], np.float64)
    valid = scores[~np.isnan(scores)]
    status = Counter(s for st in d.status for s in st)
    q = {f"p{p}": float(np.percentile(valid, p)) for p in (1, 10, 50, 90, 99)} if len(valid) else {}
    return {
        "checkpoint": args.checkpoint,
        "source": args.shards,
        "samples": int(len(scores)),
        "kept": status["ok"],
        "status": {s: status[s] for s in ("ok", "filtered", "duplicate", "failed")},
        "keep_fraction": args.keep_fraction,
        "min_score": args.min_score,
        "threshold": d.threshold if math.isfinite(d.threshold) else None,
        "dedupe_threshold": args.dedupe_threshold,
        "score": {"mean": float(valid.mean()) if len(valid) else None, **q},
        "shards": [
            {"source": u, "samples": len(r.keys), "kept": int((st == "ok").sum())}
            for u, r, st in zip(urls, results, d.status)
        ],
    }


def _stem(url: str) -> str:
    return url.rsplit(".tar", 1)[0].removesuffix(".tgz")


def write_reports(results, d: Decision, args, urls: list[str], summ: dict[str, Any]) -> str:
    """Per-shard score tables and filter.json; returns where filter.json went."""
    folder = args.output or args.reports
    for i, (r, url) in enumerate(zip(results, urls)):
        data = report_table(r, d, i, url)
        if folder:
            Dest(folder).put_bytes(shards.shard_stem(i) + SCORES_SUFFIX, data)
        else:
            head, base = posixpath.split(_stem(url))
            Dest(head).put_bytes(base + SCORES_SUFFIX, data)
    where = folder or posixpath.dirname(urls[0])
    Dest(where).put_json(SUMMARY, summ)
    return posixpath.join(where, SUMMARY)


def write_output(results, d: Decision, args, sset, urls: list[str], summ: dict[str, Any]) -> None:
    dest = Dest(args.output)
    dest.makedirs()
    names = [shards.shard_stem(i) + ".tar" for i in range(len(urls))]
    keeps = [st == "ok" for st in d.status]
    # Copying is reading and writing bytes: threads overlap the I/O of several shards.
    with ThreadPoolExecutor(max(1, min(8, args.processes or 4))) as pool:
        infos = list(pool.map(lambda a: write_shard(dest, *a), zip(names, urls, keeps)))
    for i, (r, st) in enumerate(zip(results, d.status)):
        kept = [k for k, s in zip(r.keys, st) if s == "ok"]
        c = Counter(st)
        dest.put_json(shards.shard_stem(i) + "_stats.json", {
            "shard": names[i] if infos[i] else None, "source": urls[i], "samples": len(kept),
            "rows": len(r.keys), "ok": c["ok"], "failed": c["failed"], "filtered": c["filtered"],
            "duplicate": c["duplicate"],
            "failure_reasons": dict(Counter(e.split(":")[0] for e in r.errors if e)),
            "first_key": kept[0] if kept else None, "last_key": kept[-1] if kept else None,
        })  # fmt: skip
    tokenizer = None
    if sset.tokenizer:
        with fsspec.open(sset.tokenizer, "rb") as f:
            dest.put_bytes("tokenizer.model", f.read())
        tokenizer = "tokenizer.model"
    for name, lines in (
        ("classnames.txt", sset.classnames),
        ("zeroshot_classification_templates.txt", sset.templates),
    ):
        if lines:
            dest.put_bytes(name, ("\n".join(lines) + "\n").encode("utf-8"))
    status = summ["status"]
    manifest = shards.new_manifest(
        [info for info in infos if info],
        summ["samples"] - status["ok"],  # source samples not carried over, any reason
        vars(args),
        tool_version(),
        rows=summ["samples"],
        status=status,
        reports=[shards.shard_stem(i) + SCORES_SUFFIX for i in range(len(urls))],
        filter={k: v for k, v in summ.items() if k != "shards"},
    )
    manifest["tokenizer"] = tokenizer
    dest.put_json(shards.MANIFEST_NAME, manifest)  # last: its presence means the set is whole


# -- command line ---------------------------------------------------------------------------------
def _fraction(text: str) -> float:
    v = float(text)
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {v}")
    return v


def _cosine(text: str) -> float:
    v = float(text)
    if not -1 <= v < 1:
        raise argparse.ArgumentTypeError(f"a cosine similarity in [-1, 1), got {v}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(prog="python -m data_tools.filter", description=__doc__.split("\n")[0])
    p.add_argument("shards", help="shard folder, manifest, brace pattern, .txt list (:: joins)")
    p.add_argument("--checkpoint", required=True, help="clipforge run dir or open_clip export")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument(
        "--keep-fraction", type=_fraction, help="keep this fraction of the set, best first"
    )
    g.add_argument("--min-score", type=float, help="keep samples whose cosine score is >= this")
    p.add_argument(
        "--dedupe-threshold",
        type=_cosine,
        default=None,
        help="drop an image whose cosine to an earlier kept image is above this",
    )
    p.add_argument("--output", default=None, help="folder (any fsspec URL) for the kept shards")
    p.add_argument(
        "--reports",
        default=None,
        help="folder for the score reports (default: --output, else beside the shards)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace what --output holds")
    p.add_argument(
        "--processes",
        type=positive_int,
        default=None,
        help="scoring processes (default: one per GPU, else one per CPU core)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="image decoding processes per scorer (default: 0 on CPU, up to 8 per GPU)",
    )
    p.add_argument("--batch-size", type=positive_int, default=256)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    return p  # fmt: skip


def check(args: argparse.Namespace):
    """Every problem found before any work, as one UsageError; returns the resolved ShardSet."""
    from clipforge.data.shards import SourceError, resolve

    problems = []
    try:
        checkpoint_kind(args.checkpoint)
    except UsageError as e:
        problems.append(str(e))
    sset = None
    try:
        sset = resolve(args.shards)
        if not sset.urls:
            problems.append(f"{args.shards}: no shards")
    except (SourceError, OSError) as e:
        problems.append(str(e))
    if args.output:
        out = Dest(args.output)
        if out.fs.exists(out.root) and out.fs.ls(out.root) and not args.overwrite:
            problems.append(f"--output {args.output} is not empty (--overwrite replaces it)")
        if sset and any(u.startswith("pipe:") for u in sset.urls):
            problems.append("--output copies shards through fsspec: pipe: sources cannot be copied")
        elif sset and any(_under(u, args.output) for u in sset.urls):
            problems.append(f"--output {args.output} holds the input shards")
    if sset and not (args.output or args.reports):
        odd = [u for u in sset.urls if u.startswith(("http://", "https://", "pipe:"))]
        if odd:
            problems.append(f"{odd[0]}: cannot write reports beside it; give --output or --reports")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            problems.append("--device cuda: no CUDA device here")
    if args.workers is not None and args.workers < 0:
        problems.append(f"--workers must be >= 0, got {args.workers}")
    if problems:
        raise UsageError("; ".join(problems))
    return sset


def _under(url: str, folder: str) -> bool:
    a = fsspec.core.url_to_fs(url)[1]
    b = fsspec.core.url_to_fs(folder)[1].rstrip("/")
    return a.startswith(b + "/")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        sset = check(args)
        results = score_all(args, sset.urls, sset.counts)
    except (UsageError, ValueError, OSError, FileNotFoundError) as e:
        # Scoring errors too (a shard that breaks, a model that does not load): nothing has
        # been written yet.
        msg = " ".join(str(e).split())
        print(f"error: {msg}", file=sys.stderr)
        return EXIT_USAGE
    devices, _ = plan_devices(1, args.device)
    d = decide(results, args, devices[0])
    summ = summary(results, d, args, sset.urls)
    if args.output:
        dest = Dest(args.output)
        if args.overwrite and dest.fs.exists(dest.root):
            dest.fs.rm(dest.root, recursive=True)
    where = write_reports(results, d, args, sset.urls, summ)
    if args.output:
        write_output(results, d, args, sset, sset.urls, summ)
    s = summ["status"]
    thr = "none" if summ["threshold"] is None else f"{summ['threshold']:.4f}"
    print(
        f"kept {s['ok']} of {summ['samples']} samples (score threshold {thr}; {s['filtered']} "
        f"filtered, {s['duplicate']} duplicate, {s['failed']} failed)"
        + (f" -> {args.output}" if args.output else "")
        + f"; scores in {where}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
