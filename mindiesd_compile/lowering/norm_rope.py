"""CUDA: ``rope(reshape(rms_norm(x), [.., H, D]))`` -> ``rms_norm_rope`` (ops/norm_rope.py), one kernel for
the qk-norm over all heads and the RoPE after it, including the cast that follows when the model keeps its
rotary tables in fp32 (Wan). Runs before the norms and RoPE are handed back to Inductor.
"""
from __future__ import annotations

from torch.fx import Graph, Node

from ..ops import ops
from ..ops.norm_rope import why_not_kernel
from ..passes.base import RESHAPES, FusionPass, cast_dtype, insert_call, is_call, only_user, replace, require, val


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
        why = why_not_kernel(val(x), val(weight), norm_dtype, heads_view.shape[-2], val(cos), val(sin), interleaved)
        require(why is None, f"the kernel does not apply: {why} (Inductor's fusion stays)")
        end = only_user(rope)
        end = end if end is not None and cast_dtype(end) is not None else rope  # write the cast's dtype directly
        fused = insert_call(graph, rope, ops.rms_norm_rope.default,
                            (x, weight, eps, norm_dtype, heads_view.shape[-2], cos, sin, interleaved, val(end).dtype),
                            like=rope)
        replace(end, fused)
