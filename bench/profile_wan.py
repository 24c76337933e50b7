"""Where the time of one Wan2.1 forward goes, by kernel class, next to each class's floor.

    python bench/profile_wan.py --configs 1.3b,14b            # 832x480x81, bf16, backend="mindiesd", on cuda
    python bench/profile_wan.py --configs tiny --device cpu   # smoke run (CPU: op classes, no floors)

Per config: median wall ms of the compiled forward (CUDA events), then one profiled call whose GPU kernels
are classed as attention, GEMM, convolution, copies and norm/elementwise (everything else Inductor
generates); "launch gaps" = wall time minus the sum of kernel time (one stream). Floors use rates measured
in the same run on the same card: a large bf16 GEMM (TFLOP/s) and a large device copy (GB/s).
- attention FLOPs: 4 B H S_q S_kv D per attention (self: S_kv = S; cross: S_kv = text tokens);
- GEMM FLOPs: 2 x input elements x out_features of every nn.Linear, counted with hooks in an eager call;
- norm/elementwise bytes: per block, the residual stream [S, dim] read and written by each fused chain
  (three norm+modulate, three gated residuals, qk-norm+RoPE of q and k) and the FFN activation [S, ffn]
  read and written once: 19 S dim + 2 S ffn elements of 2 bytes (what a perfectly fused block must move).
"""
import argparse
import re
import statistics
import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
from bench_wan import ATTN_RE, CONFIGS, NOT_ATTN_RE, build_model, time_calls  # noqa: E402

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
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA] if dev.type == "cuda" else [ProfilerActivity.CPU]) as prof:
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
    times = {}
    for e in prof.key_averages():
        if dev.type == "cuda" and e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        t = e.self_device_time_total if dev.type == "cuda" else e.self_cpu_time_total
        times[e.key] = times.get(e.key, 0.0) + t / 1e3  # ms
    return times


def profile_config(name, dev, dtype, iters):
    cfg, lat, txt = CONFIGS[name]
    model = build_model(cfg, dev, dtype, 0)
    g = torch.Generator(dev).manual_seed(0)
    inputs = dict(hidden_states=torch.randn(lat, generator=g, device=dev, dtype=dtype),
                  encoder_hidden_states=torch.randn(txt, generator=g, device=dev, dtype=dtype),
                  timestep=torch.tensor([500.0], device=dev))
    gemm_flops = linear_flops(model, inputs)
    torch._dynamo.reset()
    fast = torch.compile(model, backend="mindiesd", options={"target": dev.type})
    with torch.no_grad():
        call = lambda: fast(**inputs, return_dict=False)[0]  # noqa: E731
        for _ in range(2):
            call()
        wall = statistics.median(time_calls(call, dev, iters))
        times = kernel_times(call, dev)
    by_class = dict.fromkeys([c for c, _ in CLASSES], 0.0)
    for k, t in times.items():
        by_class[next(c for c, test in CLASSES if test(k))] += t
    heads, head_dim, layers = cfg["num_attention_heads"], cfg["attention_head_dim"], cfg["num_layers"]
    p = cfg["patch_size"]
    seq = lat[2] // p[0] * (lat[3] // p[1]) * (lat[4] // p[2])
    dim, text = heads * head_dim, txt[1]
    attn_flops = layers * 4 * heads * head_dim * seq * (seq + text)
    elem_bytes = layers * (19 * seq * dim + 2 * seq * cfg["ffn_dim"]) * 2
    del model, fast
    return dict(config=name, wall=wall, kernels=sum(times.values()), by_class=by_class,
                flops={"attention": attn_flops, "GEMM": gemm_flops}, bytes={"norm/elementwise": elem_bytes},
                top=sorted(times.items(), key=lambda kv: -kv[1])[:8])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="1.3b,14b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--iters", type=int, default=5)
    args = ap.parse_args()
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    tflops, gbs = measured_peaks(dev) if dev.type == "cuda" else (float("nan"), float("nan"))
    card = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    lines = [f"card {card}, torch {torch.__version__}: measured bf16 GEMM {tflops:.0f} TFLOP/s, copy {gbs:.0f} GB/s"]
    for name in args.configs.split(","):
        r = profile_config(name, dev, dtype, args.iters)
        floors = {c: f / tflops / 1e9 for c, f in r["flops"].items()}
        floors.update({c: b / gbs / 1e6 for c, b in r["bytes"].items()})
        lines += ["", f"### Wan2.1-{name}: {r['wall']:.1f} ms per forward (backend mindiesd), kernels {r['kernels']:.1f} ms",
                  "", "| class | ms | share of wall | work | achieved | floor ms | x floor |", "|---|---|---|---|---|---|---|"]
        for c, t in list(r["by_class"].items()) + [("launch gaps", r["wall"] - r["kernels"])]:
            work = (f"{r['flops'][c] / 1e12:.0f} TFLOP" if c in r["flops"] else
                    f"{r['bytes'][c] / 1e9:.0f} GB" if c in r["bytes"] else "-")
            rate = (f"{r['flops'][c] / t / 1e9:.0f} TFLOP/s" if c in r["flops"] and t else
                    f"{r['bytes'][c] / t / 1e6:.0f} GB/s" if c in r["bytes"] and t else "-")
            floor = floors.get(c)
            lines.append(f"| {c} | {t:.1f} | {100 * t / r['wall']:.1f} % | {work} | {rate} | "
                         f"{'-' if floor is None else f'{floor:.1f}'} | "
                         f"{'-' if floor is None or not floor == floor else f'{t / floor:.2f}x'} |")
        total_floor = sum(v for v in floors.values() if v == v)
        lines.append(f"\nfloor of the whole forward (sum of class floors): {total_floor:.1f} ms; "
                     f"measured {r['wall']:.1f} ms = {r['wall'] / total_floor:.2f}x" if total_floor else "")
        lines.append("top kernels: " + "; ".join(f"{k[:60]} {t:.1f} ms" for k, t in r["top"]))
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    print("\n".join(lines))


if __name__ == "__main__":
    main()
