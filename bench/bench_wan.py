"""Benchmark diffusers' WanTransformer3DModel (Wan 2.1 T2V DiT): eager vs Inductor vs the mindiesd backend.

    python bench/bench_wan.py --config 1.3b               # 832x480x81 video, one denoising step, bf16 on cuda
    python bench/bench_wan.py --tiny --device cpu --dtype float32 --iters 2    # CPU smoke test

Per variant: cold compile s (wall time of the first call = Dynamo trace + backend compile + one run), median ms
over --iters timed calls after --warmup calls, peak memory (weights included), attention kernels' share of
device time from one torch.profiler run, and max-abs / relative error against an eager reference output.

"Cold" compile: TORCHINDUCTOR_CACHE_DIR and TRITON_CACHE_DIR point at a fresh temp dir set before torch is
imported, and each compiled variant additionally runs inside torch._inductor.utils.fresh_cache() (new empty
FX-graph / AOTAutograd / autotune / Triton caches, in-memory caches cleared) after torch._dynamo.reset(), so no
variant reuses kernels compiled by an earlier one. The compile-worker pool is started before any variant so
neither backend pays (or is spared) its start-up.
"""
import os
import shutil
import sys
import tempfile

_CACHE = tempfile.mkdtemp(prefix="bench_wan_inductor_")  # must be set before torch is imported
os.environ["TORCHINDUCTOR_CACHE_DIR"] = _CACHE
os.environ["TRITON_CACHE_DIR"] = os.path.join(_CACHE, "triton")

import argparse, atexit, contextlib, datetime, gc, json, logging, re, statistics, time, traceback  # noqa: E402
import subprocess, threading  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch._inductor.async_compile  # noqa: E402
import torch._inductor.utils  # noqa: E402

atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
sys.path.append(str(Path(__file__).resolve().parents[1]))  # repo root, so `import mindiesd_compile` works uninstalled

BASE = dict(in_channels=16, out_channels=16, text_dim=4096, freq_dim=256, patch_size=(1, 2, 2),
            cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, attention_head_dim=128)
CONFIGS = {  # name: (model kwargs, latents shape, text shape)
    "1.3b": (dict(BASE, num_layers=30, num_attention_heads=12, ffn_dim=8960), (1, 16, 21, 60, 104), (1, 512, 4096)),
    "14b": (dict(BASE, num_layers=40, num_attention_heads=40, ffn_dim=13824), (1, 16, 21, 60, 104), (1, 512, 4096)),
    # 848x464x81: 21 x 29 x 53 = 32,277 tokens, which neither 2 nor 4 divides (sequence parallelism pads them)
    "1.3b-848x464": (dict(BASE, num_layers=30, num_attention_heads=12, ffn_dim=8960), (1, 16, 21, 58, 106),
                     (1, 512, 4096)),
    "14b-848x464": (dict(BASE, num_layers=40, num_attention_heads=40, ffn_dim=13824), (1, 16, 21, 58, 106),
                    (1, 512, 4096)),
    # a preview: 480x272, 17 frames (2,550 tokens), where launches, not FLOPs, may bound a forward
    "1.3b-preview": (dict(BASE, num_layers=30, num_attention_heads=12, ffn_dim=8960), (1, 16, 5, 34, 60), (1, 512, 4096)),
    "tiny": (dict(BASE, num_layers=2, num_attention_heads=2, attention_head_dim=16, ffn_dim=64, text_dim=32,
                  freq_dim=32, in_channels=4, out_channels=4), (1, 4, 2, 8, 8), (1, 8, 32)),
}
# Attention kernels: PyTorch flash / FA3 ("flash"), mem-efficient cutlass ("fmha"), cuDNN SDPA ("sdpa"), Triton
# flash-attention ("attn"). Inductor's pointwise/reduction kernels are named after the ops they fuse
# (e.g. triton_poi_fused__scaled_dot_product_flash_attention_3 is a layout copy), so they never count.
ATTN_RE = re.compile(r"flash|fmha|attention|attn|sdpa|fa3", re.I)
NOT_ATTN_RE = re.compile(r"^triton_(poi|per|red)_|^cpp_fused_")


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def build_model(cfg, dev, dtype, seed):
    """Random-weight model created directly on `dev` in `dtype`: no CPU init, no fp32 copy of 14B weights.
    Default (kaiming-uniform) init runs as one RNG kernel per tensor on the GPU, which is fast and keeps
    activations finite. Then mimic from_pretrained(torch_dtype=dtype): `_keep_in_fp32_modules` stay fp32."""
    from diffusers import WanTransformer3DModel
    torch.manual_seed(seed)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(dev):
            model = WanTransformer3DModel(**cfg)
    finally:
        torch.set_default_dtype(prev)
    keep = model._keep_in_fp32_modules or []
    for name, p in model.named_parameters():
        if any(k in name.split(".") for k in keep):
            p.data = p.data.float()
    return model.eval().requires_grad_(False)


