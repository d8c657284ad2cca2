"""DeepSpeed as the trainer, on CPU (gloo) as on GPUs (nccl): the project's one deepspeed import.

The engine wraps a *task* module (clipforge/task.py, `TrainTask`): `embed(batch)` gives the
model's outputs, `loss_from(embeddings)` the loss and metrics; the engine never knows the task
is CLIP. Batch sizes, accumulation, clipping and precision are derived here, once, from the
typed config, on top of the plain DeepSpeed dict from conf/deepspeed/ (ZeRO stage and knobs).

Accumulation (train.accum_chunks=K, engine/accumulate.py): each rank's micro batch is split
into K chunks. DeepSpeed sees K micro-steps of batch_size/K per optimizer step
(gradient_accumulation_steps=K), so its train_batch_size stays batch_size * world_size.

Setup, in this order (Engine.__init__): precision and matmul policy (engine/precision.py) ->
task onto the device -> deepspeed.initialize (casts, partitions, installs ZeRO hooks) ->
weights-only checkpoint loading -> torch.compile of the wrapped module (DeepSpeed's
`engine.compile()`: compiling before initialize would have dynamo trace ZeRO-3's partitioning
hooks as plain code) -> parameter bounds applied once.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import math
import os
import shutil
from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from clipforge.checkpoint import UNIVERSAL
from clipforge.config import Config
from clipforge.engine import dist
from clipforge.engine import precision as prec
from clipforge.engine.accumulate import gradcache_step, plain_step, split_batch
from clipforge.engine.dist import DistInfo
from clipforge.engine.optim import build_optimizer, scheduler_factory

os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")

import deepspeed  # noqa: E402  (must follow DS_ACCELERATOR)
from deepspeed.checkpoint import ds_to_universal  # noqa: E402
from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine  # noqa: E402
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler  # noqa: E402
from deepspeed.runtime.utils import (  # noqa: E402
    is_model_parallel_parameter,
    mask_nan_or_inf_with_val_inplace,
)
from deepspeed.runtime.zero.config import ZeroStageEnum  # noqa: E402
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer  # noqa: E402
from deepspeed.utils import logger as ds_logger  # noqa: E402
from deepspeed.utils import (  # noqa: E402
    safe_get_full_fp32_param,
    safe_get_local_fp32_param,
    safe_set_local_fp32_param,
)
from deepspeed.utils.tensor_fragment import fragment_address  # noqa: E402

ds_logger.setLevel(logging.WARNING)

# The only non-tensor classes DeepSpeed 0.19 pickles into the checkpoints we write (found by
# listing the pickle globals of ZeRO 0-3 checkpoints in fp32, bf16 and fp16): plain records
# with no code of their own. tests/test_engine.py loads stages 0, 2 (fp16) and 3 back.
_DS_SAFE_GLOBALS = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


# ZeRO knobs whose best value depends on the device, used where conf/deepspeed/ or the command
# line set none. On GPUs gradient reduction overlaps the backward on a side stream, in buckets
# of 5e8 elements (DeepSpeed's size, about 1 GB of bf16 each way); on CPU there are no streams
# to overlap on, and gloo moves smaller buckets with less memory held.
_ZERO_DEFAULTS = {
    "cuda": {
        "overlap_comm": True,
        "reduce_bucket_size": int(5e8),
        "allgather_bucket_size": int(5e8),
    },
    "cpu": {
        "overlap_comm": False,
        "reduce_bucket_size": int(5e7),
        "allgather_bucket_size": int(5e7),
    },
}


def build_ds_config(
    cfg: Config, world_size: int, device: torch.device | None = None
) -> dict[str, Any]:
    """The DeepSpeed dict: conf/deepspeed/<stage>.yaml plus what the typed config decides."""
    device = device or torch.device("cpu")
    ds = copy.deepcopy(dict(cfg.deepspeed))
    zero = ds["zero_optimization"] = dict(ds.get("zero_optimization", {}))
    if zero.get("stage", 0) > 0:
        for key, value in _ZERO_DEFAULTS["cuda" if device.type == "cuda" else "cpu"].items():
            zero.setdefault(key, value)
    chunks = cfg.train.accum_chunks
    # config.validate rejects a gradient_accumulation_steps in the dict: it is derived here.
    ds["train_micro_batch_size_per_gpu"] = cfg.train.batch_size // chunks
    ds["gradient_accumulation_steps"] = chunks
    ds["train_batch_size"] = cfg.train.batch_size * world_size
    # 0 turns clipping off; infinity does the same but still has DeepSpeed compute the global
    # norm, which the logs and the divergence check need.
    ds["gradient_clipping"] = cfg.train.grad_clip or math.inf
    # train.precision decides what is enabled (and the gradient-reduction dtype); other knobs
    # of these sections (fp16's initial_scale_power, loss_scale_window, ...) pass through.
    entries = prec.ds_precision(
        prec.resolve(cfg.train.precision, device), cfg.train.grad_reduce_dtype
    )
    ds["bf16"] = {**ds.get("bf16", {}), **entries.pop("bf16")}  # type: ignore[dict-item]
    # loss_scale 0 selects the dynamic loss scale, which fp16 needs to avoid underflow.
    ds["fp16"] = {"loss_scale": 0, **ds.get("fp16", {}), **entries.pop("fp16")}  # type: ignore[dict-item]
    ds.update(entries)
    # Our AdamW is torch's: ZeRO accepts it once told that a client optimizer is intended.
    ds["zero_allow_untested_optimizer"] = True
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("wall_clock_breakdown", False)
    return ds


class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine, but loading with weights_only=True.

    DeepSpeed's own loader calls torch.load(weights_only=False), which runs arbitrary code from
    a crafted checkpoint. Ours admits tensors, containers and the four DeepSpeed classes above.
    """

    def load(self, path: str, map_location: Any = None) -> Any:
        with torch.serialization.safe_globals(_DS_SAFE_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)


