"""``options["cuda_graphs"]``: the compiled forward replayed as one CUDA graph per input signature.

Why: at a small resolution a DiT forward is bound by kernel launches, not by FLOPs. Wan2.1-1.3B at 480x272x17
(2,550 tokens) on an H100: 53.6 ms op by op, 17.5 ms with this option, Inductor 28.0 ms (one run); at 832x480x81
capture changes nothing (bench/RESULTS.md).

How: the first call of a signature (shapes, strides, dtypes, sizes) runs op by op: it compiles the pieces and
lets cuBLAS, FA3 and Triton initialise. The second warms up once on a side stream and captures. Inputs that are
the model's parameters or buffers (Dynamo passes them as graph inputs) are read where they are; every other input
(latents, timestep, text) is copied into the graph's own buffer before each replay. Outputs are cloned, so two
calls in a row (CFG's cond and uncond) never share a buffer. A parameter replaced by another tensor (weights
reloaded) makes a fresh capture. A capture that fails (a host sync in a piece, an op a graph cannot hold) leaves
that signature op by op, with a warning: never a wrong result. Under sequence parallelism (``group``) the ranks
agree: if one rank's capture fails, every rank runs op by op, its exchange slot turns back where they were before
the warm-up and capture (ops/peer_gather.py), so all ranks keep writing into the slots their peers read; and
where the exchange falls back to NCCL (no symmetric memory), nothing is captured.

With a cache policy the partition runner wraps each piece instead (``replay_as_graphs``; runner.py,
``piece_graphs``): the policy picks the pieces on the host every step, and the graphs share their memory
(``PieceMemory``). Qwen-Image 20B on 4 H200s, a call that runs every block: 60.5-65.6 ms against 99-190 ms op by
op (bench/bench_cache_graphs.py). "auto" then judges each piece on its own.

"auto" (``auto=True``, the options' default where a capture is possible) captures only what it measured faster:
the second call of a signature is timed op by op; if the host issued it in under half its wall time, the GPU never
waited for the host and nothing is captured. Otherwise the third call captures and the graph's second replay (the
first uploads it) is timed too: the graph stays if it is at least 3 % faster, else it is freed and the signature
runs op by op. Under sequence parallelism the slowest rank's times decide, so every rank keeps the same. Why not capture
everything: a graph holds its own memory pool, and a 14B forward at 832x480x81 gains nothing from it; Qwen-Image
20B on 4 GPUs is 3.1x faster captured (op by op its ranks' hosts bound it, and each exchange waits for the
slowest).
"""
from __future__ import annotations

import dataclasses
import logging
import time
import warnings
from collections import Counter
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch.utils import _pytree as pytree

from ..ops import peer_gather

log = logging.getLogger("mindiesd_compile")
HOST_BOUND = 0.5   # auto: host ms / wall ms of an op-by-op call from which a graph may pay
KEEP_IF = 0.97     # auto: a graph stays if its replay takes at most this share of the op-by-op call


def _is_static(x) -> bool:
    """A parameter or buffer of the model: same storage every call, so the graph may read it in place."""
    return isinstance(x, torch.nn.Parameter) or getattr(x, "_dynamo_static_input_type", None) is not None


@dataclasses.dataclass
class Captured:
    graph: Any                       # torch.cuda.CUDAGraph (or a stand-in with replay())
    inputs: List[Any]                # what the graph reads: static inputs themselves, copies of the others
    static_ptrs: Tuple[int, ...]     # data_ptr of each static input when captured
    outputs: Any


class PieceMemory:
    """What the graphs of one partition's pieces share, because they replay one at a time: one memory pool for
    their scratch, and one buffer per input and per output slot (a slot: shape, stride, dtype and device, and
    which of the piece's tensors with those it is). A replay reads inputs copied into the slots just before it and
    copies its outputs into the slots, which are cloned before the next piece runs; so no graph's own memory has
    to outlive its replay. Wan2.1-1.3B at 832x480x81 with every block captured, on one H200: 0.43 GiB over op by
    op (with the one warm-up stream), against 17.3 GiB when each piece held its own inputs and outputs, as a
    whole-forward graph does (bench/RESULTS.md 2026-11-28, twenty-first and twenty-second sessions). The price:
    one copy of the outputs per replay (0.6-1.2 % of that GPU-bound forward, which "auto" leaves op by op)."""

    def __init__(self, graphs=torch.cuda):
        self.pool = graphs.graph_pool_handle()
        self.slots: Dict[Tuple, torch.Tensor] = {}
        self.stream = None  # the pieces' warm-up stream (CudaGraphForward._warmup_stream)

    def buffers(self, kind: str, tensors: List[Any]) -> List[Any]:
        """The ``kind`` ("in", "out") slot for each tensor of ``tensors`` (other values as they are). Made outside
        any capture, so that no graph's pool holds them."""
        nth: Counter = Counter()
        out = []
        for t in tensors:
            if not isinstance(t, torch.Tensor):
                out.append(t)
                continue
            like = (kind, t.shape, t.stride(), t.dtype, t.device)
            key = (*like, nth[like])
            nth[like] += 1
            if key not in self.slots:
                self.slots[key] = torch.empty_like(t)  # the strides a clone of ``t`` has
            out.append(self.slots[key])
        return out


