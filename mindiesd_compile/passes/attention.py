"""Attention: every SDPA flavour Inductor's decompositions produce, and hand-written softmax attention.

Anchors: the ATen SDPA ops (flash / efficient / cuDNN / CPU flash, picked by device at trace
time) and ``amax`` (the head of the decomposed softmax in ``softmax(q @ k^T * s [+ mask]) @ v``).
The op takes q/k/v in the layout the model already has: when all three are ``[B,S,H,D]`` tensors
permuted to ``[B,H,S,D]`` (diffusers' processors) the permutes are dropped and the op runs ``BSHD``,
so the kernel sees the projections' memory directly and no transpose copies are made.
Near-misses: dropout, causal masks, grouped-query heads, non-constant scale, softmax not over keys.
"""
from __future__ import annotations

import math

from ..ops import ops
from .base import (RESHAPES, FusionPass, aten, cast_dtype, getitem, insert_call, is_call, is_number, is_tensor,
                   last_dim_only, node_arg, prims, replace, require, strip_upcasts, val)

# The ATen SDPA ops and where each keeps its (mask, dropout_p, is_causal) arguments: (position, name).
SDPA_OPS = {
    aten._scaled_dot_product_flash_attention_for_cpu.default: ((None, "attn_mask"), (3, "dropout_p"), (4, "is_causal")),
    aten._scaled_dot_product_flash_attention.default: ((None, "attn_mask"), (3, "dropout_p"), (4, "is_causal")),
    aten._scaled_dot_product_efficient_attention.default: ((3, "attn_bias"), (5, "dropout_p"), (6, "is_causal")),
    aten._scaled_dot_product_cudnn_attention.default: ((3, "attn_bias"), (5, "dropout_p"), (6, "is_causal")),
    aten.scaled_dot_product_attention.default: ((3, "attn_mask"), (4, "dropout_p"), (5, "is_causal")),
}
BHSD_FROM_BSHD = [0, 2, 1, 3]


def _unbroadcast_mask(mask):
    """The mask a model passed, where torch's SDPA front end made it fit CUDA's memory-efficient kernel: padded
    to an aligned key count and sliced back, then expanded to [B, H, Q, K] (one copy per head and query, which the
    sequence-parallel pass cannot follow as a key mask). The op broadcasts the model's mask itself."""
    while is_call(mask, aten.expand.default) and is_tensor(mask.args[0]):
        mask = mask.args[0]
    if (is_call(mask, aten.slice.Tensor) and is_call(mask.args[0], aten.constant_pad_nd.default)
            and node_arg(mask, 1, "dim", 0) % val(mask).dim() == val(mask).dim() - 1
            and node_arg(mask, 2, "start", 0) in (0, None) and node_arg(mask, 4, "step", 1) == 1):
        source, pad = mask.args[0].args[0], list(mask.args[0].args[1])
        if len(pad) == 2 and pad[0] == 0 and val(source).shape == val(mask).shape:  # keys padded, sliced back
            mask = source
    return mask


def _from_bshd(node):
    """The [B,S,H,D] tensor a [B,H,S,D] view was permuted from, else None."""
    if is_call(node, aten.permute.default) and list(node.args[1]) == BHSD_FROM_BSHD:
        return node.args[0]
    return None


def _matmul_operands(node):
    """(a, b) 4-D (or 3-D) operands of ``a @ b`` as Inductor decomposes it (expand/view/bmm/view)."""
    if is_call(node, *RESHAPES):
        node = node.args[0]
    require(is_call(node, aten.bmm.default), "scores are not a batched matmul")
    operands = []
    for x in node.args[:2]:
        if is_call(x, *RESHAPES) and val(x.args[0]).shape[-2:] == val(x).shape[-2:]:
            x = x.args[0]  # batch dims folded for bmm
        if is_call(x, aten.expand.default):
            require(list(val(x).shape) == list(val(x.args[0]).shape),
                    "matmul broadcasts its operands (grouped-query heads)")
            x = x.args[0]
        operands.append(x)
    return operands


def _peel_scale(node, scale):
    """Multiply out constant ``* c`` / ``/ c`` wrappers; a tensor factor is a near-miss."""
    while is_call(node, aten.mul.Tensor, aten.div.Tensor):
        a, b = node.args[:2]
        tensor, factor = (a, b) if is_tensor(a) else (b, a)
        require(is_number(factor), "attention scale is a tensor, not a constant")
        scale = scale * factor if is_call(node, aten.mul.Tensor) else scale / factor
        node = tensor
    return node, scale


