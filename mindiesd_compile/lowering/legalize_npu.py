"""Our ops -> torch_npu's fused ops, which torchair converts to GE ops (the last pass for target "npu").

    attention       -> npu_fusion_attention (FlashAttentionScore): BSHD as "BSH" (a free view; torchair
                       converts "BSH" and "BNSD" only), BHSD as "BNSD"; head_num, scale; a boolean mask
                       becomes ``atten_mask`` (True = masked out, the inverse of SDPA's)
    rms_norm        -> npu_rms_norm (RmsNorm)
    layer_norm      -> aten.native_layer_norm (LayerNormV4; torch_npu's npu_layer_norm_eval has no converter)
    adaln           -> the norm above, then the modulation x*(1+scale)+shift in fp32
    rope            -> npu_rotary_mul (RotaryMul), rotary_mode "half" or "interleave"
    gated_residual  -> decomposed: x + y*gate is two elementwise ops GE fuses with its neighbours;
                       torch_npu has no op for it and a GE converter would build the same two ops
    all_to_all      -> torchair's own lowering (npu_define.all_to_all_single_npu -> HcomAllToAll)
    coalesced all-gather (gather_kv's keys and values) -> one all_gather_into_tensor per tensor (HcomAllGather;
                       torchair converts no coalesced form)

Each replacement keeps our op's numerics contract: it computes in the wider of the input and output
dtypes and rounds once. Sites a fused op cannot take (an additive float mask, a non-4-D RoPE) get
our reference decomposition and a line in the report ("npu:<op>" rows): slower, never wrong.
"""
from __future__ import annotations

import operator

import torch
from torch.fx import Graph, Node

from ..ops import REFERENCE, _full_width, op_name
from ..passes.base import GraphPass, NoMatch, aten, cast_dtype, is_call, require, val, where
from .decompose import inline_decomposition
from .torchair import import_torchair

KEEP_ATEN = {}  # no decompositions while tracing a replacement: GE converts ATen ops whole


def _npu():
    return torch.ops.npu


def attention_npu(q, k, v, mask, scale, layout):
    heads = q.shape[2] if layout == "BSHD" else q.shape[1]
    if mask is not None:  # [.., Sq|1, Skv] -> [B|1, N|1, Sq, Skv], the shapes FlashAttentionScore takes
        sq, skv = (q.shape[1], k.shape[1]) if layout == "BSHD" else (q.shape[2], k.shape[2])
        while mask.dim() < 4:
            mask = mask.unsqueeze(0)
        mask = torch.logical_not(mask).expand(mask.shape[0], mask.shape[1], sq, skv)
    if layout == "BSHD":
        out = _npu().npu_fusion_attention(q.flatten(2), k.flatten(2), v.flatten(2), heads, "BSH",
                                          atten_mask=mask, scale=scale)[0]
        return out.unflatten(-1, (heads, -1))
    return _npu().npu_fusion_attention(q, k, v, heads, "BNSD", atten_mask=mask, scale=scale)[0]


def _norm(x, weight, bias, eps, norm, dtype):
    x = x.to(dtype)
    weight = None if weight is None else weight.to(dtype)
    if norm == "rms":
        gamma = weight if weight is not None else x.new_ones(x.shape[-1])
        return _npu().npu_rms_norm(x, gamma, eps)[0]
    bias = None if bias is None else bias.to(dtype)
    return torch.ops.aten.native_layer_norm(x, [x.shape[-1]], weight, bias, eps)[0]


def rms_norm_npu(x, weight, eps, out_dtype):
    return _norm(x, weight, None, eps, "rms", torch.promote_types(x.dtype, out_dtype)).to(out_dtype)


def layer_norm_npu(x, weight, bias, eps, out_dtype):
    return _norm(x, weight, bias, eps, "layer", torch.promote_types(x.dtype, out_dtype)).to(out_dtype)


def adaln_npu(x, weight, bias, scale, shift, eps, norm, out_dtype):
    y = _norm(x, weight, bias, eps, norm, torch.promote_types(x.dtype, out_dtype)).float()
    return (y * (1 + scale.float()) + shift.float()).to(out_dtype)


def _as_4d(t, width):
    t = t.expand(*t.shape[:-1], width)
    return t.reshape((1,) * (4 - t.dim()) + tuple(t.shape))


def rope_npu(x, cos, sin, interleaved):
    dtype = torch.promote_types(torch.promote_types(x.dtype, cos.dtype), sin.dtype)
    width = x.shape[-1]
    r1, r2 = (_as_4d(_full_width(t, width, interleaved).to(dtype), width) for t in (cos, sin))
    return _npu().npu_rotary_mul(x.to(dtype), r1, r2, "interleave" if interleaved else "half")


