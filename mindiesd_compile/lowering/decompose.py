"""Hand fused ops back to Inductor as their decompositions, where Inductor's own fusion wins.

The norms, adaLN, RoPE and the gated residual are memory-bound elementwise/reduction chains that
Inductor fuses with their neighbours (the casts, the next GEMM's prologue); a hand kernel for them
loses (ARCHITECTURE.md). Rewriting into our ops still pays: the report, a canonical fp32 form
(one upcast, one rounding), and one place for the NPU lowering to pick its fused kernels. Attention
stays an op: its kernel choice is ours.
"""
from __future__ import annotations

import hashlib

import torch
from torch._inductor.pattern_matcher import fwd_only
from torch.fx import Graph, Node

from ..ops import REFERENCE, op_name
from ..passes.base import GraphPass

INDUCTOR_FUSES = frozenset({"rms_norm", "layer_norm", "adaln", "rope", "gated_residual"})


def inline_decomposition(graph: Graph, node: Node, fn, decompositions=None) -> Node:
    """Replace ``node`` by the ATen graph of ``fn`` traced on the node's fake inputs (with Inductor's
    decompositions, or the ``decompositions`` given: ``{}`` keeps ATen ops whole, as GE wants them);
    returns the node that now stands for ``node``'s value."""
    flat, spec = torch.utils._pytree.tree_flatten((node.args, node.kwargs))
    tensor_pos = [i for i, a in enumerate(flat) if isinstance(a, Node)]

    def call(*tensors):
        leaves = list(flat)
        for i, t in zip(tensor_pos, tensors):
            leaves[i] = t
        args, kwargs = torch.utils._pytree.tree_unflatten(leaves, spec)
        return fn(*args, **kwargs)

    fakes = [flat[i].meta["val"] for i in tensor_pos]
    mode = torch._guards.detect_fake_mode(fakes)
    with mode:
        sub = fwd_only(call, fakes, run_functional_passes=False,
                       **({} if decompositions is None else {"get_decomp_fn": lambda: decompositions}))
    env = {}
    placeholders = iter(flat[i] for i in tensor_pos)
    with graph.inserting_before(node):
        for sn in sub.graph.nodes:
            if sn.op == "placeholder":
                env[sn] = next(placeholders)
            elif sn.op == "output":
                result = env[sn.args[0]] if isinstance(sn.args[0], Node) else env[sn.args[0][0]]
            else:
                env[sn] = graph.node_copy(sn, lambda a: env[a])
                for key in ("nn_module_stack", "stack_trace"):
                    if key in node.meta:
                        env[sn].meta[key] = node.meta[key]
    node.replace_all_uses_with(result)
    graph.erase_node(node)
    return result


class DecomposeForInductor(GraphPass):
    """``ops``: the op names to hand back (default: all but attention). An offline export hands back
    attention too, so the package holds ATen ops only and loads where mindiesd_compile is not installed."""

    name = "decompose_for_inductor"

    def __init__(self, report=None, ops=INDUCTOR_FUSES):
        super().__init__(report)
        self.ops = frozenset(ops)

    def uuid(self) -> bytes:
        return hashlib.sha256(super().uuid() + repr(sorted(self.ops)).encode()).digest()

    def __call__(self, graph: Graph) -> None:
        for node in list(graph.nodes):
            name = op_name(node.target) if node.op == "call_function" else None
            if name in self.ops:
                inline_decomposition(graph, node, REFERENCE[name])
        graph.eliminate_dead_code()
