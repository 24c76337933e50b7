"""``optimize(pipe)``: compile a diffusers pipeline's transformer(s) with the mindiesd backend and let
its denoising loop drive the cross-step cache.

Steps and CFG branches are read from the transformer's ``timestep`` input (the k-th call with one
timestep is branch k); every ``scheduler.set_timesteps`` (the first thing a pipeline call does)
starts a new generation, so back-to-back generations never share cached residuals.
"""
from __future__ import annotations

import functools

import torch
import torch.distributed as dist

from .options import OptionsError
from .runtime.cache import CacheConfig, StepCache
from .runtime.cfg_parallel import CfgParallelTransformer, NegativePrompt
from .runtime.sequence_parallel import mark_sequence_dynamic

TRANSFORMERS = ("transformer", "transformer_2")  # Wan2.2 runs two experts


def optimize(pipe, cache=None, *, cfg_parallel: int = 1, sequence_parallel: int = 1, fullgraph: bool = True,
             **options):
    """Compile ``pipe``'s transformer(s) in place; returns ``pipe`` with ``pipe.step_cache`` attached
    (the first transformer's cache: ``reset()``, ``stats``, ``memory_bytes()``).

    cache:        a dict of ``CacheConfig`` fields, a ``CacheConfig`` or a ``StepCache`` (None: no caching).
    cfg_parallel: 2 runs the conditional and unconditional branch on two rank groups at once.
    sequence_parallel: ranks sharing each sequence inside each CFG group (world size = cfg_parallel x
                  sequence_parallel); options["sequence_parallel_mode"] says how they exchange it.
    options:      further backend options (``target``, ``patterns``, ...).
    """
    cfg_group, branch, negative = _parallel_groups(cfg_parallel, sequence_parallel, options)
    if cfg_parallel > 1:
        original_encode = pipe.encode_prompt

        @functools.wraps(original_encode)
        def encode_prompt(*args, **kwargs):
            result = original_encode(*args, **kwargs)
            # (prompt, negative): a pipeline that calls the transformer once per branch (Wan); anything else
            # (SD3's four embeddings, batched into one call) leaves the negative unknown: the batch is split
            negative.value = result[1] if isinstance(result, tuple) and len(result) == 2 else None
            return result

        pipe.encode_prompt = encode_prompt
    first = cache if isinstance(cache, StepCache) else StepCache(CacheConfig.from_value(cache))
    caches = []
    for name in TRANSFORMERS:
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module):
            own = first if not caches else StepCache(first.config, first.group)  # experts keep separate state
            caches.append(own)
            compiled = torch.compile(module, backend="mindiesd", fullgraph=fullgraph, options={**options, "cache": own})
            if sequence_parallel > 1:  # joint text+image attention (Flux, ...) runs on a slice only if traced dynamic
                compiled.register_forward_pre_hook(functools.partial(mark_dynamic_hook, module), with_kwargs=True)
            if cfg_parallel > 1:
                compiled = CfgParallelTransformer(compiled, cfg_group, branch, negative,
                                                  lambda: bool(getattr(pipe, "do_classifier_free_guidance", False)))
            setattr(pipe, name, compiled)
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


def mark_dynamic_hook(model, _compiled, args, kwargs):
    """Forward pre-hook of the compiled transformer: runs before Dynamo traces the call."""
    mark_sequence_dynamic(model, kwargs)


def _parallel_groups(cfg: int, sp: int, options: dict):
    """Rank layout: sequence-parallel groups are consecutive ranks, CFG pairs are one group apart."""
    negative = NegativePrompt()
    if cfg not in (1, 2):
        raise OptionsError(f"cfg_parallel must be 1 or 2 (two CFG branches), got {cfg!r}")
    if cfg == 1 and sp == 1:
        return None, 0, negative
    if not (dist.is_available() and dist.is_initialized()):
        raise OptionsError("cfg_parallel / sequence_parallel need torch.distributed initialised first (torchrun)")
    world, rank = dist.get_world_size(), dist.get_rank()
    if world != cfg * sp:
        raise OptionsError(f"cfg_parallel={cfg} x sequence_parallel={sp} needs {cfg * sp} ranks, the world has {world}")
    sp_groups = [dist.new_group(list(range(c * sp, (c + 1) * sp))) for c in range(cfg)]  # every rank creates all
    cfg_groups = [dist.new_group(list(range(s, world, sp))) for s in range(sp)]
    if sp > 1:
        options.update(sequence_parallel=sp, parallel_group=sp_groups[rank // sp])
    return cfg_groups[rank % sp], rank // sp, negative
