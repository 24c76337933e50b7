"""CFG parallelism: the conditional and unconditional branch of a step run on two rank groups at once.

Pipelines such as Wan's call the transformer twice per step, ``cond`` then ``uncond``, with the same
latents and timestep. On the ``cond`` call each rank group computes its own branch (group 0 the
prompt, group 1 the negative prompt, captured from the pipeline's ``encode_prompt``); the two noise
predictions are exchanged with one all-gather; the ``uncond`` call that follows returns the other
group's result without computing anything.

Pipelines such as SD3's batch both branches into one call (``cat([negative, prompt])``, the latents
twice). There each rank group runs its half of the batch (every tensor input whose first dim is the
batch) and the halves are all-gathered back in order.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


class NegativePrompt:
    """Holds the negative prompt embeddings the pipeline encoded for the current generation."""
    value = None


class CfgParallelTransformer(torch.nn.Module):
    def __init__(self, transformer, group, branch: int, negative: NegativePrompt, batched=lambda: False):
        """``batched()``: whether the current generation batches both CFG branches into one call."""
        super().__init__()
        self.inner = transformer
        self.group, self.branch, self.negative, self.batched = group, branch, negative, batched
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
        if kwargs.get("return_dict", True) or args:
            return self.inner(*args, **kwargs)  # a call form we do not split
        prompt = kwargs.get("encoder_hidden_states")
        if negative is None or prompt is None or prompt.shape[0] != negative.shape[0]:
            # no negative prompt for this call's batch: both branches batched into one call (SD3), or no CFG
            batch = latents.shape[0] if isinstance(latents, torch.Tensor) else 1
            if batch % 2 == 0 and self.batched():
                return self._split_batch(kwargs, batch)
            return self.inner(**kwargs)
        mine = prompt if self.branch == 0 else negative.to(device=prompt.device, dtype=prompt.dtype)
        both = self._gather(self.inner(**{**kwargs, "encoder_hidden_states": mine}))
        self._pending = (latents, (both[1], *both[2:]))
        return (both[0], *both[2:])

    def _split_batch(self, kwargs, batch: int):
        half = batch // 2
        batched = [k for k, v in kwargs.items() if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == batch]
        mine = {**kwargs, **{k: kwargs[k].narrow(0, self.branch * half, half) for k in batched}}
        both = self._gather(self.inner(**mine))
        return (torch.cat(both[:2]), *both[2:])

    def _gather(self, out) -> tuple:
        """(group 0's first output, group 1's first output, the rest of this rank's outputs)."""
        both = [torch.empty_like(out[0]) for _ in range(2)]
        dist.all_gather(both, out[0].contiguous(), group=self.group)
        return (*both, *out[1:])
