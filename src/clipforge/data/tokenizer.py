"""Captions -> fixed-length token ids for the text tower, from a sentencepiece model.

The model comes from ``python -m data_tools.tokenizer --input SHARDS`` (pad 0, unk 1, bos 2,
eos 3). Try it with ``python -m clipforge.data.tokenizer MODEL "a photo of a cat"``.

Layout of every row: ``[SOT] pieces[:context_length - 2] [EOT] 0 0 ...``. The text tower relies
on two facts: pad is 0, and EOT is always the last non-pad token (it pools there), so truncation
cuts pieces, never the EOT.
"""

from __future__ import annotations

import sys
from typing import Any

import fsspec
import sentencepiece as spm
import torch

PAD_ID = 0


class Tokenizer:
    """Picklable (DataLoader workers get a copy): the state is the serialized model proto."""

    def __init__(self, model_path: str, context_length: int = 77) -> None:
        with fsspec.open(model_path, "rb") as f:
            proto = f.read()
        self._load(proto, context_length)

    def _load(self, proto: bytes, context_length: int) -> None:
        if context_length < 2:
            raise ValueError(
                f"context_length must leave room for SOT and EOT, got {context_length}"
            )
        sp = spm.SentencePieceProcessor(model_proto=proto)
        if sp.pad_id() != PAD_ID or sp.bos_id() < 0 or sp.eos_id() < 0:
            raise ValueError(
                f"tokenizer model needs pad_id=0 and bos/eos ids (has pad={sp.pad_id()}, "
                f"bos={sp.bos_id()}, eos={sp.eos_id()}); train it with data_tools.tokenizer"
            )
        self._proto = proto
        self._sp = sp
        self.context_length = context_length
        self.pad_id = PAD_ID
        self.sot_id = sp.bos_id()
        self.eot_id = sp.eos_id()

    @property
    def vocab_size(self) -> int:
        return self._sp.vocab_size()

    def __call__(self, texts: str | list[str]) -> torch.LongTensor:
        """One caption or a list -> LongTensor [B, context_length]."""
        if isinstance(texts, str):
            texts = [texts]
        ids = self._sp.encode(list(texts), out_type=int)
        tokens = torch.full((len(ids), self.context_length), self.pad_id, dtype=torch.long)
        keep = self.context_length - 2
        for row, pieces in enumerate(ids):
            seq = [self.sot_id, *pieces[:keep], self.eot_id]
            tokens[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        return tokens  # type: ignore[return-value]

    def decode(self, tokens: torch.Tensor | list[int]) -> str:
        """Text of one row, special ids dropped (for logs and debugging)."""
        ids = tokens.tolist() if isinstance(tokens, torch.Tensor) else list(tokens)
        special = {self.pad_id, self.sot_id, self.eot_id}
        return self._sp.decode([i for i in ids if i not in special])

    def __getstate__(self) -> dict[str, Any]:
        # Explicit so the state stays one bytes field, whatever sentencepiece version pickles.
        return {"proto": self._proto, "context_length": self.context_length}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._load(state["proto"], state["context_length"])


if __name__ == "__main__":
    tok = Tokenizer(sys.argv[1])
    for text in sys.argv[2:]:
        row = tok(text)[0]
        print(row[: int((row != 0).sum())].tolist(), "->", tok.decode(row))
