"""A cache policy under ``cuda_graphs``: each piece (block) replayed as its own CUDA graph while the policy picks the
pieces on the host (``options["cuda_graphs"]`` True with ``options["cache"]``). Qwen-Image 20B at 1024x1024 on N
GPUs, in a CFG denoising loop:

    torchrun --nproc_per_node=1|2|4 bench/bench_cache_graphs.py [--policy block] [--steps 10]
    torchrun --nproc_per_node=2 bench/bench_cache_graphs.py --device cpu --tiny   # checks the script (op by op)

The same policy is compiled as ``--variants`` says: op by op (``cuda_graphs`` False), op by op again, per piece
(True), auto ("auto", the default), the later ones loading the first's pieces from Inductor's FX graph cache (one
directory per rank). Each runs the schedule twice, ``--steps`` steps of two calls (text, then other text) with a
new timestep per step: first to compile (and to capture) what the policy uses, then timed, replaying. Rank 0
prints per variant the median ms of the timed calls that ran every block and of those that skipped some, the
median host ms, how many pieces replay a graph, how many compiles Inductor's FX graph cache served (hit/miss/
bypass), the memory the variant holds after its calls and its peak (over what it held before), the worst rel L2
of its timed calls against its own first pass (the same kernels: replays against op by op and captures) and
against each op-by-op variant's. "CHECK PASSED" if
every variant is within 1e-3 of its own first pass. (Before the cache served pieces, two compiles on 4 GPUs
differed by 3.7e-3: bench/RESULTS.md 2026-11-28, twentieth session.) TORCHINDUCTOR_FX_GRAPH_CACHE=0 in the
environment would turn the cache off whatever the config says, so the script removes it.
"""
import argparse
import gc
import os
import statistics
import sys
from pathlib import Path

os.environ.pop("TORCHINDUCTOR_FX_GRAPH_CACHE", None)  # read at import: set, it overrides the config (env_name_force)
import torch  # noqa: E402
import torch._inductor.config  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

sys.path.append(str(Path(__file__).resolve().parent))
from bench_sp import init_ranks  # noqa: E402
from bench_sp_qwen import build_qwen  # noqa: E402
from bench_wan import time_calls  # noqa: E402

import mindiesd_compile  # noqa: E402


def denoise(fn, inputs, texts, steps, runner_of):
    """Per call: (output, wall ms, host ms, whether every block ran)."""
    calls = []
    for step in range(steps):
        for text in texts:
            kwargs = {**inputs, "encoder_hidden_states": text,
                      "timestep": torch.tensor([1.0 - step / steps], device=text.device)}
            out, host = [], []
            wall = time_calls(lambda: out.append(fn(**kwargs)[0]), text.device, 1, host)[0]
            runner = runner_of()
            blocks = {p.label for p in runner.partition.blocks}
            ran = sum(label.split(":")[0] in blocks and not label.endswith(":reuse") for label in runner.last_call)
            calls.append((out[0].float(), wall, host[0], ran == len(blocks)))
    return calls


def graphs_replayed(runner):
    """How many of the runner's compiled pieces replay a CUDA graph, of all of them (and which, where a few do)."""
    captured = [runner.piece[node].label + ("" if variant == "plain" else f":{variant}")
                for (node, variant, _), piece in runner.compiled.items()
                if any(e is not None for e in getattr(piece, "captured", {}).values())]
    few = f" ({', '.join(captured)})" if 0 < len(captured) <= 4 else ""
    return f"{len(captured)}/{len(runner.compiled)}{few}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--policy", default="block", choices=["block", "attention", "dynamic", "forecast"])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--variants", default="op by op,per piece,auto")
    args = ap.parse_args()
    cuda = args.device == "cuda"
    rank, world, dev = init_ranks(cuda)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"cache_graphs_rank{rank}")
    model, inputs = build_qwen(args.tiny, dev)
    texts = [inputs["encoder_hidden_states"], torch.randn_like(inputs["encoder_hidden_states"])]
    policy = {"policy": args.policy, **({"threshold": 0.1} if args.policy == "dynamic" else
                                        {"step_start": 2, "step_interval": 2})}
    options = {"target": "cuda" if cuda else "cpu"}
    if world > 1:
        mindiesd_compile.mark_sequence_dynamic(model, inputs)
        options["sequence_parallel"] = world
    torch._inductor.config.fx_graph_cache = True  # the second compile loads the first's kernels: same numbers
    results = {}
    first, graphs_kept, memory, cache_use = {}, {}, {}, {}
    for variant in [v for v in args.variants.split(",") if cuda or v.startswith("op by op")]:  # graphs: cuda only
        graphs = {"per piece": True, "auto": "auto"}.get(variant, False)
        torch._dynamo.reset()
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
        held, before = torch.cuda.memory_allocated(dev) if cuda else 0, dict(counters["inductor"])
        cache = mindiesd_compile.StepCache(policy)
        with torch.no_grad():
            fn = torch.compile(model, backend="mindiesd", options={**options, "cache": cache, "cuda_graphs": graphs},
                               fullgraph=True)
            # once through the schedule: compiles every piece and variant the policy uses; under graphs captures them
            first[variant] = denoise(fn, inputs, texts, args.steps, lambda: cache.runners[0])
            cache.reset()
            results[variant] = denoise(fn, inputs, texts, args.steps, lambda: cache.runners[0])
            graphs_kept[variant] = graphs_replayed(cache.runners[0])
        cache_use[variant] = "/".join(str(counters["inductor"][k] - before.get(k, 0)) for k in
                                      ("fxgraph_cache_hit", "fxgraph_cache_miss", "fxgraph_cache_bypass"))
        if cuda:  # what the variant holds after its calls (its graphs' pool and buffers), and its peak
            memory[variant] = (f"{(torch.cuda.memory_allocated(dev) - held) / 2**30:.2f} GiB held, "
                               f"{(torch.cuda.max_memory_allocated(dev) - held) / 2**30:.2f} GiB peak")
        fn = cache = None  # the variant's graphs go before the next one is measured
    if rank != 0:
        return torch.distributed.destroy_process_group()
    median = lambda xs: f"{statistics.median(xs):.1f}" if xs else "-"  # noqa: E731
    refs = [v for v in results if v.startswith("op by op")]
    worst = 0.0
    for variant, calls in results.items():
        full = [wall for _, wall, _, every in calls if every]
        skipping = [wall for _, wall, _, every in calls if not every]
        rel_l2 = lambda refs: max(float((out - r).norm() / r.norm()) for (out, *_), (r, *_) in zip(calls, refs))  # noqa: E731
        own = rel_l2(first[variant])
        worst = max(worst, own)
        print(f"RESULT qwen-image gpus={world} policy={args.policy} {variant}: calls={len(calls)} "
              f"every block ms={median(full)} ({len(full)}) skipping ms={median(skipping)} ({len(skipping)}) "
              f"host ms={median([h for _, _, h, _ in calls])} graphs={graphs_kept[variant]} "
              f"Inductor's cache hit/miss/bypass={cache_use[variant]} memory={memory.get(variant, '-')} "
              f"worst rel L2 vs its first pass {own:.1e}"
              + "".join(f", vs {ref} {rel_l2(results[ref]):.1e}" for ref in refs), flush=True)
    print(f"CHECK {'PASSED' if worst <= 1e-3 else 'FAILED'}", flush=True)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
