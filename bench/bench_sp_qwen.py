"""Sequence parallelism on N GPUs for Qwen-Image: one forward of the 20B transformer at 1024x1024 (4096 image
tokens, 256 text tokens of which the last 56 are padding), bf16, random weights.

    torchrun --nproc_per_node=1|2|4 bench/bench_sp_qwen.py [--iters 5]
    torchrun --nproc_per_node=2 bench/bench_sp_qwen.py --device cpu --tiny   # checks the script over gloo

N=1: torch.compile(backend="mindiesd"); N>1: options["sequence_parallel"] = N (the built-in plan: image tokens
split, text whole on every rank), after mindiesd_compile.mark_sequence_dynamic. Rank 0 prints the median ms and
saves the output (--out-dir); --compare prints each saved N-GPU output's relative L2 against the 1-GPU one.
"""
import argparse
import collections
import cProfile
import os
import pstats
import statistics
import sys
import warnings
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parent))
from bench_sp import compare, init_ranks, log_graphs_choice, warm_up  # noqa: E402
from bench_wan import time_calls  # noqa: E402

import mindiesd_compile  # noqa: E402

# Qwen/Qwen-Image's transformer config; tiny: the same model at test size
CONFIGS = {"20b": dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
                       num_attention_heads=24, joint_attention_dim=3584, axes_dims_rope=(16, 56, 56)),
           "tiny": dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
                        num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(8, 4, 4))}


def build_qwen(tiny, dev, tables_on_cpu=False):
    """The transformer (random weights; bf16 on a GPU, fp32 on the CPU) and one call's inputs at 1024x1024."""
    from diffusers import QwenImageTransformer2DModel
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    cfg = CONFIGS["tiny" if tiny else "20b"]
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)
    with torch.device(dev):  # initialised on the GPU, in bf16
        model = QwenImageTransformer2DModel(**cfg).eval()
    torch.set_default_dtype(torch.float32)
    if tables_on_cpu:  # plain attributes, not buffers: model.to(device) leaves them where they were made
        rope = model.pos_embed
        rope.pos_freqs, rope.neg_freqs = rope.pos_freqs.cpu(), rope.neg_freqs.cpu()
    side, text, padding = (8, 8, 3) if tiny else (64, 256, 56)  # latent patches per side, text tokens
    g = torch.Generator(dev).manual_seed(0)
    mask = torch.ones(1, text, device=dev)
    mask[:, -padding:] = 0
    inputs = dict(hidden_states=torch.randn(1, side * side, cfg["in_channels"], generator=g, device=dev, dtype=dtype),
                  encoder_hidden_states=torch.randn(1, text, cfg["joint_attention_dim"], generator=g, device=dev,
                                                    dtype=dtype),
                  encoder_hidden_states_mask=mask, timestep=torch.tensor([0.5], device=dev),
                  img_shapes=[(1, side, side)], return_dict=False)
    return model, inputs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--out-dir", default="/tmp/sp_qwen")
    ap.add_argument("--compare", action="store_true")
    ap.add_argument("--profile", action="store_true", help="also one profiled call (every rank: they exchange); "
                                                           "rank 0 prints its 12 costliest kernels")
    ap.add_argument("--profile-host", action="store_true", help="one call under cProfile (every rank); rank 0 "
                                                                "prints the 25 functions with most own and most "
                                                                "cumulative host time")
    ap.add_argument("--sync-debug", action="store_true", help="one call under torch.cuda.set_sync_debug_mode: rank 0 "
                                                              "prints where the host waited for the GPU")
    ap.add_argument("--graphs", nargs="?", const="on", default="off", choices=["off", "on", "auto"],
                    help="options['cuda_graphs']: False, True (--graphs alone) or 'auto' (the library's default)")
    ap.add_argument("--aligned", action="store_true", help="a barrier before each timed call, so every rank starts "
                                                           "it at once (op by op on 4 GPUs the step varies 110-400 "
                                                           "ms either way; bench/RESULTS.md 2026-11-28)")
    ap.add_argument("--tables-on-cpu", action="store_true", help="the RoPE tables on the CPU, where a model loaded on "
                                                                 "the CPU and moved to the GPU keeps them")
    ap.add_argument("--mode", default="auto", help="options['sequence_parallel_mode'] (ulysses, gather_kv, auto); "
                                                   "gather_kv@ahead or gather_kv@split also sets the overlap")
    args = ap.parse_args()
    if args.compare:
        return compare(args.out_dir)
    cuda = args.device == "cuda"
    rank, world, dev = init_ranks(cuda)
    model, inputs = build_qwen(args.tiny, dev, args.tables_on_cpu)
    if args.graphs == "auto":
        log_graphs_choice()
    options = {"target": "cuda" if cuda else "eager",
               "cuda_graphs": {"off": False, "on": True, "auto": "auto"}[args.graphs]}
    if world > 1:
        mindiesd_compile.mark_sequence_dynamic(model, inputs)
        options["sequence_parallel"] = world
        mode, _, overlap = args.mode.partition("@")
        options["sequence_parallel_mode"] = mode
        if overlap:
            options["sequence_parallel_overlap"] = overlap
    with torch.no_grad():
        fn = torch.compile(model, backend="mindiesd", options=options, fullgraph=True)
        out = fn(**inputs)[0]
        warm_up(fn, inputs, args.graphs == "auto")
        host = []  # ms the host takes to issue a call: above the wall ms, the step is bound by launching
        walls = time_calls(lambda: fn(**inputs), dev, args.iters, host, args.aligned)
        ms = statistics.median(walls)
        if args.profile:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                fn(**inputs)
                torch.cuda.synchronize(dev)
            if rank == 0:
                print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=12,
                                                max_name_column_width=60))
        if args.sync_debug:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                fn(**inputs)
                torch.cuda.set_sync_debug_mode(0)
            if rank == 0:
                where = collections.Counter(f"{w.filename}:{w.lineno} {str(w.message)[:60]}" for w in caught)
                print(f"SYNCS {len(caught)}", *(f"SYNC {n} x {at}" for at, n in where.most_common(12)), sep="\n")
        if args.profile_host:
            profile = cProfile.Profile()
            profile.runcall(fn, **inputs)
            if rank == 0:
                pstats.Stats(profile).sort_stats("tottime").print_stats(25)
                pstats.Stats(profile).sort_stats("cumulative").print_stats(25)
    if rank == 0:
        os.makedirs(args.out_dir, exist_ok=True)
        torch.save(out.float().cpu(), os.path.join(args.out_dir, f"qwen-mindiesd-{world}.pt"))  # bench_sp's names
    print(f"RESULT qwen-image gpus={world} rank={rank} mode={args.mode} median_ms={ms:.1f} "
          f"host_ms={statistics.median(host):.1f} calls_ms={' '.join(f'{w:.0f}' for w in walls)}", flush=True)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
