"""optimize(pipe): tiny Wan and SD3 pipelines generate on the CPU, with the cache driven by the denoising loop and
CFG parallelism over gloo ranks (Wan calls the transformer once per branch, SD3 batches both branches)."""
import pytest
import torch
from diffusers import (AutoencoderKL, AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline,
                       WanPipeline, WanTransformer3DModel)

import mindiesd_compile
from conftest import rel_err, spawn_ranks
from tiny_models import sd3


def tiny_wan_pipeline():
    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                        in_channels=16, out_channels=16, text_dim=32, freq_dim=32, ffn_dim=32,
                                        num_layers=3, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                        rope_max_seq_len=32)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, transformer=transformer.eval(), vae=vae.eval(),
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    return pipe


def generate(pipe, steps=6):
    g = torch.Generator().manual_seed(0)
    text = torch.randn(1, 8, 32, generator=g)
    return pipe(prompt_embeds=text, negative_prompt_embeds=torch.zeros_like(text), height=16, width=16, num_frames=5,
                num_inference_steps=steps, guidance_scale=5.0, generator=torch.Generator().manual_seed(1),
                output_type="latent").frames


def test_optimize_runs_a_tiny_wan_generation_with_cache():
    pipe = tiny_wan_pipeline()
    with torch.no_grad():
        reference = generate(pipe)
        mindiesd_compile.optimize(pipe, cache={"policy": "block", "step_start": 2, "step_interval": 2,
                                               "block_start": 1, "block_end": 3}, target="eager")
        cached = generate(pipe)
        stats = dict(pipe.step_cache.stats)
        again = generate(pipe)  # a second generation starts from a clean cache
    assert stats["calls"] == 12 and stats["generations"] == 1  # 6 steps x (cond, uncond)
    assert stats["skipped"] == 4 and pipe.step_cache.step == 5  # steps 3 and 5, both branches
    assert len(pipe.step_cache.branches) == 2
    assert torch.equal(cached, again)
    assert 0 < rel_err(cached, reference) < 0.5


def tiny_sd3_pipeline():
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8,), latent_channels=4, down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), norm_num_groups=4, layers_per_block=1)
    return StableDiffusion3Pipeline(transformer=sd3()[0].eval(), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=vae.eval(), text_encoder=None, tokenizer=None, text_encoder_2=None,
                                    tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)


def generate_sd3(pipe, steps=4):
    g = torch.Generator().manual_seed(0)
    text, pooled = torch.randn(1, 8, 32, generator=g), torch.randn(1, 32, generator=g)
    return pipe(prompt_embeds=text, negative_prompt_embeds=torch.randn(1, 8, 32, generator=g),
                pooled_prompt_embeds=pooled, negative_pooled_prompt_embeds=torch.randn(1, 32, generator=g),
                height=8, width=8, num_inference_steps=steps, guidance_scale=5.0,
                generator=torch.Generator().manual_seed(1), output_type="latent").images


PIPELINES = {"wan": (tiny_wan_pipeline, generate, 6), "sd3": (tiny_sd3_pipeline, generate_sd3, 4)}


def _cfg_worker(rank, world, name, store, out_dir):
    import json
    import os
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        make, run, _ = PIPELINES[name]
        pipe = make()
        with torch.no_grad():
            reference = run(pipe)
            # CFG 2 x 2: gather_kv inside each branch's group, the exchange beside the local attention (a subgroup's
            # all_gather_peers; "auto" on 2 ranks gathers ahead, as the sequence-parallel tests check)
            overlap = {"sequence_parallel_overlap": "split"} if world > 2 else {}
            mindiesd_compile.optimize(pipe, target="eager", cfg_parallel=2, sequence_parallel=world // 2, **overlap)
            batches = set()  # the batch each rank's compiled transformer runs
            pipe.transformer.inner.register_forward_pre_hook(
                lambda _, args, kwargs: batches.add(kwargs["hidden_states"].shape[0]), with_kwargs=True)
            out = run(pipe)
        result = dict(rel=rel_err(out, reference), calls=pipe.step_cache.runners[0].calls, batches=sorted(batches))
    except Exception as err:  # reported to the test
        result = dict(error=f"{type(err).__name__}: {err}")
    with open(os.path.join(out_dir, f"cfg{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


@pytest.mark.parametrize("name,world", [("wan", 2), ("wan", 4), ("sd3", 2), ("sd3", 4)])  # CFG 2; CFG 2 x Ulysses 2
def test_cfg_parallel_matches_one_process(tmp_path, name, world):
    """Wan: each group computes one of the two calls per step; SD3: each group its half of the batched call."""
    import json
    spawn_ranks(_cfg_worker, (world, name, str(tmp_path / "store"), str(tmp_path)), world)
    for rank in range(world):
        result = json.loads((tmp_path / f"cfg{rank}.json").read_text())
        assert "error" not in result, result
        assert result["rel"] <= 1e-5
        assert result["calls"] == PIPELINES[name][2]  # one forward of one branch per step per rank
        assert result["batches"] == [1]  # SD3 batches both branches (2 samples); each group runs its one
