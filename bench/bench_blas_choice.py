"""Which cuBLAS kernel a Wan2.1-14B GEMM gets, at the rows of 1 and 2 sequence-parallel ranks, under the library
settings a process can choose: does any of them give a shard's 16380 rows the per-FLOP rate of the whole 32760?

    python3 bench/bench_blas_choice.py [--rows 32760,16380] [--rounds 5]

Each setting runs in a child process (the environment variables are read once, when cuBLAS starts): the default;
``DISABLE_ADDMM_CUDA_LT=1`` (addmm through cublasGemmEx with the bias pre-filled, not cuBLASLt's bias epilogue);
cuBLASLt's workspace at 1 MiB and at 256 MiB (``CUBLASLT_WORKSPACE_SIZE``, KiB; a larger workspace admits split-K
kernels); ``torch.backends.cuda.preferred_blas_library("cublaslt")``. Per GEMM (projection x W^T + b, FFN down;
bf16, weights of the model's scale): median ms over rounds (each the median of 20 synchronized calls, CUDA
events), TFLOP/s over 2 x rows x in x out, and the kernel the profiler saw.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

SETTINGS = {"default": {}, "no-addmm-lt": {"DISABLE_ADDMM_CUDA_LT": "1"},
            "lt-ws-1MiB": {"CUBLASLT_WORKSPACE_SIZE": "1024"}, "lt-ws-256MiB": {"CUBLASLT_WORKSPACE_SIZE": "262144"},
            "prefer-lt": {"MINDIESD_BENCH_PREFER_LT": "1"}}


def child(rows_list, rounds):
    import torch
    from torch.profiler import ProfilerActivity, profile
    sys.path[:0] = [str(Path(__file__).resolve().parent)]
    from bench_wan import time_calls
    if os.environ.get("MINDIESD_BENCH_PREFER_LT"):
        torch.backends.cuda.preferred_blas_library("cublaslt")
    dev = torch.device("cuda")
    torch.manual_seed(0)
    out = []
    for name, fan_in, fan_out in (("projection", 5120, 5120), ("ffn down", 13824, 5120)):
        w = torch.randn(fan_out, fan_in, device=dev, dtype=torch.bfloat16) * fan_in ** -0.5
        b = torch.randn(fan_out, device=dev, dtype=torch.bfloat16)
        for rows in rows_list:
            x = torch.randn(rows, fan_in, device=dev, dtype=torch.bfloat16)
            fn = lambda: torch.addmm(b, x, w.t())  # noqa: E731 - what Inductor emits for a linear with bias
            ref = (x.float() @ w.float().t() + b.float())
            err = ((fn().float() - ref).norm() / ref.norm()).item()
            ms = statistics.median(statistics.median(time_calls(fn, dev, 20)) for _ in range(rounds))
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                fn()
                torch.cuda.synchronize(dev)
            kernels = sorted({e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA})
            out.append({"gemm": name, "rows": rows, "ms": ms, "tflops": 2 * rows * fan_in * fan_out / ms / 1e9,
                        "err": err, "kernels": kernels})
    print("JSON " + json.dumps(out), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="32760,16380")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--child", action="store_true")
    args = ap.parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    if args.child:
        return child(rows, args.rounds)
    table = {}
    for setting, env in SETTINGS.items():
        run = subprocess.run([sys.executable, __file__, "--child", "--rows", args.rows, "--rounds", str(args.rounds)],
                             env=os.environ | env, capture_output=True, text=True)
        line = next((ln for ln in run.stdout.splitlines() if ln.startswith("JSON ")), None)
        if line is None:
            print(f"{setting}: failed\n{run.stderr[-2000:]}", flush=True)
            continue
        table[setting] = json.loads(line[5:])
        for r in table[setting]:
            print(f"{setting:13s} {r['gemm']:10s} rows={r['rows']:6d} {r['ms']:.3f} ms {r['tflops']:.0f} TFLOP/s "
                  f"err={r['err']:.1e} {' + '.join(k[:70] for k in r['kernels'])}", flush=True)
    print("\n| setting | " + " | ".join(f"{r['gemm']} {r['rows']} ms (TFLOP/s)" for r in table["default"]) + " |")
    print("|---|" + "---|" * len(table["default"]))
    for setting, rs in table.items():
        print(f"| {setting} | " + " | ".join(f"{r['ms']:.3f} ({r['tflops']:.0f})" for r in rs) + " |")


if __name__ == "__main__":
    main()
