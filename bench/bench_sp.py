"""Sequence parallelism on N GPUs: one Wan2.1 forward (832x480x81, bf16, random weights).

    torchrun --nproc_per_node=N bench/bench_sp.py --config 1.3b [--variants mindiesd,diffusers]
    torchrun --nproc_per_node=N bench/bench_sp.py --config 14b --cfg-step --variants mindiesd,mindiesd+ulysses,diffusers
    torchrun --nproc_per_node=2 bench/bench_sp.py --config tiny --device cpu --variants mindiesd   # checks the
        script over gloo (diffusers' context parallelism needs an accelerator)

mindiesd: torch.compile(backend="mindiesd", options={"sequence_parallel": N}) (plain mindiesd compile
for N=1); a suffix @ulysses or @gather_kv sets options["sequence_parallel_mode"] (default "auto");
mindiesd+overlap: Inductor's comm/compute reordering; mindiesd+sync, +ahead, +split: sequence_parallel_overlap=
False (gather_kv waits for every key, then one attention), "ahead" or "split" (default "auto"); +graphs:
options["cuda_graphs"] True, +autographs: "auto" (the library's default; without either: False); +strict:
options["strict"], which changes no kernel: a second, separate compile of a variant
(mindiesd+split,mindiesd+split+strict); +deterministic: Inductor's deterministic mode (no kernel choice timed on the
device); +padmm: Inductor's force_shape_pad (every GEMM's rows padded to a multiple of 8: a shard of 32760 tokens
has 16380 on 2 GPUs, 8190 on 4); modifiers combine (mindiesd+split+graphs@gather_kv). diffusers: the
model's own context parallelism (enable_parallelism, Ulysses, eager) as the anchor. Rank 0 prints median ms
(--profile: and one call's kernel time split into compute, NCCL and NCCL not overlapped by compute) and saves the
output under --out-dir; `python bench/bench_sp.py --compare` prints each saved output's relative L2 against the
1-GPU mindiesd one (so runs on different GPUs of one host may run at the same time); --rounds prints each
variant's against the first variant's and a later call's against its first (under cuda_graphs: replayed against
op by op), and every rank's median wall and host (time to issue a call) ms, and saves each variant's first output;
--clocks adds every rank's median SM clock and power over its timed calls (the cards run at their power cap).
"""
import argparse
import logging
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.append(str(Path(__file__).resolve().parent))
from bench_wan import CONFIGS, GpuClocks, build_model, merge_intervals, time_calls  # noqa: E402

import mindiesd_compile  # noqa: E402,F401

# mindiesd+overlap: Inductor's own comm/compute reordering (each all-to-all started as soon as its input
# exists, its wait sunk to the first use, independent compute moved in between)
OVERLAP = {"reorder_for_compute_comm_overlap": True,
           "reorder_for_compute_comm_overlap_passes": ["sink_waits", "raise_comms", "reorder_compute_for_overlap"]}
