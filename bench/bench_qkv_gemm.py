"""The q, k, v projections of Wan2.1 as three GEMMs or as one over the concatenated weights.

    python3 bench/bench_qkv_gemm.py --rounds 3

Per model (1.3B: dim 1536, 14B: dim 5120) and token count (32,760 and the 1/2, 1/4 shards of Ulysses 2, 4):
ms of the three ``addmm`` (bias, x, W^T) against one ``addmm`` with [Wq; Wk; Wv], median of 20 calls per
round (CUDA events), rounds interleaved; TFLOP/s over 2 x rows x dim x 3 dim.
"""
import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent)]
from bench_wan import time_calls  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dims", default="1536,5120")
    ap.add_argument("--rows", default="32760,16380,8190")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    dev = torch.device("cuda")
    print("| dim | rows | three GEMMs ms | one GEMM ms | ratio | TFLOP/s three / one |")
    print("|---|---|---|---|---|---|")
    for dim in map(int, args.dims.split(",")):
        w = [torch.randn(dim, dim, device=dev, dtype=torch.bfloat16) * dim ** -0.5 for _ in range(3)]
        b = [torch.randn(dim, device=dev, dtype=torch.bfloat16) for _ in range(3)]
        wf, bf = torch.cat(w), torch.cat(b)
        for rows in map(int, args.rows.split(",")):
            x = torch.randn(rows, dim, device=dev, dtype=torch.bfloat16)
            three = lambda: [torch.addmm(bi, x, wi.t()) for wi, bi in zip(w, b)]  # noqa: E731
            one = lambda: torch.addmm(bf, x, wf.t())  # noqa: E731
            t3, t1 = [], []
            for f in (three, one):
                f(); f()
            for _ in range(args.rounds):
                t3.append(statistics.median(time_calls(three, dev, 20)))
                t1.append(statistics.median(time_calls(one, dev, 20)))
            a, c = statistics.median(t3), statistics.median(t1)
            flop = 2 * rows * dim * 3 * dim
            print(f"| {dim} | {rows} | {a:.3f} | {c:.3f} | {c / a:.3f} | {flop / a / 1e9:.0f} / {flop / c / 1e9:.0f} |")


if __name__ == "__main__":
    main()
