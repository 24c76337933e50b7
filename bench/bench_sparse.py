"""Block-sparse attention (options["sparse_attention"]) vs dense attention kernels, at Wan2.1 shapes.

    python bench/bench_sparse.py                 # attention only: B=1, 21x30x52 = 32760 tokens, 12 heads x 128, bf16
    python bench/bench_sparse.py --e2e           # + Wan2.1-1.3B transformer forward (random weights, 832x480x81)
    python bench/bench_sparse.py --denoise-start-steps 10 5   # + whole 50-step CFG loops, dense vs sparse
    python bench/bench_sparse.py --testbed       # quality on the trained testbed (testbed/checkpoint), 50 steps + CFG
    python bench/bench_sparse.py --testbed-cpu --testbed-block 4 --testbed-tile 2 2   # the testbed only, CPU, fp32
    python bench/bench_sparse.py --testbed-reference --testbed-block 4 --testbed-tile 2 2   # the same on the GPU
    python bench/bench_sparse.py --smoke --e2e --testbed   # CPU, tiny shapes: checks the script, times nothing meaningful

Attention only: dense cuDNN SDPA, flash SDPA, FlexAttention (compiled), FA3 (if ``fa3-fwd`` or ``flash_attn_interface``
imports), and block-sparse at each --sparsities: "kernel (fa3-paged / flex)" = the kernel alone with its block
list precomputed (fa3-paged where a flash-attention hopper build with paged KV imports, bench/build_fa3.sh),
"op" = the whole torch.ops.mindiesd_compile.sparse_attention (token reorder, block scores, top-k, block list,
kernel, inverse reorder; a fresh mask every call, i.e. mask_refresh=1). Median of
CUDA-event timings. Effective TFLOP/s counts the dense FLOPs (4 B H S^2 D), so it is comparable across rows.
Break-even sparsity: the op's time is fitted as a + b * (1 - sparsity) and solved for the dense time.

End to end (--e2e): one transformer forward, backend "mindiesd" dense vs sparse (start_step 0: every
call sparse); a 50-step estimate = start_step * dense + (50 - start_step) * sparse per forward.

Testbed (--testbed): the trained testbed DiT (8 frames x 8x8 tokens) sampled with 50 steps and CFG, compiled
dense and sparse at each --testbed-sparsities (dense for the first --start-step steps; 64-token blocks of one
frame x 8x8, since 128-token blocks would leave only 3 sparse blocks); PSNR/SSIM against the dense run and
the task accuracy (testbed.evaluate.quality). Its timings are overhead-bound (512 tokens): quality only.
"""
import argparse
import math
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
import mindiesd_compile  # noqa: E402,F401  (registers the ops)
from mindiesd_compile.sparse.layout import block_mask, select_blocks, tile_layout  # noqa: E402
from mindiesd_compile.sparse.scores import block_scores  # noqa: E402
from bench_wan import profile_attention, time_calls  # noqa: E402


def timer(dev, iters, warmup):
    def run(fn):
        for _ in range(warmup):
            fn()
        return statistics.median(time_calls(fn, dev, iters))
    return run


