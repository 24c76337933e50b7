"""Which kernel runs block-sparse attention, and the block list each kernel reads.

- ``fa3-paged`` (Hopper, bf16/fp16): FlashAttention-3's paged-KV forward. Every (batch, head, query block)
  becomes one sequence of the batch whose "KV cache pages" are the key blocks it keeps: q/k/v are laid out
  [B, H, S_pad, D] in tile order, so a block is one page and the page table lists the kept blocks (in
  ascending order: the short last block, if kept, is the last page and the sequence length stops where its
  tokens end). No K/V is copied per query block. Needs ``flash_attn_interface`` built from flash-attention's
  ``hopper/`` folder with paged KV (the ``fa3-fwd`` wheel leaves paged KV out; ``bench/build_fa3.sh``).
  On an H100 at Wan2.1-1.3B shapes, sparsity 0.8: 3.41 ms vs FlexAttention's 4.85 (dense FA3 9.73).
- ``flex`` (other CUDA devices, or no such build): FlexAttention with a ``BlockMask`` of full blocks.
- ``reference`` (elsewhere): SDPA with the block mask expanded to tokens, the oracle of the tests.

A kernel that fails falls back (fa3-paged -> flex on CUDA, -> reference elsewhere) with one warning per
(card, head dim, dtype); ``CHOICES`` records what ran and why.
"""
from __future__ import annotations

import functools
import importlib
import warnings
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops.attention_kernels import capability
from .layout import TileLayout, block_mask, expand_mask
from .remainder import add_remainder
from .reorder import gather_tokens

CHOICES: Dict[Tuple[str, int, torch.dtype], str] = {}
PAGED_DTYPES = (torch.bfloat16, torch.float16)


@functools.lru_cache(None)
def fa3_paged() -> Optional[Callable]:
    """``flash_attn_with_kvcache`` of a flash-attention ``hopper/`` build, or None."""
    try:
        return importlib.import_module("flash_attn_interface").flash_attn_with_kvcache
    except Exception:  # noqa: BLE001 - ImportError, or a build that does not load on this torch/driver
        return None


def _key(q: Tensor) -> Tuple[str, int, torch.dtype]:
    card = capability(q.device)[1] if q.device.type == "cuda" else q.device.type  # cached: no driver query per call
    return card, q.shape[-1], q.dtype


def _fallback(q: Tensor) -> str:
    return "flex" if q.device.type == "cuda" else "reference"


def choose(q: Tensor) -> str:
    """The kernel for [B, H, S, D] queries ``q``, unless an earlier call on this key fell back."""
    previous = CHOICES.get(_key(q))
    if previous is not None:
        return previous.split(":")[0]
    if (q.device.type == "cuda" and capability(q.device)[0][0] == 9
            and q.dtype in PAGED_DTYPES and q.shape[-1] <= 256 and fa3_paged() is not None):
        return "fa3-paged"
    return _fallback(q)


@functools.lru_cache(1)
def _flex():
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention, dynamic=False, fullgraph=True)


def flex_kernel_options(device: torch.device, block: int = 128) -> Optional[dict]:
    """Hopper: K/V blocks loaded by the tensor memory accelerator (H100, Wan2.1-1.3B shapes, sparsity 0.8: the
    kernel 5.21 -> 4.80 ms, bench/RESULTS.md); elsewhere FlexAttention's own choice. Blocks that FlexAttention's
    own tiles (up to 128 rows) do not divide get tiles that do (it refuses to lower otherwise)."""
    from torch.utils._triton import has_triton_tma_device
    options = {"USE_TMA": True} if capability(device)[0] >= (9, 0) and has_triton_tma_device() else {}
    if block % 128:
        tile = min(block & -block, 128)  # the largest power of two that divides the block
        options.update(BLOCK_M=tile, BLOCK_N=tile)
    return options or None


def page_table(keep: Tensor, block: int, seq_len: int) -> Tuple[Tensor, Tensor]:
    """[B, H, nq, nk] keep mask -> (page table [B*H*nq, nk] int32: the kept key blocks of each query block,
    ascending, as pages of the [B*H*nk, block] K/V pages; sequence lengths [B*H*nq] int32 in tokens)."""
    b, h, nq, nk = keep.shape
    blocks = keep.to(torch.int32).argsort(dim=-1, descending=True, stable=True).to(torch.int32)
    first_page = (torch.arange(b * h, device=keep.device, dtype=torch.int32) * nk).view(b, h, 1, 1)
    short = nk * block - seq_len  # missing tokens of the last block
    lengths = keep.sum(-1, dtype=torch.int32) * block - short * keep[..., -1].to(torch.int32)
    return (blocks + first_page).reshape(b * h * nq, nk), lengths.reshape(-1)


