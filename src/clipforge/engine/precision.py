"""The precision policy, stated once: what runs in which dtype, and what the device can do.

    train.precision=auto | fp32 | bf16 | fp16     (auto: bf16 on GPUs that have it, else fp32)
    train.grad_reduce_dtype=fp32 | compute         (the dtype gradients are reduced in)
    train.tf32=true                                (fp32 matmuls on tensor cores, GPUs only)

The policy:
- Towers (image and text transformers, their projections) run in the compute dtype: DeepSpeed
  casts the module's weights to bf16/fp16, and the task casts the images to match.
- Normalization, temperature and loss run in fp32 whatever the compute dtype: the model
  normalizes float32 features and takes exp() of the float32 log-scale (model/clip.py), the task
  upcasts before the loss (task.py). A bf16 softmax over N negatives, or a bf16 unit vector, loses
  the small terms that carry the contrastive gradient; these tensors are [B, D] and [B, N], small
  next to the towers. One limit: DeepSpeed casts every parameter of the module, the log-scale
  too, so the forward sees it rounded to bf16 (steps of ~0.8 % in the scale at 14-100); its
  fp32 master still integrates every update, and exp() runs in fp32.
- The optimizer keeps fp32 master weights in every ZeRO stage (DeepSpeed's fp16/bf16 optimizers
  and ZeRO partitions); exports are those master weights (engine/deepspeed.py).
- Gradients are reduced across ranks in fp32 by default (`communication_data_type`), as DDP with
  autocast does (open_clip): a bf16 sum over hundreds of ranks keeps 8 mantissa bits. `compute`
  reduces in the compute dtype instead, halving the traffic.
- fp32 matmuls and convolutions use TF32 on Ampere and later (`train.tf32`), as PyTorch's own
  recommendation for training; CPU runs are unaffected.

Capabilities are checked, not assumed: fp16 on a CPU needs oneDNN's fp16 kernels (AVX-512 FP16
or AMX), which many x86-64 machines lack (AMD EPYC with AVX2 only: DeepSpeed then refuses fp16
at initialize with a bare ValueError). `precision_problem` turns that into one line up front.
"""

from __future__ import annotations

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
GRAD_REDUCE_DTYPES = ("fp32", "compute")


def supports(precision: str, device: torch.device) -> bool:
    """Whether `device` can train in `precision` (fp32 always)."""
    if precision == "fp32":
        return True
    if device.type == "cuda":
        return precision == "fp16" or torch.cuda.is_bf16_supported()
    if precision == "bf16":
        return True  # emulated where there is no native bf16: slow on AVX2, but correct
    try:  # DeepSpeed's CPU accelerator asks the same question before refusing fp16
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve(precision: str, device: torch.device) -> str:
    """`auto` -> bf16 on a GPU with bf16, fp32 elsewhere (CPU recipes train in fp32)."""
    if precision != "auto":
        return precision
    return "bf16" if device.type == "cuda" and supports("bf16", device) else "fp32"


def precision_problem(precision: str, device: torch.device) -> str | None:
    """One line saying why `device` cannot train in `precision`, or None."""
    if precision not in PRECISIONS:
        return f"train.precision must be one of {PRECISIONS}, got {precision!r}"
    if supports(resolve(precision, device), device):
        return None
    if device.type == "cpu":
        return (
            f"train.precision={precision}: this CPU has no fp16 kernels (oneDNN fp16 needs "
            "AVX-512 FP16 or AMX); use train.precision=fp32 (or bf16)"
        )
    return f"train.precision={precision}: {torch.cuda.get_device_name(device)} has no bf16"


def ds_precision(precision: str, grad_reduce_dtype: str) -> dict[str, object]:
    """The DeepSpeed config entries of a resolved precision."""
    out: dict[str, object] = {
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
    }
    if precision != "fp32":
        out["communication_data_type"] = "fp32" if grad_reduce_dtype == "fp32" else precision
    return out


def setup_matmul(device: torch.device, tf32: bool) -> None:
    """TF32 for fp32 matmuls and cuDNN convolutions on GPUs (no effect on CPU)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
