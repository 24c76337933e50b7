"""Wan2.1's GEMMs at the row counts of 1, 2 and 4 sequence-parallel ranks: cuBLAS (what the compile calls now)
against Inductor's max-autotune (Triton templates beside ATen), to see whether a shard's fewer rows leave a faster
kernel to pick.

    python3 bench/bench_gemm_autotune.py --dims 5120:13824 --rows 32760,16380,8190

Per GEMM (projection x W^T + b; FFN up with the tanh-GELU epilogue; FFN down): ms of the eager ATen call
(``addmm``, ``_addmm_activation`` as the compile emits them), of ``torch.compile`` with Inductor's defaults, and
of ``mode="max-autotune-no-cudagraphs"``; median over rounds (each the median of 20 synchronized calls, CUDA
events, so a compiled variant also pays its wrapper's launch gap), the variants timed in turn. TFLOP/s over
2 x rows x in x out. Inductor prints its own back-to-back timings of every candidate as it autotunes.
"""
import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent)]
from bench_wan import time_calls  # noqa: E402


def gemms(dim, ffn, dev):
    """name -> (function of x, in features, out features), bf16 weights of the model's scale."""
    def weight(o, i):
        return torch.randn(o, i, device=dev, dtype=torch.bfloat16) * i ** -0.5, \
            torch.randn(o, device=dev, dtype=torch.bfloat16)
    wp, bp = weight(dim, dim)
    wu, bu = weight(ffn, dim)
    wd, bd = weight(dim, ffn)
    return {"projection": (lambda x: torch.addmm(bp, x, wp.t()), dim, dim),
            "ffn up+gelu": (lambda x: torch._addmm_activation(bu, x, wu.t(), use_gelu=True), dim, ffn),
            "ffn down": (lambda x: torch.addmm(bd, x, wd.t()), ffn, dim)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dims", default="5120:13824", help="model dim:FFN dim, comma separated (1.3B: 1536:8960)")
    ap.add_argument("--rows", default="32760,16380,8190")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    dev = torch.device("cuda")
    print("| GEMM | rows | ATen ms | Inductor ms | max-autotune ms | TFLOP/s ATen / autotune |", flush=True)
    print("|---|---|---|---|---|---|", flush=True)
    for dims in args.dims.split(","):
        dim, ffn = map(int, dims.split(":"))
        for name, (fn, fan_in, fan_out) in gemms(dim, ffn, dev).items():
            for rows in map(int, args.rows.split(",")):
                x = torch.randn(rows, fan_in, device=dev, dtype=torch.bfloat16)
                variants = {"aten": fn, "inductor": torch.compile(fn, dynamic=False),
                            "autotune": torch.compile(fn, dynamic=False, mode="max-autotune-no-cudagraphs")}
                ref = fn(x).float()
                for v, f in variants.items():
                    err = ((f(x).float() - ref).norm() / ref.norm()).item()
                    assert err < 2e-2, (name, rows, v, err)
                times = {v: [] for v in variants}
                for _ in range(args.rounds):
                    for v, f in variants.items():
                        times[v].append(statistics.median(time_calls(lambda: f(x), dev, 20)))
                ms = {v: statistics.median(t) for v, t in times.items()}
                flop = 2 * rows * fan_in * fan_out
                print(f"| {name} {fan_in}->{fan_out} | {rows} | {ms['aten']:.3f} | {ms['inductor']:.3f} | "
                      f"{ms['autotune']:.3f} | {flop / ms['aten'] / 1e9:.0f} / {flop / ms['autotune'] / 1e9:.0f} |",
                      flush=True)
                torch._dynamo.reset()


if __name__ == "__main__":
    main()
