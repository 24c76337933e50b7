"""Sequence parallelism on GPUs against one process: what CI's gloo tests cannot reach (the copy-engine exchange,
FA3's partial attention and the merge, the exchanges' order under Inductor, cuda_graphs over the ranks). Run on
every lent multi-GPU device:

    torchrun --nproc_per_node=2|4 bench/check_sp_cuda.py     # one line per model and variant, "FAIL" where one differs
    torchrun --nproc_per_node=2 bench/check_sp_cuda.py --device cpu   # checks the script over gloo (target eager)

Inductor's FX graph cache is off here: every case runs the passes, whose report counts the exchanged attentions.

Tiny diffusers models (tests/tiny_models.py): HunyuanVideo with padded text (a key mask, gathered with the keys),
LTX-Video (its text split with the video, with its mask), Flux (joint attention), Qwen-Image with padded text (a
key mask built in the block, its image run gathered with the keys: under cuda_graphs an NCCL kernel in the capture
would hang the process group's teardown), Flux.2 (its epilogue on each rank's tokens, the gather after proj_out;
also under cuda_graphs), ChronoEdit, LTX-2 (its whole audio attending to the split video: keys and values
gathered, also in Ulysses mode), Wan in fp32 and in bf16 with 64-wide heads (FA3's shape; the split attention's
partials are FA3's there), Wan and Flux at 15 (image) tokens, which no degree divides (padded to a multiple of it;
Flux's 8 text tokens split unpadded). Every rank's output is compared with the eager model run whole on that rank; a later
call of a `cuda_graphs` variant (replayed) with its first; a `cuda_graphs` variant whose capture failed (and so
ran op by op) fails.
"""
import argparse
import sys
import warnings
from pathlib import Path

import torch
import torch._inductor.config
import torch.distributed as dist

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / d) for d in ("", "tests", "bench")]
import mindiesd_compile  # noqa: E402
from bench_sp import init_ranks  # noqa: E402
from tiny_models import MODELS, chronoedit, flux2, ltx, ltx2  # noqa: E402

# model, config overrides, dtype, tolerance (rel. L2 against the eager model), text tokens padded[, latent shape]
CASES = [("hunyuan", {}, torch.float32, 1e-4, 3), ("ltx", {}, torch.float32, 1e-4, 3),
         ("flux", {}, torch.float32, 1e-4, 0), ("wan", {}, torch.float32, 1e-4, 0),
         ("wan", {"attention_head_dim": 64}, torch.bfloat16, 3e-2, 0), ("qwen", {}, torch.float32, 1e-4, 3),
         ("flux2", {}, torch.float32, 1e-4, 0), ("chronoedit", {}, torch.float32, 1e-4, 0),
         ("ltx2", {}, torch.float32, 1e-4, 3),
         ("wan", {}, torch.float32, 1e-4, 0, (1, 4, 1, 6, 10)),  # 15 tokens
         ("flux", {}, torch.float32, 1e-4, 0, (1, 15, 8)),  # 15 image tokens, 8 text tokens
         ("wan", {"attention_head_dim": 64}, torch.bfloat16, 3e-2, 0, (1, 4, 1, 6, 10))]
VARIANTS = {"ulysses": {"sequence_parallel_mode": "ulysses"},  # (op by op: cuda_graphs "auto" is off with NCCL)
            "ahead": {"sequence_parallel_mode": "gather_kv", "sequence_parallel_overlap": "ahead",
                      "cuda_graphs": False},
            "split": {"sequence_parallel_mode": "gather_kv", "sequence_parallel_overlap": "split",
                      "cuda_graphs": False},
            "split+graphs": {"sequence_parallel_mode": "gather_kv", "sequence_parallel_overlap": "split",
                             "cuda_graphs": True},
            "ahead+graphs": {"sequence_parallel_mode": "gather_kv", "sequence_parallel_overlap": "ahead",
                             "cuda_graphs": True}}
# what the gloo tests cannot run: each copy-engine overlap once per kind of attention ("split" runs as "ahead"
# with a mask), FA3's partials (bf16), cuda_graphs over the exchange
PER_MODEL = {("hunyuan", torch.float32): ["ahead", "ahead+graphs"], ("ltx", torch.float32): ["ahead", "split"],
             ("flux", torch.float32): ["split"], ("wan", torch.float32): ["split"],
             ("wan", torch.bfloat16): ["ahead", "split", "split+graphs"],
             ("qwen", torch.float32): ["ahead", "ahead+graphs"], ("flux2", torch.float32): ["split", "split+graphs"],
             ("chronoedit", torch.float32): ["split"], ("ltx2", torch.float32): ["ulysses", "ahead", "split"],
             ("wan", torch.float32, (1, 4, 1, 6, 10)): ["ulysses", "ahead", "split"],
             ("flux", torch.float32, (1, 15, 8)): ["ulysses", "ahead", "split"],
             ("wan", torch.bfloat16, (1, 4, 1, 6, 10)): ["ahead", "split", "split+graphs"]}


