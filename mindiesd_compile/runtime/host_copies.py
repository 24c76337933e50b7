"""Inputs the forward only copies from the CPU to the device: copied once, outside the compiled graph.

diffusers' Qwen-Image keeps its RoPE tables as plain CPU attributes (not buffers, so ``model.to("cuda")`` leaves
them there) and copies them to the GPU in every forward. That is a blocking copy from pageable memory: the host
waits for the GPU once per forward, and a CUDA graph cannot hold it (``cuda_graphs`` fell back to op by op). Here
such an input's copies leave the graph, which then takes the input on the device, and ``HostCopies`` hands it a
copy made once per tensor and version: a write in place or another tensor makes a new one.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional

import torch
from torch.fx import GraphModule, Node


def _moved_to(use: Node, node: Node, val: torch.Tensor) -> Optional[torch.device]:
    """The device ``use`` moves ``node`` to, if it is a ``.to`` that changes nothing else; else None."""
    if use.op != "call_method" or use.target != "to" or use.args[0] is not node:
        return None
    if any(isinstance(a, Node) for a in (*use.args[1:], *use.kwargs.values())):
        return None
    out = use.meta.get("example_value")
    layout = lambda t: (t.dtype, t.shape, t.stride())  # noqa: E731
    return out.device if isinstance(out, torch.Tensor) and layout(out) == layout(val) and out.device.type != "cpu" \
        else None


def hoist_host_copies(gm: GraphModule) -> Dict[int, torch.device]:
    """Rewrites Dynamo's graph ``gm``: an input holding a CPU tensor whose every use moves it to one other device
    takes the moved tensor instead. Returns {input position: device} for ``HostCopies``."""
    moved = {}
    for i, node in enumerate(n for n in gm.graph.nodes if n.op == "placeholder"):
        val = node.meta.get("example_value")
        if not isinstance(val, torch.Tensor) or val.device.type != "cpu" or not node.users:
            continue
        uses = list(node.users)
        devices = {_moved_to(use, node, val) for use in uses}
        if len(devices) != 1 or None in devices:
            continue  # used on the CPU too, or converted: left in the graph
        node.meta["example_value"] = uses[0].meta["example_value"]
        for use in uses:
            use.replace_all_uses_with(node)
            gm.graph.erase_node(use)
        moved[i] = devices.pop()
    if moved:
        gm.recompile()
    return moved


def on_devices(inputs: List, moved: Dict[int, torch.device]) -> List:
    """``inputs`` as the rewritten graph takes them."""
    return [x.to(moved[i]) if i in moved else x for i, x in enumerate(inputs)]


class HostCopies:
    """Calls ``fn`` (the graph after ``hoist_host_copies``) with each moved input's device copy, made when the
    input is first seen and again only when it changed. Keeping the source tensor alive means a new tensor can
    never reuse its address, so identity and version say exactly when the copy is stale."""

    def __init__(self, fn: Callable, moved: Dict[int, torch.device]):
        self.fn, self.moved = fn, moved
        self.copies: Dict[int, tuple] = {}  # position -> (source, its version, device copy)

    def __call__(self, *args):  # Dynamo calls a backend's result unboxed, whatever its ``_boxed_call`` says
        args = list(args)
        for i, device in self.moved.items():
            src, seen = args[i], self.copies.get(i)
            if seen is None or seen[0] is not src or seen[1] != src._version:
                seen = self.copies[i] = (src, src._version, src.to(device))
            args[i] = seen[2]
        return self.fn(*args)
