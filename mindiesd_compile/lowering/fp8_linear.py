"""Opt-in FP8 linear layers: ``addmm(b, x, W^T)`` / ``mm(x, W^T)`` with a parameter ``W`` become ``linear_fp8``
(ops/fp8_linear.py). Only where the user asked for it (``options["fp8"]["linear"]``), before the GELU epilogue
(which then finds no bf16 GEMM to fuse into). GEMMs with few rows (timestep embeddings) stay bf16: rounding
their activations costs more than the FP8 GEMM saves.
"""
from __future__ import annotations

import torch
from torch.fx import Graph, Node

from ..ops import ops
from ..passes.base import FusionPass, aten, insert_call, is_call, replace, require, val

MIN_ROWS = 16


class LinearToFp8(FusionPass):
    name = "fp8_linear"

    def anchors(self, graph: Graph):
        return [n for n in graph.nodes if is_call(n, aten.addmm.default, aten.mm.default)]

    def rewrite(self, graph: Graph, mm: Node) -> None:
        require(not mm.kwargs, "addmm with beta/alpha")
        bias, x, wt = mm.args if is_call(mm, aten.addmm.default) else (None, *mm.args)
        require(is_call(wt, aten.permute.default) and list(wt.args[1]) == [1, 0],
                "second operand is not a transposed weight")
        w = wt.args[0]
        require(w.op in ("placeholder", "get_attr"), "weight is computed in the graph, not a parameter")
        require(bias is None or val(bias).dim() == 1, "bias is not a vector")
        require(val(x).dtype == torch.bfloat16 == val(w).dtype,
                f"{val(x).dtype} model (FP8 GEMMs here write bf16; run the model in bf16)")
        rows = val(x).shape[0]
        require(not isinstance(rows, int) or rows >= MIN_ROWS, f"{rows} rows: too few for an FP8 GEMM to pay")
        replace(mm, insert_call(graph, mm, ops.linear_fp8.default, (x, w, bias), like=mm))
