"""The Inductor config a piece is compiled with: CUDA defaults, and the user's ``inductor_config`` over them."""
import torch

from mindiesd_compile.lowering import inductor


def _patches(monkeypatch, **kwargs):
    seen = {}
    monkeypatch.setattr(inductor, "compile_fx", lambda gm, inputs, config_patches: seen.update(config_patches))
    inductor.compile_inductor(torch.fx.GraphModule({}, torch.fx.Graph()), [], "manager", **kwargs)
    return seen


def test_cuda_pieces_tune_their_triton_configs(monkeypatch):
    assert _patches(monkeypatch, target="cuda")["coordinate_descent_tuning"] is True
    assert "coordinate_descent_tuning" not in _patches(monkeypatch, target="cpu")


def test_user_inductor_config_wins_over_the_defaults(monkeypatch):
    seen = _patches(monkeypatch, target="cuda", config_patches={"coordinate_descent_tuning": False})
    assert seen["coordinate_descent_tuning"] is False and seen["post_grad_custom_pre_pass"] == "manager"
