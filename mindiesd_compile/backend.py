"""The ``torch.compile`` backend "mindiesd" (registered through the ``torch_dynamo_backends`` entry point).

Dynamo graph -> AOT (functionalised ATen, inference) -> PassManager -> target lowering.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch

from .options import CompileOptions, OptionsError
from .passes import PASSES, PassManager
from .report import Report

log = logging.getLogger("mindiesd_compile")


def infer_target(example_inputs) -> str:
    devices = {t.device.type for t in example_inputs if isinstance(t, torch.Tensor)}
    if "npu" in devices:
        raise OptionsError("the graph's tensors are on 'npu', but target 'npu' is not available yet in this version "
                           "of mindiesd_compile; use target 'eager' or move the model to cuda/cpu")
    return "cuda" if "cuda" in devices else "cpu"


def build_manager(options: CompileOptions, target: str, report: Report) -> PassManager:
    passes = [PASSES[name](report) for name in options.patterns]
    if target in ("cuda", "cpu"):
        from .lowering.decompose import DecomposeForInductor
        passes.append(DecomposeForInductor(report))
    key = repr((target, options.patterns, options.strict))
    return PassManager(passes, report, strict=options.strict, dump_graphs=options.dump_graphs, config_key=key)


def mindiesd_backend(gm: torch.fx.GraphModule, example_inputs, options=None, mode: Optional[str] = None,
                     report: Optional[Report] = None):
    opts = CompileOptions.from_dict(options)  # bad options fail here, before any tracing work
    target = opts.target or infer_target(example_inputs)
    report = report if report is not None else Report(opts.patterns)
    manager = build_manager(opts, target, report)
    log.debug("mindiesd_compile: target=%s patterns=%s", target, opts.patterns)
    if target == "eager":
        from .lowering.eager import compile_eager
        return compile_eager(gm, example_inputs, manager)
    from .lowering.inductor import compile_inductor
    return compile_inductor(gm, example_inputs, manager, dict(opts.inductor_config), mode)
