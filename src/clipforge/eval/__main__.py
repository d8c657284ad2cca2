"""Evaluate a trained run's exported weights on zero-shot and retrieval sets, standalone.

    python -m clipforge.eval checkpoint=RUN_DIR eval.zeroshot=SHARDS eval.retrieval=SHARDS
    python -m clipforge.eval checkpoint=RUN_DIR "eval.zeroshot=[SHARDS_A,SHARDS_B]"
    clipforge-eval checkpoint=RUN_DIR eval.zeroshot=imagenet1k:/data/imagenet/val   # n01440764/...
    clipforge-eval checkpoint=RUN_DIR eval.zeroshot=imagenet1k@openai7:/data/imagenet/val
    torchrun --nproc_per_node 2 -m clipforge.eval checkpoint=RUN_DIR eval.zeroshot=SHARDS

Arguments are key=value, typed like the training config's `eval.*` (whose values in
RUN_DIR/config.yaml are the defaults; `eval.zeroshot=null` drops a set), plus `checkpoint=`,
`device=` (auto | cpu | cuda) and `out=` (default RUN_DIR/eval). A zero-shot entry
NAME[@TEMPLATES]:PATH uses a shipped benchmark's class names and templates (imagenet1k, cifar10,
cifar100: clipforge/eval/benchmarks/), PATH being a folder of class sub-folders or shards. Prints one JSON line per set
and writes OUT/{kind}_{set}.json with the details (confusion matrix, per-class recall) and
pictures beside it. Needs no DeepSpeed; under torchrun the sets are split over the processes
and the counts summed, which gives the same numbers as one process.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from clipforge.checkpoint import run_config
from clipforge.config import EvalConfig, eval_problems
from clipforge.eval import suite
from clipforge.eval.exported import on_ranks


@dataclass
class EvalArgs:
    checkpoint: str = MISSING
    eval: EvalConfig = field(default_factory=EvalConfig)
    device: str = "auto"
    out: Optional[str] = None


def parse(argv: list[str]) -> EvalArgs:
    """key=value arguments over the run's own eval config; an unknown key is an error."""
    bad = [a for a in argv if "=" not in a or a.startswith("-")]
    if bad or not argv:
        raise ValueError(
            f"expected key=value arguments (checkpoint=RUN_DIR ...), got {bad or argv}"
        )
    cli = OmegaConf.from_dotlist(argv)
    schema = OmegaConf.structured(EvalArgs)
    merged = OmegaConf.merge(schema, cli)
    run_cfg = Path(merged.checkpoint) / "config.yaml"
    if run_cfg.is_file():  # the run's eval section (typed) under the command line's
        run_eval = run_config(merged.checkpoint).eval
        merged = OmegaConf.merge(schema, {"eval": OmegaConf.structured(run_eval)}, cli)
    args: EvalArgs = OmegaConf.to_object(merged)  # type: ignore[assignment]
    problems = eval_problems(args.eval)
    if not suite.has_sets(args.eval):
        problems.append("nothing to evaluate: give eval.zeroshot=SHARDS or eval.retrieval=SHARDS")
    if problems:
        raise ValueError("; ".join(problems))
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    try:
        args = parse(argv)
    except (ValueError, OmegaConfBaseException) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    # Under torchrun the sets are split over the processes and the counts gathered.
    done = on_ranks(
        args.checkpoint,
        args.device,
        lambda run, rank, world: suite.run_sets(
            run.encoders(), args.eval, rank, world, draw=rank == 0
        ),
    )
    if done is None:
        return 2
    rank, results = done
    if rank == 0:
        out = Path(args.out) if args.out else Path(args.checkpoint) / "eval"
        suite.write_results(results, out)
        for res in results:
            print(json.dumps(res.line()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
