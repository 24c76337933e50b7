"""Ulysses sequence parallelism inside a block: all-to-all around every attention over sharded tokens.

The runner hands each rank a slice of the sequence (``runtime/sequence_parallel.py``); everything in a
block is token-wise except attention. This pass marks which values carry sharded tokens (data flow
from the piece's sharded inputs) and, for each attention whose q, k and v all do, inserts
``all_to_all`` (gather the sequence, scatter the heads) before it and the inverse after it, as
functional collectives that Inductor can schedule. Attention from sharded queries to replicated
keys (Wan's cross-attention to text) stays local. Head counts the degree does not divide are padded
with zero heads (e.g. 40 heads on 3 ranks run as 42; the pad costs that share of attention compute).
Anything else is an error, never a silent
fallback: a skipped rewrite here would be a wrong result, so this pass is ``required``.
"""
from __future__ import annotations

import hashlib
from typing import Dict, Sequence

import torch
import torch.distributed._functional_collectives as funcol

from ..lowering.decompose import inline_decomposition
from ..ops import op_name
from .base import GraphPass


class SequenceParallelError(ValueError):
    """A model/degree combination the sequence-parallel rewrite cannot serve; the message says why."""


def seq_to_heads(x: torch.Tensor, degree: int, group: str) -> torch.Tensor:
    """[B, S/P, H, D] on each rank -> [B, S, H/P, D] (all tokens, this rank's heads)."""
    b, s, h, d = x.shape
    x = x.reshape(b, s, degree, h // degree, d).permute(2, 0, 1, 3, 4).contiguous()
    x = funcol.all_to_all_single(x, None, None, group)
    return x.permute(1, 0, 2, 3, 4).reshape(b, degree * s, h // degree, d)


def heads_to_seq(x: torch.Tensor, degree: int, group: str) -> torch.Tensor:
    """[B, S, H/P, D] -> [B, S/P, H, D]: the inverse of ``seq_to_heads``."""
    b, s, h, d = x.shape
    x = x.reshape(b, degree, s // degree, h, d).permute(1, 0, 2, 3, 4).contiguous()
    x = funcol.all_to_all_single(x, None, None, group)
    return x.permute(1, 2, 0, 3, 4).reshape(b, s // degree, degree * h, d)


def ulysses_attention(q, k, v, mask, scale, layout, degree, group):
    if layout == "BHSD":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    heads = q.shape[2]
    pad = -heads % degree  # any head count: zero heads up to a multiple of the degree, dropped after
    if pad:  # (a zero head attends uniformly to zero values: its output is zeros, never NaN)
        q, k, v = (torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    q, k, v = (seq_to_heads(t, degree, group) for t in (q, k, v))
    out = torch.ops.mindiesd_compile.attention(q, k, v, mask, scale, "BSHD")
    out = heads_to_seq(out, degree, group)[:, :, :heads]
    return out.transpose(1, 2) if layout == "BHSD" else out


class UlyssesPass(GraphPass):
    name = "sequence_parallel"
    required = True  # a failure must stop the compile: the unrewritten graph would compute garbage

    def __init__(self, report, degree: int, group: str, sharded_inputs: Sequence[int]):
        super().__init__(report)
        self.degree, self.group, self.sharded_inputs = degree, group, frozenset(sharded_inputs)

    def uuid(self) -> bytes:
        return hashlib.sha256(super().uuid() + repr((self.degree, sorted(self.sharded_inputs))).encode()).digest()

    def __call__(self, graph: torch.fx.Graph) -> None:
        sharded: Dict[torch.fx.Node, bool] = {}
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        for i, n in enumerate(placeholders):
            sharded[n] = i in self.sharded_inputs
        for node in list(graph.nodes):
            if node.op == "placeholder":
                continue
            if op_name(node.target) == "attention":
                q, k, v, mask = node.args[:4]
                flags = [sharded.get(t, False) for t in (q, k, v)]
                if all(flags):
                    self._rewrite(graph, node)
                    sharded[node] = True
                    continue
                if flags == [True, False, False]:  # sharded queries, replicated keys: local
                    sharded[node] = True
                    continue
                if any(flags):
                    raise SequenceParallelError(
                        f"attention {node.name} mixes sharded and replicated tokens (q, k, v sharded: {flags}); "
                        "shard every sequence that enters it (list it in the parallel plan)")
            sharded[node] = any(sharded.get(a, False) for a in node.all_input_nodes)

    def _rewrite(self, graph, node):
        self.report.found(self.name)
        q, k, v, mask, scale, layout = node.args
        if mask is not None:
            raise SequenceParallelError(f"attention {node.name} has a mask; masked attention is not supported "
                                        "under sequence_parallel yet")
        degree, group = self.degree, self.group
        inline_decomposition(graph, node, lambda q, k, v, mask, scale, layout: ulysses_attention(
            q, k, v, mask, scale, layout, degree, group))
        self.report.rewritten(self.name)
