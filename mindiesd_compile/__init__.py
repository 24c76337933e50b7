"""mindiesd-compile: a graph-compiler pass library that makes diffusion transformers fast.

    fast = torch.compile(model, backend="mindiesd", options={"target": "cuda"})
    print(mindiesd_compile.report(model, **inputs).to_dict())
"""
from __future__ import annotations

import functools

import torch

from . import ops  # noqa: F401  (registers torch.ops.mindiesd_compile.*)
from .backend import mindiesd_backend
from .options import PATTERNS, TARGETS, CompileOptions, OptionsError
from .passes.manager import PassFailedError
from .report import Report
from .lowering.export import export
from .pipeline import optimize
from .runtime.cache import CacheConfig, StepCache
from .runtime.sequence_parallel import mark_sequence_dynamic

__version__ = "0.1.0"
__all__ = ["CacheConfig", "CompileOptions", "OptionsError", "PassFailedError", "Report", "StepCache", "PATTERNS",
           "TARGETS", "export", "mark_sequence_dynamic", "mindiesd_backend", "optimize", "report"]


def report(model: torch.nn.Module, *args, options=None, **kwargs) -> Report:
    """Trace ``model(*args, **kwargs)`` through the passes (target "eager": no code generation) and
    return what was found, rewritten and left alone. The same table is logged at every compile."""
    opts = CompileOptions.from_dict(options).with_target("eager")
    result = Report(opts.patterns)
    backend = functools.partial(mindiesd_backend, options=opts, report=result)
    with torch.no_grad():
        torch.compile(model, backend=backend)(*args, **kwargs)
    return result
