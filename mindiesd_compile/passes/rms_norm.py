"""RMSNorm: ``x * rsqrt(mean(x^2, -1, keepdim) + eps) [* weight]`` with any fp32 upcasts around it.

Anchor: ``rsqrt``. Covers diffusers' RMSNorm (variance from the fp32 copy, product with the
original), torch.nn.RMSNorm's decomposition and Wan's qk-norm across heads (a plain RMSNorm over
heads*dim, before the head split). Near-misses: reduction over another dim, no keepdim, eps a tensor.
"""
from __future__ import annotations

from ..ops import ops
from .base import FusionPass, aten, insert_call, is_call, is_number, last_dim_only, require, replace, strip_upcasts, val
from .norm_chain import absorb_affine


class RMSNormPass(FusionPass):
    name = "rms_norm"

    def anchors(self, graph):
        return [n for n in graph.nodes if is_call(n, aten.rsqrt.default)
                and is_call(n.args[0], aten.add) and is_call(n.args[0].args[0], aten.mean)]

    def rewrite(self, graph, rsqrt):
        add = rsqrt.args[0]
        mean, eps = add.args[0], add.args[1]
        require(is_number(eps) and add.kwargs.get("alpha", 1) == 1, "eps is not a constant number")
        square = mean.args[0]
        require(is_call(square, aten.pow.Tensor_Scalar) and square.args[1] == 2
                or is_call(square, aten.mul.Tensor) and square.args[0] is square.args[1],
                "mean is not over a square (not an RMS)")
        xf = square.args[0]
        ndim = val(xf).dim()
        dims = mean.args[1] if len(mean.args) > 1 else mean.kwargs.get("dim")
        keepdim = mean.args[2] if len(mean.args) > 2 else mean.kwargs.get("keepdim", False)
        require(dims is not None and last_dim_only(dims, ndim), f"reduces over dims {dims}, not the last dim only")
        require(keepdim, "mean without keepdim is not broadcast back over the row")
        x = strip_upcasts(xf)
        normed = [u for u in rsqrt.users if is_call(u, aten.mul.Tensor)
                  and strip_upcasts(u.args[0] if u.args[1] is rsqrt else u.args[1]) is x]
        require(len(normed) == 1, "rsqrt does not scale the same tensor whose RMS it took")
        end, weight, _ = absorb_affine(normed[0], val(x).shape[-1], with_bias=False)
        fused = insert_call(graph, end, ops.rms_norm.default, (x, weight, float(eps), val(end).dtype), like=end)
        replace(end, fused)