def attention_math(q, k, v, mask, scale, layout):
    """softmax(q k^T * scale + mask) v as matmuls GE converts (ATen's SDPA ops have no GE converter)."""
    if layout == "BSHD":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    scores = (q @ k.transpose(-2, -1)).float() * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
    out = scores.softmax(-1).to(v.dtype) @ v
    return out.transpose(1, 2) if layout == "BSHD" else out


FUSED = {"attention": attention_npu, "rms_norm": rms_norm_npu, "layer_norm": layer_norm_npu,
         "adaln": adaln_npu, "rope": rope_npu}
FALLBACK = {**REFERENCE, "attention": attention_math}


def _constant(x):
    """The number a scalar argument or a ``scalar_tensor``/``full([], v)`` node holds, else None."""
    if isinstance(x, (int, float)):
        return x
    if is_call(x, aten.scalar_tensor.default):
        return x.args[0]
    if is_call(x, aten.full.default) and not x.args[0]:
        return x.args[1]
    return None


def _boolean_mask(graph: Graph, node: Node) -> None:
    """An additive mask ``where(keep, 0, -inf)`` (or -1e4 and below: exp underflows to 0 either way; any
    cast on top) is the boolean mask ``keep`` in disguise: give attention the boolean, which
    FlashAttentionScore takes. Rows with every key masked are the one difference (undefined in both)."""
    mask = node.args[3]
    while cast_dtype(mask) is not None:
        mask = mask.args[0]
    if not is_call(mask, aten.where.self, aten.where.ScalarSelf, aten.where.ScalarOther, aten.where.Scalar):
        return
    cond, a, b = mask.args
    a, b = _constant(a), _constant(b)
    if a is None or b is None or val(cond).dtype != torch.bool:
        return
    if a == 0 and b <= -1e4:
        keep = cond
    elif b == 0 and a <= -1e4:
        with graph.inserting_before(node):
            keep = graph.call_function(aten.logical_not.default, (cond,))
        keep.meta["val"] = torch.logical_not(val(cond))
    else:
        return
    node.update_arg(3, keep)


def _check(name, node):
    """Why a site cannot take the fused op (NoMatch), checked on the node's fake values."""
    if name == "attention":
        q, mask = val(node.args[0]), val(node.args[3])
        require(q.dim() == 4, f"{q.dim()}-D attention: npu_fusion_attention takes 4-D q/k/v")
        require(mask is None or mask.dtype == torch.bool,
                "additive float mask: FlashAttentionScore takes a boolean mask only")
    if name == "rope":
        x, cos, sin = (val(a) for a in node.args[:3])
        require(x.dim() == 4 and cos.dim() <= 4 and sin.dim() <= 4, "RotaryMul takes 4-D x and cos/sin")


def _one_all_gather_per_tensor(graph: Graph, node: Node) -> None:
    inputs, group_size, group_name = node.args
    for user in list(node.users):
        require(user.target is operator.getitem, f"{user.name} reads the coalesced all-gather whole")
        with graph.inserting_before(user):
            single = graph.call_function(torch.ops._c10d_functional.all_gather_into_tensor.default,
                                         (inputs[user.args[1]], group_size, group_name))
        single.meta = dict(user.meta)
        user.replace_all_uses_with(single)
        graph.erase_node(user)
    graph.erase_node(node)


class LegalizeForNpu(GraphPass):
    name = "legalize_npu"

    def __call__(self, graph: Graph) -> None:
        a2a = torch.ops._c10d_functional.all_to_all_single.default
        for node in list(graph.nodes):
            name = op_name(node.target) if node.op == "call_function" else None
            if node.target is torch.ops._c10d_functional.all_gather_into_tensor_coalesced.default:
                _one_all_gather_per_tensor(graph, node)
            elif node.target is a2a:
                lowering = import_torchair()._utils.get_npu_default_decompositions()[a2a]  # torchair's own
                inline_decomposition(graph, node, lowering, KEEP_ATEN)
            elif name in FUSED:
                self.report.found(f"npu:{name}")
                try:
                    if name == "attention" and node.args[3] is not None:
                        _boolean_mask(graph, node)
                    _check(name, node)
                    inline_decomposition(graph, node, FUSED[name], KEEP_ATEN)
                    self.report.rewritten(f"npu:{name}")
                except NoMatch as why:
                    self.report.skipped(f"npu:{name}", where(node), f"{why}; decomposed")
                    inline_decomposition(graph, node, FALLBACK[name], KEEP_ATEN)
            elif name is not None:  # gated_residual: two elementwise ops for GE to fuse
                inline_decomposition(graph, node, REFERENCE[name], KEEP_ATEN)
        graph.eliminate_dead_code()
