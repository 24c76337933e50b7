"""Offline export: the command line writes an AOTInductor package and a manifest; a fresh process that
never imports mindiesd_compile loads the package and reproduces the model's output."""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).parent


def test_export_cli_round_trip_in_a_fresh_process(tmp_path):
    out = tmp_path / "wan"
    cli = subprocess.run([sys.executable, "-m", "mindiesd_compile", "export", "tiny_models:wan_for_export", str(out),
                          "--target", "cpu"], cwd=TESTS, capture_output=True, text=True, timeout=900)
    assert cli.returncode == 0, cli.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model_class"].endswith("WanTransformer3DModel") and manifest["target"] == "cpu"
    assert manifest["rewrites"]["attention"] == {"found": 4, "rewritten": 4, "skipped": []}
    assert manifest["rewrites"]["rope"]["rewritten"] == 4 and manifest["versions"]["torch"] == torch.__version__
    assert manifest["inputs"]["kwargs"]["hidden_states"]["shape"] == [1, 4, 2, 8, 8]

    sys.path.insert(0, str(TESTS))
    from tiny_models import wan_for_export
    model, _, kwargs = wan_for_export()
    with torch.no_grad():
        reference = model(**kwargs)[0]
    torch.save({"kwargs": kwargs, "reference": reference}, tmp_path / "io.pt")
    load = textwrap.dedent(f"""
        import sys, torch
        package = torch._inductor.aoti_load_package({str(out / manifest["package"])!r})
        io = torch.load({str(tmp_path / "io.pt")!r})
        out = package(**io["kwargs"])[0]
        assert "mindiesd_compile" not in sys.modules and "diffusers" not in sys.modules
        print("rel", float((out - io["reference"]).norm() / io["reference"].norm()))
    """)
    run = subprocess.run([sys.executable, "-c", load], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert float(run.stdout.split()[-1]) <= 1e-4


def test_export_to_an_unknown_target_names_the_valid_ones():
    import mindiesd_compile
    from tiny_models import wan_for_export
    model, args, kwargs = wan_for_export()
    with pytest.raises(mindiesd_compile.OptionsError, match=r"valid export targets: \('cuda', 'cpu', 'npu'\)"):
        mindiesd_compile.export(model, args, kwargs, "unused", target="eager")
