"""Samples/s of the training loader on any shards (a quick check; bench_loader.py compares
with open_clip on shards it builds).

    python tests/bench/loader_rate.py SHARDS --mode epoch --world 2 --batches 20
"""

from __future__ import annotations

import argparse
import time

from clipforge.config import AugmentConfig
from clipforge.data.shards import resolve
from clipforge.data.train_loader import MODES, TrainLoader
from clipforge.data.transforms import train_transform


def untokenized(texts: list[str]) -> list[str]:
    return texts  # module-level, so that it pickles to the forkserver's workers


def main() -> None:
    p = argparse.ArgumentParser(description="samples/s of the training loader on some shards")
    p.add_argument("source")
    p.add_argument("--mode", default="resampled", choices=MODES)
    p.add_argument("--world", type=int, default=1)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--size", type=int, default=224)
    a = p.parse_args()
    loader = TrainLoader(
        resolve(a.source),
        train_transform(a.size, AugmentConfig()),
        untokenized,
        a.batch,
        0,
        0,
        a.workers,
        1000,
        world=a.world,
        mode=a.mode,
    )
    it = iter(loader)
    next(it)
    t0 = time.perf_counter()
    for _ in range(a.batches):
        next(it)
    rate = a.batches * a.batch / (time.perf_counter() - t0)
    print(f"{rate:.1f} samples/s {loader.metrics()}")


if __name__ == "__main__":
    main()
