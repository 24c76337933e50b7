"""Block-sparse attention at run time: which steps are sparse, where masks come from, which kernel.

Design (compile once, decide per call). The pass rewrites each eligible self-attention into
``torch.ops.mindiesd_compile.sparse_attention``, whose arguments carry the static facts (video grid,
text tokens, tile, block, sparsity, start_step, mask_refresh). Everything that changes between
steps is decided inside the op, on the host, so nothing is ever recompiled:

- The backend wraps the compiled model (``with_runtime``): each call reads the transformer's
  ``timestep`` input and advances a step/CFG-branch tracker (the cache's ``StepCache`` bookkeeping),
  then makes its ``SparseRuntime`` the active one while the call runs.
- The op asks the active runtime for the step: before ``start_step`` it runs dense attention;
  otherwise it scores block pairs (``scores.py``), selects blocks (``layout.py``) and runs the sparse kernel,
  with the skipped blocks pooled into the softmax where ``remainder`` is on (``remainder.py``).
- Sites are numbered by call order within one transformer call (the repeated blocks share one
  compiled piece, so the graph cannot tell them apart); masks are kept per (CFG branch, site) and
  reused for ``mask_refresh`` sparse steps. A new generation (timestep jumps up, new shapes) drops them.
- Without an active runtime (the op called directly, ``mindiesd_compile.report``) every call is sparse
  with a fresh mask.

Kernels (``kernels.py``): FA3's paged KV on Hopper where such a build is installed, FlexAttention on other
CUDA devices, SDPA with the expanded block mask elsewhere (the oracle of the tests). NPU: no block-sparse
kernel exists there, so the backend does not add the pass for target "npu" (attention stays dense
FlashAttentionScore).
"""
from __future__ import annotations

import collections
import contextlib
import weakref
from typing import Optional

import torch
from torch import Tensor

from ..runtime.cache import StepCache, call_key, timestep_position
from . import kernels
from .layout import select_blocks, tile_layout
from .reorder import gather_tokens
from .scores import block_scores

_ACTIVE: Optional["SparseRuntime"] = None
_LATEST: Optional[weakref.ref] = None


class SparseRuntime:
    """Per compiled model: the step and CFG branch, masks per (branch, site), call statistics."""

    def __init__(self):
        self.tracker = StepCache()  # its step/branch bookkeeping only; its cache policy stays "none"
        self.masks: dict = {}
        self.stats = collections.Counter()  # dense / sparse calls, masks computed / reused
        self._site = 0
        self._generations = 0
        global _LATEST
        _LATEST = weakref.ref(self)

    @property
    def step(self) -> int:
        return self.tracker.step

    def begin_call(self, timestep: Optional[float], signature) -> None:
        self.tracker.begin_call(timestep, signature)
        if self.tracker.stats["generations"] != self._generations:
            self._generations = self.tracker.stats["generations"]
            self.masks.clear()
        self._site = 0

    def next_site(self) -> tuple:
        site = (self.tracker.branch, self._site)
        self._site += 1
        return site

    @contextlib.contextmanager
    def active(self):
        global _ACTIVE
        previous, _ACTIVE = _ACTIVE, self
        try:
            yield self
        finally:
            _ACTIVE = previous


def latest() -> Optional[SparseRuntime]:
    """The most recently created runtime (tests and benchmarks read its ``stats``)."""
    return _LATEST() if _LATEST is not None else None


def with_runtime(fn, gm: torch.fx.GraphModule):
    """Wrap a compiled model so every call advances a ``SparseRuntime`` and makes it active."""
    runtime = SparseRuntime()
    t_index = timestep_position(gm.graph)

    def call(*args):  # Dynamo calls a backend's result unboxed, whatever its ``_boxed_call`` says
        runtime.begin_call(*call_key(args, t_index))
        with runtime.active():
            return fn(*args)

    call.sparse_runtime = runtime
    return call


def sparse_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, layout: str, grid, text, tile, block: int,
                     sparsity: float, start_step: int, mask_refresh: int, remainder: bool = False) -> Tensor:
    """The op: dense before ``start_step`` (as told by the active runtime), block-sparse after.
    Output memory is [B, S, H, D] in both layouts, as ``attention`` writes it."""
    runtime = _ACTIVE
    site = runtime.next_site() if runtime is not None else None
    if runtime is not None and runtime.step < start_step:
        runtime.stats["dense"] += 1  # through the attention op, so its kernel choice applies (FA3 on Hopper)
        return torch.ops.mindiesd_compile.attention(q, k, v, None, scale, layout)
    lay = tile_layout(tuple(grid), tuple(text), tuple(tile), block, str(q.device))
    seq = lay.seq_len
    # [B, H, S_pad, D] in tile order, contiguous: a block is one page for FA3, a row range for the others
    q, k, v = (gather_tokens(t.transpose(1, 2) if layout == "BSHD" else t, lay.padded_perm) for t in (q, k, v))
    kind = kernels.choose(q)
    entry = None
    if runtime is not None and (runtime.step - start_step) % mask_refresh:
        entry = runtime.masks.get(site)
        if entry is not None and entry[0].shape[:2] != q.shape[:2]:
            entry = None
    if entry is None:
        keep = select_blocks(block_scores(q[:, :, :seq], k[:, :, :seq], block, scale), lay.dense, sparsity,
                             lay.n_dense)
        entry = (keep, kind, kernels.prepare(kind, keep, block, seq))
        if runtime is not None:
            runtime.masks[site] = entry
        _count(runtime, "masks_computed")
    else:
        _count(runtime, "masks_reused")
    keep, prepared_for, prepared = entry
    if prepared_for != kind:  # the kernel changed since (a fallback): its block list, from the kept mask
        prepared = kernels.prepare(kind, keep, block, seq)
    _count(runtime, "sparse")
    result = q.new_empty(q.shape[0], seq, q.shape[1], v.shape[-1])  # model token order, [B, S, H, D] memory
    kernels.attend(kind, q, k, v, keep, prepared, scale, lay, remainder, into=result.transpose(1, 2))
    return result if layout == "BSHD" else result.transpose(1, 2)


def sparse_attention_fake(q: Tensor, k: Tensor, v: Tensor, scale: float, layout: str, *static) -> Tensor:
    if layout == "BSHD":
        return q.new_empty((*q.shape[:3], v.shape[-1]))
    b, h, s, _ = q.shape
    return q.new_empty((b, s, h, v.shape[-1])).transpose(1, 2)


def _count(runtime: Optional[SparseRuntime], key: str) -> None:
    if runtime is not None:
        runtime.stats[key] += 1
