"""The configured eval sets (eval.zeroshot, eval.retrieval) run with any pair of encoders: the
DeepSpeed engine's during training, a plain exported model standalone. Also the reporting:
one console line per set, scalars to the logger, pictures to the logger, JSON files.

    python -m clipforge.train ... eval.zeroshot=SHARDS eval.retrieval=SHARDS eval.every=500
    python -m clipforge.eval checkpoint=RUN_DIR eval.zeroshot=SHARDS eval.retrieval=SHARDS
    python -m clipforge.eval checkpoint=RUN_DIR eval.zeroshot=imagenet1k:/data/imagenet/val
"""

from __future__ import annotations

import io
import json
import posixpath
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from clipforge.config import EvalConfig
from clipforge.data.eval_loader import EvalLoader
from clipforge.data.image_folder import ImageFolder, is_image_folder, open_folder
from clipforge.data.shards import ShardSet, SourceError, resolve
from clipforge.data.tario import IMAGE_EXTS, iter_samples
from clipforge.eval import benchmarks, figures, retrieval, zeroshot
from clipforge.logging import print0

Encoder = Callable[[torch.Tensor], torch.Tensor]
# Retrieval strip: this many text queries, each with its top images.
_STRIP_QUERIES, _STRIP_TOP = 4, 5


@dataclass
class Encoders:
    """What an eval needs from a model, whoever holds its weights."""

    encode_image: Encoder
    encode_text: Encoder
    tokenizer: Callable[[list[str]], torch.Tensor]
    transform: Callable[[Image.Image], torch.Tensor]


@dataclass
class SetResult:
    set: str
    kind: str  # "zeroshot" | "retrieval"
    metrics: dict[str, float | int]  # scalars: console, logger, JSON line
    details: dict[str, Any] = field(default_factory=dict)  # confusion, class names, ...
    figures: dict[str, Image.Image] = field(default_factory=dict)  # main rank only

    def line(self) -> dict[str, Any]:
        return {"set": self.set, "kind": self.kind, **self.metrics}


def set_name(source: str, parents: int = 0) -> str:
    """A short name for a set: its folder (`.../cifar10_test/` or its manifest) -> cifar10_test;
    `parents` > 0 prepends that many parent folders (`cifar10/test` -> cifar10_test). A
    benchmark entry is named after the benchmark: `imagenet1k@openai7:/data/val` ->
    imagenet1k_openai7 (its folders appended where two entries would clash)."""
    entry = benchmarks.parse_entry(source)
    if entry.benchmark is not None:
        name = "_".join(filter(None, (entry.benchmark, entry.templates)))
        return name if parents == 0 else f"{name}_{set_name(entry.path, parents - 1)}"
    first = source.split("::")[0].rstrip("/")
    if first.endswith(".json") or "{" in first or first.endswith(".tar"):
        first = posixpath.dirname(first)
    parts = [p for p in first.split("/") if p and not p.endswith(":")]
    return "_".join(parts[len(parts) - 1 - parents :]) or "set"


def sources(value: str | Sequence[str] | None) -> list[str]:
    """eval.zeroshot / eval.retrieval as a list: None -> [], one source -> [it]."""
    if not value:
        return []
    return [value] if isinstance(value, str) else [str(v) for v in value]


