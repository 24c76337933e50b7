"""CUDA: ``gelu_tanh(x @ W^T + b)`` -> ``addmm_gelu``, one cuBLASLt GEMM with a bias+GELU epilogue.

Inductor calls cuBLAS for the linear and runs GELU as a kernel of its own, so the FFN activation
([tokens, ffn_dim], the largest tensor of a DiT block) is written, read and written again: 12.8 ms of a
Wan2.1-1.3B forward on an H100 (bench/RESULTS.md). ``addmm_gelu`` runs ``aten._addmm_activation(b, x, W^T,
use_gelu=True)`` on CUDA, which applies GELU while the tile is still in registers. cuBLASLt's epilogue is the
tanh approximation, so only ``gelu(approximate="tanh")`` is taken (what Wan, Flux, SD3 and HunyuanVideo use); exact (erf) GELU stays.
The GELU is found as the decomposition Inductor's own tracing produces for it (same structure, same
constants), so the match follows PyTorch's decomposition rather than a copy of it.
"""
from __future__ import annotations

import functools

import torch
from torch._inductor import pattern_matcher as pm
from torch.fx import Graph, Node

from ..ops import ops
from ..passes.base import RESHAPES, FusionPass, aten, insert_call, is_call, require, val


@functools.lru_cache(None)
def gelu_tanh_pattern(dtype: torch.dtype):
    """(pattern, its scalar constants) of ``gelu(x, approximate="tanh")`` for an input of ``dtype``."""
    def search(x):
        return torch.nn.functional.gelu(x, approximate="tanh")
    example = [torch.empty(4, 8, dtype=dtype)]
    pattern = pm.gen_pattern(search, example, pm.fwd_only)  # scalars are wildcards here: compared below
    return pattern, scalars(pm.fwd_only(search, example).graph.nodes)


def scalars(nodes) -> list:
    return sorted(a for n in nodes if n.op == "call_function" for a in n.args
                  if isinstance(a, (int, float)) and not isinstance(a, bool))


def gelu_tanh_match(node: Node):
    """The match (``kwargs["x"]``: the input) if ``node`` computes ``gelu(x, approximate="tanh")``, else None."""
    v = val(node)
    if not (isinstance(v, torch.Tensor) and v.dtype in (torch.bfloat16, torch.float16, torch.float32)):
        return None
    pattern, constants = gelu_tanh_pattern(v.dtype)
    match = pattern.match(node)
    return match if match and scalars(match.nodes) == constants else None


class GeluIntoGemm(FusionPass):
    name = "gelu_epilogue"

    def anchors(self, graph: Graph):
        return [n for n in graph.nodes if gelu_tanh_match(n) is not None]

    def rewrite(self, graph: Graph, gelu: Node) -> None:
        match = gelu_tanh_match(gelu)
        x = match.kwargs["x"]
        mm = x.args[0] if is_call(x, *RESHAPES) else x
        require(is_call(mm, aten.addmm.default), "GELU input is not a linear layer's output")
        inside = set(match.nodes)
        require(all(u in inside or u is x for u in mm.users) and all(u in inside for u in x.users),
                "the linear layer's output has other users")
        require(not mm.kwargs, "addmm with beta/alpha")
        bias, a, w = mm.args
        require(val(bias).dim() == 1, "bias is not a vector (cuBLASLt's epilogue adds a per-column bias)")
        require(val(gelu).dtype == val(mm).dtype, "GELU output dtype differs from the linear's")
        fused = insert_call(graph, gelu, ops.addmm_gelu.default, (bias, a, w), like=mm)
        if mm is not x:
            fused = insert_call(graph, gelu, x.target, (fused, *x.args[1:]), like=x)
        gelu.replace_all_uses_with(fused)