OVERLAPS = {"sync": False, "ahead": "ahead", "split": "split"}  # variant modifier -> sequence_parallel_overlap


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="1.3b")
    ap.add_argument("--variants", default="mindiesd,diffusers")
    ap.add_argument("--cfg-step", action="store_true",
                    help="time one CFG step (cond + uncond call); variants mindiesd (CFG 2 x sequence parallel "
                         "world/2), mindiesd+ulysses, diffusers")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=0,
                    help="compile every variant first, then time them in turn, --iters calls each per round, this "
                         "many rounds (clock drift over a run then weighs on all alike); median over all calls")
    ap.add_argument("--aligned", action="store_true",
                    help="with --rounds: a barrier before each timed call, so every rank starts it at once")
    ap.add_argument("--profile", action="store_true", help="also split one call's kernel time: compute, NCCL, exposed")
    ap.add_argument("--trace", default="",
                    help="with --profile: each rank writes <trace>-<variant>-<gpus>-rank<r>.json")
    ap.add_argument("--out-dir", default="/tmp/sp_out")
    ap.add_argument("--carveout", type=int, default=0,
                    help="SMs cuBLAS and FA3 leave free (torch._C._set_sm_carveout_experimental), e.g. for NCCL")
    ap.add_argument("--device", default="cuda", help="cpu: gloo and the tiny config, to check the script")
    ap.add_argument("--compare", action="store_true", help="only compare the saved outputs")
    ap.add_argument("--clocks", action="store_true",
                    help="also print every rank's median SM clock and power over its timed calls (nvidia-smi)")
    args = ap.parse_args()
    if args.compare:
        return compare(args.out_dir)
    cuda = args.device == "cuda"
    rank, world, dev = init_ranks(cuda)
    cfg, lat, txt = CONFIGS[args.config]
    dtype = torch.bfloat16 if cuda else torch.float32
    model = build_model(cfg, dev, dtype, 0)
    g = torch.Generator(dev).manual_seed(0)
    inputs = dict(hidden_states=torch.randn(lat, generator=g, device=dev, dtype=dtype),
                  timestep=torch.tensor([500.0], device=dev),
                  encoder_hidden_states=torch.randn(txt, generator=g, device=dev, dtype=dtype),
                  return_dict=False)
    if args.carveout:
        torch._C._set_sm_carveout_experimental(args.carveout)
    if "autographs" in args.variants:
        log_graphs_choice()
    if args.cfg_step:
        return cfg_step(model, inputs, world, rank, dev, args)
    clocks = GpuClocks(dev) if args.clocks and cuda else None
    if args.rounds:
        return interleaved(model, inputs, world, rank, dev, args, clocks)
    for variant in args.variants.split(","):
        with torch.no_grad():
            fn = build_variant(variant, model, world)
            out = fn(**inputs)[0]
            warm_up(fn, inputs, "autographs" in variant)
            start = time.perf_counter()
            ms = statistics.median(time_calls(lambda: fn(**inputs), dev, args.iters))
            clock_note = rank_clocks(clocks, [(start, time.perf_counter())], world)
            trace = args.trace and f"{args.trace}-{variant}-{world}-rank{rank}.json"
            split = comm_split(lambda: fn(**inputs), dev, trace) if args.profile else None
        if rank == 0:
            os.makedirs(args.out_dir, exist_ok=True)
            torch.save(out.float().cpu(), os.path.join(args.out_dir, f"{args.config}-{variant}-{world}.pt"))
            note = " | kernels ms: " + " ".join(f"{k}={v:.1f}" for k, v in split.items()) if split else ""
            print(f"RESULT {variant} gpus={world} median_ms={ms:.1f}{clock_note}{note}", flush=True)
        torch._dynamo.reset()
    dist.destroy_process_group()


def rank_clocks(clocks, windows, world) -> str:
    """Every rank's median SM MHz / W inside its timed ``windows``, as rank 0 prints them ("" without --clocks)."""
    if clocks is None:
        return ""
    ranks = [None] * world
    dist.all_gather_object(ranks, clocks.between(windows))
    return " | SM MHz/W per rank: " + " ".join(f"{mhz:.0f}/{watts:.0f}" for mhz, watts in ranks)


def warm_up(fn, inputs, auto_graphs):
    """The calls after the first before timing: one; under cuda_graphs "auto" three (timed op by op, captured,
    timed replayed: it has chosen after them)."""
    for _ in range(3 if auto_graphs else 1):
        fn(**inputs)


def log_graphs_choice():
    """What cuda_graphs "auto" chose, in the log (INFO)."""
    logging.basicConfig()
    logging.getLogger("mindiesd_compile").setLevel(logging.INFO)


def init_ranks(cuda):
    """torchrun's process group (NCCL on GPUs, gloo on the CPU): this rank, the world size, this rank's device."""
    dist.init_process_group("nccl" if cuda else "gloo")
    dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    return dist.get_rank(), dist.get_world_size(), dev