def set_names(srcs: Sequence[str]) -> list[str]:
    """Distinct names for a kind's sets: folder names, with parent folders prepended only
    where two sets share one (`cifar10/test`, `stl10/test` -> cifar10_test, stl10_test)."""
    names = [set_name(s) for s in srcs]
    for parents in range(1, 8):
        if len(set(names)) == len(names):
            return names
        names = [set_name(s, parents) if names.count(n) > 1 else n for s, n in zip(srcs, names)]
    # Still equal (the same source given twice): number them.
    return [f"{n}_{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]


def has_sets(cfg: EvalConfig) -> bool:
    return bool(sources(cfg.zeroshot) or sources(cfg.retrieval))


def run_sets(
    enc: Encoders,
    cfg: EvalConfig,
    rank: int = 0,
    world: int = 1,
    draw: bool = False,
    strict: bool = True,
) -> list[SetResult]:
    """Every configured set, on every rank (collectives inside); `draw` on the main rank only.

    strict=False (training): a set that cannot be used (no classnames.txt, no shards) is
    skipped with a warning instead of ending hours of training. Those errors come from reading
    the set's files, the same on every rank and before any collective, so no rank is left
    waiting in one.
    """
    jobs = []
    for fn, value in ((run_zeroshot, cfg.zeroshot), (run_retrieval, cfg.retrieval)):
        srcs = sources(value)
        jobs += [(fn, src, name) for src, name in zip(srcs, set_names(srcs))]
    out = []
    for fn, source, name in jobs:
        try:
            out.append(fn(source, enc, cfg, rank, world, draw and cfg.figures, name=name))
        except SourceError as e:
            if strict:
                raise
            print0(f"warning: eval set skipped: {e}")
    return out


def run_zeroshot(
    source: str,
    enc: Encoders,
    cfg: EvalConfig,
    rank: int,
    world: int,
    draw: bool,
    name: str | None = None,
) -> SetResult:
    zs = zeroshot_set(source, cfg)
    classifier = zeroshot.build_classifier(
        enc.encode_text, enc.tokenizer, zs.classnames, zs.templates, cfg.batch_size
    )
    batches = EvalLoader(zs.data, enc.transform, cfg.batch_size, rank, world, cfg.workers)
    res = zeroshot.evaluate(enc.encode_image, relabel(batches, zs.label_map), classifier)
    name = name or set_name(source)
    details = {
        "classnames": zs.classnames,
        "templates": zs.templates,
        "per_class_recall": res.pop("per_class_recall"),
        "confusion": res.pop("confusion"),
    }
    pics = {}
    if draw:
        title = f"{name}: zero-shot top1 {res['top1']:.3f} (rows true, columns predicted)"
        pics["confusion"] = figures.confusion_image(details["confusion"], zs.classnames, title)
    return SetResult(name, "zeroshot", res, details, pics)


@dataclass
class ZeroShotSet:
    """What a zero-shot entry reads and scores against."""

    data: ShardSet | ImageFolder
    classnames: list[str]
    templates: list[str]
    # The set's label i is class label_map[i] of `classnames`; None: labels are class indices.
    label_map: list[int] | None = None


def zeroshot_set(source: str, cfg: EvalConfig) -> ZeroShotSet:
    """An eval.zeroshot entry opened: plain shards bring their own classnames.txt (and maybe
    templates); NAME[@TEMPLATES]:PATH brings the shipped benchmark's, PATH being an image folder
    (read in place) or shards whose classnames.txt, if any, says which class each label is."""
    entry = benchmarks.parse_entry(source)
    if entry.benchmark is None:
        if is_image_folder(source):
            raise SourceError(
                f"eval.zeroshot={source}: a folder of class sub-folders needs a benchmark for "
                f"its class names: eval.zeroshot=NAME:{source} ({', '.join(benchmarks.names())})"
            )
        sset = resolve(source)
        if not sset.classnames:
            raise SourceError(f"eval.zeroshot={source}: no classnames.txt beside the shards")
        # The set's own templates (CLIP_benchmark's file) are the ones its numbers are quoted with.
        return ZeroShotSet(sset, sset.classnames, sset.templates or list(cfg.templates))
    try:
        bench = benchmarks.load(entry.benchmark, entry.templates)
    except ValueError as e:
        raise SourceError(f"eval.zeroshot={source}: {e}") from None
    names, templates = list(bench.classnames), list(bench.templates)
    kind = f"{bench.name} {bench.folder_kind}"
    if is_image_folder(entry.path):
        return ZeroShotSet(open_folder(entry.path, bench.index_of, kind), names, templates)
    sset = resolve(entry.path)
    if not sset.classnames or sset.classnames == names:
        return ZeroShotSet(sset, names, templates)
    # Shards converted from a class folder (classnames.txt: n01440764, ...): map each label.
    label_map = [bench.index_of(c) for c in sset.classnames]
    unknown = [c for c, i in zip(sset.classnames, label_map) if i is None]
    if unknown:
        raise SourceError(
            f"eval.zeroshot={source}: {unknown[0]!r} (classnames.txt line "
            f"{sset.classnames.index(unknown[0]) + 1}) names no {kind}"
        )
    return ZeroShotSet(sset, names, templates, label_map)  # type: ignore[arg-type]


def relabel(
    batches: Iterable[dict[str, Any]], label_map: list[int] | None
) -> Iterator[dict[str, Any]]:
    """Batches with their `cls` labels mapped to class indices (unchanged without a map)."""
    table = torch.tensor(label_map) if label_map is not None else None
    for batch in batches:
        if table is not None and "cls" in batch and not batch.get("pad"):
            cls = batch["cls"]
            if len(cls) and (int(cls.min()) < 0 or int(cls.max()) >= len(table)):
                raise ValueError(
                    f"zero-shot set has a label outside its classnames.txt's {len(table)} lines"
                )
            batch = {**batch, "cls": table[cls]}
        yield batch


def run_retrieval(
    source: str,
    enc: Encoders,
    cfg: EvalConfig,
    rank: int,
    world: int,
    draw: bool,
    name: str | None = None,
) -> SetResult:
    sset = resolve(source)
    batches = retrieval.CaptionedLoader(
        sset, enc.transform, cfg.batch_size, rank, world, cfg.workers
    )
    metrics, images, text_feats, owner = retrieval.evaluate(
        enc.encode_image,
        enc.encode_text,
        enc.tokenizer,
        batches,
        cfg.batch_size,
        cfg.recall_at,
        rank,
        world,
    )
    pics = {}
    if draw:
        pics["retrieval"] = _strip(sset, images, text_feats, owner)
    return SetResult(name or set_name(source), "retrieval", metrics, {}, pics)


def _strip(
    sset: ShardSet,
    images: retrieval.ImageEmbeddings,
    text_feats: torch.Tensor,
    owner: torch.Tensor,
) -> Image.Image:
    """Queries: the first caption of a few images spread over the set (same ones every eval,
    so pictures of successive steps compare)."""
    n = len(images.keys)
    picks = sorted({i * n // _STRIP_QUERIES for i in range(_STRIP_QUERIES)})
    first_caption = {int(img): t for t, img in reversed(list(enumerate(owner.tolist())))}
    rows = [first_caption[i] for i in picks if i in first_caption]
    top, _ = retrieval.top_images(images.features, text_feats[rows], _STRIP_TOP)
    wanted = {images.keys[j] for j in top.flatten().tolist()}
    thumbs = load_images(sset, wanted)
    blank = Image.new("RGB", (8, 8), (128, 128, 128))
    all_texts = [c for caps in images.captions for c in caps]
    return figures.retrieval_strip(
        [all_texts[t] for t in rows],
        [[thumbs.get(images.keys[j], blank) for j in row.tolist()] for row in top],
        [[j == int(owner[t]) for j in row.tolist()] for t, row in zip(rows, top)],
    )


def load_images(sset: ShardSet, keys: set[str]) -> dict[str, Image.Image]:
    """Decoded images of `keys`, reading shards in order and stopping once all are found."""
    found: dict[str, Image.Image] = {}
    for url in sset.urls:
        for sample in iter_samples(url):
            if sample["__key__"] in keys:
                ext = next((e for e in IMAGE_EXTS if e in sample), None)
                if ext is not None:
                    found[sample["__key__"]] = Image.open(io.BytesIO(sample[ext])).convert("RGB")
            if len(found) == len(keys):
                return found
    return found


# -- reporting -------------------------------------------------------------------------------
def summary(res: SetResult, step: int | None = None) -> str:
    """One console line. `zero-shot step N: top1 X` is what launch/demo.sh greps for."""
    at = f" step {step}" if step is not None else ""
    m = res.metrics
    if res.kind == "zeroshot":
        k = next(k for k in m if k.startswith("top") and k != "top1")
        return (
            f"zero-shot{at}: top1 {m['top1']:.4f} {k} {m[k]:.4f} "
            f"mean-per-class-recall {m['mean_per_class_recall']:.4f} ({m['samples']} images) "
            f"[{res.set}]"
        )
    recalls = " ".join(f"{k} {v:.4f}" for k, v in m.items() if "_R@" in k)
    return f"retrieval{at}: {recalls} ({m['images']} images, {m['captions']} captions) [{res.set}]"


def log_results(results: Sequence[SetResult], logger: Any, step: int) -> None:
    """Console line, scalars and pictures per set; `logger` is clipforge.logging's."""
    for res in results:
        print0(summary(res, step))
        prefix = f"{res.kind}/{res.set}"
        logger.log(step, {f"{prefix}/{k}": v for k, v in res.metrics.items()})
        if res.figures:
            logger.log_images(step, {f"{prefix}/{k}": v for k, v in res.figures.items()})


def write_results(results: Sequence[SetResult], out_dir: Path) -> list[Path]:
    """OUT/{kind}_{set}.json (metrics and details) and OUT/{kind}_{set}_{figure}.png."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for res in results:
        stem = f"{res.kind}_{res.set}"
        path = out_dir / f"{stem}.json"
        path.write_text(json.dumps({**res.line(), **res.details}, indent=1) + "\n")
        written.append(path)
        for name, img in res.figures.items():
            img.save(out_dir / f"{stem}_{name}.png")
            written.append(out_dir / f"{stem}_{name}.png")
    return written
