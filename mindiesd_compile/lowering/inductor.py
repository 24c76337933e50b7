"""target="cuda"/"cpu": Inductor's ``compile_fx`` with the PassManager as its post-grad custom pre-pass.

Inductor's own defaults stand. Coordinate-descent tuning (``inductor_config={"coordinate_descent_tuning":
True}``) was the cuda default for a while and is not any more: on an H200 it took the Wan2.1-1.3B norm chains
19.8 -> 17.7 ms (forward 442.0 -> 438.3 ms, within noise) for a cold compile of 51.0 s instead of 16.2 s
(bench/RESULTS.md), i.e. ~0.3 s saved over a 50-step CFG generation for 35 s more compile.
"""
from __future__ import annotations

import contextlib

import torch
from torch._inductor.compile_fx import compile_fx

from ..ops.peer_gather import register_inductor_lowering


def compile_inductor(gm, example_inputs, manager, config_patches=None, mode=None):
    register_inductor_lowering()  # all_gather_peers as a collective (its inputs live until its wait)
    patches = {"post_grad_custom_pre_pass": manager}
    if mode is not None:
        patches.update(torch._inductor.list_mode_options(mode))
    patches.update(config_patches or {})
    if manager.dump_graphs:  # the passes must run to write their graphs: none served from the cache
        patches["fx_graph_cache"] = False
    if torch._guards.TracingContext.try_get() is not None:  # Dynamo's call: its context and shape env
        return compile_fx(gm, example_inputs, config_patches=patches)
    with _static_shape_env():
        return compile_fx(gm, example_inputs, config_patches=patches, ignore_shape_env=True)


@contextlib.contextmanager
def _static_shape_env():
    """A piece compiled at its first run (runtime/runner.py) has no Dynamo context, and Inductor's FX graph cache
    bypasses a compile without a shape env: every process compiled every piece again, and on 4 GPUs two compiles
    of Qwen-Image differed by 3.7e-3 (bench/RESULTS.md 2026-11-28, twentieth session). An empty shape env makes it
    cacheable; ``ignore_shape_env`` keeps the compile as it was, static in every size (the runner compiles a piece
    once per set of sizes)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv
    with torch._guards.tracing(torch._guards.TracingContext(FakeTensorMode(shape_env=ShapeEnv()))):
        yield
