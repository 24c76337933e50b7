"""target="npu": the same PassManager inside torchair's compile, lowered to GE (Ascend's graph engine).

torchair (shipped inside torch_npu) AOT-traces each graph, runs its post-grad hooks and converts the
ATen graph op by op to a GE graph. We hand it two things:
- decompositions: the few Inductor decompositions our patterns are written against (norms, softmax),
  so the passes see the same ATen graph on every target; everything else stays whole for GE's own
  converters (gelu, linear, ...);
- our PassManager as ``post_grad_custom_pre_pass``: fusion rewrites, then ``LegalizeForNpu`` turns our
  ops into torch_npu's fused ops (``legalize_npu.py``).
torch_npu is imported only here, only when target "npu" is asked for.
"""
from __future__ import annotations

import functools
import warnings
from pathlib import Path
from typing import Dict, Optional

import torch

from ..options import NpuConfig, OptionsError

aten = torch.ops.aten


def import_torchair():
    """torchair, after torch_npu has registered the NPU device and its ops; a clear error without them."""
    try:
        import torch_npu  # noqa: F401
        import torchair
    except ImportError as err:
        version = torch.__version__.split("+")[0]
        raise OptionsError(
            f"target 'npu' needs torch_npu with its torchair and the CANN toolkit (Ascend NPUs): "
            f"pip install torch-npu=={version} on a machine with CANN installed ({err})") from err
    return torchair


@functools.lru_cache(1)
def pattern_decompositions() -> Dict:
    """Inductor's decompositions of the ops our fusion patterns expect in decomposed form."""
    from torch._inductor.decomposition import select_decomp_table
    table = select_decomp_table()
    ops = (aten.native_layer_norm.default, aten.rms_norm.default, aten._fused_rms_norm.default,
           aten._softmax.default, aten._safe_softmax.default)
    return {op: table[op] for op in ops if op in table}


def _as_torchair_pass(manager):
    """torchair calls its post-grad hooks as ``fn(graph_module, example_inputs, config)``."""
    def run(gm: torch.fx.GraphModule, example_inputs=None, config=None):
        from torch._inductor.fx_passes.post_grad import view_to_reshape
        view_to_reshape(gm)  # the graph our passes see on every target (compile_fx does this before its passes)
        manager(gm.graph, is_inference=True)  # torchair compiles forward graphs only through this hook
        gm.recompile()
    return run


def compiler_config(torchair, npu: NpuConfig, manager):
    config = torchair.CompilerConfig()
    config.mode = npu.mode
    config.experimental_config.frozen_parameter = npu.frozen_parameter
    if npu.graph_dump:
        config.debug.graph_dump.type = npu.graph_dump_type
        config.debug.graph_dump.path = npu.graph_dump
    config.debug.run_eagerly = npu.run_eagerly
    config.post_grad_custom_pre_pass = _as_torchair_pass(manager)
    return config


def _backend(torchair, config):
    with warnings.catch_warnings():  # get_npu_backend installs a process-wide "once" filter: keep the user's
        return torchair.get_npu_backend(compiler_config=config, custom_decompositions=pattern_decompositions())


def compile_npu(gm, example_inputs, manager, npu: NpuConfig):
    torchair = import_torchair()
    return _backend(torchair, compiler_config(torchair, npu, manager))(gm, example_inputs)


def export_npu(model: torch.nn.Module, args, kwargs, out_dir: Path, manager, npu: NpuConfig,
               name: str = "model") -> Optional[Path]:
    """The optimized graph as GE's offline model: ``<name>.air`` (CANN writes it) after torchair's
    ``dynamo.pbtxt`` dump of the GE graph. Follows ``torchair.dynamo_export`` with our decompositions
    and passes; returns the ``.air`` path when CANN wrote one, else None (the dump is still there)."""
    torchair = import_torchair()
    from torchair._ge_concrete_graph.fx2ge_converter import ExportSuccess
    config = compiler_config(torchair, npu, manager)
    config.export.export_mode = True
    config.export.export_path_dir = str(out_dir)
    config.export.export_name = name
    config.experimental_config.enable_ref_data = True
    config.export.weight_name = {id(t): n for n, t in [*model.named_buffers(), *model.named_parameters()]}
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=_backend(torchair, config), fullgraph=True, dynamic=False)
    with torch.no_grad():
        try:
            compiled(*args, **kwargs)
        except ExportSuccess:
            pass
    air = Path(out_dir, f"{name}.air")
    return air if air.exists() else None