class CudaGraphForward:
    """Wraps a compiled forward ``fn(*args) -> outputs``; see the module docstring. Per call it looks at the few
    inputs that change (parameters and buffers sit at fixed positions: Dynamo's calling convention), so its own
    cost stays small next to the launches it saves."""

    def __init__(self, fn: Callable, device: torch.device, graphs=torch.cuda, group=None, auto: bool = False,
                 shared: Optional[PieceMemory] = None):
        self.fn, self.device, self.graphs = fn, device, graphs  # ``graphs``: torch.cuda (tests pass a stand-in)
        self.group = group  # the sequence-parallel ranks, which must all capture or none
        self.auto = auto    # capture only where measured faster (module docstring)
        self.shared = shared  # memory shared with graphs replayed in turn (one per piece: runner.py)
        self.stream = None    # the warm-up stream, without ``shared``
        self.static: Optional[Tuple[int, ...]] = None  # positions of parameters and buffers
        self.dynamic: Tuple[int, ...] = ()
        self.seen: set = set()
        self.captured: Dict[Tuple, Optional[Captured]] = {}  # None: capture failed (or did not pay), run op by op
        self.trials: Dict[Tuple, float] = {}  # auto: the op-by-op wall ms, until the signature's graph is judged

    def __call__(self, *args):  # Dynamo calls a backend's result unboxed, whatever its ``_boxed_call`` says
        if self.static is None:
            self.static = tuple(i for i, a in enumerate(args) if _is_static(a))
            self.dynamic = tuple(i for i in range(len(args)) if i not in self.static)
        key = tuple((a.shape, a.stride(), a.dtype, a.device) if isinstance(a, torch.Tensor) else a
                    for a in (args[i] for i in self.dynamic))
        if key not in self.seen:  # first call: compile and initialise op by op
            self.seen.add(key)
            return self._run(args)
        entry = self.captured.get(key, ...)
        if entry is ... and self.auto and key not in self.trials:
            return self._time_op_by_op(key, args)
        fresh = entry is ... or (entry is not None and self._static_ptrs(args) != entry.static_ptrs)
        if fresh:
            entry = self.captured[key] = self._capture(args)
        if entry is None:
            self.trials.pop(key, None)
            return self._run(args)
        if key in self.trials and not fresh:  # auto: the second replay (the first, after capturing, uploads it)
            return self._judge(key, entry, args)
        return self._replay(entry, args)

    def _run(self, args):
        return self.fn(*args)

    def _replay(self, entry: Captured, args):
        self._copy_in(entry.inputs, args)
        entry.graph.replay()
        return _clone(entry.outputs)

    # --- auto: capture what pays -------------------------------------------------------------------------
    def _time_op_by_op(self, key, args):
        out, host_ms, wall_ms = self._timed(lambda: self._run(args))
        if host_ms < HOST_BOUND * wall_ms:
            log.info("mindiesd_compile: cuda_graphs auto: not captured, the GPU bounds this forward (host %.1f ms of "
                     "%.1f ms)", host_ms, wall_ms)
            self.captured[key] = None
        else:
            self.trials[key] = wall_ms
        return out

    def _judge(self, key, entry: Captured, args):
        op_ms = self.trials.pop(key)
        out, _, graph_ms = self._timed(lambda: self._replay(entry, args))
        kept = graph_ms <= KEEP_IF * op_ms
        log.info("mindiesd_compile: cuda_graphs auto: graph %.1f ms, op by op %.1f ms: %s", graph_ms, op_ms,
                 "kept" if kept else "freed, op by op from now on")
        if not kept:
            self.captured[key] = None  # the graph and its memory pool go
        return out

    def _timed(self, run):
        """``run()``'s output and its host and wall ms (the slowest rank's), from an idle GPU, the ranks starting
        together: host ms is how long issuing the call took, wall ms until the GPU finished it."""
        self.graphs.synchronize(self.device)
        self._slowest(0.0, 0.0)  # the GPU idle, the ranks meet
        start = time.perf_counter()
        out = run()
        host = time.perf_counter() - start
        self.graphs.synchronize(self.device)
        return (out, *self._slowest(host * 1e3, (time.perf_counter() - start) * 1e3))

    def _slowest(self, *ms: float) -> List[float]:
        if self.group is None:
            return list(ms)
        worst = torch.tensor(ms, device=self.device)
        torch.distributed.all_reduce(worst, torch.distributed.ReduceOp.MAX, group=self.group)
        return worst.tolist()  # (waits for the GPU)

    def _capture(self, args) -> Optional[Captured]:
        group_name = getattr(self.group, "group_name", self.group)  # a ProcessGroup, or its name
        if self.group is not None and not peer_gather.on_copy_engines(group_name, self.device):
            self._tell("no symmetric memory between these GPUs, so the sequence-parallel exchange runs on NCCL, "
                       "whose kernels in a CUDA graph hang the process group's teardown (pytorch/pytorch#115388); "
                       "these inputs run op by op")
            return None
        inputs = self._input_buffers(args)
        turns = peer_gather.slot_turns()  # this rank's exchange slots, to put back if the ranks drop the capture
        why = None
        try:
            side = self._warmup_stream()
            side.wait_stream(self.graphs.current_stream(self.device))
            with self.graphs.stream(side):
                warm = self._run(inputs)  # kernels that initialise lazily do it outside the capture
            self.graphs.current_stream(self.device).wait_stream(side)
            flat, spec = pytree.tree_flatten(warm)
            slots = None if self.shared is None else self.shared.buffers("out", flat)
            del warm, flat
            graph, pool = self.graphs.CUDAGraph(), None if self.shared is None else self.shared.pool
            # thread_local, as Inductor's CUDA graph trees: another thread's CUDA call (NCCL's watchdog polling an
            # earlier collective's event) cannot invalidate this capture; this thread's illegal calls still fail it
            with self.graphs.graph(graph, pool=pool, capture_error_mode="thread_local"):
                outputs = self._run(inputs)
                if slots is not None:  # the pool's own outputs are then free: scratch for the other pieces
                    outputs = _copied_into(slots, spec, outputs)
        except Exception as err:  # noqa: BLE001 - an optional speed-up must never cost a result
            while err.__context__ is not None:  # the first error: ending a failed capture raises one of its own
                err = err.__context__
            why = f"{type(err).__name__}: {str(err)[:200]}"
        if self.group is not None and not peer_gather.every_rank(why is None, self.group, self.device):
            why = why or "on another rank"
        if why is not None:
            peer_gather.restore_slot_turns(turns)
            self._tell(f"capturing the forward failed ({why}); these inputs run op by op")
            return None
        return Captured(graph, inputs, self._static_ptrs(args), outputs)

    def _warmup_stream(self):
        """One side stream for every warm-up (of all the pieces, with ``shared``): cuBLAS keeps a workspace per
        stream it ran on for the life of the process (32 MiB on Hopper), and a new torch stream per capture cycles
        through 32 pooled streams: up to 1 GiB after a model's pieces (Qwen-Image's per piece on 2 H200s held 1.16
        GiB before, 0.19 after: bench/RESULTS.md 2026-11-28)."""
        holder = self if self.shared is None else self.shared
        if holder.stream is None:
            holder.stream = self.graphs.Stream(self.device)
        return holder.stream

    def _input_buffers(self, args) -> List[Any]:
        """What the graph reads: the static inputs themselves, the others copied into buffers of its own (shared
        slots, for a piece)."""
        if self.shared is None:
            return [a.clone() if i in self.dynamic and isinstance(a, torch.Tensor) else a for i, a in enumerate(args)]
        slots = iter(self.shared.buffers("in", [args[i] for i in self.dynamic]))
        inputs = [next(slots) if i in self.dynamic else a for i, a in enumerate(args)]
        self._copy_in(inputs, args)
        return inputs

    def _copy_in(self, buffers: List[Any], args) -> None:
        """Each changing tensor input into the graph's buffer for it."""
        for i in self.dynamic:
            if isinstance(args[i], torch.Tensor):
                buffers[i].copy_(args[i])

    def _tell(self, why: str) -> None:
        """Asked for, a graph not captured is a warning; under "auto", where it is only tried, a log line."""
        if self.auto:
            log.info("mindiesd_compile: cuda_graphs auto: %s", why)
        else:
            warnings.warn(f"mindiesd_compile: cuda_graphs: {why}", RuntimeWarning, stacklevel=4)

    def _static_ptrs(self, args) -> Tuple[int, ...]:
        return tuple(args[i].data_ptr() for i in self.static)


