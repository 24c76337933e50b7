"""target="cuda"/"cpu": Inductor's ``compile_fx`` with the PassManager as its post-grad custom pre-pass.

Inductor's own defaults stand. Coordinate-descent tuning (``inductor_config={"coordinate_descent_tuning":
True}``) was the cuda default for a while and is not any more: on an H200 it took the Wan2.1-1.3B norm chains
19.8 -> 17.7 ms (forward 442.0 -> 438.3 ms, within noise) for a cold compile of 51.0 s instead of 16.2 s
(bench/RESULTS.md), i.e. ~0.3 s saved over a 50-step CFG generation for 35 s more compile.
"""
from __future__ import annotations

from torch._inductor.compile_fx import compile_fx

from ..ops.peer_gather import register_inductor_lowering


def compile_inductor(gm, example_inputs, manager, config_patches=None, mode=None):
    register_inductor_lowering()  # all_gather_peers as a collective (its inputs live until its wait)
    patches = {"post_grad_custom_pre_pass": manager}
    if mode is not None:
        import torch
        patches.update(torch._inductor.list_mode_options(mode))
    patches.update(config_patches or {})
    return compile_fx(gm, example_inputs, config_patches=patches)
