"""RoPE (all three spellings) and gated-residual rewrites, with their near-misses."""
import pytest
import torch
from hypothesis import given, strategies as st

from conftest import TOL, Compiled, rel_err

sizes = st.integers(1, 2), st.integers(1, 9), st.integers(1, 3), st.sampled_from([4, 8, 16, 32])
dtypes = st.sampled_from([torch.float32, torch.bfloat16])


def rope_stack(x, cos, sin):
    """diffusers apply_rotary_emb(use_real=True, use_real_unbind_dim=-1): Flux, HunyuanVideo, CogVideoX."""
    x_real, x_imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    rotated = torch.stack([-x_imag, x_real], dim=-1).flatten(3)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def rope_half(x, cos, sin):
    """use_real_unbind_dim=-2: rotate halves."""
    x_real, x_imag = x.reshape(*x.shape[:-1], 2, -1).unbind(-2)
    rotated = torch.cat([-x_imag, x_real], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def rope_wan(x, freqs_cos, freqs_sin):
    """diffusers' WanAttnProcessor apply_rotary_emb, as written there."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = freqs_cos[..., 0::2], freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


def rope_wan_inline(x, freqs_cos, freqs_sin):
    """Wan's rotation with the tables sliced inline in each product (two slice nodes per table)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * freqs_cos[..., 0::2] - x2 * freqs_sin[..., 1::2]
    out[..., 1::2] = x1 * freqs_sin[..., 1::2] + x2 * freqs_cos[..., 0::2]
    return out.type_as(x)


def rope_complex(x, freqs):
    """Qwen-Image: complex multiply."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * freqs).flatten(3).type_as(x)


def tables(s, d):
    angles = torch.randn(s, d // 2)
    return angles.cos().repeat_interleave(2, -1), angles.sin().repeat_interleave(2, -1), angles


@given(*sizes, dtypes, st.sampled_from(["stack", "half", "wan", "wan_inline", "complex"]))
def test_rope_forms(b, s, h, d, dtype, form):
    x = torch.randn(b, s, h, d, dtype=dtype)
    cos, sin, angles = tables(s, d)
    if form == "stack":
        fn, args = rope_stack, (x, cos[:, None], sin[:, None])
    elif form == "half":
        half = torch.randn(s, d // 2)
        fn, args = rope_half, (x, torch.cat([half.cos()] * 2, -1)[:, None], torch.cat([half.sin()] * 2, -1)[:, None])
    elif form in ("wan", "wan_inline"):
        fn = rope_wan if form == "wan" else rope_wan_inline
        args = (x, cos[None, :, None], sin[None, :, None])
    else:
        fn, args = rope_complex, (x, torch.polar(torch.ones_like(angles), angles)[:, None])
    got = Compiled(fn, args)
    assert got.rewritten("rope") == 1 and got.ops["rope"] == 1
    assert rel_err(got.out, fn(*args)) <= TOL[dtype]


def swap_without_negation(x, cos, sin):
    a, b = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    swapped = torch.stack([b, a], dim=-1).flatten(3)  # no minus sign: not a rotation
    return x * cos + swapped * sin


def rotate_rows(x, cos, sin):
    rolled = torch.cat([-x[:, 1:], x[:, :1]], dim=1)  # rotates tokens, not the head dim
    return x * cos + rolled * sin


@pytest.mark.parametrize("fn", [swap_without_negation, rotate_rows])
def test_near_miss_rotations_are_not_rope(fn):
    x = torch.randn(1, 6, 2, 8)
    cos, sin, _ = tables(6, 8)
    got = Compiled(fn, (x, cos[:, None], sin[:, None]))
    assert got.ops["rope"] == 0
    assert rel_err(got.out, fn(x, cos[:, None], sin[:, None])) <= 1e-6


@given(st.integers(1, 3), st.integers(1, 9), st.sampled_from([8, 32]), dtypes, st.booleans())
def test_gated_residual(b, s, c, dtype, gate_first):
    x, y, gate = torch.randn(b, s, c, dtype=dtype), torch.randn(b, s, c, dtype=dtype), torch.randn(b, 1, c, dtype=dtype)
    fn = (lambda x, y, g: x + g * y) if gate_first else (lambda x, y, g: x + y * g)
    got = Compiled(fn, (x, y, gate))
    assert got.rewritten("gated_residual") == 1 and got.ops["gated_residual"] == 1
    assert rel_err(got.out, fn(x, y, gate)) <= TOL[dtype]


def test_broadcast_residual_is_left_alone():
    bias, y, gate = torch.randn(1, 1, 16), torch.randn(2, 5, 16), torch.randn(2, 1, 16)
    fn = lambda b, y, g: b + y * g  # noqa: E731
    got = Compiled(fn, (bias, y, gate))
    assert got.ops["gated_residual"] == 0
    assert rel_err(got.out, fn(bias, y, gate)) <= 1e-6


def test_tables_sliced_inline_twice_are_the_same_factor():
    x = torch.randn(1, 6, 2, 8)
    cos, sin, _ = tables(6, 8)
    args = (x, cos[None, :, None], sin[None, :, None])
    got = Compiled(rope_wan_inline, args)
    assert got.rewritten("rope") == 1 and got.ops["rope"] == 1
    assert rel_err(got.out, rope_wan_inline(*args)) <= 1e-5
