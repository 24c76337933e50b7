"""Gated residual: ``x + y * gate``, the gate per sample (``[B, 1, C]``) or per token (``[B, S, C]``).

Runs last among the fusions so RoPE and adaLN, which contain the same shape of arithmetic, are
already claimed. Near-misses: a broadcast residual (that is a bias add, not a residual stream).
"""
from __future__ import annotations

from ..ops import ops
from .base import FusionPass, aten, insert_call, is_call, is_tensor, require, replace, val


def _gated_product(add):
    """(x, mul) if one operand of ``add`` is a product of two tensors, else None."""
    for x, mul in (add.args[:2], add.args[1::-1]):
        if is_call(mul, aten.mul.Tensor) and all(is_tensor(a) for a in mul.args[:2]) and is_tensor(x):
            return x, mul
    return None


class GatedResidualPass(FusionPass):
    name = "gated_residual"

    def anchors(self, graph):
        return [n for n in graph.nodes if is_call(n, aten.add.Tensor) and n.kwargs.get("alpha", 1) == 1
                and _gated_product(n) is not None]

    def rewrite(self, graph, add):
        x, mul = _gated_product(add)
        out_shape = tuple(val(add).shape)
        require(tuple(val(x).shape) == out_shape, "residual is broadcast (a bias add, not a residual stream)")
        a, b = mul.args[:2]
        y, gate = (a, b) if val(a).numel() >= val(b).numel() else (b, a)
        require(tuple(val(y).shape) == out_shape, "update y is broadcast over the residual")
        fused = insert_call(graph, add, ops.gated_residual.default, (x, y, gate), like=add)
        require(val(fused).dtype == val(add).dtype, "type promotion differs from the unfused add")
        replace(add, fused)
