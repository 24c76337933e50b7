"""`cuda_graphs` over several input signatures: a graph per signature, each replayed with new inputs, must give op
by op's outputs exactly, whatever signature ran before it. One GPU:

    python bench/check_cuda_graphs.py [--config 1.3b-preview]

Wan2.1 (bench_wan.py's configs, bf16, random weights) called with latents of two shapes in turn (a, b, a, b, ...;
the second is the first with height and width swapped) and a new timestep each call, compiled with `cuda_graphs`
True: the first call of each shape runs op by op, the second captures, the rest replay. Then every call again,
replayed: each must equal its first run (op by op, at the capture, or replayed), the same kernels. Prints the
memory reserved after each first-run call (and how much it grew) and each replay's rel L2; "CHECK PASSED" if all
are exact. (Against a second compile run op by op, one shape could differ by 4.5e-3 rel L2 in bf16 on an H200,
with Inductor's FX graph cache on or off: two compiles, not the graphs. bench/RESULTS.md 2026-11-28, twenty-first
session.)
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parent))
from bench_wan import CONFIGS, build_model  # noqa: E402

import mindiesd_compile  # noqa: E402,F401


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="1.3b-preview")
    ap.add_argument("--calls", type=int, default=8)
    args = ap.parse_args()
    dev = torch.device("cuda")
    cfg, lat, txt = CONFIGS[args.config]
    model = build_model(cfg, dev, torch.bfloat16, 0)
    g = torch.Generator(dev).manual_seed(0)
    shapes = [lat, (*lat[:3], lat[4], lat[3])]
    latents = [torch.randn(s, generator=g, device=dev, dtype=torch.bfloat16) for s in shapes]
    text = torch.randn(txt, generator=g, device=dev, dtype=torch.bfloat16)
    calls = [dict(hidden_states=latents[call % 2], timestep=torch.tensor([500.0 - call], device=dev),
                  encoder_hidden_states=text, return_dict=False) for call in range(args.calls)]
    worst = 0.0
    with torch.no_grad():
        fast = torch.compile(model, backend="mindiesd", options={"cuda_graphs": True}, dynamic=False)
        first = []
        for call, kwargs in enumerate(calls):  # each signature: op by op, then captured, then replayed
            before = torch.cuda.memory_reserved()
            first.append(fast(**kwargs)[0].float().cpu())
            grew = (torch.cuda.memory_reserved() - before) / 2**20
            print(f"call {call} shape {tuple(kwargs['hidden_states'].shape)}: reserved "
                  f"{torch.cuda.memory_reserved() / 2**20:.0f} MiB (+{grew:.0f})", flush=True)
        for call, (kwargs, ref) in enumerate(zip(calls, first)):  # every call replayed
            out = fast(**kwargs)[0].float().cpu()
            rel = float((out - ref).norm() / ref.norm())
            worst = max(worst, rel)
            print(f"call {call} again, replayed: rel L2 vs its first run {rel:.1e}", flush=True)
    print(f"CHECK {'PASSED' if worst <= 1e-6 else 'FAILED'}: worst rel L2 {worst:.1e}", flush=True)


if __name__ == "__main__":
    main()
