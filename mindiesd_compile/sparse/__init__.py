"""Block-sparse attention over video tokens: options (``config``), masks (``layout``), kernel and
per-step decisions (``runtime``). The graph rewrite is ``passes/sparse_attention.py``."""
from .config import SparseAttentionConfig

__all__ = ["SparseAttentionConfig"]
