"""target="cuda"/"cpu": Inductor's ``compile_fx`` with the PassManager as its post-grad custom pre-pass."""
from __future__ import annotations

from torch._inductor.compile_fx import compile_fx


def compile_inductor(gm, example_inputs, manager, config_patches=None, mode=None):
    patches = {"post_grad_custom_pre_pass": manager}
    if mode is not None:
        import torch
        patches.update(torch._inductor.list_mode_options(mode))
    patches.update(config_patches or {})
    return compile_fx(gm, example_inputs, config_patches=patches)