def replay_as_graphs(compiled: Callable, device: torch.device, group, auto: bool, per_piece: bool,
                     graphs=torch.cuda) -> Callable:
    """The backend's compiled forward under ``options["cuda_graphs"]``: one graph per signature of the whole
    forward, or (``per_piece``: a cache policy, whose partition runner picks the pieces each step) one per piece,
    all sharing their memory."""
    if not per_piece:
        return CudaGraphForward(compiled, device, graphs, group, auto)
    shared = PieceMemory(graphs)
    compiled.piece_graphs = lambda piece: CudaGraphForward(piece, device, graphs, group, auto, shared)
    return compiled


def _copied_into(slots: List[Any], spec, outputs):
    for slot, out in zip(slots, pytree.tree_leaves(outputs)):
        if isinstance(slot, torch.Tensor):
            slot.copy_(out)
    return pytree.tree_unflatten(slots, spec)


def _clone(out):
    # every replay: a compiled forward returns lists and tuples, walked here in ~4 us where pytree takes ~15 (62
    # pieces a call on a host-bound step)
    if isinstance(out, torch.Tensor):
        return out.clone()
    if isinstance(out, (list, tuple)):
        return type(out)(_clone(o) for o in out)
    if isinstance(out, dict):  # a model's own output dict (a piece returns a tuple)
        return {k: _clone(v) for k, v in out.items()}
    return out
