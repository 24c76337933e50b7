"""LayerNorm: ``(x - mean) * rsqrt(var + eps) [* weight] [+ bias]`` (Inductor's decomposition).

Anchor: ``var_mean``. Affine and non-affine, fp32-upcast variants (diffusers' FP32LayerNorm).
Near-misses: normalising over more than the last dim, unbiased variance.
"""
from __future__ import annotations

from ..ops import ops
from .base import (FusionPass, aten, getitem, insert_call, is_call, is_number, last_dim_only, require, replace,
                   strip_upcasts, val)
from .norm_chain import absorb_affine


def _item(node, index):
    hits = [u for u in node.users if u.target is getitem and u.args[1] == index]
    return hits[0] if len(hits) == 1 else None


class LayerNormPass(FusionPass):
    name = "layer_norm"

    def anchors(self, graph):
        return [n for n in graph.nodes if is_call(n, aten.var_mean.correction)]

    def rewrite(self, graph, var_mean):
        xf = var_mean.args[0]
        ndim = val(xf).dim()
        dims = var_mean.args[1] if len(var_mean.args) > 1 else var_mean.kwargs.get("dim")
        require(dims is not None and last_dim_only(dims, ndim), f"normalizes over dims {dims}, not the last dim only")
        require(var_mean.kwargs.get("correction", 1) == 0, "unbiased variance (correction != 0) is not LayerNorm")
        require(var_mean.kwargs.get("keepdim", False), "var_mean without keepdim")
        var, mean = _item(var_mean, 0), _item(var_mean, 1)
        require(var is not None and mean is not None, "variance and mean are not each used once")
        add = next(iter(var.users))
        require(is_call(add, aten.add) and is_number(add.args[1]) and len(var.users) == 1, "eps is not a constant number")
        rsqrt = next(iter(add.users))
        require(is_call(rsqrt, aten.rsqrt.default), "variance + eps is not followed by rsqrt")
        sub = next(iter(mean.users))
        require(is_call(sub, aten.sub.Tensor) and sub.args[0] is xf and sub.args[1] is mean,
                "mean is not subtracted from the normalised tensor")
        normed = [u for u in rsqrt.users if is_call(u, aten.mul.Tensor) and set(u.args[:2]) == {sub, rsqrt}]
        require(len(normed) == 1, "centred tensor is not scaled by rsqrt(var + eps)")
        x = strip_upcasts(xf)
        end, weight, bias = absorb_affine(normed[0], val(x).shape[-1], with_bias=True)
        fused = insert_call(graph, end, ops.layer_norm.default, (x, weight, bias, float(add.args[1]), val(end).dtype),
                            like=end)
        replace(end, fused)
