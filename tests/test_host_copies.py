"""runtime/host_copies.py: CPU inputs the forward only copies to the device leave the graph and are copied once.

CI has no GPU: the graphs are traced with the model on the meta device (a CPU table next to it, as diffusers'
Qwen-Image keeps its RoPE tables after ``model.to("cuda")``), and the rewritten graph is then run on the CPU
against the eager model."""
import copy

import pytest
import torch

from mindiesd_compile.runtime.host_copies import HostCopies, hoist_host_copies


class WithTable(torch.nn.Module):
    def __init__(self, use):
        super().__init__()
        self.lin, self.use = torch.nn.Linear(4, 4), use
        self.table = torch.randn(4)  # a plain attribute: .to(device) leaves it on the CPU

    def forward(self, x):
        return self.use(self, x)


USES = {
    "moved": lambda m, x: m.lin(x) + m.table.to(x.device) * 2,
    "moved twice": lambda m, x: m.lin(x) * m.table.to(x.device) + m.table.to(x.device),
    # near misses: the table also read on the CPU, or converted while moved
    "read on the cpu too": lambda m, x: m.lin(x) + m.table.to(x.device) + m.table.sum().to(x.device),
    "converted": lambda m, x: m.lin(x) + m.table.to(x.device, torch.float64).float(),
}


def traced(model, x):
    graphs = []

    def keep(gm, example_inputs):
        graphs.append((gm, example_inputs))
        return gm.forward
    torch.compile(model, backend=keep, fullgraph=True)(x)
    return graphs[0]


@pytest.mark.parametrize("use", USES)
def test_only_inputs_whose_every_use_moves_them_leave_the_graph(use):
    torch.manual_seed(0)
    real = WithTable(USES[use])
    gm, example_inputs = traced(copy.deepcopy(real).to("meta"), torch.randn(2, 4, device="meta"))
    table_at = next(i for i, x in enumerate(example_inputs) if x.device.type == "cpu")
    moves = lambda: sum(n.target == "to" and n.args[0].op == "placeholder" for n in gm.graph.nodes)  # noqa: E731
    before = moves()
    moved = hoist_host_copies(gm)
    if use.startswith("moved"):
        assert moved == {table_at: torch.device("meta")} and before >= 1 and moves() == 0
        x = torch.randn(2, 4)  # the rewritten graph has no device left in it: run it on the CPU
        real_inputs = {"weight": real.lin.weight, "bias": real.lin.bias, "table": real.table}
        args = [next((v for k, v in real_inputs.items() if k in n.target), x)
                for n in gm.graph.nodes if n.op == "placeholder"]
        torch.testing.assert_close(gm(*args)[0], real(x), rtol=0, atol=0)
    else:
        assert moved == {} and moves() == before


def test_the_copy_is_made_once_per_tensor_and_version():
    seen = []
    fast = HostCopies(lambda *args: seen.append(args[1]) or args[0], {1: torch.device("meta")})
    table = torch.randn(3)
    fast("x", table), fast("x", table)
    assert seen[0].device.type == "meta" and seen[1] is seen[0]  # copied once
    table.add_(1.0)  # written in place: copied again
    fast("x", table)
    other = torch.randn(3)  # another tensor: copied again
    fast("x", other), fast("x", other)
    assert seen[2] is not seen[1] and seen[3] is not seen[2] and seen[4] is seen[3]


def test_the_backend_moves_the_table_before_compiling():
    torch.manual_seed(0)
    model = WithTable(USES["moved"]).to("meta")
    with torch.no_grad():
        out = torch.compile(model, backend="mindiesd", options={"target": "eager", "strict": True})(
            torch.randn(2, 4, device="meta"))
    assert out.shape == (2, 4) and out.device.type == "meta"
