"""The SM clock a kernel leaves the card under its power cap: Wan2.1-14B's GEMMs (and attention) at the rows of 1
and 2 ranks, each run back to back for a few seconds while ``nvidia-smi`` samples the clock and power of GPU 0.

    python3 bench/bench_gemm_clocks.py [--seconds 8] [--rows 32760,16380] [--shapes 5120:5120,13824:5120]
        [--kernels addmm,mm_t,attention] [--rounds 2]

Kernels: ``addmm`` = x @ W^T + b as the compile emits a linear; ``mm_t`` = W @ x^T, the same product with cuBLAS's
roles of rows and columns swapped (its result is the transpose of the linear's, which a consumer that fuses the
bias would read transposed; only the GEMM is timed); ``attention`` = FA3 with ``rows`` queries over 32760 keys,
40 heads of 128 (the 14B's self-attention; ``--shapes`` does not apply). Per kernel and row count, in turn, each
round: TFLOP/s over the run, median SM MHz and W of the samples in its second half (the clock settled), TFLOP/s
per GHz (the work a kernel does per cycle), and the kernel the profiler saw. On 2 GPUs the 14B forward ran its
ranks 2.3-2.7 % below one GPU's clock at the same power (bench/RESULTS.md 2026-11-28): which kernel lowers it?
And does a row count near a shard's (16380), or the other orientation, get a GEMM that does more per cycle?
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent)]
from bench_wan import GpuClocks  # noqa: E402

KEYS, HEADS, HEAD_DIM = 32760, 40, 128  # the 14B's self-attention at 832x480x81


def build(kernel, rows, fan_in, fan_out, dev):
    """(the call, its FLOPs)."""
    bf16 = dict(device=dev, dtype=torch.bfloat16)
    if kernel == "attention":
        from mindiesd_compile.ops.attention_kernels import flash_attn_3
        if flash_attn_3() is None:
            raise SystemExit("--kernels attention needs FA3 (pip install the fa3-fwd wheel)")
        q = torch.randn(1, rows, HEADS, HEAD_DIM, **bf16)
        k, v = (torch.randn(1, KEYS, HEADS, HEAD_DIM, **bf16) for _ in range(2))
        call = lambda: flash_attn_3().func(q, k, v, softmax_scale=HEAD_DIM ** -0.5)  # noqa: E731
        return call, 4 * rows * KEYS * HEADS * HEAD_DIM
    w = torch.randn(fan_out, fan_in, **bf16) * fan_in ** -0.5
    b = torch.randn(fan_out, **bf16)
    x = torch.randn(rows, fan_in, **bf16)
    call = {"addmm": lambda: torch.addmm(b, x, w.t()), "mm_t": lambda: torch.mm(w, x.t())}[kernel]
    return call, 2 * rows * fan_in * fan_out


def kernel_name(call, dev):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize(dev)
    return next((e.name for e in prof.events()
                 if e.device_type == torch.autograd.DeviceType.CUDA and "Memset" not in e.name), "?")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--rows", default="32760,16380")
    ap.add_argument("--shapes", default="5120:5120,13824:5120", help="in:out features (14B projection, FFN down)")
    ap.add_argument("--kernels", default="addmm")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    dev = torch.device("cuda:0")
    clocks = GpuClocks(dev)
    cases = [(k, s, *map(int, s.split(":"))) for k in args.kernels.split(",") if k != "attention"
             for s in args.shapes.split(",")] + \
        [("attention", f"{HEADS}x{HEAD_DIM}", 0, 0)] * ("attention" in args.kernels.split(","))
    print("| kernel | shape | rows | TFLOP/s | SM MHz | W | TFLOP/s per GHz | kernel name |", flush=True)
    print("|---|---|---|---|---|---|---|---|", flush=True)
    for _ in range(args.rounds):
        for kernel, shape, fan_in, fan_out in cases:
            for rows in (int(r) for r in args.rows.split(",")):
                call, flops = build(kernel, rows, fan_in, fan_out, dev)
                name = kernel_name(call, dev)
                start, calls = time.perf_counter(), 0
                a, z = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                while time.perf_counter() - start < args.seconds:
                    for _ in range(20):
                        call()
                    calls += 20
                    torch.cuda.synchronize(dev)
                z.record()
                torch.cuda.synchronize(dev)
                end = time.perf_counter()
                tflops = flops * calls / (a.elapsed_time(z) / 1e3) / 1e12
                mhz, watts = clocks.between([((start + end) / 2, end)])  # the clock settled
                print(f"| {kernel} | {shape} | {rows} | {tflops:.0f} | {mhz:.0f} | {watts:.0f} | "
                      f"{tflops / mhz * 1e3:.0f} | {name[:60]} |", flush=True)
                del call
                time.sleep(1.0)
    clocks.close()


if __name__ == "__main__":
    main()
