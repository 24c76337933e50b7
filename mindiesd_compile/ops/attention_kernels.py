"""Which kernel runs ``attention`` on CUDA: FlashAttention-3 where it is installed and applies, else SDPA.

FA3 ran 1.22x cuDNN per Wan2.1 attention call on an H100 (ARCHITECTURE.md). Two builds are recognised:
``fa3_fwd_interface`` from the ``fa3-fwd`` package (forward only, the ``fa3`` extra; its build may leave out
fp16) and ``flash_attn_interface`` built from the flash-attention repo's ``hopper/`` folder. FA3 takes the
model's [B, S, H, D] layout directly, so BSHD sites need no copy and its output has the memory layout our
op promises. It applies on Hopper (sm90), to the dtypes the build has, head dim <= 256, without a mask;
everything else, and any FA3 failure, runs SDPA (cuDNN / flash, PyTorch's pick), which always works.
``CHOICES`` records, per (card, head dim, dtype), what ran and why.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import warnings
from typing import Callable, Dict, FrozenSet, Optional, Tuple

import torch

CHOICES: Dict[Tuple[str, int, torch.dtype], str] = {}


@dataclasses.dataclass(frozen=True)
class FlashAttention3:
    module: str
    func: Callable            # flash_attn_func(q, k, v, softmax_scale=...) on [B, S, H, D]
    dtypes: FrozenSet[torch.dtype]


def _fa3_fwd_dtypes() -> FrozenSet[torch.dtype]:
    try:  # the package records its build flags; fp16 kernels are left out of the published wheels
        from fa3_fwd_config import CONFIG
        no_fp16 = CONFIG["build_flags"].get("FLASHATTENTION_DISABLE_FP16", False)
    except (ImportError, KeyError, TypeError):
        no_fp16 = True
    return frozenset({torch.bfloat16} if no_fp16 else {torch.bfloat16, torch.float16})


@functools.lru_cache(None)
def flash_attn_3() -> Optional[FlashAttention3]:
    """The installed FA3 build, ``fa3-fwd`` first; None when neither imports."""
    for module, dtypes in (("fa3_fwd_interface", _fa3_fwd_dtypes),
                           ("flash_attn_interface", lambda: frozenset({torch.bfloat16, torch.float16}))):
        try:
            func = importlib.import_module(module).flash_attn_func
        except Exception:  # noqa: BLE001 - ImportError, or a build that does not load on this torch/driver
            continue
        return FlashAttention3(module, func, dtypes())
    return None


@functools.lru_cache(None)
def capability(device: torch.device) -> Tuple[Tuple[int, int], str]:
    return torch.cuda.get_device_capability(device), torch.cuda.get_device_name(device)


def why_not_fa3(q, k, v, mask, cap) -> Optional[str]:
    fa3 = flash_attn_3()
    if fa3 is None:
        return "FA3 not installed (pip install 'mindiesd-compile[fa3]')"
    if cap[0] != 9:
        return f"sm{cap[0]}{cap[1]} is not Hopper"
    if q.dtype not in fa3.dtypes:
        return f"{q.dtype} (this FA3 build takes {sorted(str(d) for d in fa3.dtypes)})"
    if mask is not None:
        return "attention with a mask"
    if q.dim() != 4 or max(q.shape[-1], v.shape[-1]) > 256:
        return "not 4-D or head dim > 256"
    return None


def _fa3(q, k, v, scale, layout, sm_margin, with_lse):
    qs, ks, vs = (t if layout == "BSHD" else t.transpose(1, 2) for t in (q, k, v))
    margin = max(sm_margin, torch._C._get_sm_carveout_experimental() or 0)  # the user's carve-out, as cuBLAS does
    out = flash_attn_3().func(qs, ks, vs, softmax_scale=scale, **({"sm_margin": margin} if margin else {}),
                              **({"return_attn_probs": True} if with_lse else {}))
    out, lse = out[:2] if isinstance(out, tuple) else (out, None)  # some versions return the logsumexp anyway
    out = out if layout == "BSHD" else out.transpose(1, 2)
    return (out, lse) if with_lse else out


def _fa3_or_why(q, k, v, mask, scale, layout, sm_margin, with_lse):
    """FA3's result, or (None, why it did not run); records the choice."""
    cap, card = capability(q.device)
    key = (card, q.shape[-1], q.dtype)
    why = why_not_fa3(q, k, v, mask, cap)
    if why is None:
        try:
            result = _fa3(q, k, v, scale, layout, sm_margin, with_lse)
            CHOICES[key] = "fa3"
            return result, None
        except Exception as err:  # noqa: BLE001 - an optional kernel must never cost a result
            why = f"FA3 failed ({type(err).__name__}: {err})"
            if not CHOICES.get(key, "").startswith("sdpa"):  # once per (card, head dim, dtype)
                warnings.warn(f"mindiesd_compile: {why}; attention runs SDPA", RuntimeWarning, stacklevel=3)
    CHOICES[key] = f"sdpa: {why}"
    return None, why


def attention_cuda(q, k, v, mask, scale, layout, reference):
    out, why = _fa3_or_why(q, k, v, mask, scale, layout, 0, with_lse=False)
    return out if why is None else reference(q, k, v, mask, scale, layout)


def attention_partial_cuda(q, k, v, mask, scale, layout, sm_margin, reference):
    """Attention with its log-sum-exp: FA3, else PyTorch's memory-efficient kernel; with a mask (never from the
    sequence-parallel pass, which splits only unmasked attention) the reference."""
    result, why = _fa3_or_why(q, k, v, mask, scale, layout, sm_margin, with_lse=True)
    if why is None:
        return result
    if mask is not None:
        return reference(q, k, v, mask, scale, layout, sm_margin)
    qh, kh, vh = (t.transpose(1, 2) if layout == "BSHD" else t for t in (q, k, v))
    out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(qh, kh, vh, None, True, scale=scale)[:2]
    out = out.transpose(1, 2).contiguous()  # [B,S,H,D] memory, as the op promises
    # lse comes padded to 32 rows: the slice copied out, contiguous as the op promises (its fake says so)
    return (out if layout == "BSHD" else out.transpose(1, 2)), lse[..., :qh.shape[2]].contiguous()
