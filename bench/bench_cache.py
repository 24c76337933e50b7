"""50-step CFG denoising of Wan2.1 with each cross-step cache policy (one partitioned mindiesd compile,
policies switched with StepCache.configure, so every policy runs the same compiled pieces).

    python bench/bench_cache.py --config 1.3b            # 832x480x81, bf16, random weights, cuda
    python bench/bench_cache.py --tiny --device cpu --dtype float32 --steps 6    # smoke test

Per policy: transformer time of the whole loop (100 forwards without caching), speedup over no cache,
blocks skipped, cache memory, and the deviation of the final latent from the uncached run
(relative L2). Also checks that no policy recompiles. ``--cuda-graphs``: the option for this compile (with a
StepCache handle, graphs are per block); the last line says how many compiled pieces replay a CUDA graph.
"""
import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parent))
from bench_cache_graphs import graphs_replayed  # noqa: E402
from bench_wan import CONFIGS, build_model, sync  # noqa: E402

import mindiesd_compile  # noqa: E402
from mindiesd_compile import CacheConfig, StepCache  # noqa: E402


def settings(n_blocks, steps, typical_change):
    """Policies to compare, scaled to the model's blocks, the number of steps, and (dynamic) the probe's
    typical relative change per step, measured on this model first (random weights change far more per
    step than trained ones, so a fixed threshold would mean nothing)."""
    lo, hi = steps // 5, steps - steps // 10  # leave the first 20 % and last 10 % of steps exact
    last = n_blocks - 1 if n_blocks > 3 else n_blocks  # first and last block always computed
    return {
        "none": CacheConfig(),
        "block i2": CacheConfig(policy="block", step_start=lo, step_interval=2, step_end=hi, block_start=1,
                                block_end=last),
        "block i3": CacheConfig(policy="block", step_start=lo, step_interval=3, step_end=hi, block_start=1,
                                block_end=last),
        "attention i2": CacheConfig(policy="attention", step_start=lo, step_interval=2, step_end=hi),
        "attention i3": CacheConfig(policy="attention", step_start=lo, step_interval=3, step_end=hi),
        "dynamic 1.5x": CacheConfig(policy="dynamic", threshold=1.5 * typical_change, max_skips=3, step_start=2),
        "dynamic 3x": CacheConfig(policy="dynamic", threshold=3 * typical_change, max_skips=3, step_start=2),
        "forecast i3": CacheConfig(policy="forecast", step_start=lo, step_interval=3, step_end=hi, block_start=1,
                                   block_end=last),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=["1.3b", "14b"], default="1.3b")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--policies", default="all")
    ap.add_argument("--cuda-graphs", default="auto", choices=["off", "on", "auto"],
                    help="options['cuda_graphs'] (with the StepCache handle: per block where it captures)")
    args = ap.parse_args()
    from diffusers import UniPCMultistepScheduler
    from torch._dynamo.utils import counters

    cname = "tiny" if args.tiny else args.config
    dev, dtype = torch.device(args.device), getattr(torch, args.dtype)
    cfg, lat_shape, txt_shape = CONFIGS[cname]
    model = build_model(cfg, dev, dtype, 0)
    g = torch.Generator(dev).manual_seed(0)
    init = torch.randn(lat_shape, generator=g, device=dev, dtype=torch.float32)
    text = [torch.randn(txt_shape, generator=g, device=dev, dtype=dtype) for _ in range(2)]
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        num_train_timesteps=1000, flow_shift=3.0)
    cache = StepCache()
    graphs = {"off": False, "on": True, "auto": "auto"}[args.cuda_graphs] if dev.type == "cuda" else False
    fn = torch.compile(model, backend="mindiesd", options={"target": dev.type, "cache": cache, "cuda_graphs": graphs},
                       fullgraph=True)

    def denoise(max_steps=None):
        scheduler.set_timesteps(args.steps, device=dev)
        latents = init.clone()
        transformer_s = 0.0
        for t in scheduler.timesteps[:max_steps]:
            sync(dev); start = time.perf_counter()
            x = latents.to(dtype)
            ts = t.expand(1).to(dev)
            cond = fn(hidden_states=x, timestep=ts, encoder_hidden_states=text[0], return_dict=False)[0]
            uncond = fn(hidden_states=x, timestep=ts, encoder_hidden_states=text[1], return_dict=False)[0]
            sync(dev); transformer_s += time.perf_counter() - start
            noise = uncond.float() + args.guidance * (cond.float() - uncond.float())
            latents = scheduler.step(noise, t, latents).prev_sample
        return latents, transformer_s

    def call(step, branch=0):
        fn(hidden_states=init.to(dtype), timestep=scheduler.timesteps[step].expand(1).to(dev),
           encoder_hidden_states=text[branch], return_dict=False)

    with torch.no_grad():
        scheduler.set_timesteps(args.steps, device=dev)
        start = time.perf_counter()
        call(0)
        sync(dev)
        cold = time.perf_counter() - start
        cache.configure(CacheConfig(policy="attention", step_start=1))  # compile its record/reuse variants
        for step in range(3):
            call(step)
        sync(dev)
        runner = cache.runners[0]
        print(f"# {cname} on {torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'cpu'}, torch "
              f"{torch.__version__}: partitioned compile {cold:.1f} s, {len(runner.partition.pieces)} pieces, "
              f"{runner.compiler.compiles} compiled", flush=True)
        cache.configure(CacheConfig(policy="dynamic", threshold=1e-9))  # never skips: measures the change
        denoise(max_steps=min(12, args.steps))
        typical = sorted(cache.changes)[len(cache.changes) // 2]
        print(f"dynamic probe: median relative change per step {typical:.4f} (steps 1-{min(12, args.steps) - 1})")
        graphs = counters["stats"]["unique_graphs"]
        rows, reference = [], None
        chosen = settings(len(runner.block_nodes), args.steps, typical)
        names = list(chosen) if args.policies == "all" else ["none"] + args.policies.split(",")
        for name in names:
            cache.configure(chosen[name])
            latents, seconds = denoise()
            if reference is None:
                reference, base = latents, seconds
            dev_l2 = float((latents - reference).norm() / reference.norm())
            rows.append(dict(policy=name, seconds=seconds, speedup=base / seconds, skipped=cache.stats["skipped"],
                             computed=cache.stats["computed"], cache_mib=cache.memory_bytes() / 2**20,
                             rel_l2=dev_l2, config=str(chosen[name])))
            r = rows[-1]
            print(f"{name:14s} {seconds:8.2f} s  {r['speedup']:5.2f}x  skipped {r['skipped']:3d}  "
                  f"cache {r['cache_mib']:8.1f} MiB  rel L2 {dev_l2:.3e}", flush=True)
        recompiled = counters["stats"]["unique_graphs"] - graphs
    lines = ["| policy | transformer s | speedup | range skips | cache MiB | rel L2 vs no cache |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['policy']} | {r['seconds']:.2f} | {r['speedup']:.2f}x | {r['skipped']} | {r['cache_mib']:.1f} | "
              f"{r['rel_l2']:.2e} |" for r in rows]
    print("\n".join(lines))
    print(f"graphs compiled after the first call: {recompiled}")
    print(f"cuda_graphs {args.cuda_graphs}: {graphs_replayed(runner)} compiled pieces replay a CUDA graph"
          + (f", peak memory {torch.cuda.max_memory_allocated(dev) / 2**30:.2f} GiB, held at the end "
             f"{torch.cuda.memory_allocated(dev) / 2**30:.2f} GiB" if dev.type == "cuda" else ""))
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], f"cache_{cname}.json").write_text(json.dumps(dict(
            config=cname, steps=args.steps, cold_compile_s=cold, rows=rows, recompiled=recompiled,
            date=datetime.datetime.now().isoformat(timespec="seconds"), torch=torch.__version__), indent=1))


if __name__ == "__main__":
    main()
