"""One Wan2.1 self-attention under gather_kv on N GPUs: the key/value exchange waited for, or run beside attention.

    torchrun --nproc_per_node=N bench/bench_overlap.py [--configs 1.3b,14b]

Each rank holds its queries, keys and values ([1, 32760/N, heads, 128] bf16, 832x480x81). Timed, ms per call
(CUDA events around 10 calls, median of 10 such runs, rank 0):
- attention:  attention of the local queries over all keys (already gathered): the compute floor of the step;
- exchange:   ``all_gather_peers`` alone (copy engines, symmetric memory), start to wait;
- nccl+attn:  NCCL all-gather of keys and values, waited for, then attention (gather_kv without overlap);
- overlapped: ``all_gather_peers`` started, attention over the local keys (sm_margin 2), wait, attention over the
              peers' keys, log-sum-exp merge (as the pass emits it, merge compiled by Inductor).
Also the overlapped output's rel. L2 against ``attention`` over the NCCL-gathered keys.
"""
import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

sys.path.append(str(Path(__file__).resolve().parents[1]))
sys.path.append(str(Path(__file__).resolve().parent))
import mindiesd_compile  # noqa: E402,F401
from bench_exchange import per_call_ms  # noqa: E402
from mindiesd_compile.ops import merge_partials, peer_gather  # noqa: E402
from mindiesd_compile.passes.ulysses import SM_MARGIN_BESIDE_EXCHANGE  # noqa: E402

HEADS = {"1.3b": 12, "14b": 40}


def timeline(fn, show):
    """Three calls' GPU activity (kernels, copies) by start time, microseconds from the first."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):  # the third call: steady state, launched while the GPU runs the earlier ones
            fn()
        torch.cuda.synchronize()
    events = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                    key=lambda e: e.time_range.start)
    t0 = events[0].time_range.start if events else 0
    for e in events if show else ():
        print(f"TRACE {e.time_range.start - t0:9.1f} {e.time_range.end - e.time_range.start:9.1f} us  "
              f"{e.name[:90]}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="1.3b,14b")
    ap.add_argument("--trace", action="store_true", help="rank 0 prints one overlapped call's GPU timeline")
    ap.add_argument("--side-priority", type=int, default=None,
                    help="the exchange's side stream at this priority instead of the op's (0: low, -1: high)")
    args = ap.parse_args()
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    group = dist.group.WORLD.group_name
    if args.side_priority is not None:
        side = torch.cuda.Stream(priority=args.side_priority)
        peer_gather._side_stream = lambda device: side
    ops = torch.ops.mindiesd_compile
    merge = torch.compile(merge_partials)
    for config in args.configs.split(","):
        shape = (1, 32760 // world, HEADS[config], 128)
        q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        scale = 128 ** -0.5

        def gathered():
            kf, vf = funcol.all_gather_into_tensor_coalesced([k.movedim(1, 0), v.movedim(1, 0)], group)
            return kf.movedim(0, 1), vf.movedim(0, 1)

        def nccl_then_attention():
            kf, vf = gathered()
            return ops.attention(q, kf, vf, None, scale, "BSHD")

        kf, vf = gathered()

        def attention():
            return ops.attention(q, kf, vf, None, scale, "BSHD")

        def exchange():
            return [torch.ops._c10d_functional.wait_tensor(t) for t in ops.all_gather_peers([k, v], 1, group)]

        def overlapped():
            peers = ops.all_gather_peers([k, v], 1, group)
            local, local_lse = ops.attention_partial(q, k, v, None, scale, "BSHD", SM_MARGIN_BESIDE_EXCHANGE)
            kp, vp = (torch.ops._c10d_functional.wait_tensor(t) for t in peers)
            remote, remote_lse = ops.attention_partial(q, kp, vp, None, scale, "BSHD", 0)
            return merge(local, local_lse, remote, remote_lse, "BSHD")

        own = k.shape[1] * rank  # this rank's keys in the gathered ones; the peers' are the rest
        kp_all, vp_all = (torch.cat([t[:, :own], t[:, own + k.shape[1]:]], dim=1) for t in (kf, vf))

        def local():
            return ops.attention_partial(q, k, v, None, scale, "BSHD", SM_MARGIN_BESIDE_EXCHANGE)

        def split():  # the overlapped computation without the exchange: its compute floor
            local, local_lse = ops.attention_partial(q, k, v, None, scale, "BSHD", SM_MARGIN_BESIDE_EXCHANGE)
            remote, remote_lse = ops.attention_partial(q, kp_all, vp_all, None, scale, "BSHD", 0)
            return merge(local, local_lse, remote, remote_lse, "BSHD")

        ref, out = attention(), overlapped()
        rel = float((out.float() - ref.float()).norm() / ref.float().norm())
        variants = (("attention", attention), ("local", local),
                    ("local-margin0", lambda: ops.attention_partial(q, k, v, None, scale, "BSHD", 0)),
                    ("split", split), ("exchange", exchange), ("nccl+attn", nccl_then_attention),
                    ("overlapped", overlapped))
        times = {}
        for name, fn in variants:
            times[name] = per_call_ms(fn, torch.device("cuda", torch.cuda.current_device()))
            if rank == 0:
                print(f"  {config} {name} {times[name]:.3f} ms", flush=True)
        if args.trace:  # every rank calls it (the exchange is collective), rank 0 prints
            timeline(overlapped, rank == 0)
        if rank == 0:
            print(f"OVERLAP {config} gpus={world} " + " ".join(f"{n}={ms:.3f}" for n, ms in times.items()) +
                  f" ms | overlapped vs attention rel L2 {rel:.2e} | kernel choices "
                  f"{sorted(set(mindiesd_compile.ops.attention_kernels.CHOICES.values()))}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
