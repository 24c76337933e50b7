"""Sequence parallelism over 2 (and 4) gloo processes: every rank gets the single-process output."""
import json
import operator
import os
import re

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings, strategies as st

from conftest import spawn_ranks
from tiny_models import MODELS, chronoedit, flux2, ltx, ltx2

MODELS = {**MODELS, "ltx": ltx, "ltx2": ltx2, "flux2": flux2, "chronoedit": chronoedit}

WORLD = 2


def _sdpa_preparing_masks_as_on_cuda():
    """ATen's SDPA (the kernel AOT tracing decomposes, below the graph Dynamo records) preparing its mask as it does
    for CUDA's memory-efficient kernel: a boolean mask made additive, padded to 8 keys and sliced back, expanded to
    [B, H, Q, K]. On the CPU the graph the passes see is then the one a CUDA trace gives them."""
    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                attn_mask = torch.zeros_like(attn_mask, dtype=query.dtype).masked_fill(~attn_mask, float("-inf"))
            keys = attn_mask.shape[-1]
            if keys % 8:
                attn_mask = torch.ops.aten.constant_pad_nd(attn_mask, [0, -keys % 8])[..., :keys]
            attn_mask = attn_mask.expand(query.shape[0], query.shape[-3], query.shape[-2], key.shape[-2])
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)[0]
    lib = torch.library.Library("aten", "IMPL")
    lib.impl("scaled_dot_product_attention", sdpa, "CompositeImplicitAutograd")
    return lib  # the override lasts as long as this object


def _peer_gather_in_two_slots():
    """``all_gather_peers`` keeping its CUDA outputs' lifetime: views of two slots that the calls take in turn
    (ops/peer_gather.py), so an output read after two later calls reads a later call's data, as on a GPU. Each output
    is its own storage, as each region of a CUDA slot is (torch rejects custom ops whose outputs alias each other)."""
    from mindiesd_compile.ops.peer_gather import _gather_sync
    slots = {}  # group -> [turn, slot 0, slot 1]; a slot: one byte buffer per output position

    def gather(xs, dim, group, include_self=False):
        outs = _gather_sync(xs, dim, group, include_self)
        state = slots.setdefault(group, [0, [], []])
        turn, state[0] = state[0], 1 - state[0]
        slot = state[1 + turn]
        views = []
        for i, o in enumerate(outs):
            nbytes = o.numel() * o.element_size()
            if len(slot) <= i:
                slot.append(torch.empty(0, dtype=torch.uint8))
            if slot[i].numel() < nbytes:
                slot[i] = torch.empty(nbytes, dtype=torch.uint8)
            views.append(slot[i][:nbytes].view(o.dtype).view(o.shape).copy_(o))
        return views
    lib = torch.library.Library("mindiesd_compile", "IMPL")
    lib.impl("all_gather_peers", gather, "CPU")  # before the composite kernel, for CPU tensors
    return lib  # the override lasts as long as this object


