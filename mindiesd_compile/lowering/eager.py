"""target="eager": AOT-trace with Inductor's decompositions (the same ATen graph Inductor's post-grad
passes see), run the PassManager, and execute the result op by op. For debugging and fast tests."""
from __future__ import annotations

from torch._dynamo.backends.common import aot_autograd
from torch._inductor.decomposition import select_decomp_table
from torch._inductor.fx_passes.post_grad import view_to_reshape


def compile_eager(gm, example_inputs, manager):
    def inference(graph_module, _inputs):
        view_to_reshape(graph_module)  # as compile_fx does right before its post-grad passes
        manager(graph_module.graph, is_inference=True)
        graph_module.recompile()
        return graph_module

    def training(graph_module, _inputs):
        manager(graph_module.graph, is_inference=False)
        return graph_module

    return aot_autograd(fw_compiler=training, inference_compiler=inference,
                        decompositions=select_decomp_table())(gm, example_inputs)
