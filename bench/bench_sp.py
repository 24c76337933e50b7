"""Sequence parallelism on N GPUs: one Wan2.1 forward (832x480x81, bf16, random weights).

    torchrun --nproc_per_node=N bench/bench_sp.py --config 1.3b [--variants mindiesd,diffusers]

mindiesd: torch.compile(backend="mindiesd", options={"sequence_parallel": N}) (plain mindiesd compile
for N=1). diffusers: the model's own context parallelism (enable_parallelism, Ulysses, eager) as the
anchor. Rank 0 prints median ms; the output of the N=1 mindiesd run is saved and later runs report
their relative L2 against it.
"""
import argparse
import os
import statistics
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.append(str(Path(__file__).resolve().parent))
from bench_wan import CONFIGS, build_model, time_calls  # noqa: E402

import mindiesd_compile  # noqa: E402,F401


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="1.3b")
    ap.add_argument("--variants", default="mindiesd,diffusers")
    ap.add_argument("--cfg-step", action="store_true",
                    help="time one CFG step (cond + uncond call); with >1 GPU: CFG 2 x Ulysses world/2")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--reference", default="/tmp/sp_reference.pt")
    args = ap.parse_args()
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.cuda.set_device(dev)
    cfg, lat, txt = CONFIGS[args.config]
    model = build_model(cfg, dev, torch.bfloat16, 0)
    g = torch.Generator(dev).manual_seed(0)
    inputs = dict(hidden_states=torch.randn(lat, generator=g, device=dev, dtype=torch.bfloat16),
                  timestep=torch.tensor([500.0], device=dev),
                  encoder_hidden_states=torch.randn(txt, generator=g, device=dev, dtype=torch.bfloat16),
                  return_dict=False)
    if args.cfg_step:
        return cfg_step(model, inputs, world, rank, dev, args)
    for variant in args.variants.split(","):
        with torch.no_grad():
            if variant == "mindiesd":
                options = {"target": "cuda"} | ({"sequence_parallel": world} if world > 1 else {})
                fn = torch.compile(model, backend="mindiesd", options=options, fullgraph=True)
            else:
                if world == 1:
                    fn = model
                else:
                    from diffusers import ContextParallelConfig
                    model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
                    fn = model
            out = fn(**inputs)[0]
            fn(**inputs)
            ms = statistics.median(time_calls(lambda: fn(**inputs), dev, args.iters))
        if rank == 0:
            note = ""
            if variant == "mindiesd" and world == 1:
                torch.save(out.float().cpu(), args.reference)
            elif os.path.exists(args.reference):
                ref = torch.load(args.reference)
                note = f" rel L2 vs 1-GPU mindiesd {float((out.float().cpu() - ref).norm() / ref.norm()):.2e}"
            print(f"RESULT {variant} gpus={world} median_ms={ms:.1f}{note}", flush=True)
        torch._dynamo.reset()
    dist.destroy_process_group()


def cfg_step(model, inputs, world, rank, dev, args):
    """One denoising step with CFG: two transformer calls (cond, uncond) as the Wan pipeline makes them."""
    from mindiesd_compile.pipeline import _parallel_groups
    from mindiesd_compile.runtime.cfg_parallel import CfgParallelTransformer
    negative = torch.randn_like(inputs["encoder_hidden_states"])
    options = {"target": "cuda"}
    if world > 1:
        group, branch, holder = _parallel_groups(2, world // 2, options)
        holder.value = negative
        fn = CfgParallelTransformer(torch.compile(model, backend="mindiesd", options=options, fullgraph=True),
                                    group, branch, holder)
    else:
        fn = torch.compile(model, backend="mindiesd", options=options, fullgraph=True)

    def step():
        cond = fn(**inputs)[0]
        uncond = fn(**{**inputs, "encoder_hidden_states": negative})[0]
        return cond, uncond

    with torch.no_grad():
        step(), step()
        ms = statistics.median(time_calls(step, dev, args.iters))
        cond, uncond = step()
    if rank == 0:
        out = torch.stack([cond, uncond]).float().cpu()
        note = ""
        if world == 1:
            torch.save(out, args.reference + ".cfg")
        elif os.path.exists(args.reference + ".cfg"):
            ref = torch.load(args.reference + ".cfg")
            note = f" rel L2 vs 1 GPU {float((out - ref).norm() / ref.norm()):.2e}"
        print(f"RESULT cfg-step gpus={world} median_ms={ms:.1f}{note}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
