"""What follows a normalisation core in the models: optional casts, an affine weight and bias."""
from __future__ import annotations

from typing import Optional, Tuple

from torch.fx import Node

from .base import aten, follow_cast, is_call, only_user, other_operand, val


def _per_channel(node, channels: int) -> bool:
    """A 1-D tensor of the normalised width: an affine weight/bias, not a modulation."""
    v = val(node)
    return hasattr(v, "shape") and tuple(v.shape) == (channels,)


def absorb_affine(core: Node, channels: int, with_bias: bool) -> Tuple[Node, Optional[Node], Optional[Node]]:
    """From the normalised tensor ``core``, step over casts, ``* weight`` and (LayerNorm) ``+ bias``.

    Returns (end node, weight, bias); the end node is what the fused op replaces.
    """
    end, weight, bias = follow_cast(core), None, None
    user = only_user(end)
    if is_call(user, aten.mul.Tensor) and _per_channel(other_operand(user, end), channels):
        weight, end = other_operand(user, end), follow_cast(user)
        user = only_user(end)
    if with_bias and is_call(user, aten.add.Tensor) and _per_channel(other_operand(user, end), channels) \
            and user.kwargs.get("alpha", 1) == 1:
        bias, end = other_operand(user, end), follow_cast(user)
    return end, weight, bias
