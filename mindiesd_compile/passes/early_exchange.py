"""Start each key/value exchange as soon as its tensor exists, before the work its attention needs besides.

The sequence-parallel pass traces one ``all_gather_peers`` per tensor (keys, values) just before the attention
they feed, i.e. after the query projection, whose GEMM the model wrote first (``to_q`` before ``to_k`` and
``to_v``). On CUDA an exchange runs on copy engines beside whatever the GPU computes next, so this pass moves each,
with the work it needs, ahead of the first node of the attention's other work: the exchange whose tensor is
ready first (in graph order) goes first, and the rest of the projections run beside it; the next runs beside
what is left (on 4 H200s, Wan2.1-14B, each tensor's exchange takes about as long as one projection GEMM; the step
measured the same as with one exchange of both beside the query projection, since there the slowest rank's
transfer was already hidden, bench/RESULTS.md 2026-11-27). It only moves nodes earlier that an exchange
depends on (never past their own inputs), so the graph computes the same values; the waits stay where the
sequence-parallel pass put them. Inductor's scheduler orders independent nodes by its own heuristics (fusion,
peak memory), so the first kernels of the work left after an exchange also get an explicit dependency on it
(Inductor's ``control_deps``); torch 2.11's peak-memory reordering still moved the query GEMM back, so the
backend turns it off for these graphs. No exchange moves ahead of the attention before its own: an exchange's
outputs live until the call after next (ops/peer_gather.py), so the calls between two attentions must be the
second one's (LTX's cross-attention keys, ready at the block's start, went ahead of the self-attention's
exchanges, whose buffers they then shared). Runs last: later rewrites re-place the nodes they fuse.
"""
from __future__ import annotations

import warnings
from typing import Dict, List, Optional, Set

import torch
from torch.fx import Graph, Node

from ..ops import op_name
from ..partition import ancestors, closure
from .base import RESHAPES, GraphPass, aten

_ATTENTIONS = ("attention", "attention_partial")
# ops Inductor lowers to views of their input (no kernel to order): the dependency goes to their users
_VIEWS = (*RESHAPES, aten.permute.default, aten.t.default, aten.transpose.int, aten.expand.default,
          aten.slice.Tensor, aten.select.int, aten.unsqueeze.default, aten.squeeze.dim, aten.as_strided.default)


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


def _descendants(start: Node) -> Set[Node]:
    return closure([start], lambda n: n.users)


def _first_kernels(other: Set[Node], needed: Set[Node], order: Dict[Node, int]) -> List[Node]:
    """Where the other work leaves what the exchange needs: its first nodes that are not views, in graph order
    (not a set's: the same graph gets the same dependencies, compile after compile)."""
    todo = sorted((n for n in other if any(a in needed for a in n.all_input_nodes)), key=order.__getitem__,
                  reverse=True)  # popped from the end: graph order
    found, seen = [], set()
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.target in _VIEWS:
            todo.extend(u for u in n.users if u in other)
        else:
            found.append(n)
    firsts = set(found)
    return sorted((n for n in found if not ancestors(n.all_input_nodes) & firsts),  # the rest follow those
                  key=order.__getitem__)


def _order_after(graph: Graph, deps: Dict[Node, List[Node]]) -> None:
    """Make Inductor schedule each node after its exchanges in ``deps`` (a no-op elsewhere: the graph order
    already says so)."""
    if not deps:
        return
    try:
        from torch._inductor.fx_passes.control_dependencies import preserve_node_ordering
        from torch.utils._ordered_set import OrderedSet
    except ImportError:  # an older torch: the graph order only, which Inductor may change
        warnings.warn("mindiesd_compile: this torch has no control_deps; Inductor may schedule the projections "
                      "before the key/value exchanges", RuntimeWarning)
        return
    preserve_node_ordering(graph, {n: OrderedSet(exchanges) for n, exchanges in deps.items()})


class StartExchangesEarly(GraphPass):
    name = "early_exchange"

    def __call__(self, graph: Graph) -> None:
        gather = torch.ops.mindiesd_compile.all_gather_peers.default
        feeding: Dict[Node, List[Node]] = {}  # attention -> the exchanges it reads
        for exchange in [n for n in graph.nodes if n.target is gather]:
            self.report.found(self.name)
            attention = _attention_fed_by(exchange)
            if attention is None:
                self.report.skipped(self.name, exchange.name, "no attention reads this exchange")
            else:
                feeding.setdefault(attention, []).append(exchange)
        deps: Dict[Node, List[Node]] = {}  # kernel -> the exchanges it must follow
        in_order = [n for n in graph.nodes if n in feeding]
        for previous, attention in zip([None] + in_order, in_order):
            self._start_early(graph, attention, feeding[attention], deps, previous)
        _order_after(graph, deps)

    def _start_early(self, graph: Graph, attention: Node, exchanges: List[Node], deps,
                     previous: Optional[Node]) -> None:
        """``previous``: the attention before this one that reads exchanges; they go after it."""
        work = {n for n in ancestors(attention.all_input_nodes) if n.op == "call_function"}
        received = set().union(*(_descendants(e) for e in exchanges))  # exchanges, their waits: stay put
        placed: Set[Node] = set()  # what earlier exchanges needed: already ahead of this one
        needs = {e: ancestors([e]) for e in exchanges}
        before = {n: i for i, n in enumerate(graph.nodes)}

        def ready(e: Node) -> int:  # where the last of its inputs is computed: the first ready goes first
            return max((before[n] for n in needs[e] if n.op == "call_function" and n is not e), default=-1)
        for exchange in sorted(exchanges, key=ready):
            order = {n: i for i, n in enumerate(graph.nodes)}  # the moves below change it
            needed = needs[exchange]
            other = {n for n in work - needed - received - placed if previous is None or order[n] > order[previous]}
            first = min(other, key=order.__getitem__, default=None)
            placed |= needed
            if first is None or order[first] > order[exchange]:
                self.report.skipped(self.name, exchange.name, "no other work before the exchange")
                continue
            # what the exchange needs, between the first other node and the exchange, keeps its order
            moved = [n for n in graph.nodes if order[first] < order[n] < order[exchange] and n in needed]
            for n in moved + [exchange]:
                first.prepend(n)
            for n in _first_kernels(other, needed, order):
                deps.setdefault(n, []).append(exchange)
            self.report.rewritten(self.name)