class AttentionPass(FusionPass):
    name = "attention"

    def anchors(self, graph):
        return [n for n in graph.nodes if n.target in SDPA_OPS or is_call(n, aten.amax.default)]

    def rewrite(self, graph, anchor):
        if anchor.target in SDPA_OPS:
            self._rewrite_sdpa(graph, anchor)
        else:
            self._rewrite_softmax(graph, anchor)

    # --- SDPA ops ---------------------------------------------------------------------------------
    def _rewrite_sdpa(self, graph, sdpa):
        mask_at, dropout_at, causal_at = SDPA_OPS[sdpa.target]
        q, k, v = sdpa.args[:3]
        mask = node_arg(sdpa, *mask_at)
        mask = _unbroadcast_mask(mask) if mask is not None else None
        require(not node_arg(sdpa, *dropout_at, 0.0), "attention with dropout")
        require(not node_arg(sdpa, *causal_at, False), "causal attention is left to the SDPA kernel")
        require(not sdpa.kwargs.get("enable_gqa", False) and val(q).shape[-3] == val(k).shape[-3],
                "grouped-query attention (q heads != kv heads)")
        if sdpa.target == aten.scaled_dot_product_attention.default:
            out = sdpa
        else:  # the fused kernels return (out, logsumexp, ...): only out may be used
            outs = [u for u in sdpa.users if u.target is getitem]
            require(len(outs) == 1 and outs[0].args[1] == 0, "attention's logsumexp is used downstream")
            out = outs[0]
        scale = sdpa.kwargs.get("scale")
        scale = 1.0 / math.sqrt(val(q).shape[-1]) if scale is None else float(scale)
        self._emit(graph, out, q, k, v, mask, scale)
        # The replaced kernel is dead now, but DCE keeps it (its dropout seed makes it "random"); a graph
        # engine without a converter for it (GE) must not see it.
        for node in dict.fromkeys((out, sdpa)):  # out is sdpa for the composite op
            if not node.users:
                graph.erase_node(node)

    def _emit(self, graph, out, q, k, v, mask, scale):
        """Replace ``out`` ([B,H,S,D]) by the op, in BSHD when the model's tensors already are."""
        bshd = [_from_bshd(t) for t in (q, k, v)]
        if all(t is not None for t in bshd) and val(q).dim() == 4:
            fused = insert_call(graph, out, ops.attention.default, (*bshd, mask, scale, "BSHD"), like=out)
            for back in [u for u in out.users if _from_bshd(u) is out]:
                _replace_keeping_strides(graph, back, fused)
            if out.users:  # someone wants [B,H,S,D]: give it a free view
                as_bhsd = insert_call(graph, out, aten.permute.default, (fused, BHSD_FROM_BSHD), like=out)
                _replace_keeping_strides(graph, out, as_bhsd)
        else:
            fused = insert_call(graph, out, ops.attention.default, (q, k, v, mask, scale, "BHSD"), like=out)
            _replace_keeping_strides(graph, out, fused)

    # --- softmax(q @ k^T * s [+ mask]) @ v ---------------------------------------------------------
    def _rewrite_softmax(self, graph, amax):
        scores = amax.args[0]
        dims = amax.args[1]
        sub = [u for u in amax.users if is_call(u, aten.sub.Tensor) and u.args == (scores, amax)]
        require(len(sub) == 1 and len(sub[0].users) == 1, "amax is not the max-subtraction of a softmax")
        exp = next(iter(sub[0].users))
        require(is_call(exp, aten.exp.default), "amax is not the max-subtraction of a softmax")
        div = [u for u in exp.users if is_call(u, aten.div.Tensor) and u.args[0] is exp
               and is_call(u.args[1], aten.sum) and u.args[1].args[0] is exp]
        require(len(div) == 1, "exp is not normalised by its sum (not a softmax)")
        require(last_dim_only(dims, val(scores).dim()), f"softmax over dims {list(dims)}, not the key dim")
        probs = div[0]
        # softmax output (maybe cast back) @ v
        pv = probs
        while len(pv.users) == 1 and not is_call(pv, aten.bmm.default):
            pv = next(iter(pv.users))
        require(is_call(pv, aten.bmm.default), "softmax output does not feed a matmul")
        p_operand, v = _matmul_operands(pv)
        require(p_operand is probs or cast_dtype(p_operand) is not None and p_operand.args[0] is probs,
                "softmax is not the left operand of @ v")
        out = pv
        if len(pv.users) == 1 and is_call(next(iter(pv.users)), *RESHAPES):
            out = next(iter(pv.users))  # batch dims unfolded again
        # scores = (q @ k^T) * scale [+ mask]   (low-precision softmax decomposes with an upcast first)
        scores = strip_upcasts(scores)
        mask = None
        if is_call(scores, aten.add.Tensor) and scores.kwargs.get("alpha", 1) == 1:
            a, b = scores.args[:2]
            require(is_tensor(a) and is_tensor(b), "scores plus a constant")
            base, mask = (a, b) if _is_matmul_chain(a) else (b, a)
            scores = base
        qk, scale = _peel_scale(scores, 1.0)
        q, kt = _matmul_operands(qk)
        q, scale = _peel_scale(q, scale)
        require(is_call(kt, aten.permute.default) and list(kt.args[1])[-2:] == [val(kt).dim() - 1, val(kt).dim() - 2]
                and list(kt.args[1])[:-2] == list(range(val(kt).dim() - 2)), "key is not transposed on its last two dims")
        k, scale = _peel_scale(kt.args[0], scale)
        q, k, v = (strip_upcasts(t) for t in (q, k, v))
        require(val(q).dtype == val(k).dtype == val(v).dtype, "q, k, v have different dtypes")
        fused = insert_call(graph, out, ops.attention.default, (q, k, v, mask, float(scale), "BHSD"), like=out)
        require(tuple(val(fused).shape) == tuple(val(out).shape), "attention output shape differs")
        if val(fused).dtype != val(out).dtype:
            fused = insert_call(graph, out, prims.convert_element_type.default, (fused, val(out).dtype), like=out)
        _replace_keeping_strides(graph, out, fused)


def _replace_keeping_strides(graph, old, new):
    """Later views were traced against ``old``'s strides: hand them a tensor with the same strides."""
    if val(new).stride() != val(old).stride():
        require(val(old).is_contiguous(), "attention output has unusual strides")
        new = insert_call(graph, old, aten.clone.default, (new,), like=old)
    replace(old, new)


def _is_matmul_chain(node):
    while is_call(node, aten.mul.Tensor, aten.div.Tensor):
        node = node.args[0] if is_tensor(node.args[0]) else node.args[1]
    return is_call(node, aten.bmm.default) or is_call(node, *RESHAPES) and is_call(node.args[0], aten.bmm.default)
