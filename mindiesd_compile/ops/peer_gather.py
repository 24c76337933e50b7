"""``torch.ops.mindiesd_compile.all_gather_peers``: the ranks' chunks of each tensor, gathered asynchronously.

``all_gather_peers(xs, dim, group, include_self)`` returns, per tensor, the ranks' tensors joined along ``dim`` in
rank order, this rank's own chunk left out unless ``include_self`` (the caller may attend to it while the rest
arrives). Await each output with ``_c10d_functional.wait_tensor`` like a functional collective: undefined before,
on CUDA valid until the call after next (they view a buffer the calls take in turn; the sequence-parallel pass
reads them in the next attention).

CUDA: copy engines over symmetric memory, no SM spent on the transfer (NCCL's kernels hold SMs, and a compute
kernel beside them slows by what they hide: bench/RESULTS.md 2026-11-26). On a side stream: a barrier, each
tensor written straight into every peer's symmetric slot (GPU-to-GPU copies run on copy engines), a barrier, the
outputs marked ready. A copy within one GPU is an SM kernel, slow beside a compute kernel: the own chunk, when
included, is copied on the calling stream. The outputs are views of this rank's slot, read in place; two slots
alternate, and a call's first barrier waits until every rank has queued its reads of the slot's last contents.
The barriers are one-block kernels: a persistent kernel beside them must leave an SM free (``attention_partial``'s
``sm_margin``) or they run after it. The inputs stay alive until their outputs are awaited (Inductor: the op
lowers as a collective, whose wait holds its inputs; op by op: ``record_stream``). Where symmetric memory is
unavailable (no peer access), NCCL all-gathers synchronously, after one warning. Other devices (gloo): a
synchronous all-gather.
"""
from __future__ import annotations

import functools
import math
import warnings
from typing import List, Sequence

import torch
import torch.distributed as dist
from torch import Tensor
from torch._C._distributed_c10d import Work

_lib = torch.library.Library("mindiesd_compile", "FRAGMENT")
_lib.define("all_gather_peers(Tensor[] xs, int dim, str group, bool include_self=False) -> Tensor[]")


def _gathered_shape(x: Tensor, dim: int, chunks: int) -> List[int]:
    shape = list(x.shape)
    shape[dim] *= chunks
    return shape


def _assemble(x: Tensor, dim: int, chunks: Sequence[Tensor]) -> Tensor:
    return torch.cat(list(chunks), dim=dim) if chunks else x.new_empty(_gathered_shape(x, dim, 0))


def _gather_sync(xs: Sequence[Tensor], dim: int, group_name: str, include_self: bool = False) -> List[Tensor]:
    group = dist.distributed_c10d._resolve_process_group(group_name)
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    out = []
    for x in xs:
        chunks = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(chunks, x.contiguous(), group=group)
        out.append(_assemble(x, dim, [c for r, c in enumerate(chunks) if include_self or r != rank]))
    return out


def _all_gather_peers_fake(xs, dim, group, include_self=False):
    world = dist.distributed_c10d._resolve_process_group(group).size()
    return [x.new_empty(_gathered_shape(x, dim, world - (not include_self))) for x in xs]


class _Ready(Work):
    """What ``wait_tensor`` waits on: an event on the side stream, awaited by the calling stream."""

    def __init__(self, event: torch.cuda.Event):
        super().__init__()
        self.event = event

    def wait(self, timeout=None) -> bool:
        self.event.wait()
        return True


@functools.lru_cache(None)
def _side_stream(device: int) -> torch.cuda.Stream:
    # high priority: the barrier kernels' blocks go before the waiting blocks of the compute kernels beside them
    return torch.cuda.Stream(device, priority=-1)


