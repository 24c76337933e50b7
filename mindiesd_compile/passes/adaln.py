"""adaLN modulation: ``norm(x) * (1 + scale) + shift`` after a fused LayerNorm / RMSNorm.

Runs after the norm passes and anchors on their ops. scale/shift may broadcast over tokens
(Flux, SD3, HunyuanVideo, CogVideoX, Qwen-Image: ``[B, 1, C]``) or be per token (Wan: ``[B, S, C]``
with per-token timesteps); casts between the steps (Wan's ``.float()`` ... ``.type_as``) are absorbed,
the result rounds once to the dtype the chain ended in. Near-misses: a multiply by ``scale`` rather
than ``1 + scale`` (another modulation), a scale without a shift.
"""
from __future__ import annotations

from ..ops import op_name, ops
from .base import (RESHAPES, FusionPass, aten, broadcasts_to, follow_cast, insert_call, is_call, is_tensor, only_user,
                   other_operand, require, replace, val)


# Views models put between ``1 + scale`` and the product (``(1 + scale)[:, None, :]``).
VIEWS = (*RESHAPES, aten.unsqueeze.default, aten.expand.default,
         aten.slice.Tensor, aten.select.int, aten.squeeze.dim, aten.permute.default)


def _one_plus(node):
    """(s, views) if node is ``views(s + 1)`` (or ``1 + s``), else (None, views)."""
    views = []
    while is_call(node, *VIEWS):
        views.append(node)
        node = node.args[0]
    if is_call(node, aten.add.Tensor, aten.add.Scalar) and node.kwargs.get("alpha", 1) == 1:
        a, b = node.args[:2]
        if b == 1 and is_tensor(a):
            return a, views
        if a == 1 and is_tensor(b):
            return b, views
    return None, views


def _replay_views(graph, before, tensor, views):
    """Apply the same views to ``tensor`` that the model applied to ``1 + tensor``."""
    for v in reversed(views):
        tensor = insert_call(graph, before, v.target, (tensor, *v.args[1:]), like=v)
    return tensor


class AdaLNPass(FusionPass):
    name = "adaln"

    def anchors(self, graph):
        # A norm whose output is multiplied by a tensor that is not its own affine weight.
        out = []
        for n in graph.nodes:
            if op_name(n.target) in ("layer_norm", "rms_norm"):
                mul = only_user(follow_cast(n))
                if is_call(mul, aten.mul.Tensor) and is_tensor(other_operand(mul, follow_cast(n))):
                    out.append(n)
        return out

    def rewrite(self, graph, norm):
        normed = follow_cast(norm)
        mul = only_user(normed)
        shape = tuple(val(normed).shape)
        scale, views = _one_plus(other_operand(mul, normed))
        require(scale is not None, "modulation multiplies by scale, not (1 + scale)")
        add = only_user(mul)
        require(is_call(add, aten.add.Tensor) and add.kwargs.get("alpha", 1) == 1 and is_tensor(other_operand(add, mul)),
                "scale is not followed by + shift")
        shift = other_operand(add, mul)
        end = follow_cast(add)
        scale = _replay_views(graph, end, scale, views)
        require(broadcasts_to(scale, shape) and broadcasts_to(shift, shape), "scale/shift do not broadcast to x")
        if op_name(norm.target) == "layer_norm":
            x, weight, bias, eps, _ = norm.args
            kind = "layer"
        else:
            x, weight, eps, _ = norm.args
            bias, kind = None, "rms"
        fused = insert_call(graph, end, ops.adaln.default,
                            (x, weight, bias, scale, shift, eps, kind, val(end).dtype), like=end)
        replace(end, fused)
