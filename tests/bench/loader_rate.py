"""Samples/s of the training loader, or of one rank's share of an eval set, on any shards (a
quick check; bench_loader.py compares with open_clip on shards it builds).

    python tests/bench/loader_rate.py SHARDS --mode epoch --world 2 --batches 20
    python tests/bench/loader_rate.py SHARDS --eval --world 8 --rank 3
"""

from __future__ import annotations

import argparse
import time

from clipforge.config import AugmentConfig
from clipforge.data.eval_loader import EvalLoader
from clipforge.data.shards import resolve
from clipforge.data.train_loader import MODES, TrainLoader
from clipforge.data.transforms import eval_transform, train_transform


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
    p.add_argument("--eval", action="store_true", help="the eval loader: one rank's share, once")
    p.add_argument("--rank", type=int, default=0, help="with --eval: which rank's share")
    a = p.parse_args()
    if a.eval:
        eval_rate(a)
        return
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


def eval_rate(a: argparse.Namespace) -> None:
    tf = eval_transform(a.size, AugmentConfig())
    loader = EvalLoader(resolve(a.source), tf, a.batch, a.rank, a.world, a.workers)
    t0, n, steps = time.perf_counter(), 0, 0
    for batch in loader:
        steps += 1
        n += 0 if batch["pad"] else len(batch["key"])
    rate = n / (time.perf_counter() - t0)
    print(f"rank {a.rank}/{a.world}: {steps} steps, {n} samples, {rate:.1f} samples/s")


if __name__ == "__main__":
    main()
