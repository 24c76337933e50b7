"""The Inductor config a piece is compiled with: our passes as the post-grad pre-pass, the user's
``inductor_config`` on top, and no tuning by default (its compile time is not worth it, bench/RESULTS.md)."""
import types

import torch

from mindiesd_compile.lowering import inductor

MANAGER = types.SimpleNamespace(dump_graphs=None)  # the PassManager, as far as the config goes


def _patches(monkeypatch, manager=MANAGER, **kwargs):
    seen = {}
    monkeypatch.setattr(inductor, "compile_fx", lambda gm, inputs, config_patches, **kw: seen.update(config_patches))
    inductor.compile_inductor(torch.fx.GraphModule({}, torch.fx.Graph()), [], manager, **kwargs)
    return seen


def test_pieces_compile_with_inductors_defaults_and_our_passes(monkeypatch):
    assert _patches(monkeypatch) == {"post_grad_custom_pre_pass": MANAGER}


def test_user_inductor_config_is_applied_over_the_passes(monkeypatch):
    seen = _patches(monkeypatch, config_patches={"coordinate_descent_tuning": True})
    assert seen["coordinate_descent_tuning"] is True and seen["post_grad_custom_pre_pass"] is MANAGER


def test_dumping_graphs_compiles_without_inductors_cache(monkeypatch):
    """A graph served from the FX graph cache skips the passes, which write the dumps."""
    dumping = types.SimpleNamespace(dump_graphs="graphs/")
    assert _patches(monkeypatch, dumping) == {"post_grad_custom_pre_pass": dumping, "fx_graph_cache": False}
