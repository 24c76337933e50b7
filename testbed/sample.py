"""Load the shipped checkpoint with diffusers' own loading code and sample videos with the default flow
scheduler (``FlowMatchEulerDiscreteScheduler``), 50 steps, classifier-free guidance (conditional call, then
unconditional call with the null condition, per step, as Wan pipelines do)."""
from __future__ import annotations

import torch

from . import CHECKPOINT
from . import videos as V

STEPS = 50
GUIDANCE = 3.0
SHIFT = 3.0  # the scheduler's sigma shift; must match the t distribution the weights were trained with (train.py --t-shift)


def load(path=None, device="cpu", dtype=torch.float32):
    """``WanTransformer3DModel.from_pretrained`` of ``path`` (default: the shipped ``testbed/checkpoint``).

    diffusers refuses to load a model with ``_keep_in_fp32_modules`` (Wan has some) when ``accelerate`` is not
    installed; then the weights are loaded in float32 (where keeping modules in float32 changes nothing) with
    that attribute cleared for the call, and cast to ``dtype`` keeping those modules in float32 as diffusers
    would."""
    from diffusers import WanTransformer3DModel
    from diffusers.utils import is_accelerate_available
    if is_accelerate_available():
        model = WanTransformer3DModel.from_pretrained(str(path or CHECKPOINT), torch_dtype=dtype)
    else:
        keep = WanTransformer3DModel._keep_in_fp32_modules
        WanTransformer3DModel._keep_in_fp32_modules = None
        try:
            model = WanTransformer3DModel.from_pretrained(str(path or CHECKPOINT), torch_dtype=torch.float32)
        finally:
            WanTransformer3DModel._keep_in_fp32_modules = keep
        if dtype != torch.float32:
            model.to(dtype)
            for name, p in model.named_parameters():
                if any(k in name.split(".") for k in keep or ()):
                    p.data = p.data.float()
    return model.to(device).eval().requires_grad_(False)


def model_input(x: torch.Tensor, in_channels: int) -> torch.Tensor:
    """What the transformer takes: the (noisy) video, plus the frame-index channel for a 4-input model."""
    return V.with_frame_index(x) if in_channels == 4 else x


def scheduler(shift: float = SHIFT):
    from diffusers import FlowMatchEulerDiscreteScheduler
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


def noise(n: int, seed: int) -> torch.Tensor:
    """Initial noise for ``n`` videos, drawn on the CPU so every device starts from the same numbers."""
    return torch.randn(n, 3, V.FRAMES, V.SIZE, V.SIZE, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def sample(model, cond: torch.Tensor, seed: int = 0, steps: int = STEPS, guidance: float = GUIDANCE,
           device=None, dtype=torch.float32, transformer=None, shift: float = SHIFT) -> torch.Tensor:
    """Videos ``[B, 3, F, H, W]`` in [-1, 1] for conditions ``cond`` ``[B, 3]``.

    ``transformer`` (default ``model``) is what gets called, e.g. ``torch.compile(model, backend="mindiesd")``;
    it is called once per step (``guidance == 1``) or twice (conditional, then unconditional)."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    fn = transformer if transformer is not None else model
    b = cond.shape[0]
    sched = scheduler(shift)
    sched.set_timesteps(steps, device=device)
    x = noise(b, seed).to(device)
    text = V.encode(cond.to(device), dtype=dtype)
    null = V.null_tokens(b, device=device, dtype=dtype)
    for t in sched.timesteps:
        ts = t.expand(b).to(device)
        inp = model_input(x.to(dtype), model.config.in_channels)
        v = fn(hidden_states=inp, timestep=ts, encoder_hidden_states=text, return_dict=False)[0].float()
        if guidance != 1.0:
            u = fn(hidden_states=inp, timestep=ts, encoder_hidden_states=null, return_dict=False)[0].float()
            v = u + guidance * (v - u)
        x = sched.step(v, t, x).prev_sample
    return x.clamp(-1, 1)
