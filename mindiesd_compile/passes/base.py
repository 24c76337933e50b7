"""The pass interface and the small graph-matching vocabulary every fusion pass uses.

A pass is an Inductor ``CustomGraphPass``: ``__call__(graph)`` rewrites a post-grad ATen graph in
place, ``uuid()`` hashes the pass's source so Inductor's FX graph cache stays correct. Fusion passes
find *anchor* nodes (one per candidate site), try to match the structure around each, and either
rewrite it into a ``torch.ops.mindiesd_compile`` op or record why they left it alone. We match by
hand rather than with ``register_replacement`` because users need the *why* of every near-miss and
the models' cast/view variants are easier to accept structurally than to enumerate as patterns.
"""
from __future__ import annotations

import functools
import hashlib
import operator
import pathlib
from typing import Any, Iterable, Optional, Sequence

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
from torch.fx import Graph, Node

from ..partition import module_path
from ..report import Report

aten = torch.ops.aten
prims = torch.ops.prims
# Inductor turns views into reshapes before its post-grad passes; a matcher must accept all three.
RESHAPES = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)
FLOAT_WIDTH = {torch.float16: 16, torch.bfloat16: 16, torch.float32: 32, torch.float64: 64}


@functools.lru_cache(1)
def _package_source_hash() -> bytes:
    """Passes, ops and lowering all shape the compiled code: any source change must miss the FX graph cache."""
    root = pathlib.Path(__file__).resolve().parents[1]
    return get_hash_for_files(tuple(str(p) for p in sorted(root.rglob("*.py"))))


class NoMatch(Exception):
    """Raised inside a matcher: the site is a near-miss; the message is the user-facing *why*."""


def require(cond: bool, why: str) -> None:
    if not cond:
        raise NoMatch(why)


class GraphPass(CustomGraphPass):
    """Base of every pass: a name, a report to write to, a uuid from the pass's own source."""

    name: str = ""

    def __init__(self, report: Optional[Report] = None):
        self.report = report if report is not None else Report()

    def __call__(self, graph: Graph) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def uuid(self) -> bytes:
        return hashlib.sha256(type(self).__qualname__.encode() + _package_source_hash()).digest()


class FusionPass(GraphPass):
    """Anchor-driven rewrite: ``anchors`` picks candidate sites, ``rewrite`` matches and replaces one."""

    def anchors(self, graph: Graph) -> Iterable[Node]:  # pragma: no cover - abstract
        raise NotImplementedError

    def rewrite(self, graph: Graph, anchor: Node) -> None:  # pragma: no cover - abstract
        """Match around ``anchor`` and rewrite, or raise NoMatch(why) before touching the graph."""
        raise NotImplementedError

    def __call__(self, graph: Graph) -> None:
        for anchor in list(self.anchors(graph)):
            if not anchor.users:
                continue  # consumed by an earlier rewrite
            self.report.found(self.name)
            try:
                self.rewrite(graph, anchor)
            except NoMatch as miss:
                self.report.skipped(self.name, where(anchor), str(miss))
                continue
            self.report.rewritten(self.name)
        graph.eliminate_dead_code()


# --- node predicates and walkers ------------------------------------------------------------------

def is_call(node: Any, *targets) -> bool:
    """True if ``node`` calls one of ``targets`` (an OpOverload, or a packet meaning any overload)."""
    if not isinstance(node, Node) or node.op != "call_function":
        return False
    t = node.target
    packet = getattr(t, "overloadpacket", None)
    return any(t is x or packet is x for x in targets)


def val(node: Any):
    """The fake tensor (or value) a node produces; plain Python values pass through."""
    return node.meta.get("val") if isinstance(node, Node) else node


def node_arg(node: Node, index: Optional[int], name: str, default: Any = None) -> Any:
    """An argument given by position ``index`` (None: keyword only) or by keyword ``name``."""
    if index is not None and len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def is_tensor(node: Any) -> bool:
    return isinstance(val(node), torch.Tensor)


def is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def cast_dtype(node: Node) -> Optional[torch.dtype]:
    """dtype a pure cast node converts to, else None."""
    if is_call(node, prims.convert_element_type.default):
        return node.args[1]
    if is_call(node, aten._to_copy.default) and set(node.kwargs) <= {"dtype"}:
        return node.kwargs.get("dtype")
    return None


def strip_upcasts(node: Node) -> Node:
    """Skip casts to a wider float type: the fused ops compute in fp32 anyway, so these are free."""
    while isinstance(node, Node) and cast_dtype(node) is not None:
        src = val(node.args[0])
        if not (isinstance(src, torch.Tensor) and FLOAT_WIDTH.get(src.dtype, 99) <= FLOAT_WIDTH.get(cast_dtype(node), 0)):
            break
        node = node.args[0]
    return node


def only_user(node: Node) -> Optional[Node]:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def follow_cast(node: Node) -> Node:
    """If the single user of ``node`` is a cast, step onto it (the chain's dtype may change there)."""
    user = only_user(node)
    return user if user is not None and cast_dtype(user) is not None else node


def same_value(a: Any, b: Any) -> bool:
    """``a is b``, or both the same pure call on the same values (two slices of one table written inline twice)."""
    if a is b:
        return True
    if not (isinstance(a, Node) and isinstance(b, Node)) or a.op != "call_function" or b.op != "call_function":
        return not isinstance(a, Node) and not isinstance(b, Node) and a == b
    return (a.target == b.target and a.kwargs == b.kwargs and len(a.args) == len(b.args)
            and all(same_value(x, y) for x, y in zip(a.args, b.args)))


def other_operand(node: Node, this: Any) -> Any:
    a, b = node.args[:2]
    return b if a is this else a


def last_dim_only(dims: Sequence[int], ndim: int) -> bool:
    return len(dims) == 1 and dims[0] % ndim == ndim - 1


def broadcasts_to(node: Any, shape: Sequence[int]) -> bool:
    v = val(node)
    if not isinstance(v, torch.Tensor):
        return False
    try:
        return tuple(torch.broadcast_shapes(tuple(v.shape), tuple(shape))) == tuple(shape)
    except RuntimeError:
        return False


def where(node: Node) -> str:
    """Where a node came from, in the user's terms: the innermost module path, else the node name."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return node.name
    return f"{module_path(list(stack.values())[-1][0]) or 'model'} ({node.name})"


# --- inserting ops --------------------------------------------------------------------------------

def insert_call(graph: Graph, before: Node, target, args: tuple, like: Optional[Node] = None) -> Node:
    """Insert ``target(*args)`` before ``before`` with its fake value computed, meta copied from ``like``."""
    with graph.inserting_before(before):
        new = graph.call_function(target, args)
    fake_args = torch.fx.map_arg(args, val)
    mode = torch._guards.detect_fake_mode([a for a in torch.utils._pytree.tree_leaves(fake_args)
                                          if isinstance(a, torch.Tensor)])
    require(mode is not None, "graph carries no fake tensors to check the rewrite against")
    with mode:
        new.meta["val"] = target(*fake_args)
    for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
        if like is not None and key in like.meta:
            new.meta[key] = like.meta[key]
    return new


def replace(old: Node, new: Node) -> None:
    old.replace_all_uses_with(new)


getitem = operator.getitem
