"""Host time of one ``all_gather_peers`` call on CUDA (the copy-engine exchange), at the shapes of Qwen-Image 20B and
Wan2.1-1.3B. Op by op on several GPUs these models are bound by the host issuing work, and the exchange is what a
rank issues beyond the single-GPU forward.

    torchrun --nproc_per_node=2|4 bench/bench_gather_host.py

Per case: rounds of 20 calls, each output awaited (``wait_tensor``) as the compiled forward does; the GPU is
synchronized between rounds so the launch queue never fills (a full queue would charge GPU time to the host).
Rank 0 prints host us per call (median round) and whether the outputs equal NCCL's all_gather.
"""
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path[:0] = [str(Path(__file__).resolve().parents[1])]
from mindiesd_compile.ops import peer_gather  # noqa: E402

IMPLS = {"main": peer_gather._all_gather_peers_cuda}
try:  # a copy of the previous implementation, where one is being compared (not kept in the repository)
    sys.path[:0] = [str(Path(__file__).resolve().parent)]
    import _old_peer_gather
    IMPLS["before"] = _old_peer_gather._all_gather_peers_cuda
except ImportError:
    pass


def main():
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.cuda.set_device(dev)
    group = dist.group.WORLD.group_name
    wait = torch.ops._c10d_functional.wait_tensor
    cases = {"qwen k,v": (2, 4096 // world, 24), "wan-1.3b k,v": (2, 32760 // world, 12)}
    for name, (n, tokens, heads) in cases.items():
        for include_self in (False, True):
            xs = [torch.randn(1, tokens, heads, 128, device=dev, dtype=torch.bfloat16) for _ in range(n)]
            want = []
            for x in xs:
                parts = [torch.empty_like(x) for _ in range(world)]
                dist.all_gather(parts, x)
                want.append(torch.cat([p for r, p in enumerate(parts) if include_self or r != rank], dim=1))
            for impl, fn in IMPLS.items():
                outs = fn(xs, 1, group, include_self)
                equal = all(torch.equal(wait(o), w) for o, w in zip(outs, want))
                host = []
                for _ in range(10):
                    torch.cuda.synchronize(dev)
                    dist.barrier()
                    t = time.perf_counter()
                    for _ in range(20):
                        for o in fn(xs, 1, group, include_self):
                            wait(o)
                    host.append((time.perf_counter() - t) / 20 * 1e6)
                torch.cuda.synchronize(dev)
                if rank == 0:
                    print(f"GATHER {name} gpus={world} include_self={include_self} {impl:6s} host "
                          f"{statistics.median(host):6.1f} us/call  equal to NCCL: {equal}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
