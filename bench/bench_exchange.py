"""The Ulysses exchange alone: NCCL all-to-all with and without each rank's own part.

    torchrun --nproc_per_node=N bench/bench_exchange.py

all_to_all_single with equal splits also sends each rank's own chunk through NCCL (a local copy inside the
kernel: half the bytes on 2 GPUs). The other variant sends and receives the peers' chunks only (one NCCL
group of send/recv) and copies the own chunk with a plain copy. Buffers as the sequence-parallel compile
sends them for Wan2.1 at 832x480x81: one of q, k, v or the output, [N, 1, 32760/N, heads/N, 128] bf16.
Rank 0 prints ms per exchange (10 back to back, median of 10 such runs) and the rate over the bytes that
cross NVLink.
"""
import os
import statistics

import torch
import torch.distributed as dist


def per_call_ms(fn, dev, calls=10, runs=10):
    fn()
    out = []
    for _ in range(runs):
        dist.barrier()
        torch.cuda.synchronize(dev)
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(calls):
            fn()
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b) / calls)
    return statistics.median(out)


def main():
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.cuda.set_device(dev)
    for model, heads in (("1.3B", 12), ("14B", 40)):
        x = torch.randn(world, 1, 32760 // world, -(-heads // world), 128, device=dev, dtype=torch.bfloat16)
        out = torch.empty_like(x)
        flat_in, flat_out = x.view(world, -1), out.view(world, -1)
        others = [r for r in range(world) if r != rank]

        def full():
            dist.all_to_all_single(out, x)

        def without_self():
            ops = [dist.P2POp(dist.isend, flat_in[r], r) for r in others] + \
                  [dist.P2POp(dist.irecv, flat_out[r], r) for r in others]
            for work in dist.batch_isend_irecv(ops):
                work.wait()
            flat_out[rank].copy_(flat_in[rank])

        ms_full, ms_self = per_call_ms(full, dev), per_call_ms(without_self, dev)
        full()
        ref = out.clone()
        without_self()
        ok = torch.equal(ref, out)
        crossing = x.numel() * 2 * (world - 1) / world
        if rank == 0:
            for name, ms in (("all_to_all_single", ms_full), ("without own part + copy", ms_self)):
                print(f"EXCHANGE {model} gpus={world} {name:26s} {ms:7.3f} ms  {crossing / ms / 1e6:6.1f} GB/s "
                      f"over NVLink  (buffer {x.numel() * 2 / 2**20:.0f} MiB, equal: {ok})")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
