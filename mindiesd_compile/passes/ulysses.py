"""Sequence parallelism inside a block: an exchange around every attention over sharded tokens.

The runner hands each rank a slice of the sequence (``runtime/sequence_parallel.py``); everything in a
block is token-wise except attention. This pass marks which values carry sharded tokens (data flow
from the piece's sharded inputs) and rewrites each attention whose q, k and v all do, with functional
collectives that Inductor can schedule, in one of two ways (``EXCHANGES``; options.py's
``sequence_parallel_exchange`` picks):
- Ulysses: ``all_to_all`` (gather the sequence, scatter the heads) before attention and the inverse
  after it. Head counts the degree does not divide are padded with zero heads (e.g. 40 heads on 3
  ranks run as 42; the pad costs that share of attention compute).
- gather_kv: keys and values all-gathered before attention; queries, heads and the output stay local.
Attention from sharded queries to replicated keys (Wan's cross-attention to text) stays local; whole queries
over sharded keys (LTX-2's audio attending to the video) gather the keys and values, and every rank computes
the same whole output.

Joint attention over sharded image tokens and replicated text tokens (HunyuanVideo, SD3: the built-in
plans keep text whole) is followed through the ``cat`` that joins them: each run of tokens is tracked
as sharded or replicated (``Joint``). Around such an attention the sharded runs are all-to-all'ed and
the replicated ones keep this rank's heads, so every rank attends over the whole sequence in the
single-process order, and a text mask built for that order applies as it is; afterwards the text
heads are all-gathered (gather_kv gathers the sharded runs of keys and values, giving the same key
order). Text work is repeated on every rank (a few hundred tokens against tens of thousands of image
tokens).

A sequence the runner padded to a multiple of the degree (``pads``) ends the last rank's chunk with its pad: each
attention leaves those keys out of the gathered ones (a view), whatever the exchange.
Anything else is an error, never a silent fallback: a skipped rewrite here would be a wrong result,
so this pass is ``required``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import operator
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
import torch.distributed._functional_collectives as funcol

from ..lowering.decompose import inline_decomposition
from ..ops import merge_partials, op_name
from .base import RESHAPES, GraphPass


SPLITS = (torch.ops.aten.split_with_sizes.default, torch.ops.aten.split.Tensor)


class SequenceParallelError(ValueError):
    """A model/degree combination the sequence-parallel rewrite cannot serve; the message says why."""


def seq_to_heads(x: torch.Tensor, degree: int, group: str) -> torch.Tensor:
    """[B, S/P, H, D] on each rank -> [B, S, H/P, D] (all tokens, this rank's heads). One call per tensor: q, k
    and v stacked into one all-to-all measured no faster (bench/RESULTS.md, 2026-11-27)."""
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


_all_gather_single = getattr(funcol, "all_gather_single", funcol.all_gather_tensor)  # (torch 2.11: the latter)


def _all_gather(xs: Sequence[torch.Tensor], dim: int, group: str) -> Tuple[torch.Tensor, ...]:
    """Each tensor gathered from every rank along ``dim``, in rank order, in one (coalesced) call. ``dim`` goes to
    the front and back: free where the dims before it have size 1 (tokens at B = 1), else one copy before."""
    front = [x.movedim(dim, 0).contiguous() for x in xs]
    out = funcol.all_gather_into_tensor_coalesced(front, group) if len(front) > 1 else \
        [_all_gather_single(front[0], 0, group)]
    return tuple(g.movedim(0, dim) for g in out)


def _sendable(mask: torch.Tensor) -> torch.Tensor:
    return mask.to(torch.uint8) if mask.dtype == torch.bool else mask  # collectives take no bool


def _all_keys(mask: torch.Tensor, group: str, heads: Optional[Tuple[int, int, int]] = None) -> torch.Tensor:
    """A mask over this rank's keys -> over every rank's keys, in rank order (the order Ulysses' all-to-all
    gathers keys in). ``heads`` = (heads, local heads, degree): a mask per head ([B, H, Q, K]) then also goes to
    this rank's heads, by the same all-to-all as q, k and v."""
    m = _sendable(mask)
    if heads is not None and m.dim() == 4 and m.shape[1] == heads[0] > 1:
        count, local, degree = heads
        m = torch.nn.functional.pad(m.permute(0, 3, 1, 2), (0, 0, 0, local * degree - count))  # [B, K, H, Q]
        m = seq_to_heads(m, degree, group).permute(0, 2, 3, 1)
    else:
        (m,) = _all_gather((m,), m.dim() - 1, group)
    return m.to(mask.dtype)


def _mask_pieces(mask, mask_split, segments):
    """The pieces of a key mask that cover this rank's keys only (each to gather from every rank along its last
    dim, as the keys are), and how the mask over the ``keys`` gathered keys joins from them. ``mask_split``:
    False, the mask covers those keys already; "runs", it covers this rank's joint keys in their order (built in
    the block: Qwen-Image's text mask joined with ones for this rank's image tokens), whose sharded runs are the
    pieces; else it covers this rank's keys only (a padded chunk of a mask built before the blocks,
    runtime/sequence_parallel.py MaskSplit, or a key mask built from this rank's tokens)."""
    if not mask_split:
        return [], lambda gathered, keys: mask
    if mask_split != "runs":
        return [mask], lambda gathered, keys: gathered[0][..., :keys]
    parts = mask.split([n for _, n in segments], dim=-1)

    def join(gathered, keys):
        pieces = iter(gathered)
        return torch.cat([next(pieces) if sharded else m for (sharded, _), m in zip(segments, parts)], dim=-1)
    return [m for (sharded, _), m in zip(segments, parts) if sharded], join


def _split_runs(t: torch.Tensor, segments) -> Sequence[torch.Tensor]:
    return t.split([n for _, n in segments], dim=1) if len(segments) > 1 else (t,)


def _join(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(list(parts), dim=1)


def _unpadded(t: torch.Tensor, pad: int) -> torch.Tensor:
    """Keys (values) of a sharded run gathered in rank order without the ``pad`` tokens the runner appended to
    its sequence to make it divisible (runtime/sequence_parallel.py): they end the last rank's chunk, so the
    gathered run's last ones. A view."""
    return t[:, :t.shape[1] - pad] if pad else t


def ulysses_attention(q, k, v, mask, scale, layout, degree, group, segments=None, mask_split=False, pads=None):
    """Attention over tokens split across ranks. ``segments``: runs of (sharded, local length) along the
    sequence, default one sharded run; a sharded run is all-to-all'ed (all its tokens, this rank's heads),
    a replicated run keeps this rank's heads, in their order, and after attention the inverse (the
    replicated heads all-gathered). ``mask_split``: the mask covers this rank's keys only (a padded chunk of a
    mask built before the blocks, runtime/sequence_parallel.py MaskSplit, or a key mask built from this rank's
    tokens) and is all-gathered along the keys, in the order the all-to-all gathers them. ``pads``: per segment,
    tokens that end its sequence only to make it divisible; attended by no query (their own queries' outputs are
    dropped later)."""
    if layout == "BHSD":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    heads = q.shape[2]
    segments = segments or ((True, q.shape[1]),)
    pads = pads or (0,) * len(segments)
    local = -(-heads // degree)  # any head count: zero heads up to a multiple of the degree, dropped after
    # (a zero head attends uniformly to zero values: its output is zeros, never NaN)

    def gather_tokens(t, keys):
        if local * degree > heads:
            t = torch.nn.functional.pad(t, (0, 0, 0, local * degree - heads))
        # A replicated run goes through the same all-to-all: every rank sends the same head chunks, so the
        # first of the copies a rank gets holds its own heads (no rank in the graph: one cache entry for all).
        gathered = [seq_to_heads(r, degree, group) for r in _split_runs(t, segments)]
        return _join([(_unpadded(g, pad) if keys else g) if sharded else g[:, :n]
                      for (sharded, n), g, pad in zip(segments, gathered, pads)])

    q, k, v = gather_tokens(q, False), gather_tokens(k, True), gather_tokens(v, True)
    pieces, join_mask = _mask_pieces(mask, mask_split, segments)
    mask = join_mask([_all_keys(m, group, (heads, local, degree)) for m in pieces], k.shape[1])
    out = torch.ops.mindiesd_compile.attention(q, k, v, mask, scale, "BSHD")
    runs = _split_runs(out, [(sharded, n * degree if sharded else n) for sharded, n in segments])
    # a replicated run's heads are all-gathered back onto every rank
    out = _join([heads_to_seq(r, degree, group) if sharded else _all_gather((r,), 2, group)[0]
                 for (sharded, _), r in zip(segments, runs)])[:, :, :heads]
    return out.transpose(1, 2) if layout == "BHSD" else out


def gather_kv_attention(q, k, v, mask, scale, layout, degree, group, segments=None, mask_split=False, overlap=False,
                        pads=None, last_rank=False):
    """The same attention with keys and values all-gathered instead: each rank keeps its queries and every
    head and attends over all keys (sharded runs gathered in rank order, replicated runs as they are, i.e.
    the key order ``ulysses_attention`` has); its output holds its own tokens, so nothing is exchanged after
    attention, no layout is copied, and any head count works. The bytes received match Ulysses' on 2 ranks
    and grow with the degree (keys and values: (P-1)/P of them, against 4 tensors' (P-1)/P^2).
    ``overlap``: how the exchange hides behind compute (options.py picks): "ahead", keys and values each
    exchanged as soon as projected (passes/early_exchange.py), beside the projections still to come, attention
    waiting for every key (a key mask split across ranks goes with the keys); "split", also
    attention over this rank's own keys while the other ranks' arrive, then over theirs, the two merged by their
    log-sum-exp (a second attention kernel and the merge for more to hide behind; with a mask: "ahead"); False:
    NCCL, awaited at once. ``pads``: as in ``ulysses_attention``; ``last_rank``: whether this rank's own keys
    (which "split" reads apart from the others') end with the pads."""
    if layout == "BHSD":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    segments = segments or ((True, k.shape[1]),)
    pads = pads or (0,) * len(segments)
    if overlap == "split" and mask is None:
        out = _attend_while_gathering(q, k, v, scale, group, segments, pads, last_rank)
        return out.transpose(1, 2) if layout == "BHSD" else out
    sharded = [i for i, (s, _) in enumerate(segments) if s]
    k_runs, v_runs = list(_split_runs(k, segments)), list(_split_runs(v, segments))
    ks, vs = [k_runs[i] for i in sharded], [v_runs[i] for i in sharded]
    pieces, join_mask = _mask_pieces(mask, mask_split, segments)
    # the mask's pieces go with the keys, their key dim where the keys have theirs: in "ahead" a third peer gather
    # before the attention would reuse the keys' buffer (two in turn), and an NCCL one would put NCCL kernels into
    # cuda_graphs' capture; else one coalesced NCCL call for all
    masks = [_sendable(m).movedim(-1, 1) for m in pieces]
    gathered = _gather_ahead(ks + masks, 1, group) + _gather_ahead(vs, 1, group) if overlap else \
        _all_gather(ks + masks + vs, 1, group)
    gk, gm, gv = gathered[:len(ks)], gathered[len(ks):len(ks) + len(masks)], gathered[len(ks) + len(masks):]
    for i, k_run, v_run in zip(sharded, gk, gv):
        k_runs[i], v_runs[i] = _unpadded(k_run, pads[i]), _unpadded(v_run, pads[i])
    k, v = _join(k_runs), _join(v_runs)
    mask = join_mask([g.movedim(1, -1).to(m.dtype) for g, m in zip(gm, pieces)], k.shape[1])
    out = torch.ops.mindiesd_compile.attention(q, k, v, mask, scale, "BSHD")
    return out.transpose(1, 2) if layout == "BHSD" else out


def _gather_ahead(xs, dim, group):
    """``_all_gather`` by one ``all_gather_peers`` call (e.g. the keys' sharded runs): started as soon as its
    tensors exist (passes/early_exchange.py), beside the projections still to come, which it runs under on copy
    engines; awaited here, just before attention."""
    wait = torch.ops._c10d_functional.wait_tensor
    return tuple(wait(t) for t in torch.ops.mindiesd_compile.all_gather_peers(list(xs), dim, group, True))


# SMs the local attention leaves free: the exchange beside it needs one for each of its barrier kernels
# (ops/peer_gather.py); a 2-SM carve-out cost nothing measurable (bench/RESULTS.md, 2026-11-26)
SM_MARGIN_BESIDE_EXCHANGE = 2


def _attend_while_gathering(q, k, v, scale, group, segments, pads, last_rank):
    """[B, S, H, D] attention over this rank's keys (its sharded runs and the replicated ones) while the other
    ranks' sharded runs arrive (``all_gather_peers``, awaited only after it), then over those; the two partial
    results merge by their log-sum-exp. Softmax does not depend on key order, so the peers' keys may come in
    any order. ``pads`` (per segment) end the last rank's chunk of each run: its own keys there, the peers'
    gathered ones on the other ranks."""
    ops = torch.ops.mindiesd_compile
    sharded = [i for i, (s, _) in enumerate(segments) if s]
    k_runs, v_runs = _split_runs(k, segments), _split_runs(v, segments)
    peers = ops.all_gather_peers([t for i in sharded for t in (k_runs[i], v_runs[i])], 1, group)
    if last_rank and any(pads):
        k, v = (_join([_unpadded(r, pad) for r, pad in zip(runs, pads)]) for runs in (k_runs, v_runs))
    local, local_lse = ops.attention_partial(q, k, v, None, scale, "BSHD", SM_MARGIN_BESIDE_EXCHANGE)
    peer_pads = [0 if last_rank else pads[i] for i in sharded for _ in "kv"]
    peers = [_unpadded(torch.ops._c10d_functional.wait_tensor(t), pad)  # traced after the local attention
             for t, pad in zip(peers, peer_pads)]
    remote, remote_lse = ops.attention_partial(q, _join(peers[0::2]), _join(peers[1::2]), None, scale, "BSHD", 0)
    return merge_partials(local, local_lse, remote, remote_lse, "BSHD")


EXCHANGES = {"ulysses": ulysses_attention, "gather_kv": gather_kv_attention}


@dataclasses.dataclass(frozen=True)
class Joint:
    """A value whose token dim ``dim`` holds runs of sharded and replicated tokens: ``segments`` are
    (sharded, local length) in order; ``outer`` > 1 while a view has merged the batch into that dim."""
    segments: Tuple[Tuple[bool, int], ...]
    dim: int
    outer: int = 1

    @property
    def length(self) -> int:
        return sum(n for _, n in self.segments)


State = Union[bool, Joint]  # False: replicated, True: sharded


def _val(node):
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else None


def _runs(segments) -> Union[bool, Tuple]:
    """One sharded run is plainly sharded, replicated runs are replicated, anything else stays runs."""
    if all(not sharded for sharded, _ in segments):
        return False
    if len(segments) == 1:
        return True
    return tuple(segments)


class UlyssesPass(GraphPass):
    name = "sequence_parallel"
    required = True  # a failure must stop the compile: the unrewritten graph would compute garbage

    def __init__(self, report, degree: int, group: str, sharded_inputs: Sequence[int], mode: str = "ulysses",
                 overlap: Union[bool, str] = False, pads: Tuple[Tuple[int, int], ...] = ()):
        """``pads``: (tokens per rank, pad) of every sequence the runner split this call, where it padded one to a
        multiple of the degree (the pad ends the last rank's chunk; every attention leaves it out of its keys)."""
        super().__init__(report)
        self.degree, self.group, self.sharded_inputs = degree, group, frozenset(sharded_inputs)
        self.exchange = EXCHANGES[mode]
        self.options = {"overlap": overlap} if mode == "gather_kv" else {}
        self.pads = dict(pads)
        if pads and mode == "gather_kv":  # "split" reads this rank's keys apart: the last rank's end with the pads
            self.options["last_rank"] = \
                torch.distributed.distributed_c10d._resolve_process_group(group).rank() == degree - 1

    def uuid(self) -> bytes:
        config = (self.degree, self.group, sorted(self.sharded_inputs), self.exchange.__name__, self.options,
                  sorted(self.pads.items()))
        return hashlib.sha256(super().uuid() + repr(config).encode()).digest()

    def __call__(self, graph: torch.fx.Graph) -> None:
        sharded: Dict[torch.fx.Node, State] = {}
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        for i, n in enumerate(placeholders):
            sharded[n] = i in self.sharded_inputs
        for node in list(graph.nodes):
            if node.op == "placeholder":
                continue
            if op_name(node.target) == "attention":
                q, k, v, mask = node.args[:4]
                flags = [sharded.get(t, False) for t in (q, k, v)]
                if all(f is True for f in flags):
                    sharded[self._rewrite(graph, node, sharded.get(mask, False))] = True
                    continue
                if all(isinstance(f, Joint) for f in flags):
                    sharded[self._rewrite_joint(graph, node, flags, sharded.get(mask, False))] = flags[0]
                    continue
                if flags == [True, False, False]:  # sharded queries, replicated keys: local
                    sharded[node] = True
                    continue
                if flags == [False, True, True]:  # replicated queries over sharded keys (LTX-2's audio attending
                    # to the video): every rank gathers the keys and values and computes the whole, replicated output
                    sharded[self._rewrite(graph, node, sharded.get(mask, False), queries_sharded=False)] = False
                    continue
                if any(flags):
                    raise SequenceParallelError(
                        f"attention {node.name} mixes sharded and replicated tokens (q, k, v: {flags}); "
                        "shard every sequence that enters it (list it in the parallel plan)")
            sharded[node] = self._propagate(node, sharded)

    def _propagate(self, node, sharded) -> State:
        """Which tokens of ``node`` are sharded: a cat of sharded and replicated runs starts a Joint,
        slices at run boundaries end it, anything else carries it along its token dim."""
        states = [sharded.get(a, False) for a in node.all_input_nodes]
        joint = next((s for s in states if isinstance(s, Joint)), None)
        if node.target is torch.ops.aten.cat.default:
            return self._cat(node, sharded)
        if joint is None:
            return any(s is True for s in states)
        if node.target is torch.ops.aten.slice.Tensor and sharded.get(node.args[0]) is joint:
            return self._slice(node, joint)
        if node.target is operator.getitem and node.args[0].target in SPLITS and sharded.get(node.args[0]) is joint:
            return self._split_piece(node, joint)
        return self._follow(joint, node)

    def _follow(self, joint: Joint, node) -> Joint:
        """The joint token dim in ``node``'s output (``outer``: how many joint sequences a view merged into it)."""
        val = _val(node)
        if not isinstance(val, torch.Tensor):
            return joint  # a tuple (var_mean, split): each getitem finds its own dim
        total = joint.length
        # Exact where the op says where dims go (sizes may repeat: tokens = head dim = hidden size) ...
        if node.target is torch.ops.aten.permute.default:
            return Joint(joint.segments, [d % val.dim() for d in node.args[1]].index(joint.dim), joint.outer)
        if node.target is torch.ops.aten.unsqueeze.default:
            return Joint(joint.segments, joint.dim + (node.args[1] % val.dim() <= joint.dim), joint.outer)
        if node.target in RESHAPES:  # the dims after the tokens keep their elements; leading dims may merge in
            after = math.prod(_val(node.args[0]).shape[joint.dim + 1:])
            dims = [d for d in range(val.dim()) if math.prod(val.shape[d + 1:]) == after and val.shape[d] % total == 0]
            if len(dims) == 1:
                return Joint(joint.segments, dims[0], val.shape[dims[0]] // total)
        # ... else the same dim (elementwise, matmul rows), else the one dim of the joint length
        if joint.dim < val.dim() and val.shape[joint.dim] == total * joint.outer:
            return joint
        for outer in {1, joint.outer}:
            dims = [d for d, n in enumerate(val.shape) if n == total * outer]
            if len(dims) == 1:
                return Joint(joint.segments, dims[0], outer)
        raise SequenceParallelError(
            f"cannot follow the joint image+text sequence ({total} tokens on this rank) through {node.name} "
            f"({node.target}, shape {tuple(val.shape)}): its token dim is merged away or ambiguous; joint "
            "attention with text kept whole is not supported for this model")

    def _cat(self, node, sharded) -> State:
        tensors, dim = node.args[0], node.args[1] if len(node.args) > 1 else 0
        states = [sharded.get(t, False) for t in tensors]
        dim %= _val(node).dim()
        if not any(isinstance(s, Joint) for s in states) and len(set(states)) < 2 and \
                not (states and states[0] is True and self._joins_padded_sequences(tensors, dim)):
            return bool(states and states[0])
        joints = [s for s in states if isinstance(s, Joint)]
        if joints and joints[0].dim != dim:  # joined along features: same runs
            if any(s != joints[0] for s in states):
                raise SequenceParallelError(f"{node.name} joins tensors with different token runs along dim {dim}")
            return self._follow(joints[0], node)
        segments = []
        for t, s in zip(tensors, states):
            if isinstance(s, Joint):
                if s.outer != 1:
                    raise SequenceParallelError(f"{node.name} joins a batch-merged joint sequence")
                segments.extend(s.segments)
            else:
                segments.append((s, _val(t).shape[dim]))
        runs = _runs(segments)
        return Joint(runs, dim) if isinstance(runs, tuple) else runs

    def _joins_padded_sequences(self, tensors, dim: int) -> bool:
        """Whether a cat of sharded tensors joins split sequences (each as long as one of this call's, along
        ``dim``), one of them padded: only the last one's pad would end the last rank's chunk, so they stay apart
        as the runs of a Joint (Flux's split text and image)."""
        lengths = [_val(t).shape[dim] for t in tensors]
        return all(n in self.pads for n in lengths) and any(self.pads[n] for n in lengths)

    def _split_piece(self, node, joint: Joint) -> State:
        """Piece ``node.args[1]`` of a split: along the joint dim, the tokens it covers, as ``_slice`` takes them."""
        split, index = node.args
        sizes, dim = (list(split.args) + [0])[1:3]
        if isinstance(sizes, int):  # aten.split: pieces of that size
            sizes = [min(sizes, joint.length - at) for at in range(0, joint.length, sizes)]
        return self._slice(node, joint, (dim, sum(sizes[:index]), sum(sizes[:index + 1]), 1))

    def _slice(self, node, joint: Joint, cut=None) -> State:
        """``cut``: (dim, start, end, step), else the slice node's."""
        dim, start, end, step = cut or (list(node.args) + [0, None, None, 1][len(node.args) - 1:])[1:5]
        if dim % _val(node).dim() != joint.dim or joint.outer != 1:
            return self._follow(joint, node)
        total = joint.length
        start, end, _ = slice(start, end, step).indices(total)
        if step != 1:
            raise SequenceParallelError(f"{node.name} takes every {step}th token of a joint sequence")
        segments, at = [], 0
        for sharded, n in joint.segments:
            lo, hi = max(start, at), min(end, at + n)
            if lo < hi:
                if sharded and (lo, hi) != (at, at + n):
                    raise SequenceParallelError(f"{node.name} cuts into a sharded run of a joint sequence "
                                                f"(tokens {lo - at}..{hi - at} of {n} on this rank)")
                segments.append((sharded, hi - lo))
            at += n
        runs = _runs(segments)
        return Joint(runs, joint.dim) if isinstance(runs, tuple) else runs

    def _rewrite_joint(self, graph, node, flags, mask_state) -> torch.fx.Node:
        q, layout = flags[0], node.args[5]
        seq_dim = 1 if layout == "BSHD" else 2
        if any(f != q for f in flags) or q.dim != seq_dim or q.outer != 1:
            raise SequenceParallelError(f"attention {node.name}: q, k and v join sharded and replicated tokens "
                                        f"differently ({flags}); only joint self-attention is supported")
        mask = _val(node.args[3])
        if isinstance(mask_state, Joint) or (mask is not None and mask.dim() == 4 and mask.shape[1] != 1):
            raise SequenceParallelError(f"attention {node.name}: its mask {tuple(mask.shape)} is built from the "
                                        "joint tokens inside the block or differs per head; only a key mask "
                                        "built before the blocks can follow the split")
        self._check_no_mask_with_pad(node, mask is not None)
        pads = tuple(self.pads.get(n, 0) if sharded else 0 for sharded, n in q.segments)
        local_keys = _val(node.args[1]).shape[seq_dim]
        if mask is not None and mask_state is False and mask.shape[-1] == local_keys and mask.shape[-2] == 1:
            # as long as this rank's joint keys: built in the block over them (one entry per key, the same for
            # every query); a mask over every rank's keys is longer
            mask_state = "runs"
        self.report.found(self.name)
        degree, group, segments, exchange, options = self.degree, self.group, q.segments, self.exchange, self.options
        result = inline_decomposition(graph, node, lambda q, k, v, mask, scale, layout: exchange(
            q, k, v, mask, scale, layout, degree, group, segments, mask_state, pads=pads, **options))
        self.report.rewritten(self.name)
        return result

    def _check_no_mask_with_pad(self, node, masked: bool) -> None:
        if masked and any(self.pads.values()):
            raise SequenceParallelError(
                f"attention {node.name} has a mask and its sequence was padded to a multiple of the degree: not "
                "supported together; choose a resolution (or frame count) whose token count the degree divides")

    def _rewrite(self, graph, node, mask_state, queries_sharded: bool = True) -> torch.fx.Node:
        self.report.found(self.name)
        q, k, v, mask, scale, layout = node.args
        mask_val, k_shape = _val(mask), _val(k).shape
        keys, heads = (k_shape[1], k_shape[2]) if layout == "BSHD" else (k_shape[2], k_shape[1])
        gather_mask = mask is not None
        key_mask = gather_mask and mask_val.shape[-1] == keys and mask_val.shape[-2] == 1 and (
            mask_val.dim() < 4 or mask_val.shape[1] in (1, heads))
        if gather_mask and not (mask_state is True and key_mask):
            # a key mask built from this rank's tokens lines up with its keys, in the order the all-to-all
            # gathers them; a mask over all keys in the single-process order does not (with several runs of split
            # tokens joined, [img_0|txt_0|img_1|...] is not that order), nor does one that differs per query
            raise SequenceParallelError(
                f"attention {node.name} has a mask {tuple(mask_val.shape)} and its keys are split; only a key "
                "mask built from the split tokens (one entry per key on this rank and head, the same for every query) "
                "follows the all-to-all: keep the masked (text) tokens whole, splitting only the image tokens as the "
                "built-in plans do")
        self._check_no_mask_with_pad(node, gather_mask)
        degree, group, exchange, options = self.degree, self.group, self.exchange, self.options
        if not queries_sharded:  # whole queries: no heads to scatter, so keys and values gathered in any mode
            exchange, options = gather_kv_attention, {"overlap": options.get("overlap", False),
                                                      "last_rank": options.get("last_rank", False)}
        pads = (self.pads.get(keys, 0),)
        result = inline_decomposition(graph, node, lambda q, k, v, mask, scale, layout: exchange(
            q, k, v, mask, scale, layout, degree, group, mask_split=gather_mask, pads=pads, **options))
        self.report.rewritten(self.name)
        return result
