"""Zero-shot benchmarks shipped as data: class names, prompt templates and, for ImageNet, the
synset ids, in CLIP_benchmark's layout (this folder's README.md says where each file came from).

An eval.zeroshot entry `NAME[@TEMPLATES]:PATH` evaluates PATH as benchmark NAME: its classes and
templates are the shipped ones, whatever PATH holds. PATH is an image folder with one sub-folder
per class (ImageNet's `val/n01440764/*.JPEG`; CIFAR's `test/airplane/*.jpg`), our shards, or a
CLIP_benchmark webdataset export.

    python -m clipforge.eval checkpoint=RUN eval.zeroshot=imagenet1k:/data/imagenet/val
    python -m clipforge.eval checkpoint=RUN eval.zeroshot=imagenet1k@openai7:/data/imagenet/val
    python -m clipforge.eval checkpoint=RUN "eval.zeroshot=[cifar10:/data/cifar10/test,cifar100:C]"

Imported by config.py (validation), so it reads text files and nothing heavier.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from importlib import resources

CLASSNAMES = "classnames.txt"
TEMPLATES = "zeroshot_classification_templates.txt"
# Present where classes are WordNet synsets: the sub-folder names of the ImageNet layout.
SYNSETS = "synsets.txt"

# NAME, an optional @TEMPLATES, then ':' that does not start a URL (s3://) or an fsspec chain
# (simplecache::s3://...).
_ENTRY = re.compile(r"^(?P<name>[A-Za-z][\w.-]*?)(?:@(?P<templates>\w+))?:(?!//|:)(?P<path>.+)$")
# Shard sources of the form `pipe:CMD` (clipforge.data.shards) are not benchmark entries.
_NOT_NAMES = {"pipe"}


@dataclass(frozen=True)
class Entry:
    """One eval.zeroshot entry: `benchmark` is None for a plain shard source."""

    benchmark: str | None
    templates: str | None
    path: str


def parse_entry(source: str) -> Entry:
    m = _ENTRY.match(source)
    if m is None or m["name"] in _NOT_NAMES:
        return Entry(None, None, source)
    return Entry(m["name"], m["templates"], m["path"])


def _folder(name: str):  # a Traversable
    return resources.files(__name__) / name


def names() -> list[str]:
    """The shipped benchmarks."""
    return sorted(p.name for p in resources.files(__name__).iterdir() if (p / CLASSNAMES).is_file())


def template_sets(name: str) -> list[str]:
    """The @TEMPLATES a benchmark offers besides its default file (imagenet1k: openai7)."""
    stem = TEMPLATES.removesuffix(".txt") + "_"
    return sorted(
        p.name.removeprefix(stem).removesuffix(".txt")
        for p in _folder(name).iterdir()
        if p.name.startswith(stem) and p.name.endswith(".txt")
    )


def entry_problems(source: str) -> list[str]:
    """What is wrong with an entry's NAME or @TEMPLATES (config validation, before any reading)."""
    entry = parse_entry(source)
    if entry.benchmark is None:
        return []
    known = names()
    if entry.benchmark not in known:
        return [
            f"eval.zeroshot={source}: unknown benchmark {entry.benchmark!r} "
            f"(known: {', '.join(known)})"
        ]
    sets = template_sets(entry.benchmark)
    if entry.templates is not None and entry.templates not in sets:
        offered = ", ".join(f"@{s}" for s in sets) or "none"
        return [
            f"eval.zeroshot={source}: {entry.benchmark} has no template set "
            f"{entry.templates!r} (offered: {offered})"
        ]
    return []


def _lines(name: str, file: str) -> tuple[str, ...]:
    text = (_folder(name) / file).read_text(encoding="utf-8")
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def _folder_key(text: str) -> str:
    # A class folder `aquarium_fish/` or a converter's classnames line `aquarium fish`.
    return text.replace("_", " ").strip().casefold()


@dataclass(frozen=True)
class Benchmark:
    name: str
    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    # WordNet ids in class order, or () where classes are matched by name (CIFAR).
    synsets: tuple[str, ...] = ()

    @property
    def folder_kind(self) -> str:
        """What a class sub-folder must be named, for error lines."""
        if self.synsets:
            return f"synset (e.g. {self.synsets[0]})"
        return f"class name (e.g. {self.classnames[0]})"

    def index_of(self, folder: str) -> int | None:
        """The class a sub-folder (or a set's classnames.txt line) names, or None."""
        return _index(self)[0 if self.synsets else 1].get(
            folder if self.synsets else _folder_key(folder)
        )


@cache
def _index(bench: Benchmark) -> tuple[dict[str, int], dict[str, int]]:
    by_synset = {s: i for i, s in enumerate(bench.synsets)}
    by_name: dict[str, int] = {}
    for i, c in enumerate(bench.classnames):
        by_name.setdefault(_folder_key(c), i)
    return by_synset, by_name


@cache
def load(name: str, templates: str | None = None) -> Benchmark:
    """The shipped benchmark `name`; `templates` picks a template set other than the default."""
    problems = entry_problems(f"{name}{'@' + templates if templates else ''}:x")
    if problems:
        raise ValueError(problems[0].split(": ", 1)[1])
    file = TEMPLATES if templates is None else f"{TEMPLATES.removesuffix('.txt')}_{templates}.txt"
    synsets = _lines(name, SYNSETS) if (_folder(name) / SYNSETS).is_file() else ()
    bench = Benchmark(name, _lines(name, CLASSNAMES), _lines(name, file), synsets)
    if synsets and len(synsets) != len(bench.classnames):
        raise ValueError(f"{name}: {len(synsets)} synsets for {len(bench.classnames)} classes")
    return bench
