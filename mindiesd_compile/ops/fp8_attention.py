"""Opt-in FP8 attention (``options["fp8"] = {"attention": True}``; never on by default).

q, k and v are scaled per (batch, head) into float8_e4m3fn and run by FlashAttention-3's FP8 kernel on
Hopper, which takes the scales back as "descales" and writes bf16. MindIE SD ships FP8 attention on Ascend;
this is the same trade on CUDA: measured speedup and output deviation stand side by side in bench/RESULTS.md.

``attention_fp8_ref`` fixes the numerics the op is held to: the inputs rounded to e4m3 with those scales,
then ordinary attention. It is the CPU kernel (so the deviation FP8 costs can be studied on any machine,
e.g. on the testbed) and the fake kernel. Where the FP8 kernel does not apply (no FA3, not Hopper, a mask,
FA3 failing) the CUDA op runs ordinary bf16 attention and ``CHOICES`` says why: more accurate, not faster.
"""
from __future__ import annotations

import functools
import warnings

import torch

from . import attention_kernels as kernels

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0


def quantize_per_head(t: torch.Tensor):
    """(e4m3 copy of ``t`` [B, S, H, D], [B, H] fp32 scales): each head's largest |value| maps to e4m3's largest."""
    amax = torch.linalg.vector_norm(t, float("inf"), dim=(1, 3), dtype=torch.float32)
    scale = (amax / E4M3_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    return (t.float() / scale[:, None, :, None]).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


def to_bshd(t: torch.Tensor, layout: str) -> torch.Tensor:
    return t if layout == "BSHD" else t.transpose(1, 2)


def attention_fp8_ref(q, k, v, mask, scale: float, layout: str):
    from . import attention_ref
    rounded = []
    for t in (q, k, v):
        t8, s = quantize_per_head(to_bshd(t, layout))
        rounded.append(to_bshd((t8.float() * s[:, None, :, None]).to(t.dtype), layout))
    return attention_ref(*rounded, mask, scale, layout)


@functools.lru_cache(None)
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def head_amax(x_ptr, amax_ptr, seq, heads, TOKENS: tl.constexpr, HP: tl.constexpr, D: tl.constexpr):
        # a block of TOKENS tokens x all heads of one batch row of a contiguous [B, S, H, D]; per head the
        # largest |value| of the block, merged into amax[batch, head] (values >= 0: float max = int max)
        b, blk = tl.program_id(0), tl.program_id(1)
        t = blk * TOKENS + tl.arange(0, TOKENS)[:, None, None]
        h = tl.arange(0, HP)[None, :, None]
        d = tl.arange(0, D)[None, None, :]
        x = tl.load(x_ptr + ((b * seq + t) * heads + h) * D + d, mask=(t < seq) & (h < heads), other=0.0)
        m = tl.max(tl.max(tl.abs(x.to(tl.float32)), axis=2), axis=0)
        hv = tl.arange(0, HP)
        tl.atomic_max(amax_ptr + b * heads + hv, m, mask=hv < heads)

    @triton.jit
    def quantize(x_ptr, inv_ptr, out_ptr, rows, seq_heads, heads, D: tl.constexpr, ROWS: tl.constexpr):
        # row r = (batch * S + token) * H + head; its scale: inv[batch * H + head]
        r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)[:, None]
        d = tl.arange(0, D)[None, :]
        inv = tl.load(inv_ptr + (r // seq_heads) * heads + r % heads, mask=r < rows, other=0.0)
        x = tl.load(x_ptr + r * D + d, mask=r < rows, other=0.0).to(tl.float32)
        y = tl.minimum(tl.maximum(x * inv, -448.0), 448.0)
        tl.store(out_ptr + r * D + d, y.to(tl.float8e4nv), mask=r < rows)
    return head_amax, quantize


def quantize_cuda(t: torch.Tensor):
    """(e4m3 copy of ``t`` [B, S, H, D], its [B, H] scales): two passes, one read each, one e4m3 write.
    (A torch reduction over dims (1, 3) ran at ~400 GB/s here: 14 ms of a Wan2.1-1.3B forward on an H100.)"""
    b, s, h, d = t.shape
    if d & (d - 1):  # the kernels tile the head dim whole: powers of two only
        return quantize_per_head(t)
    head_amax, quantize = _kernels()
    t = t.contiguous()
    hp = 1 << (h - 1).bit_length()
    tokens = max(1, 8192 // (hp * d))
    amax = torch.zeros(b, h, dtype=torch.float32, device=t.device)
    head_amax[(b, -(-s // tokens))](t, amax, s, h, TOKENS=tokens, HP=hp, D=d)
    scale = (amax / E4M3_MAX).clamp_min_(torch.finfo(torch.float32).tiny)
    out = torch.empty(t.shape, dtype=E4M3, device=t.device)
    rows, block_rows = b * s * h, 16
    quantize[(-(-rows // block_rows),)](t, 1.0 / scale, out, rows, s * h, h, D=d, ROWS=block_rows)
    return out, scale


def attention_fp8_cuda(q, k, v, mask, scale, layout):
    card = kernels.capability(q.device)[1]
    key = (card, q.shape[-1], E4M3)
    why = kernels.why_not_fa3(q, k, v, mask, kernels.capability(q.device)[0])
    if why is None:
        try:
            (q8, qs), (k8, ks), (v8, vs) = (quantize_cuda(to_bshd(t, layout)) for t in (q, k, v))
            out = kernels.flash_attn_3().func(q8, k8, v8, softmax_scale=scale,
                                              q_descale=qs, k_descale=ks, v_descale=vs)
            out = out[0] if isinstance(out, tuple) else out
            kernels.CHOICES[key] = "fa3-fp8"
            return to_bshd(out.to(q.dtype), layout)
        except Exception as err:  # noqa: BLE001 - an optional kernel must never cost a result
            why = f"FA3 FP8 failed ({type(err).__name__}: {err})"
            if not kernels.CHOICES.get(key, "").startswith("bf16"):
                warnings.warn(f"mindiesd_compile: {why}; attention runs in bf16", RuntimeWarning, stacklevel=2)
    kernels.CHOICES[key] = f"bf16: {why}"
    from . import attention_ref
    return kernels.attention_cuda(q, k, v, mask, scale, layout, attention_ref)


def _attention_fp8_fake(q, k, v, mask, scale, layout):
    from . import attention_ref
    return attention_ref(q, k, v, mask, scale, layout)  # same shape, dtype and strides; no rounding needed


_lib = torch.library.Library("mindiesd_compile", "FRAGMENT")
_lib.define("attention_fp8(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale, str layout) -> Tensor")
_lib.impl("attention_fp8", attention_fp8_ref, "CompositeExplicitAutograd")
_lib.impl("attention_fp8", attention_fp8_cuda, "CUDA")
torch.library.register_fake("mindiesd_compile::attention_fp8", _attention_fp8_fake, lib=_lib)
