"""The mindiesd_compile op set: the target-neutral vocabulary the fusion passes rewrite into.

Each op is a ``torch.library`` custom op under the ``mindiesd_compile`` namespace (Huawei's MindIE SD
registers ``mindiesd``; we never touch it). The reference implementations below are plain torch
code: they are the CPU kernels, the fake (meta) kernels (run on fake tensors they give the exact
output strides), the numerical oracle in tests, and the decompositions handed back to Inductor
where its own fusion beats a hand kernel (see ``lowering/decompose.py``).

Numerics: norms always reduce in fp32 and round once to ``out_dtype``; models that normalise in
bf16 therefore get a slightly *more* accurate result than eager, within bf16 tolerance.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .attention_kernels import attention_cuda, attention_partial_cuda

NAMESPACE = "mindiesd_compile"
LAYOUTS = ("BHSD", "BSHD")


def _norm_fp32(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, kind: str) -> Tensor:
    xf = x.float()
    if kind == "rms":
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    else:
        var, mean = torch.var_mean(xf, dim=-1, correction=0, keepdim=True)
        y = (xf - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.float()
    if bias is not None:
        y = y + bias.float()
    return y


def _rotate(x: Tensor, interleaved: bool) -> Tensor:
    """The 90-degree rotation RoPE pairs with sin: interleaved pairs (x0,x1) -> (-x1,x0), or halves."""
    if interleaved:
        pairs = x.unflatten(-1, (-1, 2))
        return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def _full_width(t: Tensor, width: int, interleaved: bool) -> Tensor:
    """cos/sin may come per element (width D) or per rotated pair (width D/2)."""
    if t.shape[-1] == width or t.shape[-1] == 1:
        return t
    return t.repeat_interleave(2, dim=-1) if interleaved else torch.cat((t, t), dim=-1)


# --- reference implementations (pure torch: CPU kernel, fake kernel, decomposition) ------------

def attention_ref(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], scale: float, layout: str) -> Tensor:
    if mask is not None and mask.is_floating_point() and mask.dtype != q.dtype:
        mask = mask.to(q.dtype)  # fused kernels take an additive mask in the query's dtype only
    if layout == "BSHD":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    if out.dim() != 4:
        return out.contiguous()
    # Memory is [B,S,H,D] in both layouts, as the flash/cuDNN kernels write it: the projection after
    # attention reads it without a copy. Deterministic strides keep fake and real kernels in step.
    out = out.transpose(1, 2).contiguous()
    return out if layout == "BSHD" else out.transpose(1, 2)


def attention_partial_ref(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], scale: float, layout: str,
                          sm_margin: int) -> Tuple[Tensor, Tensor]:
    """Attention over some of the keys, with each query's log-sum-exp of scores ([B, H, S], fp32): two such
    partial results over disjoint keys merge exactly (``merge_partials``). ``sm_margin``: SMs a CUDA kernel
    leaves free for work beside it; no meaning here."""
    if layout == "BSHD":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    scores = q.float() @ k.float().transpose(-1, -2) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
    lse = torch.logsumexp(scores, dim=-1)
    out = (torch.softmax(scores, dim=-1) @ v.float()).to(q.dtype).transpose(1, 2).contiguous()  # [B,S,H,D] memory
    return (out if layout == "BSHD" else out.transpose(1, 2)), lse


def merge_partials(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor, layout: str) -> Tensor:
    """Attention over the keys of both partial results, from the two (pure torch: Inductor fuses it). b's share
    of the softmax mass is sigmoid(lse_b - lse_a), one transcendental per element of the fused kernel (which
    recomputes it for every head-dim element): on an H200 0.042 ms at [1, 8190, 12, 128] and 0.064 ms at
    [1, 8190, 40, 128], against 0.067 and 0.115 ms for exp(lse - logaddexp) per part (bench/RESULTS.md)."""
    share_b = torch.sigmoid(lse_b - lse_a)  # [B, H, S]
    share_b = (share_b.transpose(1, 2) if layout == "BSHD" else share_b).unsqueeze(-1)
    a = out_a.float()
    return (a + (out_b.float() - a) * share_b).to(out_a.dtype)


def rms_norm_ref(x: Tensor, weight: Optional[Tensor], eps: float, out_dtype: torch.dtype) -> Tensor:
    return _norm_fp32(x, weight, None, eps, "rms").to(out_dtype)


def layer_norm_ref(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                   out_dtype: torch.dtype) -> Tensor:
    return _norm_fp32(x, weight, bias, eps, "layer").to(out_dtype)


def adaln_ref(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], scale: Tensor, shift: Tensor,
              eps: float, norm: str, out_dtype: torch.dtype) -> Tensor:
    y = _norm_fp32(x, weight, bias, eps, norm)
    return (y * (1 + scale.float()) + shift.float()).to(out_dtype)


def rope_ref(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool) -> Tensor:
    width = x.shape[-1]
    cos, sin = _full_width(cos, width, interleaved), _full_width(sin, width, interleaved)
    return x * cos + _rotate(x, interleaved) * sin


def gated_residual_ref(x: Tensor, y: Tensor, gate: Tensor) -> Tensor:
    return x + y * gate


def addmm_gelu_ref(bias: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``gelu(bias + a @ b, approximate="tanh")``: a linear layer and its activation in one op."""
    return torch.nn.functional.gelu(torch.addmm(bias, a, b), approximate="tanh")


