"""Block partitioning, compile-once blocks, and the cross-step cache policies."""
import torch
import pytest

from mindiesd_compile import CacheConfig, StepCache
from mindiesd_compile.runtime.attention_reuse import attention_nodes, attention_variants
from conftest import rel_err
from tiny_models import MODELS, wan


class LinearBlock(torch.nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.proj = torch.nn.Linear(1, dim)

    def forward(self, x, timestep):
        return x + self.proj(timestep[:, None])[:, None, :]


class LinearBlocks(torch.nn.Module):
    """Blocks whose residual is ``timestep * w_i + b_i``: linear in the step when timesteps are."""

    def __init__(self, n=4, dim=8):
        super().__init__()
        self.blocks = torch.nn.ModuleList(LinearBlock(dim) for _ in range(n))
        self.proj_in = torch.nn.Linear(dim, dim)

    def forward(self, hidden_states, timestep):
        x = self.proj_in(hidden_states)
        for block in self.blocks:
            x = block(x, timestep)
        return x * 2


def compiled(model, cache=None, **options):
    step_cache = StepCache(cache)
    fn = torch.compile(model, backend="mindiesd", options={"target": "eager", "cache": step_cache, **options},
                       fullgraph=True)
    return fn, step_cache


def denoise(fn, model, kwargs_for, steps, branches=2):
    """Call like a CFG pipeline: ``branches`` calls per step with the same timestep. Yields (step, out, ref)."""
    with torch.no_grad():
        for step in range(steps):
            for branch in range(branches):
                kwargs = kwargs_for(step, branch)
                yield step, branch, fn(**kwargs), model(**kwargs)


def wan_inputs(layers=4):
    model, base = wan()
    if layers != 2:
        torch.manual_seed(0)
        from diffusers import WanTransformer3DModel
        model = WanTransformer3DModel(**{**model.config, "num_layers": layers})
    model.eval()
    texts = [base["encoder_hidden_states"], torch.randn_like(base["encoder_hidden_states"])]

    def kwargs_for(step, branch):
        g = torch.Generator().manual_seed(step)
        latents = base["hidden_states"] + 0.05 * step * torch.randn(base["hidden_states"].shape, generator=g)
        return dict(hidden_states=latents, timestep=torch.tensor([1000.0 - 90 * step]),
                    encoder_hidden_states=texts[branch], return_dict=False)
    return model, kwargs_for


def blocks_run(runner):
    return [label for label in runner.last_call if label.split(":")[0] in {p.label for p in runner.partition.blocks}]


def test_identical_blocks_compile_once_and_match_unpartitioned():
    model, kwargs_for = wan_inputs(layers=4)
    fn, cache = compiled(model)
    with torch.no_grad():
        out = fn(**kwargs_for(0, 0))[0]
        torch._dynamo.reset()
        whole = torch.compile(model, backend="mindiesd", options={"target": "eager", "partition": False})(
            **kwargs_for(0, 0))[0]
    runner = cache.runners[0]
    assert [p.label for p in runner.partition.pieces] == ["prologue", "blocks.0", "blocks.1", "blocks.2", "blocks.3",
                                                          "epilogue"]
    assert runner.compiler.compiles == 3  # prologue, one block for all four, epilogue
    assert runner.compiler.report.stats("attention").rewritten == 8  # counted per use: the whole model
    assert rel_err(out, whole) <= 1e-6


def test_a_graph_traced_with_dynamic_sizes_runs_every_resolution():
    """Dynamo traces the second frame count with dynamic sizes and reuses that graph for the third: its pieces
    compile once per set of sizes (before: the third call ran pieces compiled for the second and failed), and
    the report still counts each site once."""
    torch.manual_seed(0)
    model, kwargs = wan()
    fn, cache = compiled(model.eval())
    with torch.no_grad():
        for frames in (2, 4, 6):
            shape = list(kwargs["hidden_states"].shape)
            shape[2] = frames
            inputs = dict(kwargs, hidden_states=torch.randn(shape))
            assert rel_err(fn(**inputs)[0], model(**inputs)[0]) <= 1e-5, frames
    dynamic = cache.runners[-1]
    assert len(cache.runners) == 2 and dynamic.sizes  # the static trace, then the dynamic one
    assert dynamic.compiler.report.stats("attention").rewritten == 2 * model.config.num_layers


def test_two_block_lists_flux():
    model, kwargs = MODELS["flux"]()
    fn, cache = compiled(model.eval())
    with torch.no_grad():
        out, ref = fn(**kwargs)[0], model(**kwargs)[0]
    assert [p.kind for p in cache.runners[0].partition.pieces] == ["prologue", "block", "block", "epilogue"]
    assert rel_err(out, ref) <= 1e-4


def test_static_block_cache_skips_exactly_the_schedule():
    model, kwargs_for = wan_inputs(layers=4)
    cfg = CacheConfig(policy="block", step_start=2, step_interval=3, step_end=9, block_start=1, block_end=3)
    fn, cache = compiled(model, cfg)
    for step, branch, out, ref in denoise(fn, model, kwargs_for, steps=11):
        ran = blocks_run(cache.runners[0])
        assert (cache.step, cache.branch) == (step, branch)
        if cfg.is_compute_step(step):
            assert ran == ["blocks.0", "blocks.1", "blocks.2", "blocks.3"]
            assert rel_err(out[0], ref[0]) <= 1e-5  # compute steps are exact
        else:
            assert ran == ["blocks.0", "blocks.3"]
            assert rel_err(out[0], ref[0]) > 1e-6   # reused residual: an approximation
    skipped_steps = [s for s in range(11) if not cfg.is_compute_step(s)]
    assert skipped_steps == [3, 4, 6, 7]
    assert cache.stats["skipped"] == 2 * len(skipped_steps)
    assert len(cache.branches) == 2 and cache.memory_bytes() > 0


def test_attention_cache_reuses_attention_on_scheduled_steps():
    model, kwargs_for = wan_inputs(layers=3)
    cfg = CacheConfig(policy="attention", step_start=1, step_interval=2, block_start=0, block_end=2)
    fn, cache = compiled(model, cfg)
    for step, branch, out, ref in denoise(fn, model, kwargs_for, steps=6):
        ran = blocks_run(cache.runners[0])
        if cfg.is_compute_step(step):
            assert ran == ["blocks.0", "blocks.1", "blocks.2"]
            assert rel_err(out[0], ref[0]) <= 1e-5
        else:
            assert ran == ["blocks.0:reuse", "blocks.1:reuse", "blocks.2"]
            assert rel_err(out[0], ref[0]) > 1e-6


def test_attention_reuse_variant_drops_the_attention_inputs():
    model, kwargs_for = wan_inputs(layers=2)
    fn, cache = compiled(model)
    with torch.no_grad():
        fn(**kwargs_for(0, 0))
    runner = cache.runners[0]
    block = runner.partition.graph_module.get_submodule(runner.partition.blocks[0].name)
    record, reuse, n = attention_variants(block)
    linears = lambda gm: sum(1 for x in gm.graph.nodes if "linear" in str(x.target))  # noqa: E731
    assert n == 1 and len(attention_nodes(record)) == 2  # self-attention cached, cross-attention recomputed
    assert len(attention_nodes(reuse)) == 1 and len(attention_nodes(reuse, self_only=True)) == 0
    assert linears(reuse) == linears(block) - 3  # q, k, v of self-attention


@pytest.mark.parametrize("threshold, expect_skips", [(1e9, True), (1e-9, False)])
def test_dynamic_policy_skips_only_under_threshold(threshold, expect_skips):
    model, kwargs_for = wan_inputs(layers=4)
    cfg = CacheConfig(policy="dynamic", threshold=threshold, max_skips=2, probe_blocks=1)
    fn, cache = compiled(model, cfg)
    pattern = []
    for step, branch, out, ref in denoise(fn, model, kwargs_for, steps=7, branches=1):
        ran = blocks_run(cache.runners[0])
        pattern.append(len(ran) == 4)
        if len(ran) == 4:
            assert rel_err(out[0], ref[0]) <= 1e-5
        else:
            assert ran == ["blocks.0"]
    if expect_skips:  # compute, then skip at most max_skips in a row
        assert pattern == [True, False, False, True, False, False, True]
    else:
        assert all(pattern) and cache.stats["skipped"] == 0


def test_forecast_is_exact_for_linear_residuals_and_differs_from_reuse():
    torch.manual_seed(0)
    model = LinearBlocks().eval()
    x = torch.randn(1, 3, 8)
    kwargs_for = lambda step, branch: dict(hidden_states=x, timestep=torch.tensor([900.0 - 100 * step]))  # noqa
    schedule = dict(step_start=2, step_interval=3, block_start=1, block_end=4)
    fn, cache = compiled(model, CacheConfig(policy="forecast", **schedule))
    torch._dynamo.reset()
    reuse_fn, _ = compiled(model, CacheConfig(policy="block", **schedule))
    for step, branch, out, ref in denoise(fn, model, kwargs_for, steps=8, branches=1):
        reused = reuse_fn(**kwargs_for(step, branch))
        assert rel_err(out, ref) <= 1e-5  # first-order extrapolation of a linear residual is exact
        if step in (3, 4, 6, 7):
            assert rel_err(reused, ref) > 1e-3  # plain reuse is not
    assert cache.stats["skipped"] == 4


@pytest.mark.parametrize("policy", ["none", "block", "attention", "dynamic", "forecast"])
def test_fifty_steps_no_recompiles(policy):
    from torch._dynamo.utils import counters
    torch.manual_seed(0)
    model, kwargs_for = wan_inputs(layers=2)
    counters.clear()
    fn, cache = compiled(model, CacheConfig(policy=policy, block_start=0, block_end=2, threshold=0.5))
    for _ in denoise(fn, lambda **kw: None, kwargs_for, steps=50):
        pass
    assert counters["stats"]["unique_graphs"] == 1
    assert sum(counters["recompiles"].values()) == 0
    assert cache.stats["calls"] == (0 if policy == "none" else 100)  # caching off: no step tracking at all


def test_new_generation_resets_state():
    model, kwargs_for = wan_inputs(layers=2)
    fn, cache = compiled(model, CacheConfig(policy="block", block_start=0, block_end=2))
    with torch.no_grad():
        for step in range(3):
            fn(**kwargs_for(step, 0))
        assert cache.step == 2 and cache.memory_bytes() > 0
        fn(**kwargs_for(0, 0))  # the timestep jumps back up: a new generation
    assert cache.step == 0 and cache.stats["generations"] == 2
    cache.reset()
    assert cache.memory_bytes() == 0 and cache.step == -1


def test_bad_cache_options():
    from mindiesd_compile import OptionsError
    with pytest.raises(OptionsError, match="valid policies"):
        CacheConfig(policy="teacache")
    with pytest.raises(OptionsError, match=r"unknown cache option\(s\) \['interval'\]"):
        CacheConfig.from_value({"policy": "block", "interval": 2})
    with pytest.raises(OptionsError, match="needs options\\['partition'\\]=True"):
        from mindiesd_compile import CompileOptions
        CompileOptions.from_dict({"cache": {"policy": "block"}, "partition": False})
    model, kwargs_for = wan_inputs(layers=2)
    fn, _ = compiled(model, CacheConfig(policy="block", block_start=0, block_end=5))
    with pytest.raises(Exception, match=r"does not fit the model's 2 blocks"):
        with torch.no_grad():
            fn(**kwargs_for(0, 0))


def test_configure_switches_policy_without_recompiling():
    from torch._dynamo.utils import counters
    model, kwargs_for = wan_inputs(layers=3)
    counters.clear()
    fn, cache = compiled(model)
    with torch.no_grad():
        fn(**kwargs_for(0, 0))
        cache.configure({"policy": "block", "block_start": 0, "block_end": 3, "step_start": 1})
        for step in range(4):
            fn(**kwargs_for(step, 0))
    assert cache.stats["skipped"] == 1  # step 2 (steps 1 and 3 compute with interval 2 from step 1)
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("name", ["flux", "hunyuan", "qwen"])
def test_block_cache_on_two_stream_models(name):
    """Joint text+image blocks carry two residual streams; a cached range must reproduce both."""
    torch.manual_seed(0)
    model, kwargs = MODELS[name]()
    model.eval()
    fn, cache = compiled(model, CacheConfig(policy="block", step_start=1, step_interval=2, block_start=0,
                                            block_end=2))
    key = "timestep"
    base_t = kwargs[key]
    with torch.no_grad():
        for step in range(4):
            kw = dict(kwargs, **{key: base_t * (1 - 0.2 * step)})
            out, ref = fn(**kw)[0], model(**kw)[0]
            if cache.config.is_compute_step(step):
                assert rel_err(out, ref) <= 1e-4
            else:
                assert blocks_run(cache.runners[0]) == [] and rel_err(out, ref) < 1
    assert cache.stats["skipped"] == 1
