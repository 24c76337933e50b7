"""Plan and split a Dynamo graph at its repeated transformer blocks.

A DiT's forward is ``prologue -> blocks[0..N-1] (one or more ModuleLists) -> epilogue``. Dynamo
records, for every node, the stack of modules it was traced in (``node.meta["nn_module_stack"]``);
a node inside ``self.blocks[3]`` carries the path ``blocks.3``. We cut the graph wherever that
top-level list entry changes, which gives pieces that compile independently and, for identical
blocks, once (``runtime/runner.py``). Nodes outside every block before the first block form the
prologue, after the last the epilogue, and in between (rare) a glue piece. Under sequence parallelism the
epilogue may end at the module where the parallel plan gathers the sequence (``proj_out``): it then runs on each
rank's tokens, and what follows, the "output" piece, on the gathered ones.
"""
from __future__ import annotations

import dataclasses
import operator
import re
from typing import Callable, Iterable, List, Optional, Sequence, Set, Tuple

import torch
from torch.fx import GraphModule, Node
from torch.fx.passes.split_module import split_module

_BLOCK = re.compile(r"^([A-Za-z_]\w*)\.(\d+)$")


def module_path(raw: str) -> str:
    """``L['self'].__dict__['_modules']['blocks'][0]`` (any Dynamo spelling) -> ``blocks.0``."""
    path = re.sub(r"^L\['self'\]\.?", "", raw)
    path = re.sub(r"(?:__dict__\[')?_modules'?\]?\['([^']+)'\]", r".\1", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path).replace("..", ".")
    return path.strip(".")


def closure(roots: Iterable[Node], neighbours: Callable[[Node], Iterable[Node]]) -> Set[Node]:
    """``roots`` and every node reached from them through ``neighbours``."""
    seen, todo = set(), list(roots)
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(neighbours(n))
    return seen


def ancestors(roots: Iterable[Node]) -> Set[Node]:
    """``roots`` and every node they are computed from."""
    return closure(roots, lambda n: n.all_input_nodes)


def block_of(node: Node) -> Optional[Tuple[str, int]]:
    """(list name, index) of the top-level block list entry a node was traced in, else None."""
    for raw, _ in (node.meta.get("nn_module_stack") or {}).values():
        m = _BLOCK.match(module_path(raw))
        if m:
            return m.group(1), int(m.group(2))
    return None


def in_module(node: Node, module: str) -> bool:
    """Whether ``node`` was traced inside the module at path ``module`` (``proj_out``)."""
    return any(module_path(raw) == module for raw, _ in (node.meta.get("nn_module_stack") or {}).values())


@dataclasses.dataclass(frozen=True)
class Piece:
    name: str                  # submodule name in the split graph ("submod_3")
    kind: str                  # "prologue" | "block" | "glue" | "epilogue" | "output"
    block: Optional[int]       # global block index (blocks of every list, in execution order)
    label: str                 # "blocks.3", "prologue", ...


@dataclasses.dataclass
class Partition:
    graph_module: GraphModule  # top level: calls each piece in order
    pieces: List[Piece]
    gathered_after: Optional[str] = None  # the epilogue piece that ends at the gather module, if it was cut there

    @property
    def blocks(self) -> List[Piece]:
        return [p for p in self.pieces if p.kind == "block"]


def partition_at_blocks(gm: GraphModule, gather_modules: Sequence[str] = ()) -> Optional[Partition]:
    """Split ``gm`` into prologue | block 0 | ... | block N-1 | epilogue; None if it has no blocks. With
    ``gather_modules`` (module paths), the epilogue ends at the last node traced in one of them, and the rest
    is an "output" piece."""
    compute = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    owners = [block_of(n) for n in compute]
    if not any(owners):
        return None
    after_blocks = max(i for i, owner in enumerate(owners) if owner is not None) + 1
    cut = max((i for i in range(after_blocks, len(compute)) if any(in_module(compute[i], m) for m in gather_modules)),
              default=None)
    ids, labels, kinds = {}, [], []
    current, seen_block = None, False
    for i, (node, owner) in enumerate(zip(compute, owners)):
        key = owner if owner is not None else ("glue" if seen_block else "prologue")
        if cut is not None and i > cut:
            key = "output"
        if key != current:
            labels.append(key)
            current = key
        seen_block |= owner is not None
        ids[node] = len(labels) - 1
    last_block = max(i for i, k in enumerate(labels) if k not in ("glue", "prologue", "output"))
    n_blocks = 0
    for i, key in enumerate(labels):
        if key in ("prologue", "output"):
            kinds.append((key, None, key))
        elif key == "glue":
            kinds.append(("epilogue" if i > last_block else "glue", None, "epilogue" if i > last_block else f"glue{i}"))
        else:
            kinds.append(("block", n_blocks, f"{key[0]}.{key[1]}"))
            n_blocks += 1
    split = split_module(gm, gm, lambda n: ids[n], keep_original_order=True)
    pieces = []
    for node in list(split.graph.nodes):
        if node.op == "call_module":
            kind, block, label = kinds[int(node.target.rsplit("_", 1)[1])]
            pieces.append(Piece(node.target, kind, block, label))
            _return_tuple(split, node)
    split.recompile()
    return Partition(split, pieces, f"submod_{ids[compute[cut]]}" if cut is not None else None)


def _return_tuple(split: GraphModule, call: Node) -> None:
    """Every piece returns a tuple (AOT wants one; the runner can then treat all pieces alike)."""
    sub = split.get_submodule(call.target)
    out = next(n for n in sub.graph.nodes if n.op == "output")
    if isinstance(out.args[0], (tuple, list)):
        return
    out.args = ((out.args[0],),)
    sub.recompile()
    with split.graph.inserting_after(call):
        first = split.graph.call_function(operator.getitem, (call, 0))
    call.replace_all_uses_with(first, delete_user_cb=lambda user: user is not first)


def structural_key(gm: GraphModule, inputs) -> tuple:
    """Two pieces with equal keys compute the same function of their inputs: one compile serves both."""
    index = {}
    ops = []

    def norm(a):
        return ("node", index[a]) if isinstance(a, Node) else a

    for i, n in enumerate(gm.graph.nodes):
        index[n] = i
        if n.op == "placeholder":
            ops.append(("placeholder",))
            continue
        target = n.target if n.op != "call_module" else type(gm.get_submodule(n.target)).__name__
        ops.append((n.op, str(target), repr(torch.fx.map_arg(n.args, norm)), repr(torch.fx.map_arg(n.kwargs, norm))))
    def layout(t):  # a size-1 dim's stride is never used: a chunk and a fresh tensor of one shape match
        return tuple(stride if size > 1 else 0 for size, stride in zip(t.shape, t.stride()))

    metas = tuple((tuple(t.shape), t.dtype, layout(t), t.device.type) if isinstance(t, torch.Tensor) else repr(t)
                  for t in inputs)
    return tuple(ops), metas
