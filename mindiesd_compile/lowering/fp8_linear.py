"""Opt-in FP8 linear layers: ``addmm(b, x, W^T)`` / ``mm(x, W^T)`` with a parameter ``W`` become
``scaled_linear(quantize_rows(x), W, b)`` (ops/fp8_linear.py), one rounding per distinct ``x`` (q, k and v
share theirs). The rounding stays an op (a Triton kernel holding each row in registers): left to Inductor as
ATen ops fused into the producer, its looped row reductions made the Wan2.1-1.3B forward 14 ms slower.
Only where the user asked for it (``options["fp8"]["linear"]``), before the GELU epilogue (which then finds
no bf16 GEMM to fuse into).
GEMMs with few rows (timestep embeddings) stay bf16: rounding costs more there than the FP8 GEMM saves.
"""
from __future__ import annotations

import operator

import torch
from torch.fx import Graph, Node

from ..ops import attention_kernels, ops
from ..passes.base import RESHAPES, FusionPass, aten, insert_call, is_call, replace, require, val

MIN_ROWS = 16


class LinearToFp8(FusionPass):
    name = "fp8_linear"

    def __call__(self, graph: Graph) -> None:
        self.rounded = {}  # activation (its source if reshaped, shape) -> (e4m3 node, scale node)
        super().__call__(graph)

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
        xv, wv = val(x), val(w)
        require(xv.dtype == torch.bfloat16 == wv.dtype,
                f"{xv.dtype} model (FP8 GEMMs here write bf16; run the model in bf16)")
        require(xv.shape[1] % 16 == 0 and wv.shape[0] % 16 == 0, "K or N not a multiple of 16 (cuBLASLt FP8)")
        rows = xv.shape[0]
        require(not isinstance(rows, int) or rows >= MIN_ROWS, f"{rows} rows: too few for an FP8 GEMM to pay")
        if xv.device.type == "cuda":
            (major, minor), _ = attention_kernels.capability(xv.device)
            require((major, minor) >= (8, 9), f"sm{major}{minor} has no FP8 tensor cores")
        key = (x.args[0] if is_call(x, *RESHAPES) else x, tuple(xv.shape))  # q, k, v each reshape the same input
        if key not in self.rounded:
            both = insert_call(graph, mm, ops.quantize_rows.default, (x,), like=mm)
            self.rounded[key] = [insert_call(graph, mm, operator.getitem, (both, i), like=mm) for i in (0, 1)]
        x8, scale = self.rounded[key]
        replace(mm, insert_call(graph, mm, ops.scaled_linear.default, (x8, scale, w, bias, xv.dtype), like=mm))
