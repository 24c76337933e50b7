"""Where the time of one Wan2.1 forward goes, by kernel class, next to each class's floor.

    python bench/profile_wan.py --configs 1.3b,14b --variants inductor,mindiesd-sdpa,mindiesd,mindiesd+graph
    python bench/profile_wan.py --configs tiny --device cpu   # smoke run (CPU: op classes, no floors)

Per config and variant (Inductor; mindiesd with SDPA only; mindiesd with FA3 where installed; the latter
captured whole in one CUDA graph): median wall ms of the compiled forward (CUDA events), then one profiled call whose GPU kernels
are classed as attention, GEMM, convolution, copies and norm/elementwise (everything else Inductor
generates); "GPU idle" = wall time minus the time any kernel ran (union of kernel intervals). Floors use rates measured
in the same run on the same card: a large bf16 GEMM (TFLOP/s) and a large device copy (GB/s).
- attention FLOPs: 4 B H S_q S_kv D per attention (self: S_kv = S; cross: S_kv = text tokens);
- GEMM FLOPs: 2 x input elements x out_features of every nn.Linear, counted with hooks in an eager call;
- norm/elementwise bytes: per block, the residual stream [S, dim] read and written by each fused chain
  (three norm+modulate, three gated residuals, qk-norm+RoPE of q and k) and the FFN activation [S, ffn]
  read and written once: 19 S dim + 2 S ffn elements of 2 bytes (what a perfectly fused block must move).
"""
import argparse
import contextlib
import re
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
from bench_wan import ATTN_RE, CONFIGS, NOT_ATTN_RE, build_model, merge_intervals, time_calls  # noqa: E402

import mindiesd_compile  # noqa: E402,F401

CLASSES = (("attention", lambda k: bool(ATTN_RE.search(k)) and not NOT_ATTN_RE.search(k)),
           ("GEMM", lambda k: bool(re.search(r"gemm|cutlass|sm\d+_xmma|nvjet|cublas|triton_tem_fused_(add)?mm|_mm_|matmul",
                                             k, re.I))),
           ("convolution", lambda k: "conv" in k.lower()),
           ("copies", lambda k: bool(re.search(r"memcpy|memset|copy_|CatArrayBatched|elementwise_kernel.*copy", k, re.I))),
           ("norm/elementwise", lambda k: True))


