"""Options are validated up front; a failing pass never makes results wrong; the backend resolves by name."""
import subprocess
import sys
import textwrap
from importlib.metadata import entry_points

import pytest
import torch
import torch.nn.functional as F

from mindiesd_compile import CompileOptions, OptionsError, PassFailedError
from mindiesd_compile.passes.rms_norm import RMSNormPass
from conftest import Compiled, rel_err


def fn(x, w):
    return F.rms_norm(x, (x.shape[-1],), w, eps=1e-6) * 2 + 1


def break_after_mutating(self, graph, anchor):
    """A pass that corrupts the graph half-way and then raises: the worst case to recover from."""
    for node in list(graph.nodes):
        if node.op == "call_function":
            node.args = tuple(reversed(node.args))
    raise RuntimeError("planted failure")


def test_failing_pass_falls_back_with_warning(monkeypatch):
    monkeypatch.setattr(RMSNormPass, "rewrite", break_after_mutating)
    x, w = torch.randn(2, 5, 16), torch.randn(16)
    with pytest.warns(RuntimeWarning, match="pass 'rms_norm' failed"):
        got = Compiled(fn, (x, w), strict=False)
    assert rel_err(got.out, fn(x, w)) <= 1e-6
    assert got.ops["rms_norm"] == 0
    assert got.report.errors == [{"pass": "rms_norm", "error": "RuntimeError: planted failure"}]


def test_failing_pass_raises_under_strict(monkeypatch):
    monkeypatch.setattr(RMSNormPass, "rewrite", break_after_mutating)
    with pytest.raises(Exception, match="pass 'rms_norm' failed") as info:
        Compiled(fn, (torch.randn(2, 5, 16), torch.randn(16)), strict=True)
    assert isinstance(info.value, PassFailedError) or isinstance(info.value.__cause__, PassFailedError) \
        or "PassFailedError" in str(info.value)


@pytest.mark.parametrize("options, message", [
    ({"targte": "cuda"}, r"unknown option\(s\) \['targte'\]; valid options: \['target'"),
    ({"target": "tpu"}, r"'tpu' is not a target; valid targets: \('cuda', 'cpu', 'eager', 'npu'\)"),
    ({"npu": {"mode": "ge"}}, r"'ge' is not a torchair mode; valid modes: \('max-autotune'"),
    ({"patterns": ["attention", "flash"]}, r"unknown pattern\(s\) \['flash'\]; valid patterns"),
    ({"strict": "yes"}, r"must be True or False"),
    ({"inductor_config": {"determinstic": True}}, r"key 'determinstic' is not an Inductor config; did you mean "
                                                   r"\['deterministic'"),
])
def test_bad_options_name_the_valid_ones(options, message):
    with pytest.raises(OptionsError, match=message):
        CompileOptions.from_dict(options)
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: x + 1, backend="mindiesd", options=options)
    with pytest.raises(Exception, match=message):
        compiled(torch.randn(3))


def test_patterns_option_limits_the_rewrites():
    x, w = torch.randn(2, 5, 16), torch.randn(16)
    got = Compiled(fn, (x, w), patterns=["attention"])
    assert got.ops["rms_norm"] == 0 and rel_err(got.out, fn(x, w)) <= 1e-6


def test_decomposition_for_inductor_keeps_only_attention():
    """On cuda/cpu the norm-like ops go back to ATen for Inductor to fuse; attention stays our op."""
    def block(x, w, q, k, v):
        return fn(x, w), F.scaled_dot_product_attention(q, k, v)
    args = (torch.randn(2, 5, 16), torch.randn(16), *(torch.randn(1, 2, 6, 8) for _ in range(3)))
    got = Compiled(block, args, target="cpu")
    assert got.report.stats("rms_norm").rewritten == 1 and got.ops["rms_norm"] == 0
    assert got.ops["attention"] == 1
    for o, r in zip(got.out, block(*args)):
        assert rel_err(o, r) <= 1e-5


def test_backend_resolves_by_name_without_import():
    assert "mindiesd" in entry_points(group="torch_dynamo_backends").names
    code = textwrap.dedent("""
        import sys, torch
        assert "mindiesd_compile" not in sys.modules
        f = torch.compile(lambda x: torch.nn.functional.rms_norm(x, (8,)), backend="mindiesd",
                          options={"target": "eager"})
        with torch.no_grad():
            out = f(torch.randn(2, 8))
        assert "mindiesd_compile" in sys.modules
        print("ok", tuple(out.shape))
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ok (2, 8)" in result.stdout


def test_default_target_follows_the_tensors():
    from mindiesd_compile.backend import infer_target
    assert infer_target([torch.randn(2)]) == "cpu"
    assert infer_target([torch.randn(2, device="meta"), 3]) == "cpu"


def test_pieces_come_from_inductors_cache_in_a_new_compile(tmp_path, monkeypatch):
    """A model split into pieces compiles each at its first run, outside Dynamo's context. Inductor's FX graph
    cache serves them to the next compile (a new process, or after torch._dynamo.reset()), with the same numbers;
    not to a compile whose options change the rewrite, nor with the sequence-parallel group changed."""
    from functools import partial
    from torch._dynamo.utils import counters
    import mindiesd_compile
    from mindiesd_compile.passes.ulysses import UlyssesPass
    from tiny_models import wan
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # cold: no earlier run's entries
    model, kwargs = wan()
    model.eval()

    def compile_once(**options):
        torch._dynamo.reset()
        counters.clear()
        rep = mindiesd_compile.Report()
        backend = partial(mindiesd_compile.mindiesd_backend, options={"target": "cpu", **options}, report=rep)
        with torch.no_grad():
            out = torch.compile(model, backend=backend, fullgraph=True)(**kwargs)[0]
        return out, rep, dict(counters["inductor"])

    first, _, cold = compile_once()
    again, report, warm = compile_once()
    _, _, other = compile_once(patterns=[p for p in mindiesd_compile.options.PATTERNS if p != "rms_norm"])
    pieces = cold["fxgraph_cache_miss"]
    assert pieces >= 3 and "fxgraph_cache_hit" not in cold and "fxgraph_cache_bypass" not in cold
    assert warm.get("fxgraph_cache_hit") == pieces and "fxgraph_cache_miss" not in warm
    assert report.cache_hits == pieces + 1 and torch.equal(first, again)  # the model's two blocks: one piece, two uses
    assert other["fxgraph_cache_miss"] >= 1 and other.get("fxgraph_cache_hit", 0) < pieces
    ulysses = lambda group: UlyssesPass(None, 2, group, [0], "gather_kv", "ahead").uuid()  # noqa: E731
    assert ulysses("0") != ulysses("1")  # the group's name is in the compiled code


def test_report_says_when_inductor_served_a_graph_from_its_cache():
    from functools import partial
    import mindiesd_compile
    f = lambda x: F.rms_norm(x, (8,)) * 2  # noqa: E731
    reports = []
    for _ in range(2):
        torch._dynamo.reset()
        rep = mindiesd_compile.Report()
        with torch.no_grad():
            torch.compile(f, backend=partial(mindiesd_compile.mindiesd_backend, options={"target": "cpu"},
                                             report=rep))(torch.randn(2, 8))
        reports.append(rep)
    first, second = reports
    assert first.stats("rms_norm").rewritten == 1 or first.cache_hits == 1  # a warm cache may serve both
    assert second.cache_hits == 1 and "Inductor's FX graph cache" in second.table()
