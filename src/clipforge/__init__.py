"""clipforge: pretrain CLIP-style models at scale."""

__version__ = "0.1.0"
