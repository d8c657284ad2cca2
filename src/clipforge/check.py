"""Validate a training configuration before any process starts (the launchers call this).

    python -m clipforge.check --world-size 16 model=vit_b32 data.train=/data/shards run_dir=runs/a

Composes conf/train.yaml with the same hydra overrides the trainer will get, then reports every
problem at once on one line and exits 2; prints `config ok` and exits 0 otherwise.
"""

from __future__ import annotations

import sys

from hydra import compose, initialize_config_module
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from clipforge import checkpoint as ckpt
from clipforge import cli
from clipforge.config import Config, ConfigError, register, validate


def load_config(overrides: list[str]) -> Config:
    register()
    # The configs the trainer composes: the clipforge.conf package (conf/ in the repository).
    with initialize_config_module(config_module="clipforge.conf", version_base="1.3"):
        raw = compose(config_name="train", overrides=overrides)
    return OmegaConf.to_object(raw)  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, default=1)
    parser.add_argument("overrides", nargs="*", help="hydra overrides, as for clipforge.train")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.overrides)
        # A requeued job may come back on another world size: it keeps the checkpoint's
        # global batch, which must split over this one (config.derive_batch).
        saved = ckpt.resumed_global_batch(cfg.run_dir, cfg.resume)
        validate(cfg, args.world_size, saved_global=saved)
    except (ConfigError, HydraException, OmegaConfBaseException, FileNotFoundError) as e:
        msg = " ".join(str(e).split())
        print(f"error: {msg}", file=sys.stderr)
        return 2
    print(f"config ok (world size {args.world_size}, run_dir {cfg.run_dir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
