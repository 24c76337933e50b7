"""optimize(pipe): a tiny WanPipeline generates on the CPU with the cache driven by its denoising loop."""
import pytest
import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

import mindiesd_compile
from conftest import rel_err


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


def _cfg_worker(rank, world, store, out_dir):
    import json
    import os
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        pipe = tiny_wan_pipeline()
        with torch.no_grad():
            reference = generate(pipe)
            mindiesd_compile.optimize(pipe, target="eager", cfg_parallel=2, sequence_parallel=world // 2)
            out = generate(pipe)
        result = dict(rel=rel_err(out, reference), calls=pipe.step_cache.runners[0].calls)
    except Exception as err:  # reported to the test
        result = dict(error=f"{type(err).__name__}: {err}")
    with open(os.path.join(out_dir, f"cfg{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])  # CFG 2 alone; CFG 2 x Ulysses 2
def test_cfg_parallel_matches_one_process(tmp_path, world):
    import json
    import torch.multiprocessing as mp
    mp.spawn(_cfg_worker, args=(world, str(tmp_path / "store"), str(tmp_path)), nprocs=world, join=True)
    for rank in range(world):
        result = json.loads((tmp_path / f"cfg{rank}.json").read_text())
        assert "error" not in result, result
        assert result["rel"] <= 1e-5
        assert result["calls"] == 6  # one transformer forward per step per rank instead of two
