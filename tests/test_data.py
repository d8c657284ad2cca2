"""Convert -> load round trips on real tar shards, and third-party shards read as they are.
The loader's sharding, resume and error handling: tests/test_loader.py.

    .venv/bin/python -m pytest -q tests/test_data.py
"""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipforge.config import AugmentConfig
from clipforge.data.eval_loader import EvalLoader
from clipforge.data.shards import SourceError, resolve
from clipforge.data.tario import iter_samples
from clipforge.data.train_loader import TrainLoader
from clipforge.data.transforms import eval_transform, train_transform
from data_tools import convert

ROWS = 24


def _row_color(i: int) -> tuple[int, int, int]:
    # Distinct, JPEG-robust colours: the row index is readable back from the pixels.
    return (10 * i, 255 - 10 * i, 128)


def _decode_row(image: torch.Tensor, aug: AugmentConfig) -> int:
    mean = torch.tensor(aug.mean)[:, None, None]
    std = torch.tensor(aug.std)[:, None, None]
    rgb = (image * std + mean).clamp(0, 1).mean(dim=(1, 2)) * 255
    return int(round(float(rgb[0]) / 10))


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """A CSV of 24 solid-colour images whose captions say which row they came from."""
    root = tmp_path_factory.mktemp("dump")
    (root / "img").mkdir()
    with open(root / "dump.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "caption"])
        for i in range(ROWS):
            Image.new("RGB", (40, 30), _row_color(i)).save(root / "img" / f"{i}.png")
            w.writerow([f"img/{i}.png", f"row {i}"])
    out = root / "shards"
    rc = convert.main(
        [
            "--input",
            str(root / "dump.csv"),
            "--url-col",
            "path",
            "--output",
            str(out),
            "--image-size",
            "16",
            "--resize-mode",
            "center_crop",
            "--samples-per-shard",
            "5",
        ]
    )
    assert rc in (0, None)
    return out


def _identity_tokens(texts: list[str]) -> list[str]:
    return texts


def _loader(shards: Path, workers: int = 0, batch: int = 4, rank: int = 0) -> TrainLoader:
    return TrainLoader(
        resolve(str(shards)),
        eval_transform(16, AugmentConfig()),
        _identity_tokens,
        batch_size=batch,
        seed=3,
        rank=rank,
        workers=workers,
        shuffle_buffer=8,
    )


def test_manifest_gives_sizes(shards):
    sset = resolve(str(shards))
    assert sset.samples == ROWS
    assert sset.counts == [5, 5, 5, 5, 4]
    assert all(u.endswith(".tar") for u in sset.urls)


def test_every_caption_matches_its_image(shards):
    aug = AugmentConfig()
    seen = []
    for _, batch in zip(range(10), _loader(shards)):
        assert batch["image"].shape == (4, 3, 16, 16)
        for image, caption in zip(batch["image"], batch["text"]):
            assert caption == f"row {_decode_row(image, aug)}"
            seen.append(caption)
    # Resampled: 40 draws from 24 rows visit most of them.
    assert len(set(seen)) > 12


def test_eval_loader_reads_each_sample_once_split_by_rank(shards):
    tf = eval_transform(16, AugmentConfig())
    keys = []
    per_rank = []
    for rank in range(2):
        batches = list(EvalLoader(resolve(str(shards)), tf, batch_size=5, rank=rank, world=2))
        per_rank.append(len(batches))
        keys += [k for b in batches if not b["pad"] for k in b["key"]]
    assert per_rank[0] == per_rank[1]  # ZeRO-3 needs every rank in every forward
    assert sorted(keys) == sorted(f"{i:09d}" for i in range(ROWS))


def test_train_transform_is_random_but_seeded(shards):
    tf = train_transform(16, AugmentConfig(scale_min=0.3))
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8))
    torch.manual_seed(1)
    x1 = tf(img)
    torch.manual_seed(1)
    assert torch.equal(x1, tf(img))
    assert not torch.equal(x1, tf(img))


def test_missing_source_is_a_clear_error(tmp_path):
    with pytest.raises(SourceError, match="no such shard folder"):
        resolve(str(tmp_path / "missing"))


