"""``rms_norm_rope``: an RMSNorm over all heads followed by interleaved RoPE per head, in one pass (CUDA).

Wan, Flux and friends normalise q and k across every head (``[B, S, H*D]``), split the heads and rotate each
pair. Inductor fuses the chain but reduces the 1536-5120-wide row in a loop and loads each rotation partner
separately: 10.8 ms of a Wan2.1-1.3B forward and 39-41 ms of a 14B forward on an H100 (bench/RESULTS.md),
about 2x what reading and writing q and k once costs. The Triton kernel reads a token's row in chunks of
<= 2048 values, twice (the second time from cache; a 40-head row held whole in registers ran at ~0.8 TB/s),
and writes it once. The reference is the two ops' references composed (CPU kernel, fake kernel, oracle); the
kernel computes the rotation in fp32 and rounds once, so bf16 results agree to bf16 rounding.
"""
from __future__ import annotations

import functools

import torch


def rms_norm_rope_ref(x, weight, eps: float, norm_dtype: torch.dtype, heads: int, cos, sin, interleaved: bool,
                      out_dtype: torch.dtype):
    from . import rms_norm_ref, rope_ref
    y = rms_norm_ref(x, weight, eps, norm_dtype)
    return rope_ref(y.unflatten(-1, (heads, -1)), cos, sin, interleaved).to(out_dtype)


@functools.lru_cache(None)
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def rms_norm_rope(x_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr, seq, eps, heads,
                      cb, cs, ch, cd, sb, ss, sh, sd,
                      C: tl.constexpr, D: tl.constexpr, HC: tl.constexpr, CHUNKS: tl.constexpr,
                      HALF: tl.constexpr, NORM_BF16: tl.constexpr):
        # one token: its C = heads * D values, HC heads ([HC, D], contiguous) at a time; the second pass
        # re-reads the row from cache
        row = tl.program_id(0)
        b, s = row // seq, row % seq
        d = tl.arange(0, D)[None, :]
        total = 0.0
        for chunk in tl.static_range(CHUNKS):
            h = chunk * HC + tl.arange(0, HC)[:, None]
            x = tl.load(x_ptr + row * C + h * D + d, mask=h < heads, other=0.0).to(tl.float32)
            total += tl.sum(tl.sum(x * x, axis=1), axis=0)
        r = tl.rsqrt(total / C + eps)
        dc = d // 2 if HALF else d  # cos/sin per pair or per element
        for chunk in tl.static_range(CHUNKS):
            h = chunk * HC + tl.arange(0, HC)[:, None]
            keep = h < heads
            x = tl.load(x_ptr + row * C + h * D + d, mask=keep, other=0.0).to(tl.float32)
            y = x * r * tl.load(w_ptr + h * D + d, mask=keep, other=0.0).to(tl.float32)
            if NORM_BF16:  # the norm's output dtype, as the unfused chain rounds it
                y = y.to(tl.bfloat16).to(tl.float32)
            ye, yo = tl.split(tl.reshape(y, (HC, D // 2, 2)))  # interleaved pairs
            c = tl.load(cos_ptr + b * cb + s * cs + h * ch + dc * cd, mask=keep, other=0.0).to(tl.float32)
            sn = tl.load(sin_ptr + b * sb + s * ss + h * sh + dc * sd, mask=keep, other=0.0).to(tl.float32)
            ce, co = tl.split(tl.reshape(c, (HC, D // 2, 2)))
            se, so = tl.split(tl.reshape(sn, (HC, D // 2, 2)))
            out = tl.reshape(tl.join(ye * ce - yo * se, yo * co + ye * so), (HC, D))
            tl.store(out_ptr + row * C + h * D + d, out, mask=keep)  # rounded once, to out's dtype
    return rms_norm_rope


def why_not_kernel(x, weight, norm_dtype, heads, cos, sin, interleaved):
    d = x.shape[-1] // heads
    if not interleaved:
        return "rotation by halves"
    if x.dim() != 3 or x.stride(-1) != 1 or not x.is_contiguous():
        return "x is not a contiguous [B, S, C]"
    if weight is None or norm_dtype not in (torch.bfloat16, torch.float32):
        return "no weight, or a norm dtype other than bf16/fp32"
    if d & (d - 1) or d < 2:
        return f"head dim {d} is not a power of two"
    if cos.dim() != 4 or sin.dim() != 4 or cos.shape[-1] not in (d, d // 2) or sin.shape[-1] != cos.shape[-1]:
        return "cos/sin are not [B|1, S|1, H|1, D or D/2]"
    if d > 2048:
        return f"head dim {d} > 2048"
    return None


def rms_norm_rope_cuda(x, weight, eps, norm_dtype, heads, cos, sin, interleaved, out_dtype):
    if why_not_kernel(x, weight, norm_dtype, heads, cos, sin, interleaved) is not None:
        return rms_norm_rope_ref(x, weight, eps, norm_dtype, heads, cos, sin, interleaved, out_dtype)
    b, s, c = x.shape
    d = c // heads
    out = torch.empty(b, s, heads, d, dtype=out_dtype, device=x.device)
    cos_e, sin_e = (t.expand(b, s, heads, t.shape[-1]) for t in (cos, sin))
    hc = min(1 << (heads - 1).bit_length(), max(1, 2048 // d))  # <= 2048 values in flight: no spills
    _kernel()[(b * s,)](x, weight, cos_e, sin_e, out, s, eps, heads, *cos_e.stride(), *sin_e.stride(),
                        C=c, D=d, HC=hc, CHUNKS=-(-heads // hc), HALF=cos.shape[-1] != d,
                        NORM_BF16=norm_dtype == torch.bfloat16, num_warps=4)
    return out


_lib = torch.library.Library("mindiesd_compile", "FRAGMENT")
_lib.define("rms_norm_rope(Tensor x, Tensor? weight, float eps, ScalarType norm_dtype, int heads, Tensor cos, "
            "Tensor sin, bool interleaved, ScalarType out_dtype) -> Tensor")
_lib.impl("rms_norm_rope", rms_norm_rope_ref, "CompositeExplicitAutograd")
_lib.impl("rms_norm_rope", rms_norm_rope_cuda, "CUDA")
torch.library.register_fake("mindiesd_compile::rms_norm_rope", rms_norm_rope_ref, lib=_lib)
