"""Caching on the quality testbed: the shipped, trained video DiT (testbed/checkpoint) sampled with 50
flow-matching steps and CFG, without caching and with each cross-step cache policy of the mindiesd backend
(the policy set of bench_cache.py, one compile, policies switched with StepCache.configure).

    python bench/bench_testbed_cache.py                      # cuda, bf16, 48 videos (every condition once)
    python bench/bench_testbed_cache.py --device cpu --dtype float32 --target eager --steps 8 --n 4   # smoke

Per policy: sampling time of the whole batch (timed run after an untimed warm-up run), speedup over the
compiled run without caching, blocks skipped, and the two quality numbers of testbed.evaluate.quality:
PSNR/SSIM of the videos against the same seeds without caching, and the task accuracy (share of videos whose
detected shape and direction match the condition). Writes testbed_cache.json and a PNG strip (no cache vs
each policy) under $OUT when set.
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
sys.path.append(str(Path(__file__).resolve().parents[1]))  # repo root: testbed, mindiesd_compile uninstalled
from bench_cache import settings  # noqa: E402

import mindiesd_compile  # noqa: E402,F401
from mindiesd_compile import CacheConfig, StepCache  # noqa: E402
from testbed import evaluate as E, sample as S, videos as V  # noqa: E402


def write_strips(out: Path, outputs: dict, reference, cond, baseline: str) -> None:
    """One PNG strip per variant under ``out``: six varied conditions, each baseline video above the variant's."""
    pick = [(9 * i) % len(cond) for i in range(min(6, len(cond)))]  # varied shape, colour, direction
    for name, videos in outputs.items():
        if name != baseline:
            E.write_png(out / f"strip_{name.replace(' ', '_').replace('+', 'and')}.png",
                        E.strip([v for i in pick for v in (reference[i], videos[i])]))


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--target", default=None, help="mindiesd target (default: the device type)")
    ap.add_argument("--steps", type=int, default=S.STEPS)
    ap.add_argument("--guidance", type=float, default=S.GUIDANCE)
    ap.add_argument("--shift", type=float, default=S.SHIFT)
    ap.add_argument("--n", type=int, default=48, help="videos (conditions cycled), sampled as one batch")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--policies", default="all")
    args = ap.parse_args()
    dev, dtype = torch.device(args.device), getattr(torch, args.dtype)
    model = S.load(args.checkpoint, device=dev, dtype=dtype)
    conds = V.all_conditions()
    cond = conds[torch.arange(args.n) % len(conds)]
    run = dict(cond=cond, seed=args.seed, steps=args.steps, guidance=args.guidance, device=dev, dtype=dtype,
               shift=args.shift)

    def timed(fn):
        sync(dev); start = time.perf_counter()
        out = S.sample(model, transformer=fn, **run)
        sync(dev)
        return out, time.perf_counter() - start

    cache = StepCache()
    fn = torch.compile(model, backend="mindiesd", options={"target": args.target or dev.type, "cache": cache},
                       fullgraph=True)
    card = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    with torch.no_grad():
        timed(model)
        eager_videos, eager_s = timed(model)
        start = time.perf_counter()
        S.sample(model, transformer=fn, **dict(run, steps=2))
        cold = time.perf_counter() - start
        cache.configure(CacheConfig(policy="attention", step_start=1))  # compile its record/reuse variants
        S.sample(model, transformer=fn, **dict(run, steps=3))
        runner = cache.runners[0]
        print(f"# testbed ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, {len(runner.block_nodes)} "
              f"blocks) on {card}, {args.dtype}, torch {torch.__version__}: {args.n} videos x {args.steps} steps, "
              f"CFG {args.guidance}; compile {cold:.1f} s", flush=True)
        cache.configure(CacheConfig(policy="dynamic", threshold=1e-9))  # never skips: measures the change
        S.sample(model, transformer=fn, **dict(run, steps=args.steps))
        probe = cache.changes[1:min(12, args.steps)]
        typical = sorted(probe)[len(probe) // 2] if probe else 0.1
        print(f"dynamic probe: median relative change per step {typical:.4f}")
        chosen = settings(len(runner.block_nodes), args.steps, typical)
        names = list(chosen) if args.policies == "all" else ["none"] + args.policies.split(",")
        rows, reference, outputs = [], None, {}
        for name in names:
            cache.configure(chosen[name])
            timed(fn)                            # warm-up (compiles any variant this policy needs)
            cache.configure(chosen[name])
            videos, seconds = timed(fn)
            if reference is None:
                reference, base = videos, seconds
            q = E.quality(reference, videos, cond)
            outputs[name] = videos
            rows.append(dict(policy=name, seconds=seconds, speedup=base / seconds, skipped=cache.stats["skipped"],
                             computed=cache.stats["computed"], config=str(chosen[name]), **q))
            r = rows[-1]
            print(f"{name:14s} {seconds:7.3f} s {r['speedup']:5.2f}x skipped {r['skipped']:4d}  PSNR {r['psnr']:6.2f} dB "
                  f"SSIM {r['ssim']:.4f}  task {r['task_accuracy']:.3f} (all attributes {r['task_accuracy_all']:.3f})",
                  flush=True)
        eager_q = E.quality(reference, eager_videos, cond)
    lines = [f"eager (no compile): {eager_s:.3f} s, compiled without cache {base:.3f} s "
             f"({eager_s / base:.2f}x); eager vs compiled PSNR {eager_q['psnr']:.2f} dB, SSIM {eager_q['ssim']:.4f}, "
             f"eager task accuracy {eager_q['task_accuracy']:.3f}", "",
             "| policy | sampling s | speedup | range skips | PSNR dB vs no cache | SSIM vs no cache | task accuracy "
             "(shape+direction) | all attributes |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['policy']} | {r['seconds']:.3f} | {r['speedup']:.2f}x | {r['skipped']} | {r['psnr']:.2f} | "
              f"{r['ssim']:.4f} | {r['task_accuracy']:.3f} | {r['task_accuracy_all']:.3f} |" for r in rows]
    print("\n".join(lines))
    if os.environ.get("OUT"):
        out = Path(os.environ["OUT"])
        write_strips(out, outputs, reference, cond, "none")
        (out / "testbed_cache.json").write_text(json.dumps(dict(
            card=card, dtype=args.dtype, steps=args.steps, n=args.n, guidance=args.guidance, cold_compile_s=cold,
            eager_s=eager_s, eager_quality=eager_q, typical_change=typical, rows=rows,
            date=datetime.datetime.now().isoformat(timespec="seconds"), torch=torch.__version__), indent=1))


if __name__ == "__main__":
    main()
