"""Every attention kernel we can call on this card, at the Wan2.1 shapes, side by side.

    python3 bench/bench_attention.py                 # self- and cross-attention of Wan2.1-1.3B and 14B
    python3 bench/bench_attention.py --heads 12,6,3  # self-attention with fewer heads (Ulysses shards)

Per shape ([B, S, H, D] as the graph has it; self: S_kv = S, cross: S_kv = 512 text tokens) and kernel: median
ms of 20 calls after 3 warm-ups (CUDA events), TFLOP/s (4 B H S_q S_kv D), relative L2 difference to cuDNN.
``--rounds R`` times every kernel R times in turn (one after the other, R rounds) and reports the median round with
the spread, so a card's clock drifting during the run cannot favour whichever kernel ran first.
Kernels: cuDNN and PyTorch's flash through SDPA (on the [B, H, S, D] view), every FA3 build that imports
(`fa3_fwd_interface` from the fa3-fwd wheel, `flash_attn_interface` built from flash-attention's hopper/), and
for cross-attention the written-out attention compiled by Inductor (two GEMMs and a softmax).
"""
import argparse
import importlib
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path[:0] = [str(Path(__file__).resolve().parent)]
from bench_wan import time_calls  # noqa: E402

TOKENS, TEXT, HEAD_DIM = 32760, 512, 128  # Wan2.1 at 832x480x81; umT5 text length


def sdpa(backend):
    def run(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    return run


def fa3(module):
    func = importlib.import_module(module).flash_attn_func

    def run(q, k, v):
        out = func(q, k, v)
        return out[0] if isinstance(out, tuple) else out
    return run


@torch.compile(dynamic=False)
def written_out(q, k, v):
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    p = torch.softmax((q @ k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5, dim=-1).to(v.dtype)
    return (p @ v).transpose(1, 2)


def kernels(cross):
    found = {"cudnn": sdpa(SDPBackend.CUDNN_ATTENTION), "torch-flash": sdpa(SDPBackend.FLASH_ATTENTION)}
    for name, module in (("fa3-wheel", "fa3_fwd_interface"), ("fa3-source", "flash_attn_interface")):
        try:
            found[name] = fa3(module)
        except Exception as err:  # noqa: BLE001 - a build that is not installed is left out, with the reason
            print(f"# {name}: {type(err).__name__}: {err}")
    if cross:
        found["inductor-written-out"] = written_out
    return found


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--heads", default="12,40", help="head counts of the self-attention shapes")
    ap.add_argument("--cross-heads", default="12,40", help="head counts of the cross-attention shapes ('' for none)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--skip", default="", help="kernels left out, e.g. torch-flash")
    args = ap.parse_args()
    dev = torch.device("cuda")
    shapes = [("self", int(h), TOKENS) for h in args.heads.split(",") if h] + \
             [("cross", int(h), TEXT) for h in args.cross_heads.split(",") if h]
    rows = []
    for kind, heads, kv in shapes:
        g = torch.Generator(device=dev).manual_seed(0)
        q = torch.randn(1, TOKENS, heads, HEAD_DIM, device=dev, dtype=torch.bfloat16, generator=g)
        k, v = (torch.randn(1, kv, heads, HEAD_DIM, device=dev, dtype=torch.bfloat16, generator=g) for _ in "kv")
        flop = 4 * heads * TOKENS * kv * HEAD_DIM
        runs = {n: f for n, f in kernels(kind == "cross").items() if n not in args.skip.split(",")}
        outs, times = {}, {}
        for name, run in list(runs.items()):
            try:
                outs[name] = run(q, k, v)
                for _ in range(2):
                    run(q, k, v)
            except Exception as err:  # noqa: BLE001 - one kernel failing must not hide the others
                print(f"# {kind} H={heads} {name}: {type(err).__name__}: {str(err)[:120]}")
                del runs[name]
        for _ in range(args.rounds):
            for name, run in runs.items():
                times.setdefault(name, []).append(statistics.median(time_calls(lambda: run(q, k, v), dev, 20)))
        ref = outs["cudnn"].float()
        for name in runs:
            ms = statistics.median(times[name])
            diff = ((outs[name].float() - ref).norm() / ref.norm()).item()
            rows.append((kind, heads, kv, name, ms, min(times[name]), max(times[name]), flop / ms / 1e9, diff))
    print(f"\n{torch.cuda.get_device_name(dev)}, torch {torch.__version__}\n")
    print(f"| attention | heads | S_kv | kernel | ms (median of {args.rounds} rounds) | min-max | TFLOP/s | rel diff vs cuDNN |")
    print("|---|---|---|---|---|---|---|---|")
    for kind, heads, kv, name, ms, lo, hi, tflops, diff in rows:
        print(f"| {kind} | {heads} | {kv} | {name} | {ms:.3f} | {lo:.3f}-{hi:.3f} | {tflops:.0f} | {diff:.1e} |")


if __name__ == "__main__":
    main()
