"""CLIP's text transformer in plain PyTorch: causal pre-LN blocks, features taken at EOS.

The layout and parameter count follow open_clip's `TextTransformer` (token and learned
positional embeddings, `layers` residual blocks, a final LayerNorm, a bias-free projection),
so sizes from the CLIP paper give the same number of parameters here and there.

Token contract (clipforge.data.tokenizer): the pad id is 0 and EOS is always the last
non-pad token, so the EOS position is `(tokens != 0).sum(-1) - 1`. That is why pooling does
not rely on EOS having the largest id, as open_clip's `argmax` pooling does.

    PYTHONPATH=src python -c "from clipforge.model.text_tower import TextTower; print(TextTower(1000, 32, 64, 2, 2, 16))"
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clipforge.model.pooled import attend_one, key_mask, maybe_checkpoint


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where each token sees only itself and earlier tokens."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"text width {width} is not divisible by heads {heads}")
        self.heads = heads
        # One fused projection for q, k, v (open_clip's in_proj_weight/in_proj_bias).
        self.qkv = nn.Linear(width, 3 * width, bias=True)
        self.out_proj = nn.Linear(width, width, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        # is_causal keeps every position blind to later ones, padding included, so what
        # follows EOS can never leak into the pooled EOS features.
        x = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(x.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    """Two-layer feed-forward network with GELU (names follow open_clip: c_fc, c_proj)."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class ResidualBlock(nn.Module):
    """Pre-LN transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = Mlp(width, int(width * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))

    def forward_at(self, x: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """forward(x)[b, position[b]] for every b, computing that row only (model/pooled.py):
        [B, N, C] and [B] -> [B, C]."""
        h = self.ln_1(x)
        out = attend_one(
            self.attn.qkv(h),
            self.attn.heads,
            position,
            # Causal, seen from position[b]: itself and what precedes it.
            attn_mask=key_mask(position, x.shape[1]),
        )
        x = x[torch.arange(x.shape[0], device=x.device), position] + self.attn.out_proj(out[:, 0])
        return x + self.mlp(self.ln_2(x))


class TextTower(nn.Module):
    """Token ids [B, L] -> text embeddings [B, embed_dim] (not normalized)."""

    def __init__(
        self,
        vocab_size: int,
        context_length: int,
        width: int,
        layers: int,
        heads: int,
        embed_dim: int,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        self.context_length = context_length
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.resblocks = nn.ModuleList(
            ResidualBlock(width, heads, mlp_ratio) for _ in range(layers)
        )
        self.ln_final = nn.LayerNorm(width)
        # Bias-free, like open_clip's text_projection parameter (stored transposed here).
        self.text_projection = nn.Linear(width, embed_dim, bias=False)
        self.grad_checkpointing = False
        # False: every position through the last block, as forward_hidden (for comparisons).
        self.last_block_pooled_only = True
        self.init_parameters()

    def init_parameters(self) -> None:
        """CLIP's initialization: small embeddings, residual projections scaled by depth."""
        width, layers = self.token_embedding.embedding_dim, len(self.resblocks)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        # Each block adds two residual branches; scaling their output projections by
        # (2 * layers) ** -0.5 keeps the residual stream's variance flat with depth.
        proj_std = width**-0.5 * (2 * layers) ** -0.5
        attn_std = width**-0.5
        fc_std = (2 * width) ** -0.5
        for block in self.resblocks:
            nn.init.normal_(block.attn.qkv.weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
            for linear in (block.attn.qkv, block.attn.out_proj, block.mlp.c_fc, block.mlp.c_proj):
                nn.init.zeros_(linear.bias)
        nn.init.normal_(self.text_projection.weight, std=width**-0.5)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in backward instead of storing them."""
        self.grad_checkpointing = enable

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.shape[1] > self.context_length:
            raise ValueError(
                f"got {tokens.shape[1]} tokens per caption, context_length is {self.context_length}"
            )
        return self.token_embedding(tokens) + self.positional_embedding[: tokens.shape[1]]

    def forward_hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids [B, L] -> final-LayerNorm hidden states [B, L, width] (all positions)."""
        x = self._embed(tokens)
        for block in self.resblocks:
            x = maybe_checkpoint(self.grad_checkpointing, block, x)
        return self.ln_final(x)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids [B, L] (pad 0, EOS last non-pad) -> projected EOS features [B, embed_dim].

        Equal to forward_hidden at EOS, but the last block computes the EOS row only."""
        # clamp: an all-pad row (never produced by the tokenizer) pools position 0, not -1.
        eos = ((tokens != 0).sum(-1) - 1).clamp(min=0)
        if not self.last_block_pooled_only or len(self.resblocks) == 0:
            rows = torch.arange(tokens.shape[0], device=tokens.device)
            return self.text_projection(self.forward_hidden(tokens)[rows, eos])
        x = self._embed(tokens)
        *blocks, last = self.resblocks
        for block in blocks:
            x = maybe_checkpoint(self.grad_checkpointing, block, x)
        return self.text_projection(
            self.ln_final(maybe_checkpoint(self.grad_checkpointing, last.forward_at, x, eos))
        )
