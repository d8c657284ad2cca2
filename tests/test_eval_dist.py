"""The eval gives the same numbers with 1 and 2 processes (gloo, CPU): counts are summed and
embeddings gathered back into one global order, with padding batches dropped."""

from __future__ import annotations

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
    cfg = EvalConfig(zeroshot=folder, retrieval=folder, batch_size=batch_size, recall_at=[1, 3, 5])
    results = suite.run_sets(random_encoders(), cfg, rank, world, draw=False)
    return [{**r.line(), **r.details} for r in results]


@pytest.mark.multiproc
def test_one_and_two_processes_agree(tmp_path):
    folder = str(write_eval_set(tmp_path / "set", per_class=5))  # 15 samples
    # batch 6: batches of 6, 6, 3; rank 0 takes the 1st and 3rd, rank 1 the 2nd and then a
    # padding copy of it (every rank runs the same forwards), which must not count.
    one = evaluate_on(0, 1, folder, 6)
    assert one[0]["samples"] == 15 and one[1]["images"] == 15 and one[1]["captions"] == 37
    assert 0 < one[1]["text_to_image_R@1"] < 1  # not a degenerate case
    assert run_distributed(evaluate_on, 2, folder, 6) == [one, one]
    assert one[0]["classnames"] == CLASSNAMES
