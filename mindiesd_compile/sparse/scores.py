"""Block scores: how much attention each query block would pay each key block, the ranking top-k selects by.

``block_scores(q, k, block, scale)`` -> [B, H, nq, nk]: query block I's mean query against every key token,
then the log-sum-exp over the tokens of key block J = log of the (unnormalised) attention mass the mean
query puts on J. Pooling the keys as well (q_mean . k_mean, the first version) averages a block's keys before
the exponential, so a block holding a few strongly matching keys among many others ranks low; on the testbed
at 128 blocks and sparsity 0.8 that cost 2 of 48 videos their task (95.8 %), these scores none (100 %, as
selecting by the exact block masses; 96.9 % on 96 videos; bench/RESULTS.md).

Cost: nq x S x D multiply-adds per head, 1/block of the attention's. On CUDA one Triton kernel (a program per
(batch x head, key block) scores its keys against all pooled queries; no [nq, S] logits in memory); elsewhere
torch, a few heads at a time.
"""
from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from .layout import pool_blocks

_LOGITS_PER_CHUNK = 1 << 26  # fp32 logits held at once by the torch path (256 MiB)


def block_scores(q: Tensor, k: Tensor, block: int, scale: float) -> Tensor:
    """[B, H, S, D] queries and keys in tile order -> [B, H, nq, nk] fp32 log block masses (the last block may
    be short)."""
    q_mean = pool_blocks(q, block)
    if k.is_cuda and triton_fits(k, block):
        return _scores_triton(q_mean.to(k.dtype), k, block, scale)
    return _scores_torch(q_mean, k, block, scale)


def _scores_torch(q_mean: Tensor, k: Tensor, block: int, scale: float) -> Tensor:
    s = k.shape[2]
    full = s // block * block
    heads = max(1, _LOGITS_PER_CHUNK // (q_mean.shape[2] * s * k.shape[0]))
    out = []
    for qc, kc in zip(q_mean.split(heads, 1), k.split(heads, 1)):
        logits = (qc.to(kc.dtype) @ kc.transpose(-1, -2)).float() * scale  # [B, h, nq, S]
        parts = [logits[..., :full].unflatten(-1, (full // block, block)).logsumexp(-1)]
        if full < s:
            parts.append(logits[..., full:].logsumexp(-1, keepdim=True))
        out.append(torch.cat(parts, -1))
    return torch.cat(out, 1)


def triton_fits(k: Tensor, block: int) -> bool:
    """Blocks and head dims the Triton kernels of the sparse op take (here and in remainder.py)."""
    from torch.utils._triton import has_triton  # cached: no import attempt per call
    return 16 <= block <= 256 and 16 <= k.shape[-1] <= 256 and k.stride(-1) == 1 and has_triton()


@functools.lru_cache(None)
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def key_block_lse(q_ptr, k_ptr, out_ptr, seq, n_q, n_k, block, scale, heads, qb, qh, qs, kb, kh, ks,
                      D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, TILE_Q: tl.constexpr):
        # program (b * heads + h, key block j): its keys stay in registers while the pooled queries stream by
        bh, j = tl.program_id(0), tl.program_id(1)
        b, h = (bh // heads).to(tl.int64), (bh % heads).to(tl.int64)
        t = j * block + tl.arange(0, BLOCK_K)
        valid = (tl.arange(0, BLOCK_K) < block) & (t < seq)
        d = tl.arange(0, BLOCK_D)
        keys = tl.load(k_ptr + b * kb + h * kh + t[:, None].to(tl.int64) * ks + d[None, :],
                       mask=valid[:, None] & (d[None, :] < D), other=0.0)
        for start in range(0, n_q, TILE_Q):
            i = start + tl.arange(0, TILE_Q)
            queries = tl.load(q_ptr + b * qb + h * qh + i[:, None] * qs + d[None, :],
                              mask=(i[:, None] < n_q) & (d[None, :] < D), other=0.0)
            logits = tl.dot(queries, tl.trans(keys)) * scale
            logits = tl.where(valid[None, :], logits, float("-inf"))
            top = tl.max(logits, 1)
            lse = top + tl.log(tl.sum(tl.exp(logits - top[:, None]), 1))
            tl.store(out_ptr + (bh * n_q + i) * n_k + j, lse, mask=i < n_q)

    return triton, key_block_lse


def _scores_triton(q_mean: Tensor, k: Tensor, block: int, scale: float) -> Tensor:
    triton, kernel = _kernel()
    b, h, s, d = k.shape
    n_q, n_k = q_mean.shape[2], math.ceil(s / block)
    out = torch.empty(b, h, n_q, n_k, device=k.device, dtype=torch.float32)
    kernel[(b * h, n_k)](q_mean, k, out, s, n_q, n_k, block, scale, h,
                         q_mean.stride(0), q_mean.stride(1), q_mean.stride(2), k.stride(0), k.stride(1), k.stride(2),
                         D=d, BLOCK_D=triton.next_power_of_2(d), BLOCK_K=triton.next_power_of_2(block), TILE_Q=64,
                         num_warps=4)
    return out