def build(name, overrides, dtype, padded, latent, dev):
    torch.manual_seed(0)
    model, kwargs = ({**MODELS, "ltx": ltx, "ltx2": ltx2, "flux2": flux2, "chronoedit": chronoedit})[name]()
    if latent:
        kwargs["hidden_states"] = torch.randn(latent)
        if "img_ids" in kwargs:  # Flux: one position per image token
            kwargs["img_ids"] = torch.randn(latent[1], 3)
    if overrides:
        model = type(model)(**{**model.config, **overrides})
    mask = "encoder_hidden_states_mask" if name == "qwen" else "encoder_attention_mask"
    if padded:  # the last text tokens are padding
        kwargs[mask] = kwargs[mask].clone()
        kwargs[mask][:, -padded:] = 0
    model = model.to(dev, dtype).eval()
    kwargs = {k: v.to(dev, dtype if v.is_floating_point() and k != mask else v.dtype)
              if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    if name not in ("wan", "chronoedit"):  # joint attention splits back by token counts: dynamic sequence dims
        mindiesd_compile.mark_sequence_dynamic(model, kwargs)
    return model, kwargs


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--target", default="", help="default: cuda on the GPU, eager on the CPU (cpu: Inductor there)")
    ap.add_argument("--models", default="", help="only these (comma-separated), e.g. qwen,hunyuan")
    args = ap.parse_args()
    cuda = args.device == "cuda"
    torch._inductor.config.fx_graph_cache = False  # see the module docstring
    rank, world, dev = init_ranks(cuda)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32 means fp32 here
    failed = 0
    for name, overrides, dtype, tol, padded, *latent in CASES:
        if args.models and name not in args.models.split(","):
            continue
        model, kwargs = build(name, overrides, dtype, padded, latent[0] if latent else None, dev)
        with torch.no_grad():
            ref = model(**kwargs)[0]
        for variant in PER_MODEL[(name, dtype, *latent)]:
            if not cuda and "graphs" in variant:
                continue
            cache = mindiesd_compile.StepCache(None)  # (no caching) its runner's report counts the exchanges
            options = {"target": args.target or ("cuda" if cuda else "eager"), "sequence_parallel": world,
                       "strict": True, "cache": cache, **VARIANTS[variant]}
            try:
                with torch.no_grad(), warnings.catch_warnings(record=True) as warned:
                    warnings.simplefilter("always")
                    fn = torch.compile(model, backend="mindiesd", options=options, fullgraph=True)
                    first = fn(**kwargs)[0]
                    later = [fn(**kwargs)[0] for _ in range(2)][-1]  # under cuda_graphs: captured, then replayed
                sites = cache.runners[0].compiler.report.stats("sequence_parallel").rewritten
                errs, error = torch.tensor([rel(first, ref), rel(later, first)], device=dev), ""
                uncaptured = [str(w.message) for w in warned if "cuda_graphs" in str(w.message)]
                if uncaptured:  # op by op is right but not what the variant checks
                    errs, error = torch.full((2,), float("inf"), device=dev), " " + uncaptured[0]
            except Exception as err:  # noqa: BLE001 - reported, the other cases still run
                errs, error, sites = torch.full((2,), float("inf"), device=dev), f" {type(err).__name__}: {err}", 0
            dist.all_reduce(errs, dist.ReduceOp.MAX)  # the worst rank
            ok = float(errs[0]) <= tol and float(errs[1]) <= tol and sites > 0
            failed += not ok
            if rank == 0:
                print(f"{'ok  ' if ok else 'FAIL'} {name}{overrides or ''}{latent or ''} {str(dtype)[6:]} {world} ranks {variant}: "
                      f"{sites} attentions exchanged, rel L2 vs eager {float(errs[0]):.1e} (tol {tol:.0e}), later "
                      f"call vs first {float(errs[1]):.1e}{error[:300]}", flush=True)
            torch._dynamo.reset()
    if rank == 0:
        print(f"CHECK {'FAILED' if failed else 'PASSED'}: {failed} failing", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