def interleaved(model, inputs, world, rank, dev, args, clocks=None):
    variants = args.variants.split(",")
    fns, outs, times, host = {}, {}, {v: [] for v in variants}, {v: [] for v in variants}
    windows = {v: [] for v in variants}
    with torch.no_grad():
        for v in variants:  # each compiled at its first call, with its own backend instance
            fns[v] = build_variant(v, model, world)
            outs[v] = fns[v](**inputs)[0].float()
            warm_up(fns[v], inputs, "autographs" in v)
        for _ in range(args.rounds):
            for v in variants:
                start = time.perf_counter()
                times[v] += time_calls(lambda: fns[v](**inputs), dev, args.iters, host[v], args.aligned)
                windows[v].append((start, time.perf_counter()))
        # a later call (replayed, under cuda_graphs) against the first (op by op): the same numbers
        again = {v: float((fns[v](**inputs)[0].float() - outs[v]).norm() / outs[v].norm()) for v in variants}
    ranks = [None] * world  # every rank's median wall and host ms: an early starter waits for the others
    dist.all_gather_object(ranks, {v: (statistics.median(times[v]), statistics.median(host[v])) for v in variants})
    clock_notes = {v: rank_clocks(clocks, windows[v], world) for v in variants}
    if rank == 0:
        first = outs[variants[0]]
        os.makedirs(args.out_dir, exist_ok=True)
        for v in variants:
            torch.save(outs[v].cpu(), os.path.join(args.out_dir, f"{args.config}-{v}-{world}.pt"))  # for --compare
            ms = sorted(times[v])
            print(f"RESULT {v} gpus={world} median_ms={statistics.median(ms):.1f} min_ms={ms[0]:.1f} "
                  f"max_ms={ms[-1]:.1f} calls={len(ms)} (interleaved) rel L2 vs {variants[0]} "
                  f"{float((outs[v] - first).norm() / first.norm()):.1e}, last call vs first {again[v]:.1e} | "
                  "per rank wall/host ms: "
                  + " ".join(f"{r[v][0]:.1f}/{r[v][1]:.1f}" for r in ranks) + clock_notes[v], flush=True)
    dist.destroy_process_group()


def compare(out_dir):
    for name in sorted(n for n in os.listdir(out_dir) if n.endswith(".pt")):
        ref_name = f"{name.rsplit('-', 2)[0]}-mindiesd-1.pt"  # <config>[cfg]-<variant>-<gpus>.pt
        if name != ref_name and os.path.exists(os.path.join(out_dir, ref_name)):
            out, ref = (torch.load(os.path.join(out_dir, n)) for n in (name, ref_name))
            print(f"COMPARE {name[:-3]} rel L2 vs 1-GPU mindiesd {float((out - ref).norm() / ref.norm()):.2e}")


def _target(model):
    return "cuda" if model.device.type == "cuda" else "eager"  # on the CPU only the script is checked


def _mode(variant):
    """mindiesd@ulysses, mindiesd@gather_kv: that sequence_parallel_mode; none named: "auto"."""
    return {"sequence_parallel_mode": variant.split("@")[1]} if "@" in variant else {}


def build_variant(variant, model, world):
    if variant.startswith("mindiesd"):
        modifiers = set(variant.split("@")[0].split("+")[1:])
        overlap = next((OVERLAPS[m] for m in modifiers if m in OVERLAPS), "auto")
        inductor = (OVERLAP if "overlap" in modifiers else {}) | \
            ({"deterministic": True} if "deterministic" in modifiers else {}) | \
            ({"force_shape_pad": True} if "padmm" in modifiers else {})
        options = {"target": _target(model), "inductor_config": inductor,
                   "cuda_graphs": "auto" if "autographs" in modifiers else "graphs" in modifiers,
                   "strict": "strict" in modifiers} | \
            ({"sequence_parallel": world, "sequence_parallel_overlap": overlap} | _mode(variant) if world > 1 else {})
        return torch.compile(model, backend="mindiesd", options=options, fullgraph=True)
    if world > 1:
        from diffusers import ContextParallelConfig
        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
    return model