@dataclass
class _Bound:
    """A parameter kept in [low, high], with this rank's piece of its fp32 master when that is
    a tensor we can clamp in place (None: the module's parameter is the master, or ZeRO-3
    hands its partition out as a copy)."""

    param: nn.Parameter
    low: float
    high: float
    master: torch.Tensor | None


def _local_master(p: nn.Parameter, stage0_masters: dict[int, torch.Tensor]) -> torch.Tensor | None:
    """Found once at setup: the views stay valid, so each step's clamp costs no lookup (and,
    under ZeRO-3, none of DeepSpeed's accessor's stream synchronizations)."""
    if hasattr(p, "ds_id"):
        first, again = safe_get_local_fp32_param(p), safe_get_local_fp32_param(p)
        # A view into the fp32 flat partition comes back the same; an offloaded one is a copy.
        if first is not None and first.data_ptr() == again.data_ptr():
            return first
        return None
    mapping = getattr(p, "_hp_mapping", None)
    if mapping is not None:  # ZeRO-1/2, bf16 optimizer: a view into the flat partition
        return mapping.hp_fragment
    return stage0_masters.get(id(p))


def _skip_lone_zero12_reduction(optimizer: Any) -> bool:
    """ZeRO-1/2 in one process: leave each gradient where autograd put it.

    DeepSpeed's per-gradient reduction (DeepSpeedZeroOptimizer's
    reduce_independent_p_g_buckets_and_remove_grads, reached from its gradient hooks under
    ZeRO-2 and from reduce_gradients under ZeRO-1) copies every gradient into a bucket, divides
    the bucket by the world size, all-reduces it, copies the result back over itself and then
    into a partition buffer: four passes over every gradient (the bench's tiny model, one
    thread: ~0.12 s of a ~2.3 s profiled step). With one rank, the division is by 1.0, the
    all-reduce the identity and the partition the whole model, so each pass reproduces its
    input bit for bit; the epilogue then collects `param.grad` into the step's flat partition
    either way. Replacing the method with its bookkeeping alone gives the step the same
    values. Only the plain case is taken: a separate fp32 accumulator (ZeRO-1's grad_accum,
    ZeRO-2's compact partition of bf16 gradients), CPU offload, MoE, ZenFlow and Muon all do
    real work in that path. Never used with more than one rank. Returns whether it applied.
    """
    groups = range(len(optimizer.bit16_groups))
    if (
        optimizer.cpu_offload
        or optimizer.use_grad_accum_attribute
        or optimizer.has_moe_layers
        or optimizer.zenflow
        or any(optimizer._use_compact_grad_partition_buffer(i) for i in groups)
        or any(optimizer._is_muon_group(ps) for ps in optimizer.params_in_partition if len(ps) > 0)
    ):
        return False

    def mark_reduced(param: nn.Parameter, i: int) -> None:
        # What the original keeps of its bookkeeping: the guard against a gradient reduced
        # twice in one backward (the epilogue resets the flags).
        if param.numel() == 0:
            return
        param_id, reduced = optimizer.get_param_id(param), optimizer.params_already_reduced
        assert not reduced[param_id], f"parameter {param_id} reduced twice in one backward"
        reduced[param_id] = True

    optimizer.reduce_independent_p_g_buckets_and_remove_grads = mark_reduced
    return True