def test_image_only_shards_fail_clearly_for_training(shared_data):
    src = shared_data / "formats" / "clip_retrieval_image_only_tars"
    loader = TrainLoader(
        resolve(str(src)),
        eval_transform(16, AugmentConfig()),
        _identity_tokens,
        batch_size=2,
        seed=0,
        rank=0,
        workers=0,
        shuffle_buffer=1,
    )
    with pytest.raises(SourceError, match="no caption"):
        next(iter(loader))


def test_reads_img2dataset_output_as_is(shared_data):
    src = shared_data / "formats" / "img2dataset_webdataset_output"
    sset = resolve(str(src))
    assert sset.samples == 159
    batches = list(EvalLoader(sset, eval_transform(32, AugmentConfig()), batch_size=64))
    keys = [k for b in batches for k in b["key"]]
    assert len(keys) == 159 == len(set(keys))
    assert all(c for b in batches for c in b["caption"])


def test_img2dataset_output_trains_one_epoch_of_all_159(shared_data):
    """Exact-epoch mode on img2dataset's own output (sizes from its _stats.json, tar members
    out of key order): one epoch at batch 1 is every one of the 159 captions once."""
    src = shared_data / "formats" / "img2dataset_webdataset_output"
    sset = resolve(str(src))
    want = Counter(s["txt"].decode() for url in sset.urls for s in iter_samples(url))
    loader = TrainLoader(
        sset,
        eval_transform(16, AugmentConfig()),
        _identity_tokens,
        batch_size=1,
        seed=0,
        rank=0,
        workers=0,
        shuffle_buffer=32,
        mode="epoch",
    )
    got = Counter()
    for _, batch in zip(range(159), loader):
        got.update(batch["text"])
    assert sum(want.values()) == 159 and got == want
    assert loader.epoch == 1 and loader.errors == 0


def test_shards_stream_over_http(shards):
    """data.train may be a URL: manifest and shards fetched through fsspec's http filesystem."""
    import functools
    import http.server
    import threading

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):  # the 404s for optional sidecar files are expected
            pass

    handler = functools.partial(Quiet, directory=str(shards))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/manifest.json"
        sset = resolve(url)
        assert sset.samples == ROWS and all(u.startswith("http://") for u in sset.urls)
        batches = list(EvalLoader(sset, eval_transform(16, AugmentConfig()), batch_size=8))
        captions = [c for b in batches for c in b["caption"]]
        assert sorted(captions) == sorted(f"row {i}" for i in range(ROWS))
    finally:
        server.shutdown()


def test_eval_transform_crops_offset_rounded_down_and_composites_alpha_on_white():
    """The crop starts at (W - size) // 2 (as transformers' CLIPImageProcessor, so an
    --format hf export preprocesses the same), and transparent pixels are white (as
    data_tools.convert writes them into shards), in eval and training alike."""
    aug = AugmentConfig(mean=[0.0] * 3, std=[1.0] * 3)
    # 35 columns at 32 rows: no resize; 3 extra columns, so floor puts the crop at column 1
    # where round-half-to-even would put it at column 2.
    cols = np.repeat((np.arange(35, dtype=np.uint8) * 7)[None, :, None], 32, 0).repeat(3, 2)
    out = eval_transform(32, aug)(Image.fromarray(cols))
    assert out.shape == (3, 32, 32)
    assert round(float(out[0, 0, 0]) * 255) == 7 and round(float(out[0, 0, -1]) * 255) == 32 * 7
    # Red where fully transparent, blue where opaque: the transparent half comes out white.
    rgba = np.zeros((32, 32, 4), dtype=np.uint8)
    rgba[:, :16, 0], rgba[:, 16:, 2], rgba[:, 16:, 3] = 255, 255, 255
    for img in (Image.fromarray(rgba, "RGBA"), Image.fromarray(rgba, "RGBA").convert("PA")):
        x = (eval_transform(32, aug)(img) * 255).round()
        assert x[:, :, :16].eq(255).all(), img.mode
        assert (
            x[:, :, 16:].tolist()
            == torch.tensor([0.0, 0.0, 255.0])[:, None, None].expand(3, 32, 16).tolist()
        ), img.mode
        torch.manual_seed(0)
        y = train_transform(32, AugmentConfig(scale_min=1.0))(img)
        assert y.shape == (3, 32, 32)
