"""Train a sentencepiece model on captions, for clipforge.data.tokenizer.Tokenizer.

    python -m data_tools.tokenizer --input shards/ --vocab-size 8000     # -> shards/tokenizer.model
    python -m data_tools.tokenizer --input captions.txt --output tok.model
    clipforge-tokenizer --help                                          # installed console script

Captions come from a shard folder's tars (those listed in its manifest.json, else every
``*.tar``): every caption of KEY.json["captions"] (COCO/Flickr conversions), else KEY.txt; or
from a text file with one caption per line. Above --max-sentences captions, a uniform sample
(fixed seed) is used, and a large folder is read only in part (a random subset of shards). Ids are fixed for the text
tower: pad=0, unk=1, bos=2 (start of text), eos=3 (end of text). Text is NFKC-normalized and
lowercased. When the input is a shard folder with a manifest, its "tokenizer" field is set.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import sys
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import fsspec
import sentencepiece as spm

from clipforge import cli
from data_tools import shards

SPECIAL_IDS = {"pad_id": 0, "unk_id": 1, "bos_id": 2, "eos_id": 3}
DEFAULT_MODEL_NAME = "tokenizer.model"
EXIT_USAGE = 2


class TokenizerInputError(ValueError):
    """No usable captions; reported as one ``error:`` line, exit 2."""


def shard_paths(directory: Path, max_sentences: int | None = None, seed: int = 0) -> list[Path]:
    """Tars named by the manifest when there is one (a finished conversion), else all tars.

    When the manifest says the folder holds far more samples than ``max_sentences``, only a
    seeded random subset of shards holding at least that many is read: sampling a billion
    captions should not mean reading every shard.
    """
    if not (directory / shards.MANIFEST_NAME).exists():
        return sorted(directory.glob("*.tar"))
    entries = shards.read_manifest(directory)["shards"]
    if max_sentences is not None and sum(s["samples"] for s in entries) > 2 * max_sentences:
        picked, total = [], 0
        for entry in random.Random(seed).sample(entries, len(entries)):
            picked.append(entry)
            total += entry["samples"]
            if total >= max_sentences:
                break
        entries = sorted(picked, key=lambda s: s["name"])
    return [directory / s["name"] for s in entries]


def _sample_captions(members: dict[str, bytes]) -> list[str]:
    # COCO-style samples keep every caption in KEY.json["captions"]; KEY.txt holds the first.
    if "json" in members:
        try:
            captions = json.loads(members["json"]).get("captions")
        except (ValueError, AttributeError):
            captions = None
        if isinstance(captions, list) and captions:
            return [str(c) for c in captions]
    if "txt" in members:
        return [members["txt"].decode("utf-8", "replace")]
    return []


def iter_shard_captions(
    directory: Path, max_sentences: int | None = None, seed: int = 0
) -> Iterator[str]:
    for path in shard_paths(directory, max_sentences, seed):
        with tarfile.open(path) as tar:
            key, members = None, {}
            for member in tar:
                if not member.isfile():
                    continue
                stem, _, ext = member.name.partition(".")
                if ext not in ("txt", "json"):
                    continue
                if stem != key:
                    yield from _sample_captions(members)
                    key, members = stem, {}
                data = tar.extractfile(member)
                if data is not None:
                    members[ext] = data.read()
            yield from _sample_captions(members)


def iter_text_captions(path: str) -> Iterator[str]:
    with fsspec.open(path, "rt", compression="infer", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield line.rstrip("\n")


def sample_captions(captions: Iterable[str], max_sentences: int, seed: int = 0) -> list[str]:
    """Uniform sample of at most ``max_sentences`` in one pass (reservoir sampling)."""
    rng = random.Random(seed)
    reservoir: list[str] = []
    for i, caption in enumerate(c for c in captions if c.strip()):
        if i < max_sentences:
            reservoir.append(caption)
        elif (j := rng.randrange(i + 1)) < max_sentences:
            reservoir[j] = caption
    return reservoir


def train_model(captions: list[str], vocab_size: int = 8000, model_type: str = "bpe") -> bytes:
    """Serialized sentencepiece model proto."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(captions),
        model_writer=model,
        model_type=model_type,
        vocab_size=vocab_size,
        # Small caption sets have fewer pieces than asked for; stop there instead of failing.
        hard_vocab_limit=False,
        normalization_rule_name="nmt_nfkc_cf",
        num_threads=min(16, os.cpu_count() or 1),
        minloglevel=2,
        **SPECIAL_IDS,
    )
    return model.getvalue()


def build_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(
        prog="clipforge-tokenizer",
        description="Train a sentencepiece tokenizer on captions from shards or a text file.",
    )
    p.add_argument("--input", required=True, help="shard folder, or a text file (one per line)")
    p.add_argument("--output", default=None, help="model path or prefix (.model is appended)")
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--max-sentences", type=int, default=1_000_000)
    p.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    p.add_argument("--seed", type=int, default=0, help="for sampling captions")
    return p


def resolve_output(input_path: str, output: str | None) -> str:
    if output is None:
        if not Path(input_path).is_dir():
            raise TokenizerInputError("--output is required when --input is a text file")
        return str(Path(input_path) / DEFAULT_MODEL_NAME)
    return output if output.endswith(".model") else output + ".model"


def read_captions(input_path: str, max_sentences: int, seed: int) -> list[str]:
    source = Path(input_path)
    if source.is_dir():
        captions = iter_shard_captions(source, max_sentences, seed)
    elif source.exists() or "://" in input_path:
        captions = iter_text_captions(input_path)
    else:
        raise TokenizerInputError(f"--input {input_path} does not exist")
    sample = sample_captions(captions, max_sentences, seed)
    if not sample:
        raise TokenizerInputError(f"no captions found in {input_path}")
    return sample


def record_in_manifest(directory: Path, model_path: str) -> None:
    """Point the shard folder's manifest at the model (relative when it lies inside)."""
    if not (directory / shards.MANIFEST_NAME).exists():
        return
    manifest = shards.read_manifest(directory)
    model = Path(model_path).resolve()
    try:
        manifest["tokenizer"] = model.relative_to(directory.resolve()).as_posix()
    except ValueError:
        manifest["tokenizer"] = str(model)
    shards.write_manifest(directory, manifest)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        output = resolve_output(args.input, args.output)
        captions = read_captions(args.input, args.max_sentences, args.seed)
    except (TokenizerInputError, OSError, ValueError, tarfile.TarError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    proto = train_model(captions, args.vocab_size, args.model_type)
    with fsspec.open(output, "wb") as f:
        f.write(proto)
    if Path(args.input).is_dir() and "://" not in output:
        record_in_manifest(Path(args.input), output)
    vocab = spm.SentencePieceProcessor(model_proto=proto).vocab_size()
    print(f"trained on {len(captions)} captions: vocab {vocab} -> {output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
