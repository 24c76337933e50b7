"""FP8 on the quality testbed: the shipped, trained video DiT (testbed/checkpoint) sampled with the standard
sampler (flow matching, CFG; testbed/sample.py), compiled with backend "mindiesd" three times:

    baseline               no FP8 (same dtype)
    fp8 attention          options["fp8"] = {"attention": True}
    fp8 attention + linear options["fp8"] = {"attention": True, "linear": True}   (bf16 models only)

    python bench/bench_testbed_fp8.py                                          # cuda, bf16, Inductor, 48 videos
    python bench/bench_testbed_fp8.py --device cpu --target eager --steps 4 --n 4   # smoke (CPU simulation)

Per variant: the rewrite counts of the compile (attention sites, of them rewritten to FP8 attention; linear
sites found / rewritten to FP8 and why the others were left alone), sampling time of the batch (an untimed
short warm-up run compiles, then one timed run), and testbed.evaluate.quality: PSNR/SSIM of the videos against
the baseline with the same seeds and conditions, and the task accuracy.

On the CPU the FP8 ops run their reference kernels: the operands are rounded to e4m3 with exactly the scales
the CUDA kernels use (per (batch, head) for attention, per token / per output channel for linear layers), then
the product is computed in the model's dtype (attention) or fp32 (linear). That measures the quality cost of
the operand rounding; it does not model how the GPU kernels accumulate (FA3 FP8 also rounds the softmax
probabilities to e4m3 for the P V product; cuBLASLt runs with fast accumulation). On CUDA the same script runs
the real kernels (FA3 FP8, torch._scaled_mm) and records which kernel ran per variant. Writes
testbed_fp8.json (and a PNG strip: baseline vs each FP8 variant) under $OUT when set.
"""
import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parent))
sys.path.append(str(Path(__file__).resolve().parents[1]))  # repo root: testbed, mindiesd_compile uninstalled
from bench_testbed_cache import sync, write_strips  # noqa: E402

import torch  # noqa: E402

import mindiesd_compile  # noqa: E402,F401
from mindiesd_compile import StepCache  # noqa: E402
from mindiesd_compile.ops import attention_kernels, fp8_linear  # noqa: E402
from testbed import evaluate as E, sample as S, videos as V  # noqa: E402

VARIANTS = {"baseline": None, "fp8 attention": {"attention": True},
            "fp8 attention + linear": {"attention": True, "linear": True}}


def counts(report) -> dict:
    """What the compile rewrote: attention sites (the attention pattern) and the two FP8 passes."""
    out = {}
    for name in ("attention", "fp8_attention", "fp8_linear"):
        s = report.stats(name)
        whys = {}
        for k in s.skipped:
            whys[k["why"]] = whys.get(k["why"], 0) + 1
        out[name] = dict(found=s.found, rewritten=s.rewritten, skipped=whys)
    out["errors"] = list(report.errors)
    return out


