"""Opt-in FP8 linear layers (``options["fp8"] = {"linear": True}``; never on by default): W8A8 through
``torch._scaled_mm`` (cuBLASLt, e4m3 x e4m3, fp32 accumulation, both scales and the bias in its epilogue,
bf16 out). MindIE SD ships W8A8 on Ascend; this is the same trade on CUDA, measured in bench/RESULTS.md.

The activations are rounded per row (token) by plain ATen ops that the pass puts in the graph
(``quantize_rows``), so Inductor fuses the rounding into the kernel that produces the activation (the adaLN
before q/k/v, the GELU before the FFN's down projection) and q, k and v share one rounding. The weights are
rounded once per output channel inside ``scaled_linear`` and kept beside the bf16 weights (cached per weight
tensor and version). The reference (CPU kernel, fake kernel, oracle) is the dequantized product in fp32.
"""
from __future__ import annotations

import warnings
import weakref
from typing import Dict, Optional, Tuple

import torch

from .fp8_attention import E4M3, E4M3_MAX

CHOICES: Dict[str, str] = {}  # card -> what ran ("scaled_mm", or why not)


def quantize_rows(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 copy of 2-D ``x``, [M, 1] fp32 scales): each row's largest |value| maps to e4m3's largest."""
    xf = x.float()
    scale = (xf.abs().amax(dim=-1, keepdim=True) / E4M3_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    return (xf / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


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
    card = torch.cuda.get_device_name(x8.device)
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
_lib.define("scaled_linear(Tensor x8, Tensor x_scale, Tensor weight, Tensor? bias, ScalarType out_dtype) -> Tensor")
_lib.impl("scaled_linear", scaled_linear_ref, "CompositeExplicitAutograd")
_lib.impl("scaled_linear", scaled_linear_cuda, "CUDA")
torch.library.register_fake(
    "mindiesd_compile::scaled_linear",
    lambda x8, x_scale, weight, bias, out_dtype: x8.new_empty(x8.shape[0], weight.shape[0], dtype=out_dtype), lib=_lib)
