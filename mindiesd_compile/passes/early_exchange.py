"""Start each key/value exchange before the query work of its attention.

The sequence-parallel pass traces an ``all_gather_peers`` just before the attention it feeds, i.e. after the
query projection, whose GEMM the model wrote first (``to_q`` before ``to_k`` and ``to_v``). On CUDA the exchange
runs on copy engines beside whatever the GPU computes next, so this pass moves it, with the key/value work it
needs, ahead of the first node only the queries need: the transfer then runs beside the query projection and its
norm/RoPE instead of in front of attention. It only moves nodes earlier that the exchange depends on (never past
their own inputs), so the graph computes the same values; the waits stay where the sequence-parallel pass put
them. Inductor's scheduler orders independent nodes by its own heuristics (fusion, peak memory), so the query
work's first kernels also get an explicit dependency on the exchange (Inductor's ``control_deps``); torch 2.11's
peak-memory reordering still moved the query GEMM back, so the backend turns it off for these graphs. Runs last:
later rewrites re-place the nodes they fuse.
"""
from __future__ import annotations

import warnings
from typing import Iterable, List, Optional, Set

import torch
from torch.fx import Graph, Node

from ..ops import op_name
from .base import RESHAPES, GraphPass, aten

_ATTENTIONS = ("attention", "attention_partial")
# ops Inductor lowers to views of their input (no kernel to order): the dependency goes to their users
_VIEWS = (*RESHAPES, aten.permute.default, aten.t.default, aten.transpose.int, aten.expand.default,
          aten.slice.Tensor, aten.select.int, aten.unsqueeze.default, aten.squeeze.dim, aten.as_strided.default)


def _ancestors(roots: Iterable[Node]) -> Set[Node]:
    seen, todo = set(), list(roots)
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(n.all_input_nodes)
    return seen


def _attention_fed_by(start: Node) -> Optional[Node]:
    """The first attention reached from ``start`` through its users (waits, joins, views)."""
    seen, todo = set(), [start]
    while todo:
        n = todo.pop(0)
        if op_name(n.target) in _ATTENTIONS and n is not start:
            return n
        for u in n.users:
            if u not in seen:
                seen.add(u)
                todo.append(u)
    return None


def _first_kernels(query_only: Set[Node], needed: Set[Node]) -> List[Node]:
    """Where the query work leaves what the exchange needs: its first nodes that are not views."""
    todo = [n for n in query_only if any(a in needed for a in n.all_input_nodes)]
    found, seen = [], set()
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.target in _VIEWS:
            todo.extend(u for u in n.users if u in query_only)
        else:
            found.append(n)
    return [n for n in found if not _ancestors(n.all_input_nodes) & set(found)]  # the rest follow those


def _order_after(graph: Graph, exchange: Node, nodes: List[Node]) -> None:
    """Make Inductor schedule ``nodes`` after ``exchange`` (a no-op elsewhere: the graph order already says so)."""
    try:
        from torch._inductor.fx_passes.control_dependencies import preserve_node_ordering
        from torch.utils._ordered_set import OrderedSet
    except ImportError:  # an older torch: the graph order only, which Inductor may change
        warnings.warn("mindiesd_compile: this torch has no control_deps; Inductor may schedule the query "
                      "projection before the key/value exchange", RuntimeWarning)
        return
    preserve_node_ordering(graph, {n: OrderedSet([exchange]) for n in nodes})


class StartExchangesEarly(GraphPass):
    name = "early_exchange"

    def __call__(self, graph: Graph) -> None:
        gather = torch.ops.mindiesd_compile.all_gather_peers.default
        for exchange in [n for n in graph.nodes if n.target is gather]:
            self.report.found(self.name)
            attention = _attention_fed_by(exchange)
            if attention is None:
                self.report.skipped(self.name, exchange.name, "no attention reads this exchange")
                continue
            needed = _ancestors([exchange])
            query_only = {n for n in _ancestors([attention.args[0]]) - needed if n.op == "call_function"}
            order = {n: i for i, n in enumerate(graph.nodes)}
            first = min(query_only, key=order.__getitem__, default=None)
            if first is None or order[first] > order[exchange]:
                self.report.skipped(self.name, exchange.name, "no query work before the exchange")
                continue
            # what the exchange needs, between the first query-only node and the exchange, keeps its order
            moved = [n for n in graph.nodes if order[first] < order[n] < order[exchange] and n in needed]
            for n in moved + [exchange]:
                first.prepend(n)
            _order_after(graph, exchange, _first_kernels(query_only, needed))
            self.report.rewritten(self.name)
