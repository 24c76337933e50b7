"""Which kernel runs ``attention`` on CUDA: FlashAttention-3 where it is installed and applies, else SDPA.

FA3 (``flash_attn_interface``, built from the flash-attention repo's ``hopper/`` folder; no wheel on the
package index) ran 1.22x cuDNN per Wan2.1 attention call on an H100 (ARCHITECTURE.md). It takes the
model's [B, S, H, D] layout directly, so BSHD sites need no copy and its output has the memory layout our
op promises. It applies on Hopper (sm90), bf16/fp16, head dim <= 256, without a mask; everything else, and
any FA3 failure, runs SDPA (cuDNN / flash, PyTorch's pick), which always works. ``CHOICES`` records, per
(card, head dim, dtype), what ran and why.
"""
from __future__ import annotations

import functools
import warnings
from typing import Callable, Dict, Optional, Tuple

import torch

CHOICES: Dict[Tuple[str, int, torch.dtype], str] = {}


@functools.lru_cache(None)
def flash_attn_3() -> Optional[Callable]:
    try:
        from flash_attn_interface import flash_attn_func
    except ImportError:
        return None
    return flash_attn_func


@functools.lru_cache(None)
def capability(device: torch.device) -> Tuple[Tuple[int, int], str]:
    return torch.cuda.get_device_capability(device), torch.cuda.get_device_name(device)


def why_not_fa3(q, k, v, mask, cap) -> Optional[str]:
    if flash_attn_3() is None:
        return "flash_attn_interface not installed"
    if cap[0] != 9:
        return f"sm{cap[0]}{cap[1]} is not Hopper"
    if q.dtype not in (torch.bfloat16, torch.float16):
        return f"{q.dtype} (FA3 takes bf16/fp16)"
    if mask is not None:
        return "attention with a mask"
    if q.dim() != 4 or max(q.shape[-1], v.shape[-1]) > 256:
        return "not 4-D or head dim > 256"
    return None


def attention_cuda(q, k, v, mask, scale, layout, reference):
    cap, card = capability(q.device)
    key = (card, q.shape[-1], q.dtype)
    why = why_not_fa3(q, k, v, mask, cap)
    if why is None:
        try:
            qs, ks, vs = (t if layout == "BSHD" else t.transpose(1, 2) for t in (q, k, v))
            out = flash_attn_3()(qs, ks, vs, softmax_scale=scale)
            out = out[0] if isinstance(out, tuple) else out  # some versions also return the logsumexp
            CHOICES[key] = "fa3"
            return out if layout == "BSHD" else out.transpose(1, 2)
        except Exception as err:  # noqa: BLE001 - an optional kernel must never cost a result
            why = f"FA3 failed ({type(err).__name__}: {err})"
            if not CHOICES.get(key, "").startswith("sdpa"):  # once per (card, head dim, dtype)
                warnings.warn(f"mindiesd_compile: {why}; attention runs SDPA", RuntimeWarning, stacklevel=2)
    CHOICES[key] = f"sdpa: {why}"
    return reference(q, k, v, mask, scale, layout)
