"""The SM clock a GEMM leaves the card under its power cap: Wan2.1-14B's GEMMs at the rows of 1 and 2 ranks, each
run back to back for a few seconds while ``nvidia-smi`` samples the clock and power of GPU 0.

    python3 bench/bench_gemm_clocks.py [--seconds 8] [--rows 32760,16380] [--shapes 5120:5120,13824:5120] [--rounds 2]

Per GEMM (in:out features, bias) and row count, in turn, each round: TFLOP/s over the run, median SM MHz and W
of the samples in its second half (the clock settled), TFLOP/s per GHz (the work a kernel does per cycle), and the
kernel cuBLAS picked. On 2 GPUs the 14B forward ran its ranks 2.3-2.7 % below one GPU's clock at the same power
(bench/RESULTS.md 2026-11-28); is that the kernel cuBLAS picks at half the rows? And does a row count near a
shard's (16380) get a kernel that does more per cycle?
"""
import argparse
import statistics
import subprocess
import threading
import time

import torch


def sampler(samples):
    proc = subprocess.Popen(["nvidia-smi", "-i", "0", "--query-gpu=clocks.sm,power.draw",
                             "--format=csv,noheader,nounits", "-lms", "100"], stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:
        try:
            mhz, watts = (float(v) for v in line.split(","))
        except ValueError:
            continue
        samples.append((time.perf_counter(), mhz, watts))
    return proc


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--rows", default="32760,16380")
    ap.add_argument("--shapes", default="5120:5120,13824:5120", help="in:out features (14B projection, FFN down)")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    dev = torch.device("cuda:0")
    samples = []
    threading.Thread(target=sampler, args=(samples,), daemon=True).start()
    shapes = [(s, *map(int, s.split(":"))) for s in args.shapes.split(",")]
    rows_list = [int(r) for r in args.rows.split(",")]
    print("| GEMM | rows | TFLOP/s | SM MHz | W | TFLOP/s per GHz | kernel |", flush=True)
    print("|---|---|---|---|---|---|---|", flush=True)
    for _ in range(args.rounds):
        for name, fan_in, fan_out in shapes:
            w = torch.randn(fan_out, fan_in, device=dev, dtype=torch.bfloat16) * fan_in ** -0.5
            b = torch.randn(fan_out, device=dev, dtype=torch.bfloat16)
            for rows in rows_list:
                x = torch.randn(rows, fan_in, device=dev, dtype=torch.bfloat16)
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                    torch.addmm(b, x, w.t())
                    torch.cuda.synchronize(dev)
                kernel = next((e.name for e in prof.events() if "Memset" not in e.name
                               and e.device_type == torch.autograd.DeviceType.CUDA), "?")
                start, calls = time.perf_counter(), 0
                a = torch.cuda.Event(enable_timing=True)
                z = torch.cuda.Event(enable_timing=True)
                a.record()
                while time.perf_counter() - start < args.seconds:
                    for _ in range(20):
                        torch.addmm(b, x, w.t())
                    calls += 20
                    torch.cuda.synchronize(dev)
                z.record()
                torch.cuda.synchronize(dev)
                end = time.perf_counter()
                tflops = 2 * rows * fan_in * fan_out * calls / (a.elapsed_time(z) / 1e3) / 1e12
                late = [(m, p) for t, m, p in samples if (start + end) / 2 <= t <= end]
                mhz = statistics.median(m for m, _ in late) if late else float("nan")
                watts = statistics.median(p for _, p in late) if late else float("nan")
                print(f"| {name} | {rows} | {tflops:.0f} | {mhz:.0f} | {watts:.0f} | {tflops / mhz * 1e3:.0f} | "
                      f"{kernel[:60]} |", flush=True)
                time.sleep(1.0)


if __name__ == "__main__":
    main()