def dense_kernels(q, k, v, dev):
    """name -> fn() for each dense kernel available; q/k/v are [B, S, H, D]."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import flex_attention
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
    kernels = {}

    def sdpa(backend):
        def fn():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(qh, kh, vh)
        return fn

    if dev.type == "cuda":
        kernels["cuDNN SDPA"] = sdpa(SDPBackend.CUDNN_ATTENTION)
        kernels["flash SDPA"] = sdpa(SDPBackend.FLASH_ATTENTION)
        from mindiesd_compile.ops.attention_kernels import flash_attn_3
        fa3 = flash_attn_3()  # the fa3-fwd package or a flash_attn_interface build
        if fa3 is not None and q.dtype in fa3.dtypes:
            kernels["FA3"] = lambda: fa3.func(q, k, v)
        else:
            print("FA3: not installed for this dtype; skipped")
        flex = torch.compile(flex_attention, dynamic=False, fullgraph=True)
        kernels["FlexAttention dense"] = lambda: flex(qh, kh, vh)
    else:
        kernels["math SDPA"] = sdpa(SDPBackend.MATH)
    return kernels


def attention_only(args, dev, dtype):
    frames, h, w = args.grid
    seq, heads, dim = frames * h * w, args.heads, args.head_dim
    flops = 4 * heads * seq * seq * dim
    g = torch.Generator(dev).manual_seed(0)
    q, k, v = (torch.randn(1, seq, heads, dim, generator=g, device=dev, dtype=dtype) for _ in range(3))
    time_it = timer(dev, args.iters, args.warmup)
    rows = []

    def add(name, sparsity, fn):
        try:
            with torch.no_grad():
                ms = time_it(fn)
        except Exception as e:  # a kernel missing on this machine is reported, not fatal
            traceback.print_exc()
            print(f"{name}: FAILED ({type(e).__name__}: {e})")
            return
        rows.append(dict(name=name, sparsity=sparsity, ms=ms, tflops=flops / ms / 1e9))
        print(f"{name:<24} sparsity {sparsity:<4} {ms:9.3f} ms  {flops / ms / 1e9:7.1f} TFLOP/s (dense-equivalent)",
              flush=True)

    for name, fn in dense_kernels(q, k, v, dev).items():
        add(name, 0.0, fn)
    lay = tile_layout((frames, h, w), (0, 0), tuple(args.tile), args.block, str(dev))
    scale = 1 / math.sqrt(dim)
    qp, kp, vp = (t.transpose(1, 2).index_select(2, lay.padded_perm) for t in (q, k, v))  # as the op lays them out
    scores = block_scores(qp[:, :, :seq], kp[:, :, :seq], args.block, scale)
    from mindiesd_compile.sparse import kernels
    kinds = list(dict.fromkeys([kernels.choose(qp), "flex"])) if dev.type == "cuda" else ["reference"]
    for s in args.sparsities:
        keep = select_blocks(scores, lay.dense, s, lay.n_dense)
        print(f"sparsity {s}: {keep.float().mean().item():.3f} of the blocks kept (dense first frame included)")
        for kind in kinds:
            prepared = kernels.prepare(kind, keep, args.block, seq)
            add(f"block-sparse kernel ({kind})", s,
                lambda: kernels.attend(kind, qp, kp, vp, keep, prepared, scale, lay))
        rem = args.remainder != "off"
        op = lambda s=s: torch.ops.mindiesd_compile.sparse_attention(  # noqa: E731
            q, k, v, scale, "BSHD", [frames, h, w], [0, 0], list(args.tile), args.block, s, 0, 1, rem)
        add("block-sparse op" + (" with remainder" if rem else ""), s, op)
        if s == args.e2e_sparsity:  # where the op's time beyond the kernel goes
            _, top = profile_attention(op, dev)
            print("op kernels: " + "; ".join(f"{k[:60]} {ms:.3f} ms" for k, ms, _ in top), flush=True)
    print(f"block-sparse kernel choices: {kernels.CHOICES}")
    if args.flex_sweep and dev.type == "cuda":
        keep = select_blocks(scores, lay.dense, args.e2e_sparsity, lay.n_dense)
        flex_sweep(*(t[:, :, :seq] for t in (qp, kp, vp)), keep, scale, args, add)
    return rows


FLEX_SWEEP = (  # FlexAttention kernel_options tried on the sparse kernel (--flex-sweep); {} = Inductor's choice
    {}, {"ROWS_GUARANTEED_SAFE": True}, {"USE_TMA": True}, {"USE_TMA": True, "ROWS_GUARANTEED_SAFE": True},
    {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2},
    {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2, "USE_TMA": True},
    {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3, "USE_TMA": True},
    {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
    {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 4, "num_stages": 3},
    {"BACKEND": "FLASH"},
)


def flex_sweep(qp, kp, vp, keep, scale, args, add):
    """The sparse kernel at one sparsity under each FLEX_SWEEP kernel_options (fresh compile each)."""
    from torch.nn.attention.flex_attention import flex_attention
    mask = block_mask(keep, qp.shape[-2], args.block)
    ref = None
    for opts in FLEX_SWEEP:
        torch._dynamo.reset()
        flex = torch.compile(flex_attention, dynamic=False, fullgraph=True)
        call = lambda o=opts: flex(qp, kp, vp, block_mask=mask, scale=scale, kernel_options=o or None)  # noqa: E731
        try:
            with torch.no_grad():
                out = call().float()
        except Exception as e:  # an option this torch does not know is reported, not fatal
            print(f"flex {opts}: FAILED ({type(e).__name__}: {str(e)[:200]})")
            continue
        ref = out if ref is None else ref
        print(f"flex {opts}: rel err vs default options {float((out - ref).norm() / ref.norm()):.2e}")
        add(f"flex {opts}", args.e2e_sparsity, call)


def break_even(rows, dense_ms):
    """Sparsity at which the op matches ``dense_ms``: least squares fit of op ms = a + b * density."""
    pts = [(1 - r["sparsity"], r["ms"]) for r in rows if r["name"] == "block-sparse op"]
    if len(pts) < 2:
        return None
    mx, my = statistics.mean(p[0] for p in pts), statistics.mean(p[1] for p in pts)
    b = sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)
    a = my - b * mx
    return 1 - (dense_ms - a) / b if b > 0 else None


def wan_and_inputs(args, dev, dtype, n):
    """The random-weight 1.3B transformer (tiny with --smoke) and ``n`` random tensors: latents, then text."""
    from bench_wan import CONFIGS, build_model
    cfg, lat, txt = CONFIGS["tiny" if args.smoke else "1.3b"]
    g = torch.Generator(dev).manual_seed(0)
    return build_model(cfg, dev, dtype, 0), [torch.randn(shape, generator=g, device=dev, dtype=dtype)
                                             for shape in [lat, txt, txt][:n]]


def sparse_options(args, **fields):
    """options["sparse_attention"] at --e2e-sparsity, --block, --tile (small blocks for the tiny --smoke model)."""
    block, tile = (4, (2, 2)) if args.smoke else (args.block, tuple(args.tile))
    return {"sparse_attention": dict(sparsity=args.e2e_sparsity, block=block, tile=tile, **fields)}


def remainders(args):
    """The ``remainder`` settings --remainder asks for, each with its label."""
    return [(r, ", pooled remainder" if r else "") for r in {"off": [False], "on": [True], "both": [False, True]}[
        args.remainder]]


def print_kernels(label, fn, dev, per, top):
    """One profiled ``fn()``: GPU busy time and the ``top`` kernels, each divided by ``per``."""
    from profile_wan import kernel_times
    with torch.no_grad():
        times, busy = kernel_times(fn, dev)
    ranked = sorted(times.items(), key=lambda kv: -kv[1])[:top]
    print(f"  {label}: GPU busy {busy / per:.1f} ms; " + "; ".join(f"{k[:50]} {t / per:.1f}" for k, t in ranked),
          flush=True)


def end_to_end(args, dev, dtype):
    model, (latents, text) = wan_and_inputs(args, dev, dtype, 2)
    inputs = dict(hidden_states=latents, encoder_hidden_states=text)
    target = "eager" if args.smoke else dev.type
    time_it = timer(dev, args.e2e_iters, 1)
    rows, outs = [], {}
    variants = [("mindiesd dense", {})]
    for rem, label in remainders(args):
        variants.append((f"mindiesd sparse {args.e2e_sparsity}{label}", sparse_options(args, start_step=0,
                                                                                       remainder=rem)))
        if args.e2e_mask_refresh > 1:
            variants.append((f"mindiesd sparse {args.e2e_sparsity}{label}, mask reused for {args.e2e_mask_refresh} "
                             "steps", sparse_options(args, start_step=0, mask_refresh=args.e2e_mask_refresh,
                                                     remainder=rem)))
    for name, extra in variants:
        torch._dynamo.reset()
        fn = torch.compile(model, backend="mindiesd", options={"target": target, **extra})
        steps = iter(range(10 ** 6))  # a decreasing timestep per call: every call is a new denoising step
        call = lambda: fn(**inputs, timestep=torch.tensor([999.0 - next(steps) % 999], device=dev),  # noqa: E731
                          return_dict=False)[0]
        with torch.no_grad():
            t0 = time.perf_counter()
            outs[name] = call()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            cold = time.perf_counter() - t0
            group = args.e2e_mask_refresh  # amortise: time whole refresh periods (one mask build each)
            ms = time_it(lambda: [call() for _ in range(group)]) / group
        rows.append(dict(name=name, ms=ms, cold_s=cold))
        print(f"{name}: {ms:.1f} ms per forward (first call incl. compile {cold:.1f} s)", flush=True)
        if dev.type == "cuda":  # where a forward's time goes: kernels by name, and the GPU's idle time
            print_kernels("per forward", lambda: [call() for _ in range(group)], dev, group, 6)
    d, s = list(outs.values())[:2]
    rel = ((s.float() - d.float()).norm() / d.float().norm()).item()
    return rows, rel


def denoise(args, dev, dtype):
    """A whole CFG denoising loop of the 1.3B transformer (--denoise-steps steps, two calls each, timesteps from
    999 down, an Euler update): wall seconds, dense vs sparse with each of --denoise-start-steps dense steps."""
    model, (noise, text, negative) = wan_and_inputs(args, dev, dtype, 3)
    variants = [("dense", {}, 0)] + [(f"sparse {args.e2e_sparsity}, first {n} steps dense{label}",
                                      sparse_options(args, start_step=n, mask_refresh=args.e2e_mask_refresh,
                                                     remainder=rem), n)
                                     for n in args.denoise_start_steps for rem, label in remainders(args)]
    rows = []
    for name, extra, dense_steps in variants:
        torch._dynamo.reset()
        fn = torch.compile(model, backend="mindiesd", options={"target": "eager" if args.smoke else dev.type, **extra})

        def loop(steps):
            x = noise.clone()
            for t in torch.linspace(999, 0, steps + 1)[:-1].tolist():
                step = torch.tensor([t], device=dev)
                cond = fn(hidden_states=x, timestep=step, encoder_hidden_states=text, return_dict=False)[0]
                uncond = fn(hidden_states=x, timestep=step, encoder_hidden_states=negative, return_dict=False)[0]
                x = x - (uncond + 5.0 * (cond - uncond)) / steps
            return x
        with torch.no_grad():
            loop(dense_steps + 2)  # compiles, and runs the sparse kernels once (their first call builds them)
            seconds = time_calls(lambda: loop(args.denoise_steps), dev, 1)[0] / 1e3
        rows.append(dict(name=name, seconds=seconds))
        print(f"{args.denoise_steps}-step CFG loop, {name}: {seconds:.2f} s", flush=True)
        if args.denoise_profile and dev.type == "cuda":  # GPU idle inside the loop (against the wall above)
            print_kernels("profiled loop", lambda: loop(args.denoise_steps), dev, 1, 8)
    return rows


def testbed_quality(args, dev, dtype):
    from testbed import evaluate as E, sample as S, videos as V
    if args.smoke:
        from testbed.train import TINY, build
        model = build(TINY, 0).to(dev).eval().requires_grad_(False)
    else:
        model = S.load(args.checkpoint, device=dev, dtype=dtype)
    conds = V.all_conditions()
    cond = conds[torch.arange(args.testbed_n) % len(conds)]
    run = dict(cond=cond, seed=0, steps=args.testbed_steps, guidance=S.GUIDANCE, device=dev, dtype=dtype)
    target = "eager" if dev.type == "cpu" or args.testbed_reference else dev.type  # passes only (reference kernel)
    rows, reference = [], None
    for s, (rem, label) in [(None, (False, ""))] + [(s, r) for s in args.testbed_sparsities for r in remainders(args)]:
        sparse = {} if s is None else {"sparse_attention": dict(
            sparsity=s, start_step=args.start_step, block=args.testbed_block, tile=tuple(args.testbed_tile),
            mask_refresh=args.e2e_mask_refresh, remainder=rem)}
        torch._dynamo.reset()
        fn = torch.compile(model, backend="mindiesd", options={"target": target, **sparse})
        S.sample(model, transformer=fn, **dict(run, steps=2))  # compile
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        videos = S.sample(model, transformer=fn, **run)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        if reference is None:
            reference = videos
        rows.append(dict(sparsity=f"{s or 0.0}{label}", seconds=seconds, **E.quality(reference, videos, cond)))
        r = rows[-1]
        print(f"testbed sparsity {r['sparsity']}: {seconds:.2f} s, PSNR {r['psnr']:.2f} dB, SSIM {r['ssim']:.4f}, "
              f"task {r['task_accuracy']:.3f} (dense {r['baseline_task_accuracy']:.3f})", flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shapes: a logic check of this script")
    ap.add_argument("--e2e", action="store_true", help="also time the Wan2.1-1.3B transformer forward")
    ap.add_argument("--grid", type=int, nargs=3, default=[21, 30, 52], help="latent frames, h, w (after patching)")
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--tile", type=int, nargs=2, default=[8, 8])
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.7, 0.8, 0.9])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--e2e-sparsity", type=float, default=0.8)
    ap.add_argument("--flex-sweep", action="store_true", help="the sparse kernel at --e2e-sparsity under several "
                    "FlexAttention kernel_options")
    ap.add_argument("--e2e-iters", type=int, default=3)
    ap.add_argument("--e2e-mask-refresh", type=int, default=1,
                    help="> 1: also time sparse with masks reused for this many steps (amortised per forward); "
                         "the testbed run reuses masks as long")
    ap.add_argument("--denoise-start-steps", type=int, nargs="*", default=[],
                    help="time whole CFG denoising loops: dense, and sparse with each of these dense steps first")
    ap.add_argument("--denoise-steps", type=int, default=50)
    ap.add_argument("--denoise-profile", action="store_true", help="also profile one loop per variant")
    ap.add_argument("--remainder", choices=["off", "on", "both"], default="on",
                    help="sparse variants without / with / both ways options['sparse_attention']['remainder'] (the "
                         "skipped key blocks pooled into the softmax)")
    ap.add_argument("--start-step", type=int, default=10, help="dense steps (50-step estimate, testbed)")
    ap.add_argument("--testbed", action="store_true", help="quality on the trained testbed model")
    ap.add_argument("--checkpoint", default=None, help="testbed checkpoint (default: testbed/checkpoint)")
    ap.add_argument("--testbed-sparsities", type=float, nargs="+", default=[0.5, 0.8])
    ap.add_argument("--testbed-steps", type=int, default=50)
    ap.add_argument("--testbed-n", type=int, default=48, help="videos (all conditions once), one batch")
    ap.add_argument("--testbed-block", type=int, default=64)
    ap.add_argument("--testbed-tile", type=int, nargs=2, default=[8, 8])
    ap.add_argument("--testbed-cpu", action="store_true", help="run only the testbed part, on the CPU in fp32 with the "
                    "op's reference kernel (any block size)")
    ap.add_argument("--testbed-reference", action="store_true", help="run only the testbed part, on the GPU in fp32 "
                    "with the op's reference kernel (any block size; the same numbers as --testbed-cpu, faster)")
    args = ap.parse_args()
    if args.smoke:
        args.grid, args.heads, args.head_dim, args.block, args.tile = [3, 4, 8], 2, 16, 8, [2, 2]
        args.iters, args.warmup, args.e2e_iters = 2, 1, 1
        args.testbed_steps, args.testbed_n, args.testbed_block, args.testbed_tile = 4, 2, 8, [2, 4]
        args.start_step = min(args.start_step, 1)
    dev = torch.device("cpu" if args.smoke or args.testbed_cpu else "cuda")
    dtype = torch.float32 if dev.type == "cpu" else torch.bfloat16
    if args.testbed_reference:
        from mindiesd_compile.sparse import kernels
        kernels.choose = lambda q: "reference"  # SDPA with the expanded mask: blocks smaller than the GPU kernels take
        dtype = torch.float32
    if args.testbed_cpu or args.testbed_reference:
        print("\n".join(testbed_table(args, testbed_quality(args, dev, dtype))))
        return
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"# block-sparse attention, grid {args.grid}, {args.heads} heads x {args.head_dim}, block {args.block}, "
          f"tile {args.tile}, {dtype}, {name}, torch {torch.__version__}", flush=True)

    rows = attention_only(args, dev, dtype)
    dense = {r["name"]: r["ms"] for r in rows if r["sparsity"] == 0.0 and "sparse" not in r["name"]}
    best = min(dense, key=dense.get)
    refs = [n for n in ("FA3", "cuDNN SDPA") if n in dense] or [best]
    lines = ["| kernel | sparsity | ms | " + " | ".join(f"vs {n}" for n in refs) + " | TFLOP/s (dense-eq.) |",
             "|---|---|---|" + "---|" * len(refs) + "---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['sparsity']} | {r['ms']:.3f} | "
                     + " | ".join(f"{dense[n] / r['ms']:.2f}x" for n in refs) + f" | {r['tflops']:.0f} |")
    notes = []
    for n in refs:
        s = break_even(rows, dense[n])
        notes.append(f"break-even sparsity vs {n}: " + ("n/a" if s is None else f"{s:.2f}"))
    if args.e2e:
        e2e, rel = end_to_end(args, dev, dtype)
        d_ms = e2e[0]["ms"]
        lines += ["", "| Wan2.1-1.3B forward | ms | speedup | first call s |", "|---|---|---|---|"]
        lines += [f"| {r['name']} | {r['ms']:.1f} | {d_ms / r['ms']:.2f}x | {r['cold_s']:.1f} |" for r in e2e]
        for r in e2e[1:]:
            est = args.start_step * d_ms + (50 - args.start_step) * r["ms"]
            notes.append(f"50 steps, {args.start_step} dense, {r['name']}: {est / 1e3:.1f} s vs {50 * d_ms / 1e3:.1f} s "
                         f"dense ({50 * d_ms / est:.2f}x)")
        notes.append(f"sparse vs dense output rel err {rel:.3e} (random weights)")
    if args.denoise_start_steps:
        rows = denoise(args, dev, dtype)
        lines += ["", f"| {args.denoise_steps}-step CFG denoising, Wan2.1-1.3B | s | speedup |", "|---|---|---|"]
        lines += [f"| {r['name']} | {r['seconds']:.2f} | {rows[0]['seconds'] / r['seconds']:.2f}x |" for r in rows]
    if args.testbed:
        lines += testbed_table(args, testbed_quality(args, dev, dtype))
    print("\n" + "\n".join(lines + [""] + notes))


def testbed_table(args, rows):
    lines = ["", f"| testbed sparsity (dense first {args.start_step} steps, mask_refresh {args.e2e_mask_refresh}, "
             f"{args.testbed_block}-token blocks) | sampling s | PSNR dB vs dense | SSIM vs dense | task accuracy | "
             "dense task accuracy |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['sparsity']} | {r['seconds']:.2f} | {r['psnr']:.2f} | {r['ssim']:.4f} | "
              f"{r['task_accuracy']:.3f} | {r['baseline_task_accuracy']:.3f} |" for r in rows]
    return lines


if __name__ == "__main__":
    main()