def _length(spans):
    return sum(b - a for a, b in spans)


def comm_split(fn, dev, trace=None):
    """One profiled call: ms of compute kernels (busy union), of NCCL kernels, of NCCL time with no compute
    kernel running (exposed), of the layout copies around the exchanges, of the GPU idle between the first
    and the last kernel, and the compute kernels' summed time by class (profile_wan.py's classes)."""
    from profile_wan import CLASSES
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize(dev)
    if trace:
        prof.export_chrome_trace(trace)
    comm, compute, copies, classes = [], [], 0.0, {}
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        span = (e.time_range.start, e.time_range.end)
        nccl = "nccl" in e.name.lower()
        (comm if nccl else compute).append(span)
        if "clone" in e.name or "permute" in e.name:  # Inductor's layout copies (its fused norms say "_to_copy")
            copies += e.self_device_time_total
        if not nccl:
            cls = next(name for name, match in CLASSES if match(e.name))
            classes[cls] = classes.get(cls, 0.0) + e.self_device_time_total / 1e3
    every = merge_intervals(comm + compute)
    comm, compute = merge_intervals(comm), merge_intervals(compute)
    both = [(max(a, c), min(b, d)) for a, b in comm for c, d in compute if max(a, c) < min(b, d)]
    overlapped = _length(merge_intervals(both))
    idle = (every[-1][1] - every[0][0] - _length(every)) / 1e3 if every else 0.0
    return {"compute": _length(compute) / 1e3, "nccl": _length(comm) / 1e3,
            "nccl_exposed": (_length(comm) - overlapped) / 1e3, "layout_copies": copies / 1e3, "idle": idle} | classes


def cfg_step(model, inputs, world, rank, dev, args):
    """One denoising step with CFG: two transformer calls (cond, uncond) as the Wan pipeline makes them.
    Variants: mindiesd = CFG 2 x sequence parallel world/2 (each branch on its own half of the GPUs; @ulysses,
    @gather_kv: that sequence_parallel_mode); mindiesd+ulysses =
    Ulysses over all GPUs, branch after branch; diffusers = its context parallelism (Ulysses, all GPUs, eager)."""
    from mindiesd_compile.pipeline import _parallel_groups
    from mindiesd_compile.runtime.cfg_parallel import CfgParallelTransformer
    negative = torch.randn_like(inputs["encoder_hidden_states"])
    for variant in args.variants.split(","):
        if variant == "mindiesd+ulysses" and world == 1:
            continue  # the same as mindiesd on one GPU
        options = {"target": _target(model)} | (_mode(variant) if world > 2 else {})
        if variant.split("@")[0] == "mindiesd" and world > 1:
            group, branch, holder = _parallel_groups(2, world // 2, options)
            holder.value = negative
            fn = CfgParallelTransformer(torch.compile(model, backend="mindiesd", options=options, fullgraph=True),
                                        group, branch, holder)
        elif variant == "mindiesd+ulysses":
            fn = build_variant("mindiesd", model, world)
        else:
            fn = build_variant(variant, model, world)

        def step():
            cond = fn(**inputs)[0]
            uncond = fn(**{**inputs, "encoder_hidden_states": negative})[0]
            return cond, uncond

        with torch.no_grad():
            step(), step()
            ms = statistics.median(time_calls(step, dev, args.iters))
            cond, uncond = step()
        if rank == 0:
            os.makedirs(args.out_dir, exist_ok=True)
            out = torch.stack([cond, uncond]).float().cpu()
            torch.save(out, os.path.join(args.out_dir, f"{args.config}cfg-{variant}-{world}.pt"))
            print(f"RESULT cfg-step {variant} gpus={world} median_ms={ms:.1f}", flush=True)
        torch._dynamo.reset()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
