"""Opt-in FP8 attention: ``attention`` sites without a mask become ``attention_fp8`` (ops/fp8_attention.py).

Runs last, after every pass that reads or wraps attention (Ulysses, sparse attention), and only where
the user asked for it (``options["fp8"]["attention"]``). Masked sites stay bf16: FA3's FP8 kernel takes no mask.
"""
from __future__ import annotations

from torch.fx import Graph, Node

from ..ops import ops
from ..passes.base import FusionPass, is_call, require


class AttentionToFp8(FusionPass):
    name = "fp8_attention"

    def anchors(self, graph: Graph):
        return [n for n in graph.nodes if is_call(n, ops.attention.default)]

    def rewrite(self, graph: Graph, node: Node) -> None:
        require(node.args[3] is None, "attention with a mask (FA3's FP8 kernel takes none)")
        node.target = ops.attention_fp8.default
