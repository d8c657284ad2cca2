"""Training a sentencepiece model (data_tools.tokenizer) and the loader's Tokenizer layout.

PYTHONPATH=src:. .venv/bin/python -m pytest tests/test_tokenizer.py -q
"""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from clipforge.data.tokenizer import Tokenizer
from data_tools import shards
from data_tools import tokenizer as train_tool

SUBJECTS = ["cat", "dog", "red car", "blue bird", "old house", "green tree", "small boat"]
PLACES = ["on a sofa", "in the park", "at night", "near the sea", "under a bridge"]


def captions(n: int = 210) -> list[str]:
    return [f"A photo of a {SUBJECTS[i % 7]} {PLACES[i % 5]}, number {i}" for i in range(n)]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tok")
    text = folder / "captions.txt"
    text.write_text("\n".join(captions()) + "\n", encoding="utf-8")
    assert train_tool.main(["--input", str(text), "--output", str(folder / "tok")]) == 0
    return folder / "tok.model"


def content(row: torch.Tensor) -> list[int]:
    return row[: int((row != 0).sum())].tolist()


def test_layout_sot_pieces_eot_then_padding(model_path: Path) -> None:
    tok = Tokenizer(str(model_path))
    assert (tok.pad_id, tok.sot_id, tok.eot_id) == (0, 2, 3)
    assert 30 < tok.vocab_size <= 8000
    tokens = tok(["A photo of a cat on a sofa", "dog"])
    assert tokens.shape == (2, 77) and tokens.dtype == torch.long
    for row in tokens:
        ids = content(row)
        assert ids[0] == tok.sot_id and ids[-1] == tok.eot_id
        assert 0 not in ids and tok.eot_id not in ids[:-1]
        assert (row[len(ids) :] == 0).all()
    assert tok("dog").shape == (1, 77)
    assert tok.decode(tokens[0]) == "a photo of a cat on a sofa"  # lowercased by the model


def test_truncation_keeps_eot_last(model_path: Path) -> None:
    tok = Tokenizer(str(model_path), context_length=16)
    row = tok(" ".join(captions(40)))[0]
    assert row.shape == (16,)
    assert row[0] == tok.sot_id and row[-1] == tok.eot_id and (row != 0).all()


def test_pickles_for_loader_workers_and_reads_fsspec_urls(model_path: Path) -> None:
    tok = Tokenizer(f"file://{model_path}", context_length=32)
    clone = pickle.loads(pickle.dumps(tok))
    texts = captions(5)
    assert torch.equal(clone(texts), tok(texts))
    assert clone.vocab_size == tok.vocab_size and clone.context_length == 32


def test_trains_from_shard_folder_and_records_it_in_manifest(tmp_path: Path) -> None:
    with shards.ShardWriter(tmp_path / "00000.tar") as writer:
        for i, caption in enumerate(captions()):
            writer.add(f"{i:09d}", {"txt": caption.encode("utf-8")})
        info = writer.close()
    shards.write_manifest(tmp_path, shards.new_manifest([info], 0, {}, "test"))
    assert train_tool.main(["--input", str(tmp_path), "--vocab-size", "500"]) == 0
    manifest = shards.read_manifest(tmp_path)
    assert manifest["tokenizer"] == "tokenizer.model"
    tok = Tokenizer(str(tmp_path / manifest["tokenizer"]))
    assert tok.vocab_size <= 500 and content(tok("a red car")[0])[-1] == tok.eot_id


def test_sampling_is_bounded_and_seeded() -> None:
    sample = train_tool.sample_captions(captions(), 50, seed=1)
    assert len(sample) == 50 and len(set(sample)) == 50
    assert sample == train_tool.sample_captions(captions(), 50, seed=1)


def test_text_input_needs_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = tmp_path / "c.txt"
    text.write_text("a cat\n", encoding="utf-8")
    assert train_tool.main(["--input", str(text)]) == 2
    assert capsys.readouterr().err.startswith("error: --output is required")


def test_coco_style_json_captions_are_all_used(tmp_path: Path) -> None:
    import json

    with shards.ShardWriter(tmp_path / "00000.tar") as writer:
        for i in range(3):
            caps = [f"caption {i} number {j}" for j in range(5)]
            meta = json.dumps({"key": f"{i:09d}", "captions": caps}).encode()
            writer.add(f"{i:09d}", {"jpg": b"x", "txt": caps[0].encode(), "json": meta})
        writer.add("000000003", {"jpg": b"x", "txt": b"only a txt caption"})
        writer.close()
    got = list(train_tool.iter_shard_captions(tmp_path))
    assert len(got) == 16 and got[5] == "caption 1 number 0" and got[-1] == "only a txt caption"


def test_large_folder_reads_a_seeded_subset_of_shards(tmp_path: Path) -> None:
    infos = []
    for s in range(10):
        with shards.ShardWriter(tmp_path / f"{s:05d}.tar") as writer:
            for i in range(20):
                writer.add(f"{s}{i:08d}", {"txt": f"shard {s} caption {i}".encode()})
            infos.append(writer.close())
    shards.write_manifest(tmp_path, shards.new_manifest(infos, 0, {}, "test"))
    picked = train_tool.shard_paths(tmp_path, max_sentences=30, seed=0)
    assert len(picked) == 2  # 2 x 20 >= 30 captions, out of 200
    assert picked == train_tool.shard_paths(tmp_path, max_sentences=30, seed=0)
    assert len(train_tool.shard_paths(tmp_path, max_sentences=150)) == 10  # not far more: all
    sample = train_tool.read_captions(str(tmp_path), 30, seed=0)
    assert len(sample) == 30 and {c.split()[1] for c in sample} <= {p.stem[-1] for p in picked}