# Elements per fp32 partial norm in _grad_norm_without_fp64_copies: short enough that each
# partial sum keeps float64's answer to ~1e-8 relative (torch's CPU norm sums sequentially, so
# one fp32 norm over a 6.3M-element embedding gradient is off by ~2e-4), long enough that the
# partials cost nothing beside the pass over the gradient.
_NORM_CHUNK = 4096


def sum_of_squares(tensors: list[torch.Tensor]) -> torch.Tensor:
    """sum(t.double().square().sum() for t in tensors), a float64 scalar, without float64 copies
    of the tensors: fp32 norms of 4096-element chunks, squared and summed in float64."""
    parts = []
    for t in tensors:
        flat = t.reshape(-1)
        whole = flat.numel() // _NORM_CHUNK * _NORM_CHUNK
        if whole:
            chunks = flat[:whole].view(-1, _NORM_CHUNK)
            parts.append(torch.linalg.vector_norm(chunks, dim=1, dtype=torch.float32))
        if whole < flat.numel():
            rest = torch.linalg.vector_norm(flat[whole:], dtype=torch.float32)
            parts.append(rest.reshape(1))
    if not parts:
        return torch.zeros((), dtype=torch.float64)
    return torch.cat(parts).double().square().sum()


def _grad_norm_without_fp64_copies(optimizer: Any) -> bool:
    """ZeRO-1/2's global gradient norm (clipping, the logged grad_norm) from fp32 partial sums.

    DeepSpeed's get_grad_norm_direct converts every gradient of the partition to float64
    first, a copy twice the gradient's size: the bench's tiny model, one thread, ~20 ms of a
    ~40 ms optimizer step, for a norm that a 1e-3 error would not change the clipping of.
    This replacement keeps its contract at any world size (L2 over this rank's partition,
    zero padding and pipeline-replicated copies skipped, summed over the data-parallel and
    model-parallel groups, inf/NaN reported as -1) and its accuracy (float64 sums of fp32
    chunk norms, ~1e-8 relative), reading each gradient once. Other norms (inf) go to
    DeepSpeed's. Returns whether it applied (not with CPU offload, which has its own path).
    """
    if not isinstance(optimizer, DeepSpeedZeroOptimizer) or optimizer.cpu_offload:
        return False
    original = optimizer.get_grad_norm_direct

    def get_grad_norm_direct(
        gradients: list[torch.Tensor], params: list[nn.Parameter], norm_type: float = 2
    ) -> torch.Tensor:
        if float(norm_type) != 2.0:
            return original(gradients, params, norm_type)
        real = (g for g in gradients if not getattr(g, "_zero_padding", False))
        counted = [
            g
            for g, p in zip(real, params)
            if not getattr(p, "ds_pipe_replicated", False)
            and (is_model_parallel_parameter(p) or optimizer.model_parallel_rank == 0)
        ]
        # On the training device: the data-parallel group's backend is NCCL on GPUs.
        total = sum_of_squares(counted).float().to(optimizer.device)
        dist.sum_over_group_(total, optimizer.dp_process_group)
        optimizer._model_parallel_all_reduce(tensor=total, op=deepspeed.comm.ReduceOp.SUM)
        total = total.sqrt()
        mask_nan_or_inf_with_val_inplace(total, device=optimizer.device)
        return total

    optimizer.get_grad_norm_direct = get_grad_norm_direct
    return True


