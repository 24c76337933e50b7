"""CUDA: ``rope(reshape(rms_norm(x), [.., H, D]))`` -> ``rms_norm_rope`` (ops/norm_rope.py), one kernel for
the qk-norm over all heads and the RoPE after it. Runs before the norms and RoPE are handed back to Inductor.
"""
from __future__ import annotations

from torch.fx import Graph, Node

from ..ops import ops
from ..passes.base import RESHAPES, FusionPass, insert_call, is_call, replace, require, val


class NormRopeIntoOne(FusionPass):
    name = "norm_rope"

    def anchors(self, graph: Graph):
        return [n for n in graph.nodes if is_call(n, ops.rope.default)]

    def rewrite(self, graph: Graph, rope: Node) -> None:
        split, cos, sin, interleaved = rope.args
        require(is_call(split, *RESHAPES) and len(split.users) == 1, "RoPE input is not a head split")
        norm = split.args[0]
        require(is_call(norm, ops.rms_norm.default) and len(norm.users) == 1, "RoPE input is not an RMSNorm's")
        normed, heads_view = val(norm), val(split)
        require(heads_view.dim() == normed.dim() + 1 and heads_view.shape[:-2] == normed.shape[:-1]
                and heads_view.shape[-2] * heads_view.shape[-1] == normed.shape[-1],
                "the reshape does more than split the last dim into heads")
        x, weight, eps, norm_dtype = norm.args
        fused = insert_call(graph, rope, ops.rms_norm_rope.default,
                            (x, weight, eps, norm_dtype, heads_view.shape[-2], cos, sin, interleaved), like=rope)
        require(val(fused).dtype == val(rope).dtype, "type promotion differs from the unfused chain")
        replace(rope, fused)
