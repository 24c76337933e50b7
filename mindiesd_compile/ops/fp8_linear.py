"""Opt-in FP8 linear layers (``options["fp8"] = {"linear": True}``; never on by default): W8A8 through
``torch._scaled_mm`` (cuBLASLt, e4m3 x e4m3, fp32 accumulation, both scales and the bias in its epilogue,
bf16 out). MindIE SD ships W8A8 on Ascend; this is the same trade on CUDA, measured in bench/RESULTS.md.

Weights are rounded once per output channel and kept beside the bf16 weights (cached per weight tensor and
version); activations are rounded per row (token) on every call in one pass. ``linear_fp8_ref`` fixes the
numerics the op is held to (both operands rounded with those scales, the product in fp32): it is the CPU
kernel and the fake kernel. Where the FP8 GEMM does not apply (before sm89, not bf16, K or N not multiples
of 16) the CUDA op runs the bf16 linear.
"""
from __future__ import annotations

import functools
import weakref
from typing import Dict, Optional, Tuple

import torch

from . import attention_kernels as kernels
from .fp8_attention import E4M3, E4M3_MAX, triton_cdiv

CHOICES: Dict[Tuple[str, torch.dtype], str] = {}  # (card, dtype) -> what ran and why


def quantize_rows_torch(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 copy of 2-D ``x``, [M, 1] fp32 scales): each row's largest |value| maps to e4m3's largest."""
    xf = x.float()
    scale = (xf.abs().amax(dim=-1, keepdim=True) / E4M3_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    return (xf / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


def linear_fp8_ref(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    (x8, xs), (w8, ws) = quantize_rows_torch(x), quantize_rows_torch(weight)
    out = (x8.float() * xs) @ (w8.float() * ws).t()
    return (out if bias is None else out + bias.float()).to(x.dtype)


@functools.lru_cache(None)
def _row_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def quantize_rows(x_ptr, out_ptr, scale_ptr, cols, stride, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        c = tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * stride + c, mask=c < cols, other=0.0).to(tl.float32)
        scale = tl.maximum(tl.max(tl.abs(x), axis=0) / 448.0, 1.1754943508222875e-38)
        y = tl.minimum(tl.maximum(x / scale, -448.0), 448.0)
        tl.store(out_ptr + row * cols + c, y.to(tl.float8e4nv), mask=c < cols)
        tl.store(scale_ptr + row, scale)
    return quantize_rows


def quantize_rows_cuda(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """One read of ``x`` (a row held whole in registers), one e4m3 write; torch's form when rows are long."""
    rows, cols = x.shape
    block = 1 << (cols - 1).bit_length()
    if block > 16384:
        return quantize_rows_torch(x)
    x = x if x.stride(-1) == 1 else x.contiguous()
    out = torch.empty(rows, cols, dtype=E4M3, device=x.device)
    scale = torch.empty(rows, 1, dtype=torch.float32, device=x.device)
    _row_kernel()[(rows,)](x, out, scale, cols, x.stride(0), BLOCK=block, num_warps=min(16, max(4, block // 1024)))
    return out, scale


_WEIGHTS: Dict[int, tuple] = {}  # id(weight) -> (weakref, version, e4m3 weight [N, K], scales [1, N])


def weight_fp8(weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The weight's e4m3 copy and per-output-channel scales, rounded once per weight and version."""
    entry = _WEIGHTS.get(id(weight))
    if entry is None or entry[0]() is not weight or entry[1] != weight._version:
        w8, ws = quantize_rows_cuda(weight.detach())
        entry = (weakref.ref(weight, lambda _, key=id(weight): _WEIGHTS.pop(key, None)), weight._version,
                 w8, ws.view(1, -1))
        _WEIGHTS[id(weight)] = entry
    return entry[2], entry[3]


def why_not_fp8_gemm(x, weight) -> Optional[str]:
    (major, minor), _ = kernels.capability(x.device)
    if (major, minor) < (8, 9):
        return f"sm{major}{minor} has no FP8 tensor cores"
    if x.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16:
        return f"{x.dtype} x {weight.dtype} (row-wise scaled FP8 GEMMs write bf16)"
    if x.shape[1] % 16 or weight.shape[0] % 16:
        return f"K={x.shape[1]}, N={weight.shape[0]} not multiples of 16"
    return None


def linear_fp8_cuda(x, weight, bias):
    key = (kernels.capability(x.device)[1], x.dtype)
    why = why_not_fp8_gemm(x, weight)
    if why is None:
        w8, ws = weight_fp8(weight)
        x8, xs = quantize_rows_cuda(x)
        CHOICES[key] = "scaled_mm"
        return torch._scaled_mm(x8, w8.t(), scale_a=xs, scale_b=ws, bias=bias, out_dtype=x.dtype,
                                use_fast_accum=True)
    CHOICES[key] = f"bf16: {why}"
    out = x @ weight.t()
    return out if bias is None else out + bias


_lib = torch.library.Library("mindiesd_compile", "FRAGMENT")
_lib.define("linear_fp8(Tensor x, Tensor weight, Tensor? bias) -> Tensor")
_lib.impl("linear_fp8", linear_fp8_ref, "CompositeExplicitAutograd")
_lib.impl("linear_fp8", linear_fp8_cuda, "CUDA")
torch.library.register_fake("mindiesd_compile::linear_fp8",
                            lambda x, weight, bias: x.new_empty(x.shape[0], weight.shape[0]), lib=_lib)