class Engine:
    """One training step = forward, backward, step (over K chunks when accumulating); plus
    checkpoints and weight export."""

    def __init__(self, task: nn.Module, cfg: Config, dist_info: DistInfo):
        if dist_info.device.type == "cpu":
            # The shared-memory comm op JIT-compiles on first use; gloo needs none of it.
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        self.cfg = cfg
        self.device = dist_info.device
        self.is_main = dist_info.is_main
        self.chunks = cfg.train.accum_chunks
        self.precision = prec.resolve(cfg.train.precision, self.device)
        problem = prec.precision_problem(self.precision, self.device)
        if problem:  # train.run validates first; this guards direct users of the engine
            raise ValueError(problem)
        prec.setup_matmul(self.device, cfg.train.tf32)
        self.ds_config = build_ds_config(cfg, dist_info.world_size, self.device)
        task = task.to(self.device)
        self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=task,
            optimizer=build_optimizer(task, cfg.optim),
            lr_scheduler=scheduler_factory(cfg.sched, cfg.train.steps),
            config=self.ds_config,
            dist_init_required=False,
        )
        self.ds.checkpoint_engine = WeightsOnlyCheckpointEngine(self.ds._config)
        self.zero_stage = self.ds.zero_optimization_stage()
        if cfg.train.compile:
            # After initialize, as DeepSpeed supports it; compiles the task module in place
            # (parameter names, hence checkpoints, stay the same). The task keeps its loss out
            # of the traced graph (task.py).
            self.ds.compile(compile_kwargs={"dynamic": False})
        self._bounds = self._bounded_params(task)
        self._apply_bounds()
        if self.zero_stage == 0 and dist_info.world_size == 1:
            # Alone, DeepSpeed still flattens every gradient, "all-reduces" it and copies it
            # back: ~10% of a small model's CPU step, for nothing.
            self.ds.enable_backward_allreduce = False
        if self.zero_stage in (1, 2) and dist_info.world_size == 1:
            _skip_lone_zero12_reduction(self.optimizer)
        if self.zero_stage in (1, 2):
            _grad_norm_without_fp64_copies(self.optimizer)
        self._fp32_grad_norm: torch.Tensor | None = None
        if self.zero_stage == 0 and self.precision == "fp32":
            # This is the one path where DeepSpeed clips but throws the norm away.
            self.ds.clip_fp32_gradients = self._clip_fp32_gradients

    def _clip_fp32_gradients(self) -> None:
        # Under ZeRO-0 the gradients are already averaged over ranks: the local norm is global.
        self._fp32_grad_norm = torch.nn.utils.clip_grad_norm_(
            self.module.parameters(), self.ds.gradient_clipping()
        )

    @property
    def module(self) -> nn.Module:
        return self.ds.module

    @property
    def world_size(self) -> int:
        return self.ds.dp_world_size

    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {
            k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v
            for k, v in batch.items()
        }

    # -- training ----------------------------------------------------------------------------
    def train_step(self, batch: dict[str, Any], sync: bool = True) -> dict[str, float]:
        """Forward, backward and one optimizer step over `batch`; returns float metrics.

        `grad_norm` is the global norm before clipping; it is left out when fp16's dynamic loss
        scale skipped the step (an overflow there is expected, not a divergence).
        sync=False returns only the learning rate: reading a metric waits for the device to
        finish the step, which the training loop does at logging steps only, so that on a
        GPU the host queues the next step while this one runs.
        """
        self.ds.train()
        batch = self._to_device(batch)
        lr = self.scheduler.get_last_lr()[0]  # the rate this step uses (step() moves it on)
        if self.chunks == 1:
            loss, metrics = self.ds(batch)
            self._backward_and_step(loss)
        elif self.cfg.train.accum_mode == "gradcache":
            loss, metrics = self._gradcache(batch)
        else:
            loss, metrics = plain_step(
                split_batch(batch, self.chunks), self.ds, self._backward_and_step
            )
        self._apply_bounds()
        if not sync:
            return {"lr": lr}
        return {"lr": lr, **self._report(loss, metrics)}

    # -- parameter bounds (CLIP's temperature cap) ---------------------------------------------
    def _bounded_params(self, task: nn.Module) -> list[_Bound]:
        bounds = getattr(task, "param_bounds", dict)()
        params = dict(self.module.named_parameters())
        missing = sorted(set(bounds) - set(params))
        if missing:
            raise ValueError(f"param_bounds names unknown parameters: {missing}")
        masters = self._stage0_masters()
        return [
            _Bound(params[k], lo, hi, _local_master(params[k], masters))
            for k, (lo, hi) in bounds.items()
        ]

    @torch.no_grad()
    def _apply_bounds(self) -> None:
        """Clamp the bounded parameters in every copy this rank holds: the module's (full under
        ZeRO 0-2, this rank's partition under ZeRO-3) and the optimizer's fp32 master (whole,
        a fragment of this rank's flat partition, or a ZeRO-3 partition). A clamp is
        elementwise, so clamping each local piece is clamping the whole: no collective, no host
        sync, and the forward sees the bound value at once, not after the next step."""
        for b in self._bounds:
            p = b.param
            # ZeRO-3 keeps small parameters gathered between steps ("persistent"): both the
            # gathered data and the partition are the module's copies then.
            for lp in (p, getattr(p, "ds_tensor", None)):
                if lp is not None and lp.numel():
                    lp.data.clamp_(b.low, b.high)
            if b.master is not None:
                b.master.clamp_(b.low, b.high)
            elif hasattr(p, "ds_id"):  # a ZeRO-3 partition DeepSpeed hands out as a copy
                master = safe_get_local_fp32_param(p)  # (offloaded: waits for the device)
                if master is not None:
                    safe_set_local_fp32_param(p, master.clamp(b.low, b.high))

    def _stage0_masters(self) -> dict[int, torch.Tensor]:
        """ZeRO-0 in fp16/bf16: DeepSpeed's (unfused) fp16 optimizer keeps one fp32 clone per
        parameter; {id(module parameter): its clone}. Empty in fp32 (no separate master)."""
        groups = getattr(self.optimizer, "fp16_groups", None)
        masters = getattr(self.optimizer, "fp32_groups", None)
        if not groups or not masters or self.zero_stage != 0:
            return {}
        return {id(lp): hp for lg, hg in zip(groups, masters) for lp, hp in zip(lg, hg)}

    def _gradcache(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return gradcache_step(
            split_batch(batch, self.chunks),
            embed=lambda chunk: self.ds(chunk, embed_only=True),
            loss_from=self.module.loss_from,
            # The surrogate's gradients are already the exact sum over chunks: no 1/K.
            backward=lambda s: self._backward_and_step(s, scale_wrt_gas=False),
            shared=self.module.shared_outputs,
            device=self.device,
        )

    def _backward_and_step(self, loss: torch.Tensor, scale_wrt_gas: bool = True) -> None:
        # DeepSpeed wants step() after every micro-step; it only updates at the K-th.
        self.ds.backward(loss, scale_wrt_gas=scale_wrt_gas)
        self.ds.step()

    def _report(self, loss: torch.Tensor, metrics: dict[str, torch.Tensor]) -> dict[str, float]:
        # The global batch's loss: each rank's loss averages its own rows of the gathered
        # problem over equal per-rank batches, so their mean is the whole batch's, the same
        # number at any world size. The loss's metrics (per-direction losses, accuracies,
        # mean logits) are such averages too, and the scale and bias are the same everywhere:
        # all go in one all-reduce, on the steps that read metrics only.
        names = sorted(metrics)
        values = dist.mean_over_ranks(
            torch.stack(
                [loss.detach().float().reshape(())]
                + [metrics[k].float().reshape(()) for k in names]
            )
        ).tolist()
        out = {"loss": values[0]}
        grad_norm = self.ds.get_global_grad_norm()
        if grad_norm is None:
            grad_norm = self._fp32_grad_norm
        if grad_norm is not None and self.ds.was_step_applied():
            out["grad_norm"] = float(grad_norm)
        elif self.precision == "fp16":
            out["skipped_step"] = 1.0
        out.update(zip(names, values[1:]))
        return out

    @torch.no_grad()
    def forward_eval(self, fn_name: str, *args: Any) -> Any:
        """Call a method of the task's model in eval mode (all ranks must call under ZeRO-3)."""
        self.ds.eval()
        args = [a.to(self.device) if torch.is_tensor(a) else a for a in args]
        return getattr(self.module, fn_name)(*args)

    # -- checkpoints -------------------------------------------------------------------------
    def save(self, ckpt_dir: Path, tag: str, client_state: dict[str, Any]) -> None:
        """Every rank writes its ZeRO partition; DeepSpeed writes the `latest` pointer."""
        self.ds.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state)

    def load(
        self, ckpt_dir: Path, tag: str | None, saved_world: int | None = None
    ) -> dict[str, Any]:
        """Load a tag written by `saved_world` ranks (None: by this world size).

        ZeRO shards (and the bf16 optimizer's) are cut for the world size that wrote them. At
        another world size the tag is first converted, once, into DeepSpeed's universal
        checkpoint (ds_to_universal: per parameter, the whole fp32 master and Adam moments,
        beside the step counters, scheduler and model states), which DeepSpeed's
        `load_universal` path re-partitions for this world: model, moments, scheduler and
        counters carry over. Unpartitioned tags (ZeRO-0 in fp32/fp16) load as they are.
        """
        load_dir, load_tag, universal = Path(ckpt_dir), tag, False
        if tag and saved_world not in (None, self.world_size) and _partitioned(load_dir / tag):
            load_dir, load_tag, universal = (
                load_dir / tag,
                to_universal(load_dir / tag, self.is_main),
                True,
            )
        self.ds._config.load_universal_checkpoint = universal
        groups = getattr(self.optimizer, "optimizer", self.optimizer).param_groups
        # ZeRO-3's universal load (DeepSpeed 0.19.8, load_hp_checkpoint_state_from_checkpoint_
        # dir_stage3) gives every param group the hyperparameters of the checkpoint's group 0:
        # our no-decay group would decay. The groups are the config's (optim.py), one schedule
        # for all: keep their own values, the learning rate aside (the scheduler's, restored).
        own = [{k: v for k, v in g.items() if k not in _SCHEDULED} for g in groups]
        try:
            with _weights_only_loads() if universal else contextlib.nullcontext():
                path, client_state = self.ds.load_checkpoint(str(load_dir), tag=load_tag)
        finally:
            self.ds._config.load_universal_checkpoint = False
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint {tag or 'latest'} in {ckpt_dir}")
        if universal:
            for group, values in zip(groups, own):
                group.update(values)
            self._unshare_steps()
            self._apply_bounds()
        return client_state or {}

    def _unshare_steps(self) -> None:
        """ZeRO-3's universal load (0.19.8) hands every sub-group's optimizer state the same
        `step` tensor; torch's AdamW increments it in place, once per group, so the second
        group would take its bias correction from a step count one ahead. One tensor each."""
        inner = getattr(self.optimizer, "optimizer", self.optimizer)
        for state in inner.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()

    @torch.no_grad()
    def fp32_state_dict(self) -> dict[str, torch.Tensor]:
        """The full fp32 master weights (and buffers), on the CPU; call on EVERY rank (ZeRO
        1-3 assemble partitions with collectives), the result is the same on all.

        Master, not module: under bf16/fp16 the module holds rounded copies (every weight with
        its low 16 bits zero), the optimizer the fp32 values it updates. Per parameter:
        ZeRO-1/2/3 and the bf16 optimizer through DeepSpeed's `safe_get_full_fp32_param`, ZeRO-0
        in half precision from the fp16 optimizer's clones, ZeRO-0 fp32 from the module (it is
        the master). Buffers (BatchNorm statistics) exist only in the module.
        """
        masters = self._stage0_masters()
        out: dict[str, torch.Tensor] = {}
        seen: dict[int, torch.Tensor] = {}  # tied parameters are assembled once
        for name, value in self.module.state_dict(keep_vars=True).items():
            if not isinstance(value, nn.Parameter):
                out[name] = value.detach().cpu().clone()
                if out[name].is_floating_point():
                    out[name] = out[name].float()
                continue
            if id(value) not in seen:
                seen[id(value)] = self._full_master(value, masters)
            out[name] = seen[id(value)]
        return out

    def _full_master(self, p: nn.Parameter, masters: dict[int, torch.Tensor]) -> torch.Tensor:
        shape = p.ds_shape if hasattr(p, "ds_id") else p.shape
        full = safe_get_full_fp32_param(p)  # None: no DeepSpeed master for this parameter
        if full is None and hasattr(p, "ds_id"):  # a frozen ZeRO-3 parameter: gather its data
            with deepspeed.zero.GatheredParameters([p]):
                full = p.detach().clone()
        if full is None:
            full = masters.get(id(p), p)
        return full.detach().float().cpu().clone().reshape(shape)