def measured_peaks(dev):
    """(bf16 GEMM TFLOP/s, copy GB/s) of this card, median of a few runs."""
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    gemm = statistics.median(time_calls(lambda: a @ a, dev, 10))
    x = torch.empty(2 ** 30 // 2, device=dev, dtype=torch.bfloat16)  # 1 GiB
    y = torch.empty_like(x)
    copy = statistics.median(time_calls(lambda: y.copy_(x), dev, 10))
    return 2 * 8192 ** 3 / gemm / 1e9, 2 * x.numel() * 2 / copy / 1e6


def linear_flops(model, inputs):
    flops = [0]

    def hook(mod, args, out):
        flops[0] += 2 * args[0].numel() * mod.out_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        model(**inputs, return_dict=False)
    for h in handles:
        h.remove()
    return flops[0]


def kernel_times(fn, dev):
    """(ms per kernel name, ms the GPU was busy: union of kernel intervals) of one profiled call."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA] if dev.type == "cuda" else [ProfilerActivity.CPU]) as prof:
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
    times, spans = {}, []
    for e in prof.events():
        if dev.type == "cuda" and e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        t = e.self_device_time_total if dev.type == "cuda" else e.self_cpu_time_total
        times[e.name] = times.get(e.name, 0.0) + t / 1e3  # ms
        if dev.type == "cuda":
            spans.append((e.time_range.start, e.time_range.end))
    busy = sum(b - a for a, b in merge_intervals(spans))  # us
    return times, busy / 1e3 if spans else sum(times.values())


GEMM_OPS = ("aten::mm", "aten::addmm", "aten::_addmm_activation", "aten::bmm", "aten::_scaled_mm")


def gemm_by_shape(fn, dev):
    """{(op, input shapes): (calls, device ms)} of the matrix products in one profiled call: where two variants'
    GEMM time differs, this says which product (bias epilogue, GELU epilogue, layout) it is."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        fn()
        torch.cuda.synchronize(dev)
    return {(e.key, repr(e.input_shapes)): (e.count, e.device_time_total / 1e3)
            for e in prof.key_averages(group_by_input_shape=True) if e.key in GEMM_OPS}


@contextlib.contextmanager
def attention_kernel(name):
    """"sdpa": hide FA3 from the CUDA attention kernel chooser for this variant; "fa3src": use the FA3 built
    from source (``flash_attn_interface``, bench/build_fa3.sh) even where the fa3-fwd wheel is installed."""
    from mindiesd_compile.ops import attention_kernels as K
    saved = K.flash_attn_3
    if name == "sdpa":
        K.flash_attn_3 = lambda: None
    elif name == "fa3src":
        import flash_attn_interface
        build = K.FlashAttention3("flash_attn_interface", flash_attn_interface.flash_attn_func,
                                  frozenset({torch.bfloat16}))
        K.flash_attn_3 = lambda: build
    try:
        yield
    finally:
        K.flash_attn_3 = saved


def whole_call_graph(call, dev):
    """Capture the whole forward in one CUDA graph (an upper bound on what CUDA graphs save)."""
    side = torch.cuda.Stream(dev)
    side.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(side):
        for _ in range(2):
            call()
    torch.cuda.current_stream(dev).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call()
    return lambda: (graph.replay(), out)[1]


@contextlib.contextmanager
def persistent_reductions_up_to(numel):
    """Experiment: Inductor keeps row reductions up to ``numel`` in registers (its default: 1024)."""
    from torch._inductor.choices import InductorChoices
    from torch._inductor.runtime.hints import ReductionHint
    from torch._inductor.virtualized import V
    original = InductorChoices.should_use_persistent_reduction

    def wider(features, cooperative_reduction):
        if (not cooperative_reduction and features.get_reduction_hint() == ReductionHint.INNER
                and V.graph.sizevars.statically_known_leq(features.reduction_numel, numel)):
            return True
        return original(features, cooperative_reduction)
    InductorChoices.should_use_persistent_reduction = staticmethod(wider)
    try:
        yield
    finally:
        InductorChoices.should_use_persistent_reduction = staticmethod(original)


NO_GELU = [p for p in mindiesd_compile.PATTERNS if p != "gelu_epilogue"]
NO_NORM_ROPE = [p for p in mindiesd_compile.PATTERNS if p != "norm_rope"]
VARIANTS = {  # name: (backend options, or None / a mode for Inductor, attention kernel, capture whole call, context)
    "inductor": (None, "auto", False, None),
    "mindiesd": ({}, "auto", False, None),
    "mindiesd-fa3src": ({}, "fa3src", False, None),
    "mindiesd-sdpa": ({"patterns": [p for p in NO_GELU if p in NO_NORM_ROPE]}, "sdpa", False, None),
    "mindiesd-nogelu": ({"patterns": NO_GELU}, "auto", False, None),
    "mindiesd-nonormrope": ({"patterns": NO_NORM_ROPE}, "auto", False, None),
    "mindiesd+graph": ({}, "auto", True, None),
    "mindiesd+cudagraphs": ({"cuda_graphs": True}, "auto", False, None),  # options["cuda_graphs"]: whole forward
    "mindiesd+inductor-cudagraphs": ({"inductor_config": {"triton.cudagraphs": True}}, "auto", False, None),  # per piece
    "inductor+cudagraphs": ("reduce-overhead", "auto", False, None),  # Inductor's cudagraph trees
    "mindiesd-nopartition": ({"partition": False}, "auto", False, None),  # one graph, no piece runner
    "mindiesd+fp8attn": ({"fp8": {"attention": True}}, "auto", False, None),
    "mindiesd+fp8": ({"fp8": {"attention": True, "linear": True}}, "auto", False, None),

    "mindiesd+persistent": ({}, "auto", False, lambda: persistent_reductions_up_to(8192)),
    "mindiesd+multikernel": ({"inductor_config": {"triton.multi_kernel": 1}}, "auto", False, None),
    "mindiesd+cdt": ({"inductor_config": {"coordinate_descent_tuning": True}}, "auto", False, None),
}


def profile_variant(variant, model, inputs, dev, iters):
    options, kernel, graphed, context = VARIANTS[variant]
    torch._dynamo.reset()
    fresh = getattr(torch._inductor.utils, "fresh_cache", None) or torch._inductor.utils.fresh_inductor_cache
    with fresh(), torch.no_grad(), attention_kernel(kernel), (context or contextlib.nullcontext)():
        if options is None or isinstance(options, str):
            fast = torch.compile(model, mode=options)
        else:
            fast = torch.compile(model, backend="mindiesd", options={"target": dev.type, **options})
        call = lambda: fast(**inputs, return_dict=False)[0]  # noqa: E731
        start = time.perf_counter()
        out = call()  # cold: compiles (a fresh Inductor cache per variant)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        compile_s = time.perf_counter() - start
        out = call()
        if graphed:
            call = whole_call_graph(call, dev)
        wall = statistics.median(time_calls(call, dev, iters))
        times, busy = kernel_times(call, dev)
        gemms = gemm_by_shape(call, dev) if dev.type == "cuda" else {}
        out = call().float().clone()
    return wall, times, busy, out, compile_s, gemms


def profile_config(name, dev, dtype, iters, variants):
    cfg, lat, txt = CONFIGS[name]
    model = build_model(cfg, dev, dtype, 0)
    g = torch.Generator(dev).manual_seed(0)
    inputs = dict(hidden_states=torch.randn(lat, generator=g, device=dev, dtype=dtype),
                  encoder_hidden_states=torch.randn(txt, generator=g, device=dev, dtype=dtype),
                  timestep=torch.tensor([500.0], device=dev))
    gemm_flops = linear_flops(model, inputs)
    with torch.no_grad():
        ref = model(**inputs, return_dict=False)[0].float()
    heads, head_dim, layers = cfg["num_attention_heads"], cfg["attention_head_dim"], cfg["num_layers"]
    p = cfg["patch_size"]
    seq = lat[2] // p[0] * (lat[3] // p[1]) * (lat[4] // p[2])
    dim, text = heads * head_dim, txt[1]
    work = dict(flops={"attention": layers * 4 * heads * head_dim * seq * (seq + text), "GEMM": gemm_flops},
                bytes={"norm/elementwise": layers * (19 * seq * dim + 2 * seq * cfg["ffn_dim"]) * 2})
    results = {}
    for variant in variants:
        try:
            wall, times, busy, out, compile_s, gemms = profile_variant(variant, model, inputs, dev, iters)
        except Exception as err:  # noqa: BLE001 - report the variant as failed, keep the others
            print(f"{name} {variant}: FAILED {type(err).__name__}: {err}", flush=True)
            continue
        by_class = dict.fromkeys([c for c, _ in CLASSES], 0.0)
        top = {c: [] for c in by_class}
        for k, t in sorted(times.items(), key=lambda kv: -kv[1]):
            c = next(c for c, test in CLASSES if test(k))
            by_class[c] += t
            top[c].append((k, t))
        rel = float((out - ref).norm() / ref.norm())
        results[variant] = dict(wall=wall, busy=busy, by_class=by_class, top=top, rel=rel, compile_s=compile_s,
                                gemms=gemms)
        print(f"{name} {variant}: {wall:.1f} ms, busy {busy:.1f} ms, rel err vs eager {rel:.2e}, "
              f"first call (compile) {compile_s:.1f} s", flush=True)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    from mindiesd_compile.ops.attention_kernels import CHOICES
    print(f"attention kernel choices: {CHOICES}")
    del model
    return dict(config=name, variants=results, **work)


def class_table(r, floors):
    """Rows: kernel classes + idle + wall; columns per variant: ms and x floor (or achieved rate)."""
    names = list(r["variants"])
    head = "| class | floor ms | " + " | ".join(f"{v} ms | x floor" for v in names) + " |"
    lines = [head, "|" + "---|" * (2 + 2 * len(names))]
    classes = list(next(iter(r["variants"].values()))["by_class"]) + ["GPU idle", "**forward**"]
    total_floor = sum(v for v in floors.values() if v == v)
    for c in classes:
        floor = total_floor if c == "**forward**" else floors.get(c)
        cells = []
        for v in names:
            x = r["variants"][v]
            t = {"GPU idle": x["wall"] - x["busy"], "**forward**": x["wall"]}.get(c, x["by_class"].get(c, 0.0))
            cells.append(f"{t:.1f} | {'-' if not floor or floor != floor else f'{t / floor:.2f}x'}")
        lines.append(f"| {c} | {'-' if floor is None or floor != floor else f'{floor:.1f}'} | " + " | ".join(cells) + " |")
    return lines


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="1.3b,14b")
    ap.add_argument("--variants", default="inductor,mindiesd-sdpa,mindiesd", help=", ".join(VARIANTS))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--iters", type=int, default=5)
    args = ap.parse_args()
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    tflops, gbs = measured_peaks(dev) if dev.type == "cuda" else (float("nan"), float("nan"))
    card = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    lines = [f"card {card}, torch {torch.__version__}: measured bf16 GEMM {tflops:.0f} TFLOP/s, copy {gbs:.0f} GB/s"]
    for name in args.configs.split(","):
        r = profile_config(name, dev, dtype, args.iters, args.variants.split(","))
        floors = {c: f / tflops / 1e9 for c, f in r["flops"].items()}
        floors.update({c: b / gbs / 1e6 for c, b in r["bytes"].items()})
        lines += ["", f"### Wan2.1-{name} (attention {r['flops']['attention'] / 1e12:.0f} TFLOP, "
                  f"GEMM {r['flops']['GEMM'] / 1e12:.0f} TFLOP)", ""] + class_table(r, floors)
        for v, x in r["variants"].items():
            base = r["variants"].get("inductor")
            vs = f", {x['wall'] / base['wall']:.3f}x Inductor" if base else ""
            lines.append(f"\n{v}: {x['wall']:.1f} ms{vs}, rel err vs eager {x['rel']:.2e}; top kernels per class:")
            for c, ks in x["top"].items():
                if ks:
                    lines.append(f"  {c}: " + "; ".join(f"{k[:70]} {t:.1f}" for k, t in ks[:4]))
            for (op, shapes), (n, t) in sorted(x["gemms"].items(), key=lambda kv: -kv[1][1]):
                lines.append(f"  gemm {op} {shapes} x{n}: {t:.1f} ms")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
