"""Graph surgery for the attention cache: two variants of a block piece.

``record``: the block as it is, also returning its self-attention outputs.
``reuse``: the block taking those outputs as extra inputs instead of computing them; dead code
elimination then removes what only fed them (q/k/v projections, qk-norms, RoPE).
Only self-attention (query and key of one length) is cached: it is the quadratic cost, while
cross-attention to a few hundred text tokens is cheap to recompute and would double the memory.
Operates on the Dynamo-level piece, where attention is one ``scaled_dot_product_attention`` call.
"""
from __future__ import annotations

import copy
import operator
from typing import Tuple

import torch
from torch.fx import GraphModule

from ..passes.base import node_arg

SDPA = torch._C._nn.scaled_dot_product_attention


def attention_nodes(gm: GraphModule, self_only: bool = False):
    nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is SDPA]
    if self_only:
        nodes = [n for n in nodes if _seq_len(node_arg(n, 0, "query")) == _seq_len(node_arg(n, 1, "key"))]
    return nodes


def _seq_len(node):
    value = node.meta.get("example_value") if isinstance(node, torch.fx.Node) else None
    return value.shape[-2] if isinstance(value, torch.Tensor) else None


def _outputs(gm: GraphModule):
    out = next(n for n in gm.graph.nodes if n.op == "output")
    value = out.args[0]
    return out, (list(value) if isinstance(value, (tuple, list)) else [value])


def attention_variants(gm: GraphModule) -> Tuple[GraphModule, GraphModule, int]:
    """(record, reuse, number of attention calls); both variants return a flat tuple."""
    record = copy.deepcopy(gm)
    out, values = _outputs(record)
    attn = attention_nodes(record, self_only=True)
    out.args = (tuple(values + attn),)
    record.recompile()

    reuse = copy.deepcopy(gm)
    out, values = _outputs(reuse)
    last_input = [n for n in reuse.graph.nodes if n.op == "placeholder"][-1]
    for i, node in enumerate(reversed(attention_nodes(reuse, self_only=True))):
        with reuse.graph.inserting_after(last_input):
            cached = reuse.graph.placeholder(f"cached_attention_{len(attn) - 1 - i}")
        cached.meta.update(node.meta)
        node.replace_all_uses_with(cached)
    out.args = (tuple(values),)
    _eliminate_dead_code(reuse.graph)
    reuse.recompile()
    return record, reuse, len(attn)


# Fresh tensors a Dynamo graph may fill with ``t[idx] = v`` (Wan's RoPE writes into empty_like).
_FRESH = (torch.empty_like, torch.zeros_like, torch.ones_like, torch.full_like, torch.empty, torch.zeros)


def _eliminate_dead_code(graph: torch.fx.Graph) -> None:
    """DCE that also drops in-place writes into a fresh tensor nobody reads (Dynamo keeps setitem) and
    frees tensors used only as a dtype reference (``out.type_as(query)`` keeps the whole q path alive)."""
    for node in list(graph.nodes):
        if node.op == "call_method" and node.target == "type_as" and len(node.args) == 2:
            ref = node.args[1].meta.get("example_value") if isinstance(node.args[1], torch.fx.Node) else None
            if isinstance(ref, torch.Tensor):
                node.target, node.args = "to", (node.args[0], ref.dtype)
    changed = True
    while changed:
        graph.eliminate_dead_code()
        changed = False
        for node in list(graph.nodes):
            writes = [u for u in node.users if u.target is operator.setitem and u.args[0] is node]
            if node.target in _FRESH and writes and len(writes) == len(node.users):
                for w in writes:
                    graph.erase_node(w)
                changed = True