def merge_intervals(spans):
    """The union of [start, end) intervals as sorted, disjoint [start, end] pairs (kernel timelines)."""
    merged = []
    for a, b in sorted(spans):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return merged


def time_calls(fn, dev, n, host=None, aligned=False):
    """Wall ms per call: CUDA events on GPU, synchronize + perf_counter elsewhere. ``host``: a list that gets
    the ms the host took to issue each call (elsewhere: the wall ms). ``aligned``: every rank of the default group
    starts each call together (a barrier before it)."""
    out = []
    for _ in range(n):
        if aligned:
            torch.distributed.barrier()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
        if dev.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t = time.perf_counter()
            a.record(); fn(); b.record()
            if host is not None:
                host.append((time.perf_counter() - t) * 1e3)
            b.synchronize()
            out.append(a.elapsed_time(b))
        else:
            t = time.perf_counter(); fn(); out.append((time.perf_counter() - t) * 1e3)
            if host is not None:
                host.append(out[-1])
    return out


class GpuClocks:
    """One GPU's SM clock and power, sampled by ``nvidia-smi`` every 100 ms in the background. The cards run at
    their power cap under these models, so the clock each run got belongs beside its time (bench/RESULTS.md
    2026-11-28: a 2-GPU step ran 2.3-2.7 % below one GPU's clock at the same power). Where nvidia-smi is missing,
    no samples: every median is nan."""

    def __init__(self, dev):
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        ids = [v.strip() for v in visible.split(",")] if visible else []
        index = ids[dev.index] if dev.index is not None and dev.index < len(ids) else str(dev.index or 0)
        self.samples = []
        try:
            self.proc = subprocess.Popen(["nvidia-smi", "-i", index, "--query-gpu=clocks.sm,power.draw",
                                          "--format=csv,noheader,nounits", "-lms", "100"],
                                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except OSError:
            self.proc = None
            return
        threading.Thread(target=self._read, daemon=True).start()
        atexit.register(self.close)

    def _read(self):
        for line in self.proc.stdout:
            try:
                mhz, watts = (float(v) for v in line.split(","))
            except ValueError:
                continue
            self.samples.append((time.perf_counter(), mhz, watts))

    def between(self, windows):
        """(median SM MHz, median W) of the samples taken inside ``windows``: (start, end) pairs of
        ``time.perf_counter()`` readings."""
        inside = [(m, w) for t, m, w in self.samples if any(a <= t <= b for a, b in windows)]
        if not inside:
            return float("nan"), float("nan")
        return statistics.median(m for m, _ in inside), statistics.median(w for _, w in inside)

    def close(self):
        if self.proc is not None:
            self.proc.terminate()


def profile_attention(fn, dev):
    """One profiled call; returns (attention share of device time, top-5 [(name, ms, is_attn)])."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts) as prof:
        fn(); sync(dev)
    times = {}
    for e in prof.key_averages():
        if dev.type == "cuda":  # GPU kernels (and memcpy/memset) only: their self time is their duration
            if e.device_type != torch.autograd.DeviceType.CUDA:
                continue
            t = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
        else:  # CPU smoke run: self time of CPU ops (no double counting of nested ops)
            t = e.self_cpu_time_total
        times[e.key] = times.get(e.key, 0.0) + t
    is_attn = lambda k: bool(ATTN_RE.search(k)) and not NOT_ATTN_RE.search(k)  # noqa: E731
    total = sum(times.values()) or float("nan")
    share = sum(t for k, t in times.items() if is_attn(k)) / total
    top = sorted(times.items(), key=lambda kv: -kv[1])[:5]
    return share, [(k, t / 1e3, is_attn(k)) for k, t in top]


def make_variant(name, model, dev):
    if name == "eager":
        return model
    torch._dynamo.reset()
    if name == "inductor":
        return torch.compile(model)
    if name in ("mindiesd", "mindiesd-whole"):  # -whole: one graph, no block partition
        return torch.compile(model, backend="mindiesd",
                             options={"target": dev.type, "partition": name == "mindiesd"})
    raise ValueError(f"unknown variant {name!r}")


def run_variant(name, model, inputs, ref, dev, args):
    fresh = getattr(torch._inductor.utils, "fresh_cache", None) or torch._inductor.utils.fresh_inductor_cache
    ctx = contextlib.nullcontext() if name == "eager" else fresh()
    if dev.type == "cuda":
        torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats(dev)
    with ctx, torch.no_grad():
        fn = make_variant(name, model, dev)
        call = lambda: fn(**inputs, return_dict=False)[0]  # noqa: E731
        t0 = time.perf_counter()
        out = call(); sync(dev)
        cold = time.perf_counter() - t0
        for _ in range(args.warmup):
            call()
        ms = statistics.median(time_calls(call, dev, args.iters))
        share, top = profile_attention(call, dev) if args.profile else (float("nan"), [])
    peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else float("nan")
    o, r = out.float(), ref.float()
    row = dict(variant=name, median_ms=ms, cold_compile_s=None if name == "eager" else cold, peak_gib=peak,
               attn_share=share, max_abs_err=(o - r).abs().max().item(),
               rel_err=((o - r).norm() / r.norm()).item(), finite=bool(torch.isfinite(o).all()), top_kernels=top)
    del fn, out, o
    return row


def no_nan(o):
    """NaN -> None recursively, so the JSON file is strict JSON."""
    if isinstance(o, float) and o != o:
        return None
    if isinstance(o, dict):
        return {k: no_nan(v) for k, v in o.items()}
    return [no_nan(v) for v in o] if isinstance(o, (list, tuple)) else o


def fmt(v, spec, suffix=""):
    return "n/a" if v is None or v != v else f"{v:{spec}}{suffix}"


def table(rows):
    by = {r["variant"]: r for r in rows if "median_ms" in r}
    lines = ["| variant | median ms | vs eager | vs inductor | cold compile s | peak GiB | attn share | rel err |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "median_ms" not in r:
            lines.append(f"| {r['variant']} | skipped: {r['error'].splitlines()[-1][:80]} | | | | | | |")
            continue
        sp = {b: by[b]["median_ms"] / r["median_ms"] if b in by else None for b in ("eager", "inductor")}
        lines.append(f"| {r['variant']} | {r['median_ms']:.1f} | {fmt(sp['eager'], '.2f', 'x')} | "
                     f"{fmt(sp['inductor'], '.2f', 'x')} | {fmt(r['cold_compile_s'], '.1f')} | "
                     f"{fmt(r['peak_gib'], '.2f')} | {fmt(r['attn_share'], '.1%')} | {r['rel_err']:.2e} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=["1.3b", "14b"], default="1.3b")
    ap.add_argument("--tiny", action="store_true", help="tiny 2-layer model for smoke tests (overrides --config)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    ap.add_argument("--variants", default="eager,inductor,mindiesd-whole,mindiesd")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-profile", dest="profile", action="store_false", help="skip the torch.profiler run")
    args = ap.parse_args()
    log = logging.getLogger("mindiesd_compile")  # the backend's rewrite table, logged at compile time
    log.addHandler(logging.StreamHandler(sys.stdout)); log.setLevel(logging.INFO)
    cname = "tiny" if args.tiny else args.config
    dev, dtype = torch.device(args.device), getattr(torch, args.dtype)
    cfg, lat_shape, txt_shape = CONFIGS[cname]

    model = build_model(cfg, dev, dtype, args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    g = torch.Generator(dev).manual_seed(args.seed)
    inputs = dict(hidden_states=torch.randn(lat_shape, generator=g, device=dev, dtype=dtype),
                  timestep=torch.tensor([500.0], device=dev),
                  encoder_hidden_states=torch.randn(txt_shape, generator=g, device=dev, dtype=dtype))
    dev_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"# Wan {cname}: {n_params / 1e9:.3f}B params, latents {lat_shape}, text {txt_shape}, {args.dtype}, "
          f"{dev_name}, torch {torch.__version__}", flush=True)

    with torch.no_grad():  # eager reference for the numerics columns
        ref = model(**inputs, return_dict=False)[0].clone()
    if not torch.isfinite(ref).all():
        sys.exit("eager reference output is not finite; adjust the weight init")

    if any(v != "eager" for v in args.variants.split(",")):
        with contextlib.suppress(Exception):  # start compile workers now: no variant pays for their start-up
            torch._inductor.async_compile.AsyncCompile.warm_pool()
    rows = []
    for name in [v.strip() for v in args.variants.split(",") if v.strip()]:
        print(f"== {name}", flush=True)
        try:
            row = run_variant(name, model, inputs, ref, dev, args)
        except Exception as e:  # a failing backend (e.g. mindiesd not importable yet) is reported and skipped
            traceback.print_exc()
            row = dict(variant=name, error=f"{type(e).__name__}: {e}")
        finally:
            gc.collect(); torch._dynamo.reset()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
        if "median_ms" in row:
            print(f"   median {row['median_ms']:.2f} ms, cold {fmt(row['cold_compile_s'], '.1f', ' s')}, "
                  f"max abs err {row['max_abs_err']:.3e}, rel err {row['rel_err']:.3e}, finite {row['finite']}")
            for k, t, a in row["top_kernels"]:
                print(f"   {t:10.3f} ms {'ATTN' if a else '    '} {k[:110]}")
        else:
            print(f"   SKIPPED: {row['error']}")

    md = table(rows)
    print("\n" + md)
    if os.environ.get("OUT"):
        path = Path(os.environ["OUT"]) / f"bench_{cname}.json"
        path.write_text(json.dumps(no_nan(dict(
            config=cname, model_kwargs=cfg, latents=lat_shape, text=txt_shape, dtype=args.dtype, params=n_params,
            device=dev_name, date=datetime.datetime.now().isoformat(timespec="seconds"), torch=torch.__version__,
            iters=args.iters, warmup=args.warmup, rows=rows, table=md)), indent=1, default=str))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
