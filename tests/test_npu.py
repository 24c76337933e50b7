"""target "npu": our passes inside torchair's compile, lowered to GE — checked structurally on the CPU.

torchair is the real Python from the torch-npu wheel with a test double for its C++ core
(``torchair_double.py``). What runs here: the FX -> GE conversion (GE graphs dumped and parsed), the
GE ModelDef export, and torchair's ``run_eagerly`` execution of the converted FX graph with CPU kernels
for torch_npu's ops (so a wrong layout, head count, scale or mask in our legalisation fails on
numbers). What needs an Ascend machine: GE compiling and running the graphs, the ``.air`` from CANN.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import mindiesd_compile
from mindiesd_compile import OptionsError, Report
from conftest import spawn_ranks
from tiny_models import MODELS

# torchair warns about every torch_npu op it does not find here (it registers converters lazily)
pytestmark = pytest.mark.filterwarnings("ignore:Failed to import torchair")

# Sites per tiny model (tests/tiny_models.py), whole graph: attention, rms_norm (qk-norm), rope.
SITES = {"wan": (4, 8, 4), "flux": (2, 6, 4), "hunyuan": (3, 6, 4)}
HEADS, SCALE = 2, 16 ** -0.5


def use_torchair(monkeypatch=None):
    import torchair_double
    torchair = torchair_double.load()
    import mindiesd_compile.lowering.torchair as lowering
    if monkeypatch is not None:
        monkeypatch.setattr(lowering, "import_torchair", lambda: torchair)
    else:
        lowering.import_torchair = lambda: torchair
    return torchair_double


@pytest.fixture
def torchair(monkeypatch):
    return use_torchair(monkeypatch)


def ge_graphs(dump_dir: Path):
    """Every GE graph torchair dumped as text: a list of (op type, {attribute: value as text}) per graph."""
    graphs = []
    for path in sorted(dump_dir.rglob("*.pbtxt")):
        graphs.append([])
        for block in path.read_text().split("\nnode {")[1:]:
            op_type = re.search(r'\n\s*op: "(\w+)"', block).group(1)
            attrs = dict(re.findall(r'key: "([^"\[]+)"\s*value \{\s*s: \'\w+: "?([^"\\]*)"?\\n\'', block))
            graphs[-1].append((op_type, attrs))
    return graphs


def compile_npu(name, tmp_path, **options):
    torch.manual_seed(0)
    model, kwargs = MODELS[name]()
    model.eval()
    report = Report()
    backend = lambda gm, inputs: mindiesd_compile.mindiesd_backend(gm, inputs, options={  # noqa: E731
        "target": "npu", "npu": {"run_eagerly": True, "graph_dump": str(tmp_path)}, **options}, report=report)
    with torch.no_grad():
        ref = model(**kwargs)[0]
        out = torch.compile(model, backend=backend, fullgraph=True)(**kwargs)[0]
    return (out - ref).norm().item() / ref.norm().item(), report, ge_graphs(tmp_path)


@pytest.mark.parametrize("name", sorted(SITES))
def test_models_lower_to_fused_ge_ops(torchair, tmp_path, name):
    rel, report, graphs = compile_npu(name, tmp_path, partition=False)
    (ops,) = graphs  # the whole model is one GE graph
    attention, rms_norm, rope = SITES[name]
    counts = Counter(op for op, _ in ops)
    assert rel <= 1e-5
    assert counts["FlashAttentionScore"] == attention == report.stats("npu:attention").rewritten
    assert counts["RmsNorm"] == rms_norm == report.stats("npu:rms_norm").rewritten  # the qk-norms
    # every LayerNorm, plain or inside adaLN (these models' adaLN normalise with LayerNorm)
    assert counts["LayerNormV4"] == report.stats("npu:layer_norm").rewritten + report.stats("npu:adaln").rewritten
    assert counts["RotaryMul"] == rope == report.stats("npu:rope").rewritten
    for op, attrs in ops:
        if op == "FlashAttentionScore":
            assert int(attrs["head_num"]) == HEADS and attrs["input_layout"] in ("BSH", "BNSD")
            assert float(attrs["scale_value"]) == pytest.approx(SCALE)
    assert not any(op.startswith("Aten") or "ScaledDotProduct" in op for op in counts), counts


def _sp_worker(rank, world, store, out_dir, mode):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        use_torchair()
        dump = Path(out_dir, f"rank{rank}")
        rel, report, graphs = compile_npu("wan", dump, sequence_parallel=world, sequence_parallel_mode=mode)
        per_graph = [(Counter(op for op, _ in ops), sorted({op for op, _ in ops if op.startswith("HcomAllToAll")}))
                     for ops in graphs]
        result = dict(rel=rel, ulysses=report.stats("sequence_parallel").rewritten,
                      fused=report.stats("npu:attention").rewritten,
                      blocks=[(c["FlashAttentionScore"], c["HcomAllToAll"] + c["HcomAllToAllV"], kinds,
                               c["HcomAllGather"]) for c, kinds in per_graph if c["FlashAttentionScore"]])
    except Exception as err:  # reported to the test, which asserts on it
        result = dict(error=f"{type(err).__name__}: {err}")
    Path(out_dir, f"{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


@pytest.mark.parametrize("mode", ["auto", "gather_kv"])
def test_sequence_parallel_exchanges_lower_to_hcom(tmp_path, mode):
    world = 2
    spawn_ranks(_sp_worker, (world, str(tmp_path / "store"), str(tmp_path), mode), world)
    for rank in range(world):
        result = json.loads((tmp_path / f"{rank}.json").read_text())
        assert "error" not in result, result
        assert result["rel"] <= 1e-5  # every rank returns the single-process output
        assert result["ulysses"] == 2 and result["fused"] == 4  # per block: self-attention sharded, both fused
        # The block, compiled once: FlashAttentionScore for self- and cross-attention, nothing exchanged around
        # cross-attention to the replicated text; around the self-attention, "auto" (Ulysses on the NPU): four
        # all-to-alls (q, k, v in; out back; torchair emits HcomAllToAll on CANN >= 8.2 and the equal-count
        # HcomAllToAllV otherwise, as on this CPU); gather_kv: two all-gathers (keys, values) and no all-to-all.
        (fused, a2a, kinds, all_gathers), = result["blocks"]
        assert fused == 2, result
        if mode == "gather_kv":
            assert (a2a, all_gathers) == (0, 2), result
        else:
            assert a2a == 4 and kinds in (["HcomAllToAll"], ["HcomAllToAllV"]) and all_gathers == 0, result


def test_export_writes_a_ge_model_and_manifest(torchair, tmp_path):
    torch.manual_seed(0)
    model, kwargs = MODELS["wan"]()
    path = mindiesd_compile.export(model.eval(), (), kwargs, tmp_path, target="npu")
    from torchair._ge_concrete_graph import ge_ir_pb2
    model_def = ge_ir_pb2.ModelDef()
    model_def.ParseFromString(path.read_bytes())  # what CANN's export receives, written where it writes the .air
    counts = Counter(op.type for graph in model_def.graph for op in graph.op)
    attention, rms_norm, rope = SITES["wan"]
    assert (counts["FlashAttentionScore"], counts["RmsNorm"], counts["RotaryMul"]) == (attention, rms_norm, rope)
    assert (tmp_path / "dynamo.pbtxt").exists()
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["target"] == "npu" and manifest["package"] == path.name
    assert manifest["rewrites"]["npu:attention"]["rewritten"] == attention


def test_attention_the_fused_op_cannot_take_is_decomposed_and_reported(torchair, tmp_path):
    class Biased(torch.nn.Module):  # an additive float mask that is no boolean in disguise (e.g. ALiBi)
        def forward(self, q, k, v, bias):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)

    q, k, v = (torch.randn(1, 2, 8, 16) for _ in range(3))
    bias = torch.randn(1, 2, 8, 8)
    report = Report()
    backend = lambda gm, inputs: mindiesd_compile.mindiesd_backend(gm, inputs, report=report, options={  # noqa: E731
        "target": "npu", "npu": {"run_eagerly": True, "graph_dump": str(tmp_path)}})
    with torch.no_grad():
        out = torch.compile(Biased(), backend=backend, fullgraph=True)(q, k, v, bias)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    assert (out - ref).abs().max() <= 1e-5
    stats = report.stats("npu:attention")
    assert (stats.found, stats.rewritten) == (1, 0) and "additive float mask" in stats.skipped[0]["why"]
    counts = Counter(op for ops in ge_graphs(tmp_path) for op, _ in ops)
    assert counts["FlashAttentionScore"] == 0 and counts["SoftmaxV2"] + counts["Softmax"] == 1, counts


def test_target_npu_without_torch_npu_says_what_to_install():
    model, kwargs = MODELS["wan"]()
    with pytest.raises(Exception, match=r"pip install torch-npu==2\.\d+"):  # Dynamo wraps backend errors
        with torch.no_grad():
            torch.compile(model, backend="mindiesd", options={"target": "npu"})(**kwargs)
    with pytest.raises(OptionsError, match="pip install torch-npu"):
        mindiesd_compile.export(model, (), kwargs, "unused", target="npu")


def test_importing_the_package_never_imports_torch_npu():
    code = "import sys, mindiesd_compile; print('torch_npu' in sys.modules or 'torchair' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


@pytest.mark.parametrize("npu, error", [({"mode": "ge"}, "not a torchair mode"), ({"graph_dump_type": "json"}, "valid"),
                                        ({"frozen": True}, "unknown options\\['npu'\\] key"),
                                        ({"run_eagerly": 1}, "True or False")])
def test_bad_npu_options_name_the_valid_ones(npu, error):
    with pytest.raises(OptionsError, match=error):
        mindiesd_compile.CompileOptions.from_dict({"target": "npu", "npu": npu})


def test_npu_options_with_another_target_are_an_error():
    with pytest.raises(OptionsError, match="configures target 'npu'"):
        mindiesd_compile.CompileOptions.from_dict({"target": "cuda", "npu": {"mode": "reduce-overhead"}})
