"""``optimize(pipe)``: compile a diffusers pipeline's transformer(s) with the mindiesd backend and let
its denoising loop drive the cross-step cache.

Steps and CFG branches are read from the transformer's ``timestep`` input (the k-th call with one
timestep is branch k); every ``scheduler.set_timesteps`` (the first thing a pipeline call does)
starts a new generation, so back-to-back generations never share cached residuals.
"""
from __future__ import annotations

import functools

import torch

from .runtime.cache import CacheConfig, StepCache

TRANSFORMERS = ("transformer", "transformer_2")  # Wan2.2 runs two experts


def optimize(pipe, cache=None, *, fullgraph: bool = True, **options):
    """Compile ``pipe``'s transformer(s) in place; returns ``pipe`` with ``pipe.step_cache`` attached
    (the first transformer's cache: ``reset()``, ``stats``, ``memory_bytes()``).

    cache:   a dict of ``CacheConfig`` fields, a ``CacheConfig`` or a ``StepCache`` (None: no caching).
    options: further backend options (``target``, ``patterns``, ...).
    """
    first = cache if isinstance(cache, StepCache) else StepCache(CacheConfig.from_value(cache))
    caches = []
    for name in TRANSFORMERS:
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module):
            own = first if not caches else StepCache(first.config, first.group)  # experts keep separate state
            caches.append(own)
            setattr(pipe, name, torch.compile(module, backend="mindiesd", fullgraph=fullgraph,
                                              options={**options, "cache": own}))
    if not caches:
        raise ValueError(f"{type(pipe).__name__} has no transformer to optimize (looked for {TRANSFORMERS})")
    original = pipe.scheduler.set_timesteps

    @functools.wraps(original)
    def set_timesteps(*args, **kwargs):
        for c in caches:
            c.reset()
        return original(*args, **kwargs)

    pipe.scheduler.set_timesteps = set_timesteps
    pipe.step_cache = first
    return pipe
