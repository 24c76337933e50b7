"""CFG parallelism: the conditional and unconditional branch of a step run on two rank groups at once.

Pipelines such as Wan's call the transformer twice per step, ``cond`` then ``uncond``, with the same
latents and timestep. On the ``cond`` call each rank group computes its own branch (group 0 the
prompt, group 1 the negative prompt, captured from the pipeline's ``encode_prompt``); the two noise
predictions are exchanged with one all-gather; the ``uncond`` call that follows returns the other
group's result without computing anything.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


class NegativePrompt:
    """Holds the negative prompt embeddings the pipeline encoded for the current generation."""
    value = None


class CfgParallelTransformer(torch.nn.Module):
    def __init__(self, transformer, group, branch: int, negative: NegativePrompt):
        super().__init__()
        self.inner = transformer
        self.group, self.branch, self.negative = group, branch, negative
        self._pending = None  # (latents of the cond call, uncond output) until the uncond call takes it

    def __getattr__(self, name):  # dtype, config, cache_context, ...: those of the wrapped transformer
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)

    def forward(self, *args, **kwargs):
        latents = kwargs.get("hidden_states")
        if self._pending is not None and latents is self._pending[0]:
            out, self._pending = self._pending[1], None
            return out
        negative = self.negative.value
        if negative is None or kwargs.get("return_dict", True) or args:
            return self.inner(*args, **kwargs)  # no CFG in this generation (or a call form we do not split)
        prompt = kwargs["encoder_hidden_states"]
        mine = prompt if self.branch == 0 else negative.to(device=prompt.device, dtype=prompt.dtype)
        out = self.inner(**{**kwargs, "encoder_hidden_states": mine})
        both = [torch.empty_like(out[0]) for _ in range(2)]
        dist.all_gather(both, out[0].contiguous(), group=self.group)
        self._pending = (latents, (both[1], *out[1:]))
        return (both[0], *out[1:])
