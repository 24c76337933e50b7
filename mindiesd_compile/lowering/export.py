"""Offline export: the optimized graph as an AOTInductor package (cuda/cpu) or a GE model (npu), plus a manifest.

cuda/cpu: ``torch.export`` traces the model, AOTInductor compiles it with the same PassManager as the
online backend (installed as Inductor's post-grad pass), and every mindiesd op, attention included, is
handed back as ATen: the package needs ``torch`` only — not mindiesd_compile, not the model's source —
to load (``torch._inductor.aoti_load_package``) and run.
npu: torchair's export path with the same passes (``torchair.py``): ``dynamo.pbtxt`` (the GE graph,
readable) and ``model.air`` (GE's offline model, written by CANN).
"""
from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any, Optional

import torch

from ..options import CompileOptions, OptionsError
from ..report import Report

EXPORT_TARGETS = ("cuda", "cpu", "npu")
_AOTI = "torch._inductor.aoti_load_package(path)(*args, **kwargs); needs torch only"
LOAD = {"cuda": _AOTI, "cpu": _AOTI,
        "npu": "GE offline model: CANN's aclmdlLoadFromFile / ATC tools; dynamo.pbtxt is the same graph as text"}


def _describe(value: Any):
    if isinstance(value, torch.Tensor):
        return {"shape": list(value.shape), "dtype": str(value.dtype).replace("torch.", ""), "device": value.device.type}
    if isinstance(value, (list, tuple)):
        return [_describe(v) for v in value]
    if isinstance(value, dict):
        return {k: _describe(v) for k, v in value.items()}
    return repr(value)


def export(model: torch.nn.Module, args=(), kwargs: Optional[dict] = None, out_dir: str | Path = "export",
           target: Optional[str] = None, options: Optional[dict] = None) -> Path:
    """Export ``model(*args, **kwargs)``; returns the package path. Writes ``model.pt2`` and ``manifest.json``."""
    from .. import __version__
    from ..backend import build_manager, infer_target

    kwargs = dict(kwargs or {})
    opts = CompileOptions.from_dict({**(options or {}), "partition": False})
    tensors = [t for t in [*args, *kwargs.values(), *model.parameters()] if isinstance(t, torch.Tensor)]
    target = target or infer_target(tensors)
    if target not in EXPORT_TARGETS:
        raise OptionsError(f"export target {target!r} is not available; valid export targets: {EXPORT_TARGETS}")
    if target == "npu":
        from .torchair import import_torchair
        import_torchair()  # no torch_npu: say what to install before tracing
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = Report(opts.patterns)
    manager = build_manager(opts, target, report, offline=True)
    if target == "npu":
        from .torchair import export_npu
        package = export_npu(model, args, kwargs, out, manager, opts.npu) or out / "dynamo.pbtxt"
    else:
        with torch.no_grad():
            program = torch.export.export(model, tuple(args), kwargs, strict=False)
            package = torch._inductor.aoti_compile_and_package(
                program, package_path=str(out / "model.pt2"),
                inductor_configs={"post_grad_custom_pre_pass": manager, **dict(opts.inductor_config)})
    versions = {"torch": torch.__version__, "mindiesd_compile": __version__, "python": platform.python_version()}
    try:
        import diffusers
        versions["diffusers"] = diffusers.__version__
    except ImportError:
        pass
    manifest = {
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "package": Path(package).name,
        "target": target,
        "inputs": {"args": _describe(list(args)), "kwargs": _describe(kwargs)},
        "options": {"patterns": list(opts.patterns), "strict": opts.strict},
        "rewrites": report.to_dict(),
        "versions": versions,
        "load": LOAD[target],
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return Path(package)