# --- registration ---------------------------------------------------------------------------------

_lib = torch.library.Library(NAMESPACE, "DEF")
_lib.define("attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale, str layout) -> Tensor")
_lib.define("attention_partial(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale, str layout, int sm_margin) "
            "-> (Tensor, Tensor)")
_lib.define("rms_norm(Tensor x, Tensor? weight, float eps, ScalarType out_dtype) -> Tensor")
_lib.define("layer_norm(Tensor x, Tensor? weight, Tensor? bias, float eps, ScalarType out_dtype) -> Tensor")
_lib.define("adaln(Tensor x, Tensor? weight, Tensor? bias, Tensor scale, Tensor shift, float eps, str norm, "
            "ScalarType out_dtype) -> Tensor")
_lib.define("rope(Tensor x, Tensor cos, Tensor sin, bool interleaved) -> Tensor")
_lib.define("gated_residual(Tensor x, Tensor y, Tensor gate) -> Tensor")
_lib.define("addmm_gelu(Tensor bias, Tensor a, Tensor b) -> Tensor")

REFERENCE = {
    "attention": attention_ref,
    "attention_partial": attention_partial_ref,
    "rms_norm": rms_norm_ref,
    "layer_norm": layer_norm_ref,
    "adaln": adaln_ref,
    "rope": rope_ref,
    "gated_residual": gated_residual_ref,
    "addmm_gelu": addmm_gelu_ref,
}

for _name, _fn in REFERENCE.items():
    # CompositeExplicitAutograd: one kernel for every device until a target registers a faster one.
    _lib.impl(_name, _fn, "CompositeExplicitAutograd")
    torch.library.register_fake(f"{NAMESPACE}::{_name}", _fn, lib=_lib)


def _attention_cuda(q, k, v, mask, scale, layout):  # FA3 where it applies, else SDPA: attention_kernels.py
    return attention_cuda(q, k, v, mask, scale, layout, attention_ref)


def _attention_partial_cuda(q, k, v, mask, scale, layout, sm_margin):
    return attention_partial_cuda(q, k, v, mask, scale, layout, sm_margin, attention_partial_ref)


def _addmm_gelu_cuda(bias, a, b):
    # cuBLASLt's bias+GELU epilogue (tanh GELU on CUDA; on the CPU this ATen op means exact GELU)
    return torch._addmm_activation(bias, a, b, use_gelu=True)


_lib.impl("attention", _attention_cuda, "CUDA")
_lib.impl("attention_partial", _attention_partial_cuda, "CUDA")
_lib.impl("addmm_gelu", _addmm_gelu_cuda, "CUDA")

ops = getattr(torch.ops, NAMESPACE)


def op_name(target) -> Optional[str]:
    """'rms_norm' for torch.ops.mindiesd_compile.rms_norm.default, else None."""
    if isinstance(target, torch._ops.OpOverload) and target.namespace == NAMESPACE:
        return target._opname
    return None

from . import fp8_attention as _fp8_attention  # noqa: E402,F401  (registers attention_fp8)
from . import fp8_linear as _fp8_linear  # noqa: E402,F401  (registers scaled_linear)
from . import peer_gather as _peer_gather  # noqa: E402,F401  (registers all_gather_peers)
from . import norm_rope as _norm_rope  # noqa: E402,F401  (registers rms_norm_rope)
from . import sparse as _sparse  # noqa: E402,F401  (registers sparse_attention)
