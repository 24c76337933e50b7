"""``torch.ops.mindiesd_compile.sparse_attention``: block-sparse self-attention over video tokens.

Its implementation is host code that consults the per-model runtime (``sparse/runtime.py``), so it
stays an opaque op for every lowering (Inductor calls it as an extern kernel) and is never decomposed.
"""
import torch

from ..sparse.runtime import sparse_attention, sparse_attention_fake

_lib = torch.library.Library("mindiesd_compile", "FRAGMENT")
_lib.define("sparse_attention(Tensor q, Tensor k, Tensor v, float scale, str layout, int[] grid, int[] text, "
            "int[] tile, int block, float sparsity, int start_step, int mask_refresh, bool remainder=False) -> Tensor")
_lib.impl("sparse_attention", sparse_attention, "CompositeExplicitAutograd")
torch.library.register_fake("mindiesd_compile::sparse_attention", sparse_attention_fake, lib=_lib)