class _Layout:
    """Where one call signature's tensors go in a slot: per tensor a [outer, chunks, inner] region (chunks: the
    ``world`` ranks', this rank's left out unless ``include_self``), aligned to 16 bytes for any dtype after it (a
    key mask after the keys). Made once per signature."""

    def __init__(self, xs: Sequence[Tensor], dim: int, world: int, include_self: bool):
        self.world, self.include_self = world, include_self
        chunks = world - (not include_self)
        self.regions = [(math.prod(x.shape[:dim]), chunks, math.prod(x.shape[dim:])) for x in xs]
        sizes = [-(-math.prod(r) * x.element_size() // 16) * 16 for r, x in zip(self.regions, xs)]
        self.offsets = [sum(sizes[:i]) for i in range(len(xs))]
        self.nbytes = sum(sizes)
        self.dtypes = [x.dtype for x in xs]
        self.gathered = [_gathered_shape(x, dim, chunks) for x in xs]

    def rows(self, xs: Sequence[Tensor]) -> List[Sequence[Tensor]]:
        """Each tensor's outer rows, flat: the runs a call copies (one per tensor where nothing is outside ``dim``)."""
        return [(x.view(-1),) if r[0] == 1 else x.view(r[0], -1).unbind(0) for x, r in zip(xs, self.regions)]


class _Slot:
    """One symmetric buffer, with each layout's copies and outputs in it made once: op by op on several GPUs the
    host bounds Qwen-Image's forward, and slicing the views per call cost it ~0.2 ms of host time per exchange
    (121 a forward on 4 GPUs; bench/RESULTS.md, 2026-11-28). Each region has its own storage (one ``get_buffer``
    each), so the outputs of one call never alias each other (custom ops' rule)."""

    def __init__(self, tensor: Tensor, hdl):
        self.tensor, self.hdl, self.rank, self.routes = tensor, hdl, hdl.rank, {}

    def region(self, rank: int, at: int, shape, dtype) -> Tensor:
        """A [outer, chunks, inner] region at byte offset ``at`` of ``rank``'s buffer (a peer's: mapped here)."""
        nbytes = math.prod(shape) * dtype.itemsize
        return self.hdl.get_buffer(rank, (nbytes,), torch.uint8, at).view(dtype).view(shape)

    def route(self, layout: _Layout):
        """(tensor index, outer row, destination in a peer's region) for every copy this rank makes, peers in ring
        order; this rank's regions; and the rows of them that hold its own chunk (``include_self``)."""
        got = self.routes.get(layout)
        if got is None:
            sends, include_self = [], layout.include_self
            for peer in _ring_order(self.rank, layout.world):
                at_peer = self.rank if include_self else self.rank - (self.rank > peer)  # this rank's chunk there
                for i, (region, at, dtype) in enumerate(zip(layout.regions, layout.offsets, layout.dtypes)):
                    dst = self.region(peer, at, region, dtype)
                    sends += [(i, o, dst[o, at_peer]) for o in range(region[0])]
            mine = [self.region(self.rank, at, region, dtype)
                    for region, at, dtype in zip(layout.regions, layout.offsets, layout.dtypes)]
            own = [m[:, self.rank] for m in mine] if include_self else []
            got = self.routes[layout] = sends, mine, own
        return got


class _Slots:
    """Per group: two symmetric buffers used in turn (a call's outputs are read in place while the next call's
    pushes may already land), each grown by a new allocation when a call needs more (old ones are kept: earlier
    outputs may still view them). Every rank makes the same calls in the same order, so turns and growth agree."""

    def __init__(self, group: str):
        self.group, self.buffers, self.turn, self.kept, self.layouts = group, [None, None], 0, [], {}
        _ALL_SLOTS.append(self)

    @functools.cached_property
    def world(self) -> int:
        return dist.distributed_c10d._resolve_process_group(self.group).size()

    def layout(self, xs: Sequence[Tensor], dim: int, include_self: bool) -> _Layout:
        key = (dim, include_self, *((x.shape, x.dtype) for x in xs))
        got = self.layouts.get(key)
        if got is None:
            got = self.layouts[key] = _Layout(xs, dim, self.world, include_self)
        return got

    def next(self, nbytes: int, device: torch.device):
        from torch._C._distributed_c10d import _SymmetricMemory
        i, self.turn = self.turn, 1 - self.turn
        buf = self.buffers[i]
        if buf is None or buf.tensor.numel() < nbytes:
            if buf is not None:
                self.kept.append(buf)
            t = _SymmetricMemory.empty_strided_p2p((nbytes,), (1,), torch.uint8, device, self.group)
            self.buffers[i] = buf = _Slot(t, _SymmetricMemory.rendezvous(t))
        return buf


_ALL_SLOTS: List[_Slots] = []


def slot_turns() -> List[int]:
    """Which slot each group's next call takes: a capture that is thrown away (runtime/cuda_graph.py) must leave
    them as they were, or this rank would write into a slot its peers are not reading."""
    return [slots.turn for slots in _ALL_SLOTS]


def restore_slot_turns(turns: Sequence[int]) -> None:
    for slots, turn in zip(_ALL_SLOTS, turns):
        slots.turn = turn


def every_rank(ok: bool, group, device: torch.device) -> bool:
    """Whether ``ok`` holds on every rank of ``group``: ranks that must take one path agree on it."""
    flag = torch.tensor([int(ok)], device=device)
    dist.all_reduce(flag, dist.ReduceOp.MIN, group=group)
    return bool(flag.item())


@functools.lru_cache(None)
def _slots(group_name: str, device: torch.device):
    """The group's ``_Slots``, or None (after one warning) where symmetric memory is unavailable on any rank (all
    ranks must take the same path: one waiting at a barrier for a rank that went to NCCL would hang)."""
    why = ""
    try:
        from torch.distributed import _symmetric_memory as symm
        if hasattr(symm, "enable_symm_mem_for_group"):  # required before torch 2.12, a deprecated no-op after
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                symm.enable_symm_mem_for_group(group_name)
        symm.get_symm_mem_workspace(group_name, 1)  # fails here without peer access
    except Exception as err:  # noqa: BLE001 - no P2P between the GPUs, a torch without it: fall back
        why = f"{type(err).__name__}: {err}"
    if every_rank(not why, dist.distributed_c10d._resolve_process_group(group_name), device):
        return _Slots(group_name)
    warnings.warn(f"mindiesd_compile: symmetric memory unavailable for group {group_name} ({why or 'on another rank'}); "
                  "keys and values are all-gathered by NCCL, without overlap", RuntimeWarning)
    return None


def on_copy_engines(group_name: str, device: torch.device) -> bool:
    """Whether this group's calls run on copy engines (False: NCCL, symmetric memory being unavailable on some
    rank; every rank gets the same answer)."""
    return _slots(group_name, device) is not None


def _ring_order(rank: int, world: int) -> List[int]:
    """The peers this rank writes to, in turn: the next rank first. At every step each GPU then receives from
    one peer; in rank order all ranks would write into rank 0 first, 3 writers sharing its links on 4 GPUs."""
    return [(rank + i) % world for i in range(1, world)]


def _all_gather_peers_cuda(xs: Sequence[Tensor], dim: int, group: str, include_self: bool = False) -> List[Tensor]:
    device = xs[0].device
    slots = _slots(group, device)
    if slots is None:
        return _gather_sync(xs, dim, group, include_self)
    xs = [x.contiguous() for x in xs]
    layout = slots.layout(xs, dim, include_self)
    slot = slots.next(layout.nbytes, device)
    sends, mine, own = slot.route(layout)
    rows = layout.rows(xs)
    side, caller = _side_stream(device.index), torch.cuda.current_stream(device)
    side.wait_stream(caller)  # the tensors are ready, and this rank's reads of this slot's last contents queued
    ready = torch.cuda.Event()
    with torch.cuda.device(device.index):  # set_stream, not torch.cuda.stream(): cheaper on the host
        torch.cuda.set_stream(side)
        try:
            slot.hdl.barrier(channel=0)  # every rank here: its tensors ready, its slot free
            for i, o, dst in sends:  # contiguous runs: copy-engine writes over NVLink
                dst.copy_(rows[i][o])
            slot.hdl.barrier(channel=0)  # every peer's writes into this rank's slot have landed
            ready.record(side)
        finally:
            torch.cuda.set_stream(caller)
    for mine_own, x in zip(own, xs):  # after the side stream's start: the pushes need not wait for this copy
        mine_own.copy_(x.view(mine_own.shape))
    outs = [m.view(shape) for m, shape in zip(mine, layout.gathered)]  # fresh tensors over the slot's regions
    work = _Ready(ready)
    for x in xs:
        x.record_stream(side)
    for out in outs:
        torch._C._distributed_c10d._register_work(out, work)
    return outs


_lib.impl("all_gather_peers", _gather_sync, "CompositeExplicitAutograd")
_lib.impl("all_gather_peers", _all_gather_peers_cuda, "CUDA")
torch.library.register_fake("mindiesd_compile::all_gather_peers", _all_gather_peers_fake, lib=_lib)


def register_inductor_lowering() -> None:
    """Lower ``all_gather_peers`` as a collective: Inductor then keeps each input alive until its output's wait (the
    side stream reads it until then). Called by the Inductor lowering, once."""
    from torch._inductor import ir
    from torch._inductor.lowering import lowerings, register_lowering
    op = torch.ops.mindiesd_compile.all_gather_peers
    if op in lowerings or op.default in lowerings:
        return

    @register_lowering(op, type_promotion_kind=None)
    def _lower(xs, dim, group, include_self=False):
        return [ir.TensorBox.create(t) for t in
                ir._CollectiveKernel.create_out_of_place(op.default, xs, dim, group, include_self)]
