"""The block-sparse op's token reorder: q/k/v into tile order as [B, H, S_pad, D], the output back.

``gather_tokens(x, index, out)`` writes ``out[b, h, s] = x[b, h, index[s]]`` (rows of D values) for
[B, H, S, D] views of any strides whose last dim is contiguous, in one pass. On CUDA it is a Triton kernel:
ATen's ``index_select`` on such a strided view (the model's [B, S, H, D] memory seen as [B, H, S, D]) falls
back to an element-wise gather, 21.9 ms of a sparse Wan2.1-1.3B forward on an H100 (bench/RESULTS.md).
Elsewhere, and for the oracle, ``index_select`` then a copy.
"""
from __future__ import annotations

import functools
from typing import Optional

from torch import Tensor


@functools.lru_cache(None)
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def gather_tokens(x_ptr, index_ptr, out_ptr, seq_out, heads, xb, xh, xs, ob, oh, os,
                      D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
        # program (b * heads + h, token block): BLOCK_S rows of one head; neighbouring programs read the
        # neighbouring heads of the same tokens
        bh = tl.program_id(0)
        b, h = (bh // heads).to(tl.int64), (bh % heads).to(tl.int64)
        s = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
        in_seq = s < seq_out
        src = tl.load(index_ptr + s, mask=in_seq, other=0).to(tl.int64)
        d = tl.arange(0, BLOCK_D)[None, :]
        mask = in_seq[:, None] & (d < D)
        rows = tl.load(x_ptr + b * xb + h * xh + src[:, None] * xs + d, mask=mask)
        tl.store(out_ptr + b * ob + h * oh + s[:, None].to(tl.int64) * os + d, rows, mask=mask)

    return triton, gather_tokens


def gather_tokens(x: Tensor, index: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """``out[:, :, s] = x[:, :, index[s]]`` for [B, H, S, D] views; ``out`` (new and contiguous if not given)."""
    b, h, _, d = x.shape
    if out is None:
        out = x.new_empty(b, h, index.numel(), d)
    if not (x.is_cuda and x.stride(-1) == 1 and out.stride(-1) == 1):
        return out.copy_(x.index_select(2, index))
    triton, kernel = _kernel()
    block_s = 32
    grid = (b * h, triton.cdiv(index.numel(), block_s))
    kernel[grid](x, index, out, index.numel(), h, x.stride(0), x.stride(1), x.stride(2),
                 out.stride(0), out.stride(1), out.stride(2),
                 D=d, BLOCK_D=triton.next_power_of_2(d), BLOCK_S=block_s, num_warps=4)
    return out