def prepare(kind: str, keep: Tensor, block: int, seq_len: int):
    """What ``kind`` reads besides the keep mask (kept with the mask when it is reused across steps)."""
    if kind == "fa3-paged":
        return page_table(keep, block, seq_len)
    if kind == "flex":
        return block_mask(keep, seq_len, block)
    return None


def attend(kind: str, q: Tensor, k: Tensor, v: Tensor, keep: Tensor, prepared, scale: float, lay: TileLayout,
           remainder: bool = False, into: Optional[Tensor] = None) -> Tensor:
    """Attention of [B, H, S_pad, D] tile-ordered q/k/v (S_pad = whole blocks, contiguous; ``lay`` their layout)
    restricted to the kept blocks, plus the skipped blocks pooled if ``remainder`` (remainder.py). Returns the
    rows in tile order, [B, H, S_pad or seq_len, D] (rows past seq_len undefined), or, given ``into`` ([B, H,
    seq_len, D], any strides), writes them there in model order and returns ``into``."""
    block, seq_len = lay.block, lay.seq_len
    if kind == "fa3-paged":
        try:
            b, h, s_pad, d = q.shape
            pages = [t.reshape(b * h * (s_pad // block), block, 1, t.shape[-1]) for t in (q, k, v)]
            table, lengths = prepared
            out = fa3_paged()(*pages, cache_seqlens=lengths, page_table=table, softmax_scale=scale,
                              return_softmax_lse=remainder)
            out, lse = (out[0], out[1]) if isinstance(out, tuple) else (out, None)  # (out, lse, *rest) with the lse
            CHOICES[_key(q)] = kind
            lse = lse.view(b, h, s_pad) if remainder else None  # [B*H*nq, 1, block] -> [B, H, S_pad]
            return _finish(out.view(b, h, s_pad, v.shape[-1]), lse, q, k, v, keep, scale, lay, into)
        except Exception as err:  # noqa: BLE001 - an optional kernel must never cost a result
            kind = _fallback(q)
            CHOICES[_key(q)] = f"{kind}: FA3 paged KV failed ({type(err).__name__}: {err})"
            warnings.warn(f"mindiesd_compile: block-sparse attention on FA3's paged KV failed ({type(err).__name__}: "
                          f"{err}); it runs {kind} from now on", RuntimeWarning, stacklevel=2)
            prepared = prepare(kind, keep, block, seq_len)
    CHOICES.setdefault(_key(q), kind)
    qs, ks, vs = (t[:, :, :seq_len] for t in (q, k, v))
    lse = None
    if kind == "flex":
        from torch.nn.attention.flex_attention import AuxRequest
        aux = {"return_aux": AuxRequest(lse=True)} if remainder else {}
        out = _flex()(qs, ks, vs, block_mask=prepared, scale=scale, kernel_options=flex_kernel_options(q.device, block),
                      **aux)
        out, lse = (out[0], out[1].lse) if remainder else (out, None)
    elif remainder:  # the oracle written out, for its log-sum-exp
        logits = (qs @ ks.transpose(-1, -2)).float() * scale
        logits = logits.masked_fill(~expand_mask(keep, seq_len, block), float("-inf"))
        lse = logits.logsumexp(-1)
        out = (torch.exp(logits - lse.unsqueeze(-1)) @ vs.float()).to(q.dtype)
    else:  # the oracle
        out = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=expand_mask(keep, seq_len, block), scale=scale)
    return _finish(out, lse, q, k, v, keep, scale, lay, into)


def _finish(out: Tensor, lse: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, keep: Tensor, scale: float,
            lay: TileLayout, into: Optional[Tensor]) -> Tensor:
    """The kept blocks' rows -> plus the pooled remainder where their ``lse`` is given -> model order into ``into``
    (the remainder's merge writes model order itself)."""
    if lse is not None:
        return add_remainder(out, lse, q, k, v, keep, scale, lay.block, lay.seq_len, into, lay.perm)
    return out if into is None else gather_tokens(out, lay.inverse, into)
