"""target="cuda"/"cpu": Inductor's ``compile_fx`` with the PassManager as its post-grad custom pre-pass."""
from __future__ import annotations

from torch._inductor.compile_fx import compile_fx

# Per-kernel Triton launch configs found by benchmarking (coordinate descent) on CUDA: the LayerNorm chains of
# a Wan2.1-1.3B forward 22.0 -> 18.0 ms on an H100 (bench/RESULTS.md). options["inductor_config"] overrides.
CUDA_DEFAULTS = {"coordinate_descent_tuning": True}


def compile_inductor(gm, example_inputs, manager, config_patches=None, mode=None, target="cuda"):
    patches = {"post_grad_custom_pre_pass": manager, **(CUDA_DEFAULTS if target == "cuda" else {})}
    if mode is not None:
        import torch
        patches.update(torch._inductor.list_mode_options(mode))
    patches.update(config_patches or {})
    return compile_fx(gm, example_inputs, config_patches=patches)
