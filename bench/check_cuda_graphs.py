"""`cuda_graphs` over several input signatures: a graph per signature, each replayed with new inputs, must give op
by op's outputs exactly, whatever signature ran before it. One GPU:

    python bench/check_cuda_graphs.py [--config 1.3b-preview]

Wan2.1 (bench_wan.py's configs, bf16, random weights) called with latents of two shapes in turn (a, b, a, b, ...;
the second is the first with height and width swapped) and a new timestep each call: first compiled with
`cuda_graphs` False (the reference outputs), then with True (both compiles share Inductor's FX graph cache, so the
same kernels run). Prints each call's rel L2 against op by op and the memory reserved after it (and how much it
grew); "CHECK PASSED" if every call matches.
"""
import argparse
import os
import sys
from pathlib import Path

os.environ.pop("TORCHINDUCTOR_FX_GRAPH_CACHE", None)  # read at import: set, it overrides the config (env_name_force)
import torch  # noqa: E402
import torch._inductor.config  # noqa: E402

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
    torch._inductor.config.fx_graph_cache = True  # the second compile loads the first's kernels: same numbers
    calls = [dict(hidden_states=latents[call % 2], timestep=torch.tensor([500.0 - call], device=dev),
                  encoder_hidden_states=text, return_dict=False) for call in range(args.calls)]
    worst = 0.0
    with torch.no_grad():
        op_by_op = torch.compile(model, backend="mindiesd", options={"cuda_graphs": False}, dynamic=False)
        refs = [op_by_op(**kwargs)[0].float().cpu() for kwargs in calls]
        del op_by_op
        torch._dynamo.reset()
        torch.cuda.empty_cache()
        fast = torch.compile(model, backend="mindiesd", options={"cuda_graphs": True}, dynamic=False)
        for call, (kwargs, ref) in enumerate(zip(calls, refs)):
            before = torch.cuda.memory_reserved()
            out = fast(**kwargs)[0].float().cpu()
            rel = float((out - ref).norm() / ref.norm())
            worst = max(worst, rel)
            print(f"call {call} shape {tuple(kwargs['hidden_states'].shape)}: rel L2 vs op by op {rel:.1e}, "
                  f"reserved {torch.cuda.memory_reserved() / 2**20:.0f} MiB "
                  f"(+{(torch.cuda.memory_reserved() - before) / 2**20:.0f})", flush=True)
    print(f"CHECK {'PASSED' if worst <= 1e-6 else 'FAILED'}: worst rel L2 {worst:.1e}", flush=True)


if __name__ == "__main__":
    main()
