"""The last transformer block, computed for the one token a CLIP tower keeps.

A CLIP tower hands the loss one vector per sample: the ViT's class token, the text
transformer's EOS token. In the last block every other token's output is computed and then
dropped, yet those tokens matter there only as keys and values for the kept token's attention.
So the towers run their last block on the kept token alone: the fused q|k|v projection for
every token (keys and values), then attention, output projection, residuals and MLP for one
row. The result is the full block's at that row (same weights, same operations per row;
rounding may differ), its gradients likewise, and the block costs a quarter of its matmul
work: 3 of its 12 width^2 multiply-adds per token. On the 4-layer towers of
conf/model/tiny.yaml that is ~18 % less work in every forward and backward
(tests/bench/bench_train.py; tests/test_model.py checks the equality and counts the FLOPs).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


def maybe_checkpoint(enabled: bool, fn: Any, *args: Tensor) -> Tensor:
    """fn(*args), recomputed in backward instead of stored when `enabled` and grad is on.
    use_reentrant=False: works when the inputs need no grad, and with ZeRO-3's hooks."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def attend_one(
    qkv: Tensor,
    heads: int,
    keep: Tensor | None = None,
    *,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    q_norm: nn.Module | None = None,
    k_norm: nn.Module | None = None,
) -> Tensor:
    """Multi-head attention for one query per sample: `qkv` [B, N, 3D] is a block's fused
    q|k|v projection of every token; the query is token `keep[b]` of sample b (None: token 0),
    keys and values are every token's. Returns [B, 1, D], before the output projection.
    `attn_mask` [B, 1, 1, N] (True: attend) limits the keys each query sees; `q_norm`/`k_norm`
    are per-head norms (timm's qk_norm).

    The projection is the module's own call on every token, although only one row's query is
    read (1 of the block's 12 width^2 multiply-adds per token): calling the module, not slicing
    its weight, keeps what hooks into it working: ZeRO-3 gathers a module's parameters in its
    forward hook, adapters such as LoRA replace its forward."""
    b, n, three_d = qkv.shape
    d = three_d // 3
    q = (
        qkv[:, :1, :d]
        if keep is None
        else qkv[torch.arange(b, device=qkv.device), keep, :d][:, None]
    )
    q = q.reshape(b, 1, heads, d // heads).transpose(1, 2)
    k, v = qkv[..., d:].reshape(b, n, 2, heads, d // heads).permute(2, 0, 3, 1, 4)
    if q_norm is not None:
        q = q_norm(q)
    if k_norm is not None:
        k = k_norm(k)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
    return out.transpose(1, 2).reshape(b, 1, d)


def key_mask(last: Tensor, n: int) -> Tensor:
    """[B, 1, 1, n] boolean mask letting sample b attend to positions 0..last[b] (causal
    attention seen from the query at position last[b])."""
    positions = torch.arange(n, device=last.device)
    return (positions[None, :] <= last[:, None])[:, None, None, :]
