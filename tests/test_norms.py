"""RMSNorm, LayerNorm and adaLN rewrites: fire exactly where they should, match eager, leave near-misses alone."""
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st

from conftest import TOL, Compiled, rel_err

dims = st.integers(1, 3), st.integers(1, 9), st.sampled_from([8, 16, 24, 64])
eps_values = st.floats(1e-8, 1e-2)
dtypes = st.sampled_from([torch.float32, torch.bfloat16])


def diffusers_rms_norm(x, weight, eps):
    """diffusers.models.normalization.RMSNorm.forward, as written there."""
    input_dtype = x.dtype
    variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
    x = x * torch.rsqrt(variance + eps)
    if weight is not None:
        if weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(weight.dtype)
        return x * weight
    return x.to(input_dtype)


@given(*dims, eps_values, dtypes, st.booleans())
def test_rms_norm_diffusers_form(b, s, c, eps, dtype, affine):
    x = torch.randn(b, s, c, dtype=dtype)
    w = torch.randn(c, dtype=dtype) if affine else None
    fn = lambda x, w: diffusers_rms_norm(x, w, eps)  # noqa: E731
    got = Compiled(fn, (x, w))
    assert got.rewritten("rms_norm") == 1 and got.ops["rms_norm"] == 1
    assert rel_err(got.out, fn(x, w)) <= TOL[dtype]


@given(*dims, eps_values, dtypes)
def test_rms_norm_torch_module(b, s, c, eps, dtype):
    norm = torch.nn.RMSNorm(c, eps=eps).to(dtype)
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(b, s, c, dtype=dtype)
    got = Compiled(norm, (x,))
    assert got.rewritten("rms_norm") == 1
    assert rel_err(got.out, norm(x)) <= TOL[dtype]


def test_rms_norm_over_wrong_dim_is_left_alone():
    x = torch.randn(2, 6, 16)
    fn = lambda x: x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + 1e-6)  # noqa: E731
    got = Compiled(fn, (x,))
    assert got.rewritten("rms_norm") == 0 and got.ops["rms_norm"] == 0
    assert "not the last dim" in got.report.stats("rms_norm").skipped[0]["why"]
    assert rel_err(got.out, fn(x)) <= 1e-6


@given(*dims, eps_values, dtypes, st.booleans())
def test_layer_norm(b, s, c, eps, dtype, affine):
    norm = torch.nn.LayerNorm(c, eps=eps, elementwise_affine=affine).to(dtype)
    if affine:
        torch.nn.init.normal_(norm.weight), torch.nn.init.normal_(norm.bias)
    x = torch.randn(b, s, c, dtype=dtype)
    got = Compiled(norm, (x,))
    assert got.rewritten("layer_norm") == 1 and got.ops["layer_norm"] == 1
    assert rel_err(got.out, norm(x)) <= TOL[dtype]


def test_fp32_layer_norm_upcast_chain():
    """diffusers' FP32LayerNorm: normalise a bf16 tensor in fp32, cast back."""
    x = torch.randn(2, 7, 32, dtype=torch.bfloat16)
    fn = lambda x: F.layer_norm(x.float(), (32,), eps=1e-6).to(x.dtype)  # noqa: E731
    got = Compiled(fn, (x,))
    assert got.rewritten("layer_norm") == 1
    assert got.out.dtype == torch.bfloat16 and rel_err(got.out, fn(x)) <= TOL[torch.bfloat16]


def test_layer_norm_over_two_dims_is_left_alone():
    x = torch.randn(2, 6, 16)
    fn = lambda x: F.layer_norm(x, (6, 16))  # noqa: E731
    got = Compiled(fn, (x,))
    assert got.rewritten("layer_norm") == 0
    assert rel_err(got.out, fn(x)) <= 1e-6


@given(*dims, eps_values, dtypes, st.sampled_from(["layer", "rms"]), st.booleans())
def test_adaln(b, s, c, eps, dtype, kind, per_token):
    x = torch.randn(b, s, c, dtype=dtype)
    mod_shape = (b, s, c) if per_token else (b, c)
    scale, shift = torch.randn(mod_shape, dtype=dtype), torch.randn(mod_shape, dtype=dtype)

    def fn(x, scale, shift):
        normed = F.layer_norm(x, (c,), eps=eps) if kind == "layer" else F.rms_norm(x, (c,), eps=eps)
        if not per_token:  # Flux/SD3 style: modulation per sample, broadcast over tokens
            return normed * (1 + scale)[:, None, :] + shift[:, None, :]
        return normed * (1 + scale) + shift

    got = Compiled(fn, (x, scale, shift))
    assert got.rewritten("adaln") == 1 and got.ops["adaln"] == 1
    assert got.ops["layer_norm"] + got.ops["rms_norm"] == 0  # the norm was folded into adaln
    assert rel_err(got.out, fn(x, scale, shift)) <= TOL[dtype]


def test_wan_adaln_fp32_chain():
    """Wan: (norm(x.float()) * (1 + scale) + shift).type_as(x) with fp32 modulation and bf16 stream."""
    x = torch.randn(1, 12, 32, dtype=torch.bfloat16)
    scale, shift = torch.randn(1, 1, 32), torch.randn(1, 1, 32)
    fn = lambda x, sc, sh: (F.layer_norm(x.float(), (32,), eps=1e-6) * (1 + sc) + sh).type_as(x)  # noqa: E731
    got = Compiled(fn, (x, scale, shift))
    assert got.rewritten("adaln") == 1 and got.out.dtype == torch.bfloat16
    assert rel_err(got.out, fn(x, scale, shift)) <= TOL[torch.bfloat16]


def test_modulation_by_scale_not_one_plus_scale_is_left_alone():
    x, scale, shift = torch.randn(2, 5, 16), torch.randn(2, 1, 16), torch.randn(2, 1, 16)
    fn = lambda x, sc, sh: F.layer_norm(x, (16,)) * sc + sh  # noqa: E731
    got = Compiled(fn, (x, scale, shift))
    assert got.rewritten("adaln") == 0 and got.ops["adaln"] == 0
    assert got.report.stats("adaln").skipped[0]["why"] == "modulation multiplies by scale, not (1 + scale)"
    assert got.rewritten("layer_norm") == 1  # the norm itself is still fused
    assert rel_err(got.out, fn(x, scale, shift)) <= 1e-5
