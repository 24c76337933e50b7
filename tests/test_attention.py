"""Attention rewrites: SDPA in either layout and hand-written softmax attention; near-misses left alone."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st

from conftest import TOL, Compiled, rel_err

# Sequences of 1 token are left out: Inductor's CPU decomposition turns a 1-row matmul into mul+sum.
shapes = st.integers(1, 2), st.integers(1, 3), st.integers(2, 12), st.integers(2, 12), st.sampled_from([8, 16, 32])
dtypes = st.sampled_from([torch.float32, torch.bfloat16])


def qkv(b, h, sq, sk, d, dtype, bshd=False):
    q = torch.randn(b, sq, h, d, dtype=dtype) if bshd else torch.randn(b, h, sq, d, dtype=dtype)
    k = torch.randn(b, sk, h, d, dtype=dtype) if bshd else torch.randn(b, h, sk, d, dtype=dtype)
    v = torch.randn_like(k)
    return q, k, v


@given(*shapes, dtypes)
def test_sdpa_from_bshd_projections_runs_in_bshd(b, h, sq, sk, d, dtype):
    """diffusers' processors: [B,S,H,D] tensors permuted into SDPA and back. No transposes must remain."""
    def fn(q, k, v):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2).flatten(2)

    args = qkv(b, h, sq, sk, d, dtype, bshd=True)
    got = Compiled(fn, args)
    assert got.rewritten("attention") == 1 and got.ops["attention"] == 1
    assert rel_err(got.out, fn(*args)) <= TOL[dtype]


@given(*shapes, dtypes, st.booleans())
def test_sdpa_bhsd_with_mask_and_scale(b, h, sq, sk, d, dtype, masked):
    mask = torch.randn(b, 1, sq, sk, dtype=dtype) if masked else None
    scale = 0.3
    fn = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)  # noqa: E731
    args = qkv(b, h, sq, sk, d, dtype)
    got = Compiled(fn, args)
    assert got.rewritten("attention") == 1
    assert rel_err(got.out, fn(*args)) <= TOL[dtype]


@given(*shapes, dtypes, st.booleans(), st.booleans())
def test_hand_written_attention(b, h, sq, sk, d, dtype, upcast, masked):
    mask = torch.randn(sq, sk) if masked else None

    def fn(q, k, v):
        qf, kf = (q.float(), k.float()) if upcast else (q, k)
        scores = qf @ kf.transpose(-2, -1) / math.sqrt(d)
        if mask is not None:
            scores = scores + mask.to(scores.dtype)
        return scores.softmax(-1).to(v.dtype) @ v

    args = qkv(b, h, sq, sk, d, dtype)
    got = Compiled(fn, args)
    assert got.rewritten("attention") == 1 and got.ops["attention"] == 1
    assert rel_err(got.out, fn(*args)) <= TOL[dtype]


def test_causal_sdpa_is_left_alone():
    fn = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
    args = qkv(1, 2, 6, 6, 8, torch.float32)
    got = Compiled(fn, args)
    assert got.ops["attention"] == 0
    assert got.report.stats("attention").skipped[0]["why"] == "causal attention is left to the SDPA kernel"
    assert rel_err(got.out, fn(*args)) <= 1e-6


def test_scale_applied_after_softmax_is_left_alone():
    """softmax(q k^T) * 0.5 @ v is not attention with scale 0.5: the kernel scales the logits."""
    fn = lambda q, k, v: (q @ k.transpose(-2, -1)).softmax(-1) * 0.5 @ v  # noqa: E731
    args = qkv(1, 2, 5, 7, 8, torch.float32)
    got = Compiled(fn, args)
    assert got.ops["attention"] == 0 and got.report.stats("attention").found == 1
    assert rel_err(got.out, fn(*args)) <= 1e-6


def test_softmax_over_queries_is_left_alone():
    fn = lambda q, k, v: (q @ k.transpose(-2, -1) * 0.3).softmax(-2) @ v  # noqa: E731
    args = qkv(1, 2, 5, 5, 8, torch.float32)
    got = Compiled(fn, args)
    assert got.ops["attention"] == 0
    assert rel_err(got.out, fn(*args)) <= 1e-6


def test_tensor_scale_is_left_alone():
    fn = lambda q, k, v, s: (q @ k.transpose(-2, -1) * s).softmax(-1) @ v  # noqa: E731
    args = (*qkv(1, 2, 5, 5, 8, torch.float32), torch.tensor(0.3))
    got = Compiled(fn, args)
    assert got.ops["attention"] == 0
    assert "scale is a tensor" in got.report.stats("attention").skipped[0]["why"]
    assert rel_err(got.out, fn(*args)) <= 1e-6


@pytest.mark.parametrize("layout", ["BHSD", "BSHD"])
def test_attention_op_matches_sdpa(layout):
    import mindiesd_compile  # noqa: F401
    q, k, v = qkv(2, 3, 9, 5, 16, torch.float32, bshd=layout == "BSHD")
    out = torch.ops.mindiesd_compile.attention(q, k, v, None, 0.25, layout)
    t = (lambda x: x.transpose(1, 2)) if layout == "BSHD" else (lambda x: x)
    ref = t(F.scaled_dot_product_attention(t(q), t(k), t(v), scale=0.25))
    assert rel_err(out, ref) <= 1e-6