def _worker(rank, world, name, options, overrides, store, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    result = {}
    try:
        import mindiesd_compile
        override = _sdpa_preparing_masks_as_on_cuda() if options.pop("cuda_like_masks", False) else None  # noqa: F841
        slots = _peer_gather_in_two_slots()  # noqa: F841
        torch.manual_seed(0)
        model, kwargs = MODELS[name]()
        if overrides:
            model = type(model)(**{**model.config, **overrides})
        model.eval()
        cache_config = options.pop("cache", None)
        cache = mindiesd_compile.StepCache(cache_config)
        cached_reference = options.pop("cached_reference", False)  # one process with the same cache policy
        steps = options.pop("steps", 1)
        second_shape = options.pop("second_shape", None)  # another resolution through the same (dynamic) graph
        if "hidden_states_shape" in options:
            kwargs["hidden_states"] = torch.randn(options.pop("hidden_states_shape"))
        if "img_ids_shape" in options:  # Flux: one position per image token
            kwargs["img_ids"] = torch.randn(options.pop("img_ids_shape"))
        kwargs.update(options.pop("inputs", {}))  # e.g. LTX-Video's frame count, height and width
        if "img_shapes" in options:  # Qwen-Image: the image the tokens come from
            kwargs["img_shapes"] = options.pop("img_shapes")
        for key, t in list(kwargs.items()) if options.pop("batch2", False) else ():  # two different samples
            if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == 1:
                random = t.is_floating_point() and key not in ("encoder_attention_mask", "encoder_hidden_states_mask")
                kwargs[key] = torch.cat([t, torch.randn_like(t) if random else t])
        unmasked, padding = dict(kwargs), options.pop("text_padding", 0)
        mask_key = "encoder_hidden_states_mask" if "encoder_hidden_states_mask" in kwargs else "encoder_attention_mask"
        if padding:  # the last text tokens are padding (HunyuanVideo's, LTX's, Qwen-Image's text mask)
            kwargs[mask_key] = kwargs[mask_key].clone()
            kwargs[mask_key][:, -padding:] = 0
        if options.pop("dynamic", False):  # after the inputs are final: the marks live on the tensors
            mindiesd_compile.mark_sequence_dynamic(model, kwargs)
        dumps = os.path.join(out_dir, f"graphs-{name}-{rank}")
        with torch.no_grad():
            fn = torch.compile(model, backend="mindiesd", fullgraph=True,
                               options={"target": "eager", "cache": cache, "sequence_parallel": world,
                                        "dump_graphs": dumps, **options})
            # the reference: one process, same options but the parallelism (e.g. sparse attention is not eager's)
            one = torch.compile(model, backend="mindiesd", options={"target": "eager", **options}) \
                if "sparse_attention" in options else model
            if cached_reference:
                one = torch.compile(model, backend="mindiesd",
                                    options={"target": "eager", "cache": mindiesd_compile.StepCache(cache_config)})
            rels, codes = [], []
            for step in range(steps):
                kw = dict(kwargs, timestep=kwargs["timestep"] - 100 * step)
                if step == 0 and options.get("target") == "cpu":  # Inductor: keep the code it generates
                    from torch._inductor.utils import run_and_get_code
                    outs, codes = run_and_get_code(fn, **kw)
                    ref, out = one(**kw)[0], outs[0]
                else:
                    ref, out = one(**kw)[0], fn(**kw)[0]
                rels.append(float((out - ref).norm() / ref.norm()))
            if second_shape:
                kw = dict(kwargs, hidden_states=torch.randn(second_shape))
                rels.append(float((fn(**kw)[0] - model(**kw)[0]).norm() / model(**kw)[0].norm()))
            dense, plain = model(**kwargs)[0], model(**unmasked)[0]
            result_dense = float((out - dense).norm() / dense.norm())
            rel_to_unmasked = float((out - plain).norm() / plain.norm())
        runner = cache.runners[0]
        result = dict(rel=rels[0], rels=rels, rel_to_dense=result_dense, rel_to_unmasked=rel_to_unmasked,
                      shape_ok=out.shape == ref.shape, skipped=cache.stats["skipped"],
                      sp_sites=runner.compiler.report.stats("sequence_parallel").rewritten,  # exchanged attentions
                      collectives=_collectives(dumps), exchange_order=_exchange_order(dumps),
                      attention=runner.compiler.report.stats("attention").rewritten, compiles=runner.compiler.compiles,
                      pieces=[p.label for p in runner.partition.pieces if p.kind != "block"],
                      gather_point=runner.piece[runner.gather_point].label,
                      # per generated graph with an exchange: the matrix products it runs before starting each
                      products_before_exchange=[[c[:m.start()].count("extern_kernels.addmm(")
                                                 for m in re.finditer(r"all_gather_peers\.default\(", c)]
                                                for c in codes if "all_gather_peers.default(" in c])
    except Exception as err:  # reported to the test, which asserts on it
        result = dict(error=f"{type(err).__name__}: {err}")
    finally:
        with open(os.path.join(out_dir, f"{name}-{rank}.json"), "w") as f:
            json.dump(result, f)
        dist.destroy_process_group()


def _collectives(dumps):
    """Collective calls in the graphs the sequence-parallel pass left, per kind (every compiled piece once)."""
    graphs = [open(os.path.join(dumps, f)).read() for f in sorted(os.listdir(dumps))
              if f.endswith("_sequence_parallel.txt")]
    kinds = ("_c10d_functional.all_to_all_single", "_c10d_functional.all_gather_into_tensor_coalesced",
             "_c10d_functional.all_gather_into_tensor", "mindiesd_compile.all_gather_peers",
             "mindiesd_compile.attention_partial")
    return {kind.split(".")[1]: sum(g.count(f"{kind}.default]") for g in graphs) for kind in kinds}


def _exchange_order(dumps):
    """The first rewritten graph's matmuls, exchange and attention ops in the order it runs them (after the last
    pass), up to the op after the last wait (the attention that reads the exchange)."""
    rewritten = sorted(f.split("_")[0] for f in os.listdir(dumps) if f.endswith("_sequence_parallel.txt"))
    last = max((f for f in os.listdir(dumps) if rewritten and f.startswith(rewritten[0] + "_")), default=None)
    text = open(os.path.join(dumps, last)).read() if last else ""
    ops = re.findall(r"\.(addmm|mm|all_gather_peers|wait_tensor|attention_partial|attention|control_deps)(?:\.default)?\]",
                     text)
    waits = [i for i, op in enumerate(ops) if op == "wait_tensor"]
    return ops[:waits[-1] + 2] if waits else []


def run_ranks(tmp_path, name, overrides=None, world=WORLD, **options):
    spawn_ranks(_worker, (world, name, options, overrides, str(tmp_path / f"store-{name}"), str(tmp_path)), world)
    return [json.loads((tmp_path / f"{name}-{r}.json").read_text()) for r in range(world)]


@pytest.mark.parametrize("mode, overlap, collectives, order", [
    # one block graph (both blocks share it): q, k, v and the output each in an all-to-all
    ("ulysses", "auto", {"all_to_all_single": 4, "all_gather_into_tensor_coalesced": 0, "all_gather_peers": 0}, None),
    # keys and values in one NCCL all-gather, awaited at once; nothing after attention
    ("gather_kv", False, {"all_to_all_single": 0, "all_gather_into_tensor_coalesced": 1, "all_gather_peers": 0},
     ["addmm", "addmm", "addmm", "wait_tensor", "wait_tensor", "attention"]),
    # "auto" on 2 ranks: "ahead", one exchange per tensor, each started as soon as its tensor exists: the values'
    # after their projection, the key projection after it (control_deps), then the keys' exchange, then the
    # query's projection (the model projects q first; now ordered after both); both awaited just before attention
    ("gather_kv", "auto", {"all_to_all_single": 0, "all_gather_into_tensor_coalesced": 0, "all_gather_peers": 2,
                           "attention_partial": 0},
     ["addmm", "all_gather_peers", "control_deps", "all_gather_peers", "control_deps", "wait_tensor", "wait_tensor",
      "attention"]),
    # "split": also the attention over this rank's keys before the wait, then the peer's: two partial attentions
    ("gather_kv", "split", {"all_to_all_single": 0, "all_gather_into_tensor_coalesced": 0, "all_gather_peers": 1,
                            "attention_partial": 2},
     ["addmm", "addmm", "all_gather_peers", "control_deps", "attention_partial", "wait_tensor", "wait_tensor",
      "attention_partial"])])
def test_two_ranks_match_one_process_wan(tmp_path, mode, overlap, collectives, order):
    for result in run_ranks(tmp_path, "wan", sequence_parallel_mode=mode, sequence_parallel_overlap=overlap):
        assert "error" not in result, result
        assert result["shape_ok"] and result["rel"] <= 1e-5
        assert result["sp_sites"] == 2  # the self-attentions; cross-attention to replicated text stays local
        assert result["attention"] == 4
        # prologue, one block for both (the first block's sharded input too), the epilogue on this rank's tokens up
        # to proj_out (where the plan gathers), the output (unpatchify) on the gathered ones
        assert result["compiles"] == 4 and result["pieces"] == ["prologue", "epilogue", "output"]
        assert {k: result["collectives"][k] for k in collectives} == collectives
        if order:
            assert result["exchange_order"] == order


@pytest.mark.parametrize("overlap, collectives", [
    ("split", {"all_gather_peers": 1, "attention_partial": 2, "all_to_all_single": 0}),
    ("ahead", {"all_gather_peers": 2, "attention_partial": 0, "all_to_all_single": 0})])
def test_four_ranks_gather_kv_matches_one_process(tmp_path, overlap, collectives):
    """gather_kv on 4 ranks (the default on 4 GPUs, with "split"): three peers' keys and values per attention."""
    for result in run_ranks(tmp_path, "wan", world=4, sequence_parallel_mode="gather_kv",
                            sequence_parallel_overlap=overlap):
        assert "error" not in result, result
        assert result["shape_ok"] and result["rel"] <= 1e-5 and result["sp_sites"] == 2
        assert {k: result["collectives"][k] for k in collectives} == collectives


@pytest.mark.parametrize("overlap, exchanges, partials, products", [("ahead", 2, 0, [1, 2]), ("split", 1, 2, [2])])
def test_overlapped_gather_kv_through_inductor_matches_one_process(tmp_path, overlap, exchanges, partials, products):
    """The exchange lowered by Inductor (CPU): all_gather_peers as a collective whose inputs live until its wait
    ("ahead": every rank's chunk of one tensor in one buffer; "split": the peers' keys and values, the merge
    fused), started before the query projection in the generated code; every rank gets the single-process
    output."""
    for result in run_ranks(tmp_path, "wan", target="cpu", sequence_parallel_mode="gather_kv",
                            sequence_parallel_overlap=overlap):
        assert "error" not in result, result
        assert result["shape_ok"] and result["rel"] <= 1e-5
        assert result["collectives"]["all_gather_peers"] == exchanges
        assert result["collectives"]["attention_partial"] == partials
        # Inductor keeps each exchange where the pass put it: "ahead" starts the values' after the value GEMM
        # alone and the keys' before the query GEMM; "split" starts its one after the key and value GEMMs (without
        # the control dependencies it fused the queries' norm/RoPE with the keys' and ran all three GEMMs first)
        assert result["products_before_exchange"] == [products], result["products_before_exchange"]


@pytest.mark.parametrize("latent", [None, (1, 4, 1, 6, 10)])  # 32 tokens; 15, padded to 16
def test_sequence_parallel_composes_with_caching(tmp_path, latent):
    cache = {"policy": "block", "step_start": 1, "step_interval": 2, "block_start": 0, "block_end": 2}
    results = run_ranks(tmp_path, "wan", cache=cache, steps=4, **({"hidden_states_shape": latent} if latent else {}))
    for result in results:
        assert "error" not in result, result
        assert result["skipped"] == 1  # step 2 reuses the (sharded) residual on both ranks
        assert result["rels"][0] <= 1e-5 and result["rels"][1] <= 1e-5 and result["rels"][3] <= 1e-5
    assert results[0]["rels"] == results[1]["rels"]


@pytest.mark.parametrize("mode", ["ulysses", "gather_kv"])
def test_attention_reuse_under_sequence_parallelism_matches_one_process(tmp_path, mode):
    """The attention cache's reused step (step 2: blocks 0-1 take step 1's attention outputs, their q/k/v and
    exchanges not run) gives each rank the single-process cached output, with either exchange."""
    cache = {"policy": "attention", "step_start": 1, "step_interval": 2, "block_start": 0, "block_end": 2}
    results = run_ranks(tmp_path, "wan", cache=cache, steps=4, cached_reference=True, sequence_parallel_mode=mode)
    for result in results:
        assert "error" not in result, result
        assert result["skipped"] == 1 and max(result["rels"]) <= 1e-5, result


def test_length_specialised_joint_attention_is_a_clear_error(tmp_path):
    """Flux traced with static shapes splits joint attention back by the traced text length: the error says
    how to trace it instead."""
    for result in run_ranks(tmp_path, "flux"):
        assert "fixes token counts" in result["error"] and "mark_sequence_dynamic" in result["error"]


def test_joint_attention_with_dynamic_sequence_dims_matches_one_process(tmp_path):
    """Flux (text and image tokens both split, joint attention) traced with dynamic sequence dims (the default
    exchange on 2 ranks: gather_kv; Ulysses' joint path: the HunyuanVideo test)."""
    for result in run_ranks(tmp_path, "flux", dynamic=True, sequence_parallel_overlap="split"):
        assert "error" not in result, result
        assert result["shape_ok"] and result["rel"] <= 1e-5
        assert result["sp_sites"] == 2 == result["attention"]  # the double-stream and the single-stream block
        # "split" joint attention: the peer's image keys arrive beside the attention over this rank's image keys
        # and the (replicated) text keys
        assert result["collectives"]["all_gather_peers"] == 2 == result["collectives"]["attention_partial"] / 2


@pytest.mark.parametrize("mode", ["ulysses", "gather_kv"])
def test_hunyuan_video_with_text_padding_matches_one_process(tmp_path, mode):
    """HunyuanVideo ships no _cp_plan: the built-in one splits the image tokens where they enter the blocks and
    keeps text whole. Its key mask (built in the prologue, last 3 text tokens padding) reaches each rank as a
    padded chunk and is gathered back whole; joint attention runs in the single-process key order. Batch 2:
    the joint sequence is followed through the projections' [B*S, C] views; 3 heads: padded to 4 (Ulysses)."""
    heads = {"num_attention_heads": 3}
    for result in run_ranks(tmp_path, "hunyuan", heads, dynamic=True, text_padding=3, batch2=True,
                            sequence_parallel_mode=mode):
        assert "error" not in result, result
        assert result["shape_ok"] and result["rel"] <= 1e-5
        assert result["rel_to_unmasked"] > 1e-3  # the padding mask really changes the output
        assert result["sp_sites"] == 2  # the double- and the single-stream block
        assert result["attention"] == 3  # + the token refiner's text self-attention (prologue, unsplit)
        exchanged = result["collectives"]["all_to_all_single"]  # the modes really differ
        assert (exchanged == 0) if mode == "gather_kv" else (exchanged > 0), result["collectives"]
        # masked: no split; "auto" gathers the image keys and values ahead, one peer exchange each, per site, the
        # key mask with the keys (a third peer gather would reuse the keys' buffer; an NCCL one, cuda_graphs would
        # capture)
        assert result["collectives"]["all_gather_peers"] == (4 if mode == "gather_kv" else 0), result["collectives"]
        if mode == "gather_kv":
            assert result["collectives"]["all_gather_into_tensor"] == 0, result["collectives"]
        assert result["collectives"]["attention_partial"] == 0


@pytest.mark.parametrize("mode", ["ulysses", "gather_kv"])
def test_ltx_text_split_with_its_padding_mask_matches_one_process(tmp_path, mode):
    """LTX-Video's _cp_plan splits the text (and its padding mask) with the video tokens: its cross-attention has
    every token split, and the key mask built from each rank's text (per head, as LTX repeats it) goes through
    the all-to-all with the keys. The last 3 of 8 text tokens are padding: all on rank 1."""
    for result in run_ranks(tmp_path, "ltx", dynamic=True, text_padding=3, sequence_parallel_mode=mode):
        assert "error" not in result, result
        assert result["shape_ok"] and result["rel"] <= 1e-5
        assert result["rel_to_unmasked"] > 1e-3  # the padding mask really changes the output
        assert result["sp_sites"] == 4 == result["attention"]  # both blocks: self- and cross-attention, all split
        if mode == "gather_kv":  # keys and values one exchange each per site (one block graph, counted once), the
            # text mask in the keys' one
            assert result["collectives"]["all_gather_peers"] == 4, result["collectives"]
            assert result["collectives"]["all_gather_into_tensor"] == 0, result["collectives"]


@pytest.mark.parametrize("mode", ["ulysses", "gather_kv"])
@pytest.mark.parametrize("name", ["hunyuan", "ltx"])
def test_masks_as_a_cuda_trace_builds_them_follow_the_split(tmp_path, name, mode):
    """On CUDA, SDPA's front end expands a key mask to every head and query (and pads unaligned keys) before the
    passes see the graph; the attention pass hands the op the model's mask, so the split still follows it (before:
    every masked model under sequence parallelism failed on CUDA, bench/RESULTS.md 2026-11-27)."""
    for result in run_ranks(tmp_path, name, dynamic=True, text_padding=3, cuda_like_masks=True,
                            sequence_parallel_mode=mode):
        assert "error" not in result, result
        assert result["shape_ok"] and result["rel"] <= 1e-5
        assert result["rel_to_unmasked"] > 1e-3  # the padding mask really changes the output
        assert result["sp_sites"] == {"hunyuan": 2, "ltx": 4}[name]


def test_a_whole_mask_over_split_keys_is_a_clear_error(tmp_path):
    """The same plan without the mask entry: each rank's keys are a slice, its mask (built in the block, per head)
    covers them all: a clear error, not a silently misapplied mask."""
    plan = {k: v for k, v in ltx()[0]._cp_plan.items()}
    plan[""] = {k: v for k, v in plan[""].items() if k != "encoder_attention_mask"}
    for result in run_ranks(tmp_path, "ltx", dynamic=True, text_padding=3, parallel_plan=plan):
        assert "takes a mask over the whole joint sequence" in result["error"], result
        assert "only key-padding masks built before the blocks can follow the split" in result["error"]


@pytest.mark.parametrize("mode, overlap, collectives", [
    ("ulysses", False, {"all_gather_into_tensor_coalesced": 1, "all_gather_peers": 0}),  # the audio's: NCCL
    ("gather_kv", "ahead", {"all_gather_peers": 6, "attention_partial": 0}),  # keys, values: one exchange each
    ("gather_kv", "split", {"all_gather_peers": 4, "attention_partial": 4})])  # unmasked: own keys while gathering
def test_ltx2_audio_attending_to_the_split_video_matches_one_process(tmp_path, mode, overlap, collectives):
    """LTX-2 splits its video and the video's text (and its padding mask) but keeps the audio whole: the audio's
    attention to the video has whole queries over split keys, so every rank gathers those keys and values and
    computes the same whole output (the video's attention to the audio stays local)."""
    for result in run_ranks(tmp_path, "ltx2", dynamic=True, text_padding=3, sequence_parallel_mode=mode,
                            sequence_parallel_overlap=overlap):
        assert "error" not in result, result
        assert result["shape_ok"] and result["rel"] <= 1e-5
        assert result["rel_to_unmasked"] > 1e-3  # the padding mask really changes the output
        # per block: the video's self- and text attention (split), the audio's attention to the video (gathered)
        assert result["sp_sites"] == 6 and result["attention"] == 12, result
        # (one block graph for both blocks, counted once)
        assert {k: result["collectives"][k] for k in collectives} == collectives, result["collectives"]


def test_ltx2_shipped_plan_leaves_a_rope_whole_a_clear_error(tmp_path):
    """LTX-2's shipped plan splits the video's RoPE but not the one of its audio-video cross-attention, which is
    per video token too: the built-in plan splits both; the shipped one gets the planner's clear error."""
    plan = ltx2()[0]._cp_plan
    for result in run_ranks(tmp_path, "ltx2", dynamic=True, parallel_plan=plan):
        assert "fixes token counts" in result["error"], result


def test_flux2_epilogue_drops_the_text_by_its_count_on_each_rank(tmp_path):
    """Flux.2 joins text and image into one sequence between its double- and single-stream blocks (both split by its
    _cp_plan), and its epilogue drops the text by the count it took before the blocks: it runs on each rank's
    [text | image] up to proj_out, where the plan gathers (gathered after the last block instead, the ranks' runs
    interleave and the count cuts the wrong tokens: 20 tokens out of 16)."""
    for result in run_ranks(tmp_path, "flux2", dynamic=True):
        assert "error" not in result, result
        assert result["shape_ok"] and result["rel"] <= 1e-5
        assert result["sp_sites"] == 2 == result["attention"]  # the double- and the single-stream block
        assert result["gather_point"] == "epilogue" and result["pieces"][-1] == "epilogue"  # proj_out ends it


def test_a_plan_without_a_gather_module_gathers_after_the_last_block(tmp_path):
    """Wan's plan without its proj_out entry: the last block's output is gathered, the epilogue runs whole."""
    from diffusers import WanTransformer3DModel
    plan = {k: v for k, v in WanTransformer3DModel._cp_plan.items() if k != "proj_out"}
    for result in run_ranks(tmp_path, "wan", parallel_plan=plan):
        assert "error" not in result, result
        assert result["shape_ok"] and result["rel"] <= 1e-5
        assert result["gather_point"] == "blocks.1" and result["pieces"] == ["prologue", "epilogue"]


def test_chronoedit_matches_one_process(tmp_path):
    """ChronoEdit (Wan's blocks, with cross-attention to image embeddings as well as text) by its shipped plan."""
    for result in run_ranks(tmp_path, "chronoedit"):
        assert "error" not in result, result
        assert result["shape_ok"] and result["rel"] <= 1e-5
        assert result["sp_sites"] == 2 and result["attention"] == 4  # cross-attention to replicated keys: local


def test_sd3_two_ranks_match_one_process(tmp_path):
    """SD3 ships no _cp_plan: the built-in one splits the image tokens where they enter the blocks, text stays
    whole (joint attention, no mask). Its blocks multiply the latent height in patches, handed over by the
    prologue, back into the image token count: each rank's blocks get their share, the epilogue the whole."""
    for result in run_ranks(tmp_path, "sd3", dynamic=True, sequence_parallel_overlap=True):  # "auto": ahead
        assert "error" not in result, result
        assert result["shape_ok"] and result["rel"] <= 1e-5
        assert result["sp_sites"] == 3  # joint attention in both blocks + block 0's image-only attn2 (dual attention)
        # keys and values, one exchange each, per site: block 0 (2 sites), block 1 (each graph counted once)
        assert result["collectives"]["all_gather_peers"] == 6
        assert result["collectives"]["attention_partial"] == 0


def test_a_second_resolution_matches_one_process(tmp_path):
    """HunyuanVideo traced with dynamic sizes, called at 4x4 then 8x4 latent patches: the plan made at the first
    call splits the second too, and the pieces compile again for its sizes."""
    for result in run_ranks(tmp_path, "hunyuan", dynamic=True, text_padding=3, second_shape=(1, 4, 2, 8, 4)):
        assert "error" not in result, result
        assert len(result["rels"]) == 2 and max(result["rels"]) <= 1e-5, result["rels"]


@pytest.mark.parametrize("mode, overlap, world", [("ulysses", "auto", 2), ("gather_kv", False, 2),
                                                  ("gather_kv", "ahead", 2), ("gather_kv", "split", 4)])
def test_an_indivisible_sequence_is_padded_and_matches_one_process(tmp_path, mode, overlap, world):
    """Wan at 1 x 3 x 5 = 15 tokens: padded to 16, the last rank's chunk ending with the pad token, which no
    attention attends to and the gather drops ("split" on 4 ranks: the last rank's own keys and the others' peer
    keys end with it)."""
    for result in run_ranks(tmp_path, "wan", world=world, hidden_states_shape=(1, 4, 1, 6, 10),
                            sequence_parallel_mode=mode, sequence_parallel_overlap=overlap):
        assert "error" not in result, result
        assert result["shape_ok"] and result["rel"] <= 1e-5, result
        assert result["sp_sites"] == 2


@settings(max_examples=40, deadline=None)
@given(tokens=st.integers(1, 200), degree=st.integers(2, 8), dim=st.integers(0, 2))
def test_padded_chunks_gather_back_to_the_sequence(tokens, degree, dim):
    """Every rank's chunk is as long (the pad ends the last one), and joined in rank order without the pad they are
    the sequence, for any length and degree."""
    from mindiesd_compile.runtime.sequence_parallel import _local, padding
    shape = [2, 3, 4]
    shape[dim] = tokens
    x = torch.randn(shape)
    chunks = [_local(x, dim, degree, r) for r in range(degree)]
    assert len({c.shape for c in chunks}) == 1
    assert chunks[0].shape[dim] * degree == tokens + padding(tokens, degree)
    assert torch.equal(torch.cat(chunks, dim).narrow(dim, 0, tokens), x)


def test_indivisible_tokens_that_cannot_be_padded_are_a_clear_error(tmp_path):
    """HunyuanVideo at 1 x 3 x 3 = 9 image tokens on 2 ranks: its blocks rebuild the token count from the
    model's sizes, which cannot count a pad."""
    for result in run_ranks(tmp_path, "hunyuan", dynamic=True, hidden_states_shape=(1, 4, 1, 3, 3)):
        assert ("HunyuanVideoTransformer3DModel: the sequence entering the blocks has 9 tokens, not divisible by "
                "sequence_parallel=2 (sequence_parallel=3 would divide it), and its blocks rebuild the token count "
                "from the model's sizes, so it cannot be padded") in result["error"], result


@pytest.mark.parametrize("overlap", ["split", "ahead"])
def test_joint_attention_over_a_padded_and_an_unpadded_sequence_matches_one_process(tmp_path, overlap):
    """Flux's plan splits its 8 text tokens (4 per rank, no pad) and 15 image tokens (8 per rank, one pad token):
    the joint attention leaves out the image run's pad only."""
    for result in run_ranks(tmp_path, "flux", dynamic=True, hidden_states_shape=(1, 15, 8), img_ids_shape=(15, 3),
                            sequence_parallel_overlap=overlap):
        assert "error" not in result, result
        assert result["shape_ok"] and result["rel"] <= 1e-5, result
        assert result["sp_sites"] == 2


def test_split_sequences_as_long_per_rank_with_different_padding_are_a_clear_error(tmp_path):
    """8 text tokens and 7 image tokens are 4 per rank each, one without a pad, one with: an attention could not
    tell them apart."""
    for result in run_ranks(tmp_path, "flux", dynamic=True, hidden_states_shape=(1, 7, 8), img_ids_shape=(7, 3)):
        assert "split sequences of 4 tokens per rank need different padding to a multiple of 2" in result["error"], \
            result


def test_a_masked_attention_over_a_padded_sequence_is_a_clear_error(tmp_path):
    """LTX-Video at 1 x 3 x 5 = 15 video tokens (padded to 16) with its text split and masked: its cross-attention
    gathers the text keys with their mask, which padding does not serve yet."""
    for result in run_ranks(tmp_path, "ltx", dynamic=True, hidden_states_shape=(1, 15, 8),
                            inputs={"num_frames": 1, "height": 3, "width": 5}):
        assert "has a mask and its sequence was padded to a multiple of the degree" in result["error"], result


@pytest.mark.parametrize("tokens, degree, which", [
    (4096, 3, "sequence_parallel=2, 4, 8 would divide it"),         # Flux at 1024x1024 on 3 GPUs
    (6889, 2, "no degree from 2 to 8 would divide it"),             # Qwen-Image at 1328x1328: 83 x 83
    (17550, 4, "sequence_parallel=2, 3, 5, 6 would divide it")])    # CogVideoX at 720x480x49: 13 x 30 x 45
def test_an_indivisible_sequence_names_the_degrees_that_fit(tokens, degree, which):
    from mindiesd_compile import OptionsError
    from mindiesd_compile.runtime.sequence_parallel import check_divisible
    with pytest.raises(OptionsError, match=re.escape(f"M: x has {tokens} tokens, not divisible by sequence_parallel="
                                                     f"{degree} ({which}); choose a resolution")):
        check_divisible("M", "x", tokens, degree)
    check_divisible("M", "x", tokens - tokens % degree, degree)  # a divisible count passes


@pytest.mark.parametrize("mode", ["ulysses", "gather_kv"])
def test_qwen_image_with_text_padding_matches_one_process(tmp_path, mode):
    """Qwen-Image's own _cp_plan splits the text too, but with a text mask its forward fixes the text length in
    the traced graph: the built-in plan splits its image tokens and image positions (built from the Python ints
    of img_shapes, traced as symbols) and keeps the text whole. Each block joins the text mask with ones for this
    rank's image tokens: that key mask is gathered run by run, like the keys. Batch 2; 3 heads (padded to 4 under
    Ulysses). gather_kv: the mask's image run goes in the keys' exchange, no collective of its own."""
    for result in run_ranks(tmp_path, "qwen", {"num_attention_heads": 3}, dynamic=True, text_padding=3,
                            batch2=True, sequence_parallel_mode=mode):
        assert "error" not in result, result
        assert result["shape_ok"] and result["rel"] <= 1e-5
        assert result["rel_to_unmasked"] > 1e-3  # the padding mask really changes the output
        assert result["sp_sites"] == 2 == result["attention"]  # the joint attention of both blocks
        if mode == "gather_kv":
            assert result["collectives"]["all_gather_peers"] == 4, result["collectives"]
            assert result["collectives"]["all_gather_into_tensor"] == 0, result["collectives"]


def test_qwen_image_on_four_ranks_divides_the_width(tmp_path):
    """2 frames x 6 x 4 latent patches on 4 ranks: the blocks rebuild the image token count from frames, height
    and width, so the ranks' blocks get one of them divided, the first the degree divides (the width)."""
    for result in run_ranks(tmp_path, "qwen", world=4, dynamic=True, text_padding=3,
                            hidden_states_shape=(1, 48, 16), img_shapes=[(2, 6, 4)]):
        assert "error" not in result, result
        assert result["shape_ok"] and result["rel"] <= 1e-5 and result["sp_sites"] == 2


def test_per_block_plan_entries_are_a_clear_error(tmp_path):
    """Qwen-Image's own _cp_plan (passed explicitly: the built-in one replaces it) splits the text mask and
    modulation index again at every block."""
    from diffusers import QwenImageTransformer2DModel
    for result in run_ranks(tmp_path, "qwen", parallel_plan=QwenImageTransformer2DModel._cp_plan):
        assert "QwenImageTransformer2DModel's parallel plan splits inputs of every block" in result["error"], result
        assert "transformer_blocks.*" in result["error"]


def test_per_sub_module_plan_entries_are_a_clear_error(tmp_path):
    """Helios' shipped plan splits and gathers around every block's attention and FFN ("blocks.*.attn1"): on Wan's
    blocks (whose sub-modules have those names), the same clear error."""
    from diffusers.models._modeling_parallel import ContextParallelInput
    split = ContextParallelInput(split_dim=1, expected_dims=3, split_output=False)
    plan = {"blocks.*.attn1": {"hidden_states": split}, "blocks.*.ffn": {"hidden_states": split}}
    for result in run_ranks(tmp_path, "wan", parallel_plan=plan):
        assert "parallel plan splits inputs of every block" in result["error"], result
        assert "blocks.*.attn1" in result["error"]


def test_heads_not_divisible_are_padded(tmp_path):
    """3 heads on 2 ranks under Ulysses: a zero head pads them to 4; every rank still gets the single-process
    output (gather_kv keeps every head on every rank: the HunyuanVideo test runs 3 heads with it)."""
    heads = {"num_attention_heads": 3}
    for result in run_ranks(tmp_path, "wan", overrides=heads, sequence_parallel_mode="ulysses"):
        assert "error" not in result, result
        assert result["rel"] <= 1e-5 and result["sp_sites"] == 2


def test_world_size_must_match_the_degree(tmp_path):
    for result in run_ranks(tmp_path, "wan", sequence_parallel=4):
        assert "sequence_parallel=4 but the process group has 2 rank(s)" in result["error"]


def test_sequence_parallel_without_distributed_is_a_clear_error():
    from mindiesd_compile import CompileOptions, OptionsError
    with pytest.raises(OptionsError, match="needs torch.distributed initialised"):
        CompileOptions.from_dict({"sequence_parallel": 2})


def test_overlap_auto_is_ahead_on_two_ranks_and_split_on_more(one_rank):
    """"auto" (or True): the exchange ahead of the query projection on 2 ranks, the split attention on more (both
    measured fastest there, bench/RESULTS.md 2026-11-27); none on the NPU or with FP8 attention; a name is kept."""
    from mindiesd_compile.options import CompileOptions, OptionsError

    def overlap(target, **options):
        return CompileOptions.from_dict(options).sequence_parallel_overlap_for(target)
    assert overlap("cuda", sequence_parallel=2) == "ahead" == overlap("cuda", sequence_parallel=2,
                                                                       sequence_parallel_overlap=True)
    assert overlap("cuda", sequence_parallel=4) == "split" == overlap("cuda", sequence_parallel=3)
    assert overlap("cuda", sequence_parallel=2, sequence_parallel_overlap="split") == "split"
    assert overlap("cuda", sequence_parallel=4, sequence_parallel_overlap="ahead") == "ahead"
    assert overlap("cuda", sequence_parallel=2, sequence_parallel_overlap=False) is False
    assert overlap("npu", sequence_parallel=2) is False
    assert overlap("cuda", sequence_parallel=2, fp8={"attention": True}) is False
    for wrong in (1, "early", None):
        with pytest.raises(OptionsError, match=f"must be 'auto', 'ahead', 'split', True .* or False, got {wrong!r}"):
            CompileOptions.from_dict({"sequence_parallel_overlap": wrong})


def test_unknown_sequence_parallel_mode_is_a_clear_error():
    from mindiesd_compile import CompileOptions, OptionsError
    with pytest.raises(OptionsError, match="'ring' is not a mode; valid modes: \\('auto', 'ulysses', 'gather_kv'\\)"):
        CompileOptions.from_dict({"sequence_parallel_mode": "ring"})


@pytest.fixture
def one_rank(tmp_path):
    """torch.distributed initialised in this process (world size 1): what the sequence-parallel options ask for."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_auto_mode_picks_the_exchange_measured_faster(one_rank):
    """gather_kv on 2 ranks and, overlapped, on 3-4; Ulysses on more, with sparse attention and on the NPU (untimed
    there); a mode named is the mode that runs."""
    from mindiesd_compile import CompileOptions

    def exchange(target, **options):
        return CompileOptions.from_dict(options).sequence_parallel_exchange(target)
    assert exchange("cuda", sequence_parallel=2) == "gather_kv" == exchange("eager", sequence_parallel=2)
    # 3-4 ranks: gather_kv where its exchange is overlapped (CUDA), else Ulysses; more ranks: Ulysses
    assert exchange("cuda", sequence_parallel=4) == "gather_kv" == exchange("cuda", sequence_parallel=3)
    assert exchange("cuda", sequence_parallel=4, sequence_parallel_overlap=False) == "ulysses"
    assert exchange("cuda", sequence_parallel=4, fp8={"attention": True}) == "ulysses"
    assert exchange("eager", sequence_parallel=4) == "ulysses" == exchange("cuda", sequence_parallel=8)
    assert exchange("npu", sequence_parallel=2) == "ulysses"
    assert exchange("cuda", sequence_parallel=2, sparse_attention={"sparsity": 0.5}) == "ulysses"
    assert exchange("cuda", sequence_parallel=4, sequence_parallel_mode="gather_kv") == "gather_kv"
    assert exchange("cuda", sequence_parallel=2, sequence_parallel_mode="ulysses") == "ulysses"
    assert exchange("npu", sequence_parallel=2, sequence_parallel_mode="gather_kv") == "gather_kv"


def test_gather_kv_with_sparse_attention_is_a_clear_error(one_rank):
    """Block-sparse attention selects per head over the whole sequence: only Ulysses gives a rank that."""
    from mindiesd_compile import CompileOptions, OptionsError
    with pytest.raises(OptionsError, match="use sequence_parallel_mode 'ulysses' with sparse attention"):
        CompileOptions.from_dict({"sequence_parallel": 2, "sequence_parallel_mode": "gather_kv",
                                  "sparse_attention": {"sparsity": 0.5}})


def test_block_sparse_attention_under_sequence_parallelism(tmp_path):
    """Ulysses gives each rank the whole sequence for its heads, so block-sparse attention (grid 3x4x4: 12 blocks
    of 4 tokens, sparsity 0.9) selects and runs per head exactly as on one process."""
    sparse = {"sparsity": 0.9, "block": 4, "tile": (2, 2)}
    for result in run_ranks(tmp_path, "wan", sparse_attention=sparse, hidden_states_shape=(1, 4, 3, 8, 8)):
        assert "error" not in result, result
        assert result["rel"] <= 1e-5 and result["sp_sites"] == 2
        assert result["rel_to_dense"] > 1e-3  # sparse attention really ran (it differs from dense attention)


def test_optimize_marks_the_sequence_dims_before_the_first_trace():
    """optimize(pipe, sequence_parallel=N) registers this pre-hook: Dynamo then sees Flux's four split inputs
    (hidden_states, encoder_hidden_states, img_ids, txt_ids) with dynamic sizes."""
    import functools
    from mindiesd_compile.pipeline import mark_dynamic_hook
    model, kwargs = MODELS["flux"]()
    sizes = []

    def backend(gm, example_inputs):
        sizes.append(sum(isinstance(x, torch.SymInt) for x in example_inputs))
        return gm.forward

    compiled = torch.compile(model.eval(), backend=backend)
    compiled.register_forward_pre_hook(functools.partial(mark_dynamic_hook, model), with_kwargs=True)
    with torch.no_grad():
        compiled(**kwargs)
    assert sizes == [4]


def _exchange_graph(query_first: bool, per_tensor: bool = False) -> torch.fx.GraphModule:
    """x -> q, k, v projections (q written first or last) -> all_gather_peers(k, v), or one call per tensor ->
    waits -> attention."""
    aten, ops = torch.ops.aten, torch.ops.mindiesd_compile
    g = torch.fx.Graph()
    x, wq, wk, wv = (g.placeholder(n) for n in ("x", "wq", "wk", "wv"))
    q = g.call_function(aten.mm.default, (x, wq)) if query_first else None
    k, v = g.call_function(aten.mm.default, (x, wk)), g.call_function(aten.mm.default, (x, wv))
    exchanges = [g.call_function(ops.all_gather_peers.default, ([t], 1, "0", True)) for t in (k, v)] \
        if per_tensor else [g.call_function(ops.all_gather_peers.default, ([k, v], 1, "0", True))] * 2
    if not query_first:
        q = g.call_function(aten.mm.default, (x, wq))
    q = g.call_function(aten.view.default, (q, [1, 4, 2, 2]))
    k, v = (g.call_function(torch.ops._c10d_functional.wait_tensor.default,
                            (g.call_function(operator.getitem, (e, 0 if per_tensor else i)),))
            for i, e in enumerate(exchanges))
    g.output(g.call_function(ops.attention.default, (q, k, v, None, 1.0, "BSHD")))
    return torch.fx.GraphModule(torch.nn.Module(), g)


def _calls(gm):
    calls = [n for n in gm.graph.nodes if n.op == "call_function"]
    return calls, [getattr(n.target, "__name__", str(n.target)) for n in calls]


def test_early_exchange_moves_the_exchange_ahead_of_the_query_work_only():
    """The exchange and the key/value projections it needs go before the query projection, which then depends on
    the exchange (control_deps: Inductor must keep that order); nothing else moves. A graph whose query work
    already follows the exchange is left alone, with the reason."""
    from mindiesd_compile.passes.early_exchange import StartExchangesEarly
    from mindiesd_compile.report import Report
    gm, report = _exchange_graph(query_first=True), Report()
    StartExchangesEarly(report)(gm.graph)
    gm.graph.lint()
    calls, names = _calls(gm)
    assert names[:4] == ["mm.default", "mm.default", "all_gather_peers.default", "control_deps"], names
    assert calls[3].args[0] == (calls[2],)  # the query GEMM (not its view) waits for the exchange's start
    assert report.stats("early_exchange").rewritten == 1

    gm, report = _exchange_graph(query_first=False), Report()
    before = [n.name for n in gm.graph.nodes]
    StartExchangesEarly(report)(gm.graph)
    assert [n.name for n in gm.graph.nodes] == before
    assert report.stats("early_exchange").skipped[0]["why"] == "no other work before the exchange"


def test_early_exchange_starts_each_tensor_as_soon_as_it_exists():
    """Keys and values exchanged by separate calls: the keys' exchange goes right after their projection (ready
    first), the value projection after it (beside it), then the values' exchange, then the query projection,
    which follows both; every wait stays before the attention."""
    from mindiesd_compile.passes.early_exchange import StartExchangesEarly
    from mindiesd_compile.report import Report
    gm, report = _exchange_graph(query_first=True, per_tensor=True), Report()
    StartExchangesEarly(report)(gm.graph)
    gm.graph.lint()
    calls, names = _calls(gm)
    assert names[:5] == ["mm.default", "all_gather_peers.default", "control_deps", "all_gather_peers.default",
                         "control_deps"], names
    k_exchange, v_gemm, v_exchange, q_gemm = calls[1:5]
    assert k_exchange.args[0][0] is calls[0] and v_exchange.args[0][0] is v_gemm
    assert v_gemm.args[0] == (k_exchange,) and q_gemm.args[0] == (k_exchange, v_exchange)
    waits = [i for i, name in enumerate(names) if name == "wait_tensor.default"]
    assert len(waits) == 2 and min(waits) > 4 and names[-1] == "attention.default", names
    assert report.stats("early_exchange").rewritten == 2


def test_early_exchange_keeps_each_attentions_exchanges_after_the_attention_before():
    """A self-attention, then a cross-attention whose keys and values come from the text (ready at the start):
    the cross-attention's exchanges start after the self-attention, not ahead of its exchanges. An exchange's
    outputs live until the call after next (two buffers in turn): ahead, they were overwritten before being read
    (LTX-Video under sequence parallelism on GPUs, bench/RESULTS.md 2026-11-27)."""
    from mindiesd_compile.passes.early_exchange import StartExchangesEarly
    from mindiesd_compile.report import Report
    aten, ops = torch.ops.aten, torch.ops.mindiesd_compile
    g = torch.fx.Graph()
    x, text, *w = (g.placeholder(n) for n in ("x", "text", "wq", "wk", "wv", "wq2", "wk2", "wv2"))

    def attend(q_in, kv_in, wq, wk, wv):
        q, k, v = (g.call_function(aten.mm.default, (a, b)) for a, b in ((q_in, wq), (kv_in, wk), (kv_in, wv)))
        k, v = (g.call_function(torch.ops._c10d_functional.wait_tensor.default, (g.call_function(
            operator.getitem, (g.call_function(ops.all_gather_peers.default, ([t], 1, "0", True)), 0)),))
            for t in (k, v))
        return g.call_function(ops.attention.default, (q, k, v, None, 1.0, "BSHD"))
    g.output(attend(attend(x, x, *w[:3]), text, *w[3:]))
    gm, report = torch.fx.GraphModule(torch.nn.Module(), g), Report()
    StartExchangesEarly(report)(gm.graph)
    gm.graph.lint()
    _, names = _calls(gm)
    attentions = [i for i, name in enumerate(names) if name == "attention.default"]
    exchanges = [i for i, name in enumerate(names) if name == "all_gather_peers.default"]
    assert len(exchanges) == 4 and exchanges[1] < attentions[0] < exchanges[2], names
    assert report.stats("early_exchange").rewritten >= 2  # the self-attention's keys and values still go early


@pytest.mark.parametrize("world", [2, 3, 4, 8])
def test_peer_writes_go_round_the_ring(world):
    """all_gather_peers' copy-engine writes: every rank writes to every peer once, and at each step every GPU is
    written to by exactly one peer (in rank order all ranks wrote into rank 0 first: on 4 H200s its links then
    carried 3 writers and the other ranks' writes ran 2.9x slower, bench/RESULTS.md 2026-11-27)."""
    from mindiesd_compile.ops.peer_gather import _ring_order
    orders = [_ring_order(rank, world) for rank in range(world)]
    assert all(sorted(o) == sorted(set(range(world)) - {r}) for r, o in enumerate(orders))
    assert all(sorted(o[step] for o in orders) == list(range(world)) for step in range(world - 1))


class _HostSymmetricMemory:
    """Every rank's symmetric buffer on the host, as ``get_buffer`` hands them out: a byte range of one rank's."""

    def __init__(self, buffers, rank):
        self.buffers, self.rank = buffers, rank

    def get_buffer(self, rank, sizes, dtype, storage_offset):
        assert dtype == torch.uint8 and storage_offset % 16 == 0  # each region aligned for any dtype
        return self.buffers[rank][storage_offset:storage_offset + sizes[0]]


@settings(deadline=None, max_examples=30)
@given(world=st.integers(2, 4), include_self=st.booleans(), dim=st.integers(0, 2), data=st.data())
def test_peer_gather_routes_assemble_the_gather(world, include_self, dim, data):
    """all_gather_peers' copy plan (made once per slot and call signature, run by every later call): after every
    rank's copies, each rank's outputs hold the ranks' tensors joined along ``dim`` in rank order, its own left out
    unless ``include_self``, for any shapes, dims and dtypes after one another in the slot (keys, then a mask)."""
    from mindiesd_compile.ops.peer_gather import _Layout, _Slot
    shape = data.draw(st.lists(st.integers(1, 4), min_size=dim + 1, max_size=dim + 2), label="shape")
    dtypes = data.draw(st.lists(st.sampled_from([torch.bfloat16, torch.float32, torch.bool]), min_size=1,
                                max_size=3), label="dtypes")
    xs = [[(torch.randn(shape) * 4).to(d) for d in dtypes] for _ in range(world)]  # per rank
    layout = _Layout(xs[0], dim, world, include_self)
    buffers = [torch.zeros(layout.nbytes, dtype=torch.uint8) for _ in range(world)]
    slots = [_Slot(None, _HostSymmetricMemory(buffers, rank)) for rank in range(world)]
    routes = [slot.route(layout) for slot in slots]
    assert all(slot.route(layout) is got for slot, got in zip(slots, routes))  # made once
    for rank, (sends, mine, own) in enumerate(routes):
        rows = layout.rows(xs[rank])
        for i, o, dst in sends:
            dst.copy_(rows[i][o])
        for own_rows, x in zip(own, xs[rank]):
            own_rows.copy_(x.view(own_rows.shape))
    for rank, (sends, mine, own) in enumerate(routes):
        assert len(sends) == (world - 1) * sum(r[0] for r in layout.regions)
        for i, out in enumerate(mine):
            want = torch.cat([xs[r][i] for r in range(world) if include_self or r != rank], dim=dim)
            assert torch.equal(out.view(layout.gathered[i]), want)
