"""The skipped key blocks' share of attention, approximated by one pooled key and value per block.

Top-k drops ~4/5 of the key blocks; their attention mass is small per block but not zero, and summed it
shifts every output row. ``add_remainder`` restores it coarsely: each key block J a query block skipped enters
that query's softmax as one key, J's mean key with ``log |J|`` added to its logit (|J| tokens, each counted as
the mean one), with J's mean value. The kept blocks' exact attention and this coarse part are merged by their
log-sum-exps, so the result is one softmax over [kept tokens, pooled skipped blocks]. Exact where a block's
keys and values are all alike; never changes a query block that skips nothing (dense rows).

Cost: S x n_blocks x D per head (1/block of dense attention) plus one read of K and V to pool them, every
sparse call (K and V change every step even where the mask is reused). On CUDA two Triton kernels: one pools
K and V, one (a program per (batch x head, 64 rows of a query block)) streams the pooled keys of the blocks it
skipped and writes the merged rows, in place or straight to their tokens' positions in the model's order (so the
op's output needs no separate reorder); elsewhere torch.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from .layout import pool_blocks
from .scores import triton_fits


def pooled_kv(k: Tensor, v: Tensor, block: int, seq_len: int):
    """Mean key and value of every block ([B, H, nk, D], ``k``'s dtype) and log token count per block [nk]."""
    kp, vp = (pool_blocks(t[:, :, :seq_len], block).to(t.dtype) for t in (k, v))
    n_k = kp.shape[2]
    counts = torch.full((n_k,), float(block), device=k.device)
    counts[-1] = seq_len - (n_k - 1) * block
    return kp, vp, counts.log()


def add_remainder(out: Tensor, lse: Tensor, q: Tensor, k: Tensor, v: Tensor, keep: Tensor, scale: float,
                  block: int, seq_len: int, into: Optional[Tensor] = None, rows: Optional[Tensor] = None) -> Tensor:
    """Merge the skipped blocks (pooled) into ``out`` [B, H, >= seq_len, D], the attention over the kept blocks
    whose log-sum-exp per row is ``lse`` [B, H, >= seq_len]; q/k/v [B, H, S_pad, D] in tile order. Returns the
    merged rows in tile order (rows past ``seq_len`` undefined), or, given ``into`` ([B, H, seq_len, D], any
    strides) and ``rows`` (tile row i is token ``rows[i]``), writes row i to ``into[:, :, rows[i]]`` and returns
    ``into`` (on CUDA in the same pass: no separate reorder of the output)."""
    if out.is_cuda and _triton_fits(q, k, v, block):
        return _remainder_triton(out, lse, q, k, v, keep, scale, block, seq_len, into, rows)
    merged = _remainder_torch(out, lse, q, *pooled_kv(k, v, block, seq_len), keep, scale, block, seq_len)
    return merged if into is None else into.index_copy_(2, rows[:seq_len], merged[:, :, :seq_len])


def _remainder_torch(out, lse, q, kp, vp, log_counts, keep, scale, block, seq_len):
    logits = (q[:, :, :seq_len] @ kp.transpose(-1, -2)).float() * scale + log_counts  # [B, H, S, nk]
    skipped = (~keep).repeat_interleave(block, -2)[..., :seq_len, :]
    logits = logits.masked_fill(~skipped, float("-inf"))
    lse_c = logits.logsumexp(-1)
    lse_c_safe = lse_c.masked_fill(lse_c.isinf(), 0.0)  # rows that skip nothing: weights exp(-inf) = 0, no NaN
    out_c = torch.exp(logits - lse_c_safe.unsqueeze(-1)) @ vp.float()
    lse_f = lse[:, :, :seq_len].float()
    top = torch.maximum(lse_f, lse_c)
    w_f, w_c = torch.exp(lse_f - top).unsqueeze(-1), torch.exp(lse_c - top).unsqueeze(-1)
    merged = (out[:, :, :seq_len].float() * w_f + out_c * w_c) / (w_f + w_c)
    return merged.to(out.dtype)


ROWS, POOLED, WARPS, STAGES = 64, 32, 4, 3  # query rows and pooled keys per tile, launch: fastest on an H100


def _triton_fits(q: Tensor, k: Tensor, v: Tensor, block: int) -> bool:
    return k.stride() == v.stride() and k.stride(-1) == 1 and triton_fits(q, block)  # one pooling pass reads both


@functools.lru_cache(None)
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def pool_kv(k_ptr, v_ptr, kp_ptr, vp_ptr, seq, n_k, block, heads, kb, kh, ks, pb, ph, ps,
                D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr):
        # program (b * heads + h, key block j): the mean key and value of block j (k and v share strides)
        bh, j = tl.program_id(0), tl.program_id(1)
        b, h = (bh // heads).to(tl.int64), (bh % heads).to(tl.int64)
        t = j * block + tl.arange(0, BLOCK_K)
        d = tl.arange(0, BLOCK_D)
        valid = ((tl.arange(0, BLOCK_K) < block) & (t < seq))[:, None] & (d < D)[None, :]
        offsets = b * kb + h * kh + t[:, None].to(tl.int64) * ks + d[None, :]
        count = tl.minimum(block, seq - j * block).to(tl.float32)
        k_mean = tl.sum(tl.load(k_ptr + offsets, mask=valid, other=0.0).to(tl.float32), 0) / count
        v_mean = tl.sum(tl.load(v_ptr + offsets, mask=valid, other=0.0).to(tl.float32), 0) / count
        pooled = b * pb + h * ph + j * ps + d
        tl.store(kp_ptr + pooled, k_mean.to(kp_ptr.dtype.element_ty), mask=d < D)
        tl.store(vp_ptr + pooled, v_mean.to(vp_ptr.dtype.element_ty), mask=d < D)

    @triton.jit
    def pooled_remainder(q_ptr, kp_ptr, vp_ptr, keep_ptr, o_ptr, lse_ptr, dst_ptr, dst_rows_ptr, seq, n_k, block,
                         scale, heads, qb, qh, qs, pb, ph, ps, kb, kh, kq, ob, oh, os, lb, lh, ls, db, dh, ds,
                         D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         SCATTER: tl.constexpr):
        # program (b * heads + h, query block i, BLOCK_M rows of it): online softmax over the pooled keys of the
        # blocks i skipped, then merged with the kept blocks' rows (out, lse); written in place or, SCATTER, to
        # the rows' model positions
        bh, i, part = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        b, h = (bh // heads).to(tl.int64), (bh % heads).to(tl.int64)
        in_block = part * BLOCK_M + tl.arange(0, BLOCK_M)
        rows = i * block + in_block
        in_rows = (in_block < block) & (rows < seq)
        d = tl.arange(0, BLOCK_D)
        in_d = d < D
        q = tl.load(q_ptr + b * qb + h * qh + rows[:, None].to(tl.int64) * qs + d[None, :],
                    mask=in_rows[:, None] & in_d[None, :], other=0.0)
        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        total = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for start in range(0, n_k, BLOCK_N):
            j = start + tl.arange(0, BLOCK_N)
            in_k = j < n_k
            skipped = tl.load(keep_ptr + b * kb + h * kh + i * kq + j, mask=in_k, other=1) == 0
            offsets = b * pb + h * ph + j[:, None] * ps + d[None, :]
            kp = tl.load(kp_ptr + offsets, mask=in_k[:, None] & in_d[None, :], other=0.0)
            vp = tl.load(vp_ptr + offsets, mask=in_k[:, None] & in_d[None, :], other=0.0)
            log_count = tl.log(tl.maximum(tl.minimum(block, seq - j * block), 1).to(tl.float32))  # the short last block
            logits = tl.dot(q, tl.trans(kp)) * scale + log_count[None, :]
            logits = tl.where(skipped[None, :], logits, float("-inf"))
            m_new = tl.maximum(m, tl.max(logits, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing skipped yet: keep zeros, no NaN
            alpha = tl.exp(m - m_safe)
            p = tl.exp(logits - m_safe[:, None])
            total = total * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(vp.dtype), vp)
            m = m_new
        lse_f = tl.load(lse_ptr + b * lb + h * lh + rows * ls, mask=in_rows, other=0.0)
        o_offsets = b * ob + h * oh + rows[:, None].to(tl.int64) * os + d[None, :]
        o_f = tl.load(o_ptr + o_offsets, mask=in_rows[:, None] & in_d[None, :], other=0.0).to(tl.float32)
        some = total > 0
        lse_c = tl.where(some, m + tl.log(tl.where(some, total, 1.0)), float("-inf"))
        top = tl.maximum(lse_f, lse_c)
        w_f = tl.exp(lse_f - top)
        w_c = tl.where(some, tl.exp(lse_c - top), 0.0)
        coarse = acc / tl.where(some, total, 1.0)[:, None]
        merged = (o_f * w_f[:, None] + coarse * w_c[:, None]) / (w_f + w_c)[:, None]
        if SCATTER:
            dst = tl.load(dst_rows_ptr + rows, mask=in_rows, other=0).to(tl.int64)
            tl.store(dst_ptr + b * db + h * dh + dst[:, None] * ds + d[None, :], merged.to(dst_ptr.dtype.element_ty),
                     mask=in_rows[:, None] & in_d[None, :])
        else:
            tl.store(o_ptr + o_offsets, merged.to(o_ptr.dtype.element_ty), mask=in_rows[:, None] & in_d[None, :])

    return triton, pool_kv, pooled_remainder


def _remainder_triton(out, lse, q, k, v, keep, scale, block, seq_len, into, rows):
    triton, pool_kv, remainder = _kernel()
    b, h, _, d = q.shape
    n_q, n_k = keep.shape[2], keep.shape[3]
    kp, vp = (torch.empty(b, h, n_k, d, device=q.device, dtype=k.dtype) for _ in range(2))
    constants = dict(D=d, BLOCK_D=triton.next_power_of_2(d))
    pool_kv[(b * h, n_k)](k, v, kp, vp, seq_len, n_k, block, h, *k.stride()[:3], *kp.stride()[:3],
                          BLOCK_K=triton.next_power_of_2(block), **constants)
    keep = keep.contiguous().view(torch.uint8)
    block_m = min(ROWS, triton.next_power_of_2(block))
    dst = out if into is None else into
    dst_rows = rows if into is not None else keep  # read only with SCATTER
    remainder[(b * h, n_q, triton.cdiv(block, block_m))](
        q, kp, vp, keep, out, lse, dst, dst_rows, seq_len, n_k, block, scale, h,
        *q.stride()[:3], *kp.stride()[:3], *keep.stride()[:3], *out.stride()[:3], *lse.stride()[:3], *dst.stride()[:3],
        BLOCK_M=block_m, BLOCK_N=POOLED, num_warps=WARPS, num_stages=STAGES, SCATTER=into is not None, **constants)
    return dst
