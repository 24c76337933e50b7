"""``torch.ops.mindiesd_compile.gather_peers``: the other ranks' chunks of each tensor, started asynchronously.

``gather_peers(xs, dim, group)`` returns, per tensor, every other rank's tensor joined along ``dim`` in rank order
(this rank's own chunk left out: the caller attends to it while the rest arrives). Await each output with
``_c10d_functional.wait_tensor`` like a functional collective; the outputs are undefined before.

CUDA: copy engines over symmetric memory, no SM spent on the transfer (NCCL's kernels hold SMs, and a compute
kernel beside them slows by what they hide: bench/RESULTS.md 2026-11-26). On a side stream: the tensors are copied
into this rank's symmetric slot, a barrier, each peer's slot is pulled into the output, the outputs are marked
ready, a second barrier (every peer has read the slot before the next call overwrites it). The barriers are
one-block kernels: a persistent kernel beside them must leave an SM free (``attention_partial``'s ``sm_margin``).
The inputs stay alive until their outputs are awaited (Inductor: the op lowers as a collective, whose wait holds
its inputs; op by op: ``record_stream``). Where symmetric memory is unavailable (no peer access), NCCL
all-gathers synchronously, after one warning. Other devices (gloo): a synchronous all-gather.
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
_lib.define("gather_peers(Tensor[] xs, int dim, str group) -> Tensor[]")


def _peer_shape(x: Tensor, dim: int, world: int) -> List[int]:
    shape = list(x.shape)
    shape[dim] *= world - 1
    return shape


def _assemble(x: Tensor, dim: int, chunks: Sequence[Tensor]) -> Tensor:
    return torch.cat(list(chunks), dim=dim) if chunks else x.new_empty(_peer_shape(x, dim, 1))


def _gather_sync(xs: Sequence[Tensor], dim: int, group_name: str) -> List[Tensor]:
    group = dist.distributed_c10d._resolve_process_group(group_name)
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    out = []
    for x in xs:
        chunks = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(chunks, x.contiguous(), group=group)
        out.append(_assemble(x, dim, [c for r, c in enumerate(chunks) if r != rank]))
    return out


def _gather_peers_fake(xs, dim, group):
    world = dist.distributed_c10d._resolve_process_group(group).size()
    return [x.new_empty(_peer_shape(x, dim, world)) for x in xs]


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
    return torch.cuda.Stream(device)


@functools.lru_cache(None)
def _symmetric_memory_ok(group_name: str) -> bool:
    try:
        from torch.distributed import _symmetric_memory as symm
        if hasattr(symm, "enable_symm_mem_for_group"):  # required before torch 2.12, a deprecated no-op after
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                symm.enable_symm_mem_for_group(group_name)
        symm.get_symm_mem_workspace(group_name, 1)
        return True
    except Exception as err:  # noqa: BLE001 - no P2P between the GPUs, a torch without it: fall back
        warnings.warn(f"mindiesd_compile: symmetric memory unavailable for group {group_name} ({type(err).__name__}: "
                      f"{err}); keys and values are all-gathered by NCCL, without overlap", RuntimeWarning)
        return False


def _slot(hdl, rank: int, x: Tensor, at: int) -> Tensor:
    """``x``'s place in ``rank``'s symmetric slot: the tensors lie back to back as bytes (one slot, any dtype)."""
    return hdl.get_buffer(rank, (x.numel() * x.element_size(),), torch.uint8, at).view(x.dtype).view(x.shape)


def _gather_peers_cuda(xs: Sequence[Tensor], dim: int, group: str) -> List[Tensor]:
    if not _symmetric_memory_ok(group):
        return _gather_sync(xs, dim, group)
    from torch.distributed import _symmetric_memory as symm
    xs = [x.contiguous() for x in xs]
    sizes = [x.numel() * x.element_size() for x in xs]
    hdl = symm.get_symm_mem_workspace(group, sum(sizes))
    rank, world = hdl.rank, hdl.world_size
    outs = [x.new_empty(_peer_shape(x, dim, world)) for x in xs]
    side, caller = _side_stream(xs[0].device.index), torch.cuda.current_stream()
    side.wait_stream(caller)
    ready = torch.cuda.Event()
    with torch.cuda.stream(side):
        offsets = [sum(sizes[:i]) for i in range(len(xs))]
        for x, at in zip(xs, offsets):
            _slot(hdl, rank, x, at).copy_(x)
        hdl.barrier(channel=0)
        peers = [r for r in range(world) if r != rank]
        for x, at, out in zip(xs, offsets, outs):
            outer = math.prod(x.shape[:dim])
            dst = out.view(outer, world - 1, -1)
            for i, peer in enumerate(peers):
                src = _slot(hdl, peer, x, at).view(outer, -1)
                for o in range(outer):  # contiguous runs: plain copy-engine memcpys
                    dst[o, i].copy_(src[o])
        ready.record(side)
        hdl.barrier(channel=0)
    for x in xs:
        x.record_stream(side)
    for out in outs:
        out.record_stream(side)
        torch._C._distributed_c10d._register_work(out, _Ready(ready))
    return outs


_lib.impl("gather_peers", _gather_sync, "CompositeExplicitAutograd")
_lib.impl("gather_peers", _gather_peers_cuda, "CUDA")
torch.library.register_fake("mindiesd_compile::gather_peers", _gather_peers_fake, lib=_lib)


def register_inductor_lowering() -> None:
    """Lower ``gather_peers`` as a collective: Inductor then keeps each input alive until its output's wait (the
    side stream reads it until then). Called by the Inductor lowering, once."""
    from torch._inductor import ir
    from torch._inductor.lowering import lowerings, register_lowering
    op = torch.ops.mindiesd_compile.gather_peers
    if op in lowerings or op.default in lowerings:
        return

    @register_lowering(op, type_promotion_kind=None)
    def _lower(xs, dim, group):
        return [ir.TensorBox.create(t) for t in ir._CollectiveKernel.create_out_of_place(op.default, xs, dim, group)]
