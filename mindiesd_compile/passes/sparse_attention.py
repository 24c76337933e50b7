"""Sparse attention: self-attention over the video tokens becomes block-sparse attention (RainFusion style).

Sites: the ``attention`` ops the attention pass produced. A site qualifies when queries and keys are
one sequence of the video's ``frames x h x w`` tokens, possibly with text tokens concatenated before
or after them (joint attention; found as the ``cat`` that builds the sequence, and kept dense).
The grid is read from the graph, not configured: the 5-D output of the patch-embedding convolution.
With ``partition`` the blocks are compiled apart from the prologue that holds it, so the backend reads
it from the whole Dynamo graph first (``resolve_video_grid``); the pass falls back to its own graph.
Near-misses, reported: cross-attention (queries and keys of different lengths, e.g. to text), a
sequence that is not the grid (plus text), a masked attention, a single frame, no grid found.
What runs, and when, is decided at run time: ``sparse/runtime.py``.
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Optional, Tuple

import torch

from ..ops import ops
from ..sparse.config import SparseAttentionConfig
from .base import FusionPass, aten, insert_call, is_call, node_arg, replace, require, val

_CONV3D = (torch.conv3d, torch.nn.functional.conv3d)


def video_grid(graph: torch.fx.Graph) -> Optional[Tuple[int, int, int]]:
    """(frames, h, w) of the one 5-D convolution output in a Dynamo or ATen graph, else None."""
    grids = set()
    for n in graph.nodes:
        if n.op == "call_function" and (n.target in _CONV3D or is_call(n, aten.convolution.default)):
            out = n.meta.get("val", n.meta.get("example_value"))
            if isinstance(out, torch.Tensor) and out.dim() == 5:
                grids.add(tuple(int(s) for s in out.shape[2:]))
    return grids.pop() if len(grids) == 1 else None


def resolve_video_grid(options, gm: torch.fx.GraphModule):
    """Options whose sparse_attention config carries the grid of the whole graph (before partitioning)."""
    cfg = options.sparse_attention
    if cfg is None or cfg.grid is not None:
        return options
    grid = video_grid(gm.graph)
    return options if grid is None else dataclasses.replace(
        options, sparse_attention=dataclasses.replace(cfg, grid=grid))


def with_sparse_runtime(fn, gm: torch.fx.GraphModule, options):
    """The compiled model, wrapped to track denoising steps when sparse attention is on."""
    if options.sparse_attention is None:
        return fn
    from ..sparse.runtime import with_runtime
    return with_runtime(fn, gm)


def _text_around_video(node, seq: int, n_video: int) -> Optional[Tuple[int, int]]:
    """(text before, text after) of the ``cat`` that joined the video and text tokens into ``node``."""
    seen, frontier = set(), [node]
    while frontier and len(seen) < 500:
        n = frontier.pop(0)
        if n in seen:
            continue
        seen.add(n)
        if is_call(n, aten.cat.default):
            out = val(n)
            dim = node_arg(n, 1, "dim", 0) % out.dim()
            sizes = [val(t).shape[dim] for t in n.args[0]]
            if out.shape[dim] == seq and sizes.count(n_video) == 1:
                before = sum(sizes[:sizes.index(n_video)])
                return before, seq - n_video - before
        frontier.extend(n.all_input_nodes)
    return None


class SparseAttentionPass(FusionPass):
    name = "sparse_attention"

    def __init__(self, report=None, config: Optional[SparseAttentionConfig] = None):
        super().__init__(report)
        self.config = config or SparseAttentionConfig()
        self.grid = None

    def uuid(self) -> bytes:
        return hashlib.sha256(super().uuid() + repr(self.config).encode()).digest()

    def __call__(self, graph):
        self.grid = self.config.grid or video_grid(graph)
        super().__call__(graph)

    def anchors(self, graph):
        return [n for n in graph.nodes if is_call(n, ops.attention.default)]

    def rewrite(self, graph, node):
        q, k, v, mask, scale, layout = node.args
        require(self.grid is not None, "no video grid: the graph has no single 5-D patch-embedding convolution; "
                                       "set options['sparse_attention']['grid'] = (frames, h, w)")
        require(mask is None, "attention with a mask")
        require(val(q).dim() == 4, "attention is not 4-D (heads folded into the batch)")
        seq_dim = 1 if layout == "BSHD" else 2
        sq, sk = val(q).shape[seq_dim], val(k).shape[seq_dim]
        require(sq == sk, f"cross-attention ({sq} queries, {sk} keys)")
        frames, h, w = self.grid
        require(frames >= 2, "a single frame: the first frame is kept dense, nothing is left to sparsify")
        n_video = frames * h * w
        text = (0, 0) if sq == n_video else _text_around_video(q, sq, n_video)
        require(text is not None and (sq == n_video or _text_around_video(k, sk, n_video) == text),
                f"sequence of {sq} tokens is not the video grid {frames}x{h}x{w} = {n_video} (plus text)")
        c = self.config
        new = insert_call(graph, node, ops.sparse_attention.default,
                          (q, k, v, scale, layout, list(self.grid), list(text), list(c.tile), c.block,
                           float(c.sparsity), c.start_step, c.mask_refresh, c.remainder), like=node)
        require(val(new).stride() == val(node).stride(), "sparse attention output strides differ")
        replace(node, new)