def kernel_choices(dev) -> dict:
    """Which attention / GEMM kernel ran (CUDA ops record it; the CPU runs the reference kernels)."""
    if dev.type != "cuda":
        return {"attention": "reference (CPU)", "linear": "reference (CPU)"}
    return {"attention": {f"{k[0]}, head dim {k[1]}, {k[2]}": v for k, v in attention_kernels.CHOICES.items()},
            "linear": dict(fp8_linear.CHOICES)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--target", default=None, help="mindiesd target (default: the device type; 'eager' on the CPU "
                    "runs the passes and the graph op by op)")
    ap.add_argument("--steps", type=int, default=S.STEPS)
    ap.add_argument("--guidance", type=float, default=S.GUIDANCE)
    ap.add_argument("--shift", type=float, default=S.SHIFT)
    ap.add_argument("--n", type=int, default=48, help="videos (the 48 conditions cycled), sampled as one batch")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", default="all", help="comma list of FP8 variants besides the baseline")
    ap.add_argument("--eager", action="store_true", help="also sample the uncompiled model (compile noise scale)")
    args = ap.parse_args()
    dev, dtype = torch.device(args.device), getattr(torch, args.dtype)
    target = args.target or dev.type
    model = S.load(args.checkpoint, device=dev, dtype=dtype)
    conds = V.all_conditions()
    cond = conds[torch.arange(args.n) % len(conds)]
    run = dict(cond=cond, seed=args.seed, steps=args.steps, guidance=args.guidance, device=dev, dtype=dtype,
               shift=args.shift)
    names = list(VARIANTS) if args.variants == "all" else ["baseline"] + args.variants.split(",")

    def timed(fn, **over):
        sync(dev); start = time.perf_counter()
        out = S.sample(model, transformer=fn, **dict(run, **over))
        sync(dev)
        return out, time.perf_counter() - start

    card = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"# testbed ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params) on {card}, {args.dtype}, "
          f"target {target}, torch {torch.__version__}: {args.n} videos x {args.steps} steps, CFG {args.guidance}",
          flush=True)
    rows, outputs, reference = [], {}, None
    with torch.no_grad():
        for name in names:
            fp8 = VARIANTS[name]
            torch._dynamo.reset()
            attention_kernels.CHOICES.clear(); fp8_linear.CHOICES.clear()
            cache = StepCache()  # disabled: only to reach the partition runner and its report
            options = {"target": target, "cache": cache, **({"fp8": fp8} if fp8 else {})}
            fn = torch.compile(model, backend="mindiesd", options=options, fullgraph=True)
            _, compile_s = timed(fn, steps=1)  # warm-up (2 calls): compiles every piece; sites counted once
            report = cache.runners[-1].compiler.report
            videos, seconds = timed(fn)
            if reference is None:
                reference, base = videos, seconds
            q = E.quality(reference, videos, cond)
            outputs[name] = videos
            rows.append(dict(variant=name, fp8=fp8, seconds=seconds, speedup=base / seconds, compile_s=compile_s,
                             sites=counts(report), kernels=kernel_choices(dev), **q))
            r, c = rows[-1], rows[-1]["sites"]
            print(f"{name:24s} {seconds:8.3f} s {r['speedup']:5.2f}x  attention {c['attention']['rewritten']} "
                  f"-> fp8 {c['fp8_attention']['rewritten']}, linear fp8 {c['fp8_linear']['rewritten']}"
                  f"/{c['fp8_linear']['found']}  PSNR {r['psnr']:6.2f} dB SSIM {r['ssim']:.4f}  task "
                  f"{r['task_accuracy']:.3f} (all attributes {r['task_accuracy_all']:.3f})", flush=True)
            for why, k in c["fp8_linear"]["skipped"].items():
                print(f"    fp8_linear left {k} alone: {why}")
            if c["errors"]:
                print(f"    PASS ERRORS: {c['errors']}")
            if dev.type == "cuda" and fp8:
                print(f"    kernels: {r['kernels']}")
        eager = None
        if args.eager:
            videos, seconds = timed(model)
            eager = dict(seconds=seconds, **E.quality(reference, videos, cond))
    lines = ["| variant | attention sites -> FP8 | linear sites -> FP8 (found) | sampling s | speedup | "
             "PSNR dB vs baseline | SSIM vs baseline | task accuracy (shape+direction) | all attributes |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c = r["sites"]
        lines.append(f"| {r['variant']} | {c['attention']['rewritten']} -> {c['fp8_attention']['rewritten']} | "
                     f"{c['fp8_linear']['rewritten']} ({c['fp8_linear']['found']}) | {r['seconds']:.3f} | "
                     f"{r['speedup']:.2f}x | {r['psnr']:.2f} | {r['ssim']:.4f} | {r['task_accuracy']:.3f} | "
                     f"{r['task_accuracy_all']:.3f} |")
    if eager:
        lines.append(f"\neager (uncompiled, {args.dtype}): {eager['seconds']:.3f} s; vs the compiled baseline PSNR "
                     f"{eager['psnr']:.2f} dB, SSIM {eager['ssim']:.4f}, task accuracy {eager['task_accuracy']:.3f}")
    print("\n".join(lines))
    if os.environ.get("OUT"):
        out = Path(os.environ["OUT"])
        out.mkdir(parents=True, exist_ok=True)
        write_strips(out, outputs, reference, cond, "baseline")
        (out / "testbed_fp8.json").write_text(json.dumps(dict(
            card=card, dtype=args.dtype, target=target, steps=args.steps, n=args.n, guidance=args.guidance,
            shift=args.shift, seed=args.seed, rows=rows, eager=eager,
            date=datetime.datetime.now().isoformat(timespec="seconds"), torch=torch.__version__), indent=1))


if __name__ == "__main__":
    main()