# -- re-partitioning for another world size -------------------------------------------------------
# Param-group entries the scheduler owns (and `params`, which the optimizer owns).
_SCHEDULED = ("params", "lr", "initial_lr")


def _partitioned(tag_dir: Path) -> bool:
    """Whether a tag's optimizer state is cut by rank: ZeRO 1-3 (zero_pp_rank_*) or the bf16
    optimizer (bf16_zero_pp_rank_*)."""
    return any(tag_dir.glob("*zero_pp_rank_*_optim_states.pt"))


def to_universal(tag_dir: Path, is_main: bool) -> str:
    """Convert `tag_dir` into TAG/universal/ once (the main rank writes, every rank waits); returns
    the sub-directory's name, the tag to load from `tag_dir`.

    Written to universal.tmp and renamed, so a conversion cut short is redone, never loaded.
    Runs in this process, one file at a time: no worker pool forked from a trainer that holds
    a process group (and, on GPUs, a CUDA context). Cost: one read of every rank's shards and
    one write of the fp32 master and moments (~3 x 4 bytes per parameter).
    """
    out = tag_dir / UNIVERSAL
    if is_main and not out.is_dir():
        tmp = tag_dir / (UNIVERSAL + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        args = Namespace(
            input_folder=str(tag_dir),
            output_folder=str(tmp),
            num_extract_workers=1,
            num_merge_workers=1,
            keep_temp_folder=False,
            strict=True,
            # Our tags carry no universal_checkpoint_info (no tensor or pipeline parallelism
            # to describe): the converter adds the plain data-parallel one.
            inject_missing_state=True,
        )
        quiet = io.StringIO()  # its progress bars and per-step prints, kept off the run's log
        with (
            _weights_only_loads(),
            contextlib.redirect_stdout(quiet),
            contextlib.redirect_stderr(quiet),
        ):
            ds_to_universal.main(args)
        tmp.replace(out)
    dist.barrier()
    return UNIVERSAL


@contextlib.contextmanager
def _weights_only_loads():
    """DeepSpeed's converter and universal loader call torch.load(weights_only=False); inside
    this block every torch.load is weights-only, admitting the DeepSpeed records listed above,
    as WeightsOnlyCheckpointEngine does for ordinary loads."""
    original = torch.load

    def load(*args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        with torch.serialization.safe_globals(_DS_SAFE_GLOBALS):
            return original(*args, **kwargs)

    torch.load = load  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.load = original  # type: ignore[assignment]
