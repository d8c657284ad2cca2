"""The eval gives the same numbers with 1 and N processes (gloo, CPU): counts are summed and
embeddings gathered back into one global order, with padding batches dropped; each rank reads
its own share of the set (tests/test_eval_loader.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from dist_utils import run_distributed
from eval_data import CLASSNAMES, write_eval_set

from clipforge.config import AugmentConfig, EvalConfig
from clipforge.data.transforms import eval_transform
from clipforge.eval import suite


def random_encoders() -> suite.Encoders:
    """A fixed random 'model' (same weights in every process): numbers that are neither 0 nor
    1, with ties between identical captions, so that order and padding mistakes show."""
    g = torch.Generator().manual_seed(0)
    proj = torch.randn(3 * 8 * 8, 16, generator=g)
    words = torch.randn(64, 16, generator=g)

    def tokenize(texts: list[str]) -> torch.Tensor:
        return torch.tensor(
            [
                [sum(map(ord, w)) % 64 for w in t.split()[:6]] + [0] * (6 - len(t.split()[:6]))
                for t in texts
            ]
        )

    return suite.Encoders(
        lambda x: torch.nn.functional.avg_pool2d(x, 4).flatten(1) @ proj,
        lambda t: words[t].sum(dim=1),
        tokenize,
        eval_transform(32, AugmentConfig()),
    )


def evaluate_on(rank: int, world: int, folder: str, batch_size: int) -> list[dict]:
    # workers=0: the ranks are daemon processes (dist_utils), which may not start workers.
    cfg = EvalConfig(
        zeroshot=folder, retrieval=folder, batch_size=batch_size, recall_at=[1, 3, 5], workers=0
    )
    results = suite.run_sets(random_encoders(), cfg, rank, world, draw=False)
    return [{**r.line(), **r.details} for r in results]


def evaluate_each(rank: int, world: int, folders: list[str], batch_size: int) -> list[list[dict]]:
    return [evaluate_on(rank, world, f, batch_size) for f in folders]


def with_manifest(folder: Path) -> Path:
    """The same set with its shard sizes known (a manifest), which splits it by sample range."""
    shards = [{"name": p.name, "samples": 5} for p in sorted(folder.glob("*.tar"))]
    (folder / "manifest.json").write_text(json.dumps({"shards": shards}))
    return folder


@pytest.mark.multiproc
def test_one_and_two_processes_agree(tmp_path):
    folder = str(write_eval_set(tmp_path / "set", per_class=5))  # 15 samples
    # No manifest, so shard sizes are unknown: each rank reads its own shards (5 samples each),
    # rank 0 one, rank 1 two; rank 0 then runs a padding copy of its batch (every rank runs the
    # same forwards), which must not count.
    one = evaluate_on(0, 1, folder, 6)
    assert one[0]["samples"] == 15 and one[1]["images"] == 15 and one[1]["captions"] == 37
    assert 0 < one[1]["text_to_image_R@1"] < 1  # not a degenerate case
    assert run_distributed(evaluate_on, 2, folder, 6) == [one, one]
    assert one[0]["classnames"] == CLASSNAMES


@pytest.mark.multiproc
@pytest.mark.parametrize("world", [3, 4])
def test_more_processes_agree_with_sizes_known_or_not(tmp_path, world):
    """15 samples in 3 shards of 5, batches of 6. Sizes known: global batches of 6, 6, 3 split
    by sample range; sizes unknown: batches of 5 inside each rank's shards. With 4 ranks one
    rank has nothing to read and only pads."""
    folders = [
        str(write_eval_set(tmp_path / "unknown", per_class=5)),
        str(with_manifest(write_eval_set(tmp_path / "known", per_class=5))),
    ]
    one = evaluate_each(0, 1, folders, 6)
    assert all(r[0]["samples"] == 15 and r[1]["images"] == 15 for r in one)
    assert run_distributed(evaluate_each, world, folders, 6) == [one] * world
