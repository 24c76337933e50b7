"""The diffusers DiTs as they ship (tiny configs): every attention, qk-norm and adaLN site is rewritten,
``fullgraph=True`` holds, and outputs match eager."""
import pytest
import torch
from diffusers.models.attention import AttentionModuleMixin
from diffusers.models.attention_processor import Attention

import mindiesd_compile
from conftest import Compiled, rel_err
from tiny_models import MODELS

QK_NORMS = ("norm_q", "norm_k", "norm_added_q", "norm_added_k")
# RoPE'd attention inputs per model: (q, k) of every attention that takes rotary embeddings.
ROPE_SITES = {"wan": 4, "flux": 4, "sd3": 0, "hunyuan": 4, "cogvideox": 2, "qwen": 8}


def attention_modules(model):
    return sum(isinstance(m, (AttentionModuleMixin, Attention)) for m in model.modules())


def qk_norm_modules(model):
    return sum(1 for name, m in model.named_modules() if name.rsplit(".", 1)[-1] in QK_NORMS and m is not None)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_rewritten_and_exact(name):
    torch.manual_seed(0)
    model, kwargs = MODELS[name]()
    model.eval()
    with torch.no_grad():
        ref = model(**kwargs)[0]
    got = Compiled(model, (), kwargs)  # fullgraph=True inside
    report = got.report.to_dict()

    assert report["attention"]["rewritten"] == attention_modules(model) == got.ops["attention"]
    assert report["attention"]["skipped"] == []
    assert report["rope"]["rewritten"] == ROPE_SITES[name] == got.ops["rope"]
    assert report["rms_norm"]["rewritten"] + report["layer_norm"]["rewritten"] >= qk_norm_modules(model)
    assert report["rms_norm"]["skipped"] == report["layer_norm"]["skipped"] == []
    assert report["adaln"]["rewritten"] == report["adaln"]["found"] > 0 and report["adaln"]["skipped"] == []
    assert got.report.errors == []
    assert rel_err(got.out[0], ref) <= 1e-4


def test_report_api_on_wan():
    model, kwargs = MODELS["wan"]()
    rep = mindiesd_compile.report(model.eval(), **kwargs)
    d = rep.to_dict()
    assert set(d) >= {"attention", "rms_norm", "layer_norm", "adaln", "rope", "gated_residual"}
    for stats in d.values():
        assert set(stats) == {"found", "rewritten", "skipped"}
    assert d["attention"] == {"found": 4, "rewritten": 4, "skipped": []}


def test_wan_through_inductor_matches_eager(caplog):
    """The real lowering: Inductor with the PassManager as post-grad pass (one ~30 s CPU compile)."""
    import logging
    torch.manual_seed(0)
    model, kwargs = MODELS["wan"]()
    model.eval()
    with torch.no_grad(), caplog.at_level(logging.INFO, logger="mindiesd_compile"), \
            torch._inductor.config.patch(force_disable_caches=True):
        ref = model(**kwargs)[0]
        out = torch.compile(model, backend="mindiesd", options={"target": "cpu"}, fullgraph=True)(**kwargs)[0]
    assert rel_err(out, ref) <= 1e-4
    table = [r.getMessage() for r in caplog.records if "mindiesd_compile rewrites" in r.getMessage()]
    assert table, "the rewrite table is logged at compile time"
    line = {ln.split()[0]: ln.split()[1:3] for ln in table[-1].splitlines()[2:]}
    assert line["attention"] == ["4", "4"] and line["rope"] == ["4", "4"] and line["adaln"] == ["5", "5"]
