"""Cleanup: drop views, clones and casts that do nothing (same shape, dtype and strides as their input).

Runs first so the fusion passes see ``x -> op`` instead of ``x -> clone -> view -> op``; Inductor's
``remove_noop_ops`` does the same, but only after the custom passes have run. Nodes feeding the
graph output are kept: removing them could make an output alias an input, which AOT did not plan for.
"""
from __future__ import annotations

from .base import RESHAPES, GraphPass, aten, cast_dtype, is_call, val

NOOP_CANDIDATES = (*RESHAPES, aten.clone.default,
                   aten.alias.default, aten.expand.default)


def _is_noop(node) -> bool:
    if not (is_call(node, *NOOP_CANDIDATES) or cast_dtype(node) is not None):
        return False
    if any(u.op == "output" for u in node.users):
        return False
    out, inp = val(node), val(node.args[0])
    return (hasattr(out, "shape") and hasattr(inp, "shape") and out.shape == inp.shape and out.dtype == inp.dtype
            and out.device == inp.device and (out.stride() == inp.stride() or out.numel() <= 1))


class CleanupPass(GraphPass):
    name = "cleanup"

    def __call__(self, graph):
        for node in list(graph.nodes):
            if _is_noop(node):
                self.report.found(self.name)
                node.replace_all_uses_with(node.args[0])
                self.report.rewritten(self.name)
        graph.eliminate_dead_code()
