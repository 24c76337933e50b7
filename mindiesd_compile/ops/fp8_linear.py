"""Opt-in FP8 linear layers (``options["fp8"] = {"linear": True}``; never on by default): W8A8 through
``torch._scaled_mm`` (cuBLASLt, e4m3 x e4m3, fp32 accumulation, both scales and the bias in its epilogue,
bf16 out). MindIE SD ships W8A8 on Ascend; this is the same trade on CUDA, measured in bench/RESULTS.md.

The activations are rounded per row (token) by ``quantize_rows`` (one Triton pass on CUDA), once per distinct
input (q, k and v share theirs); the weights are rounded once per output channel inside ``scaled_linear`` and kept beside the bf16 weights (cached per weight
tensor and version). The reference (CPU kernel, fake kernel, oracle) is the dequantized product in fp32.
"""
from __future__ import annotations

import functools
import warnings
import weakref
from typing import Dict, Optional, Tuple

import torch

from . import attention_kernels as kernels
from .fp8_attention import E4M3, E4M3_MAX

CHOICES: Dict[str, str] = {}  # card -> what ran ("scaled_mm", or why not)


def quantize_rows(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 copy of 2-D ``x``, [M, 1] fp32 scales): each row's largest |value| maps to e4m3's largest."""
    xf = x.float()
    scale = (xf.abs().amax(dim=-1, keepdim=True) / E4M3_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    return (xf / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


@functools.lru_cache(None)
def _row_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def quantize_rows_kernel(x_ptr, out_ptr, scale_ptr, cols, stride, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        c = tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * stride + c, mask=c < cols, other=0.0).to(tl.float32)
        scale = tl.maximum(tl.max(tl.abs(x), axis=0) / 448.0, 1.1754943508222875e-38)
        y = tl.minimum(tl.maximum(x / scale, -448.0), 448.0)
        tl.store(out_ptr + row * cols + c, y.to(tl.float8e4nv), mask=c < cols)
        tl.store(scale_ptr + row, scale)
    return quantize_rows_kernel


def quantize_rows_cuda(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """One read of ``x`` with each row held whole in registers, one e4m3 write (rows up to 16384 values)."""
    rows, cols = x.shape
    block = 1 << (cols - 1).bit_length()
    if block > 16384:
        return quantize_rows(x)
    x = x if x.stride(-1) == 1 else x.contiguous()
    out = torch.empty(rows, cols, dtype=E4M3, device=x.device)
    scale = torch.empty(rows, 1, dtype=torch.float32, device=x.device)
    _row_kernel()[(rows,)](x, out, scale, cols, x.stride(0), BLOCK=block, num_warps=min(16, max(4, block // 1024)))
    return out, scale


def scaled_linear_ref(x8: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                      out_dtype: torch.dtype) -> torch.Tensor:
    w8, ws = quantize_rows(weight)
    out = (x8.float() * x_scale) @ (w8.float() * ws).t()
    return (out if bias is None else out + bias.float()).to(out_dtype)


_WEIGHTS: Dict[int, tuple] = {}  # id(weight) -> (weakref, version, e4m3 weight [N, K], scales [1, N])


def weight_fp8(weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The weight's e4m3 copy and per-output-channel scales, rounded once per weight and version."""
    entry = _WEIGHTS.get(id(weight))
    if entry is None or entry[0]() is not weight or entry[1] != weight._version:
        w8, ws = quantize_rows(weight.detach())
        entry = (weakref.ref(weight, lambda _, key=id(weight): _WEIGHTS.pop(key, None)), weight._version,
                 w8, ws.view(1, -1))
        _WEIGHTS[id(weight)] = entry
    return entry[2], entry[3]


def scaled_linear_cuda(x8, x_scale, weight, bias, out_dtype):
    card = kernels.capability(x8.device)[1]  # cached: this runs for every linear layer of every step
    try:
        w8, ws = weight_fp8(weight)
        out = torch._scaled_mm(x8 if x8.stride(-1) == 1 else x8.contiguous(), w8.t(), scale_a=x_scale.contiguous(),
                               scale_b=ws, bias=bias, out_dtype=out_dtype, use_fast_accum=True)
        CHOICES[card] = "scaled_mm"
        return out
    except Exception as err:  # noqa: BLE001 - an optional kernel must never cost a result
        if CHOICES.get(card) != "reference":
            warnings.warn(f"mindiesd_compile: FP8 GEMM failed ({type(err).__name__}: {err}); the linear layer "
                          "runs dequantized", RuntimeWarning, stacklevel=2)
        CHOICES[card] = "reference"
        return scaled_linear_ref(x8, x_scale, weight, bias, out_dtype)


_lib = torch.library.Library("mindiesd_compile", "FRAGMENT")
_lib.define("quantize_rows(Tensor x) -> (Tensor, Tensor)")
_lib.impl("quantize_rows", quantize_rows, "CompositeExplicitAutograd")
_lib.impl("quantize_rows", quantize_rows_cuda, "CUDA")
torch.library.register_fake("mindiesd_compile::quantize_rows", lambda x: (
    x.new_empty(x.shape, dtype=E4M3), x.new_empty(x.shape[0], 1, dtype=torch.float32)), lib=_lib)
_lib.define("scaled_linear(Tensor x8, Tensor x_scale, Tensor weight, Tensor? bias, ScalarType out_dtype) -> Tensor")
_lib.impl("scaled_linear", scaled_linear_ref, "CompositeExplicitAutograd")
_lib.impl("scaled_linear", scaled_linear_cuda, "CUDA")
torch.library.register_fake(
    "mindiesd_compile::scaled_linear",
    lambda x8, x_scale, weight, bias, out_dtype: x8.new_empty(x8.shape[0], weight.shape[0], dtype=out_dtype), lib=_lib)
