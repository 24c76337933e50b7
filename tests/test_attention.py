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


def _cuda_sdpa_graph(b, h, sq, sk, d, mask_shape):
    """The ATen graph torch's SDPA front end traces on CUDA for the memory-efficient kernel: the model's mask
    padded to 8 keys and sliced back where its key count is not a multiple of 8, then expanded to [B, H, Q, K]
    (traced with fake tensors: the kernel itself has no CPU implementation)."""
    from torch.fx.experimental.proxy_tensor import make_fx
    pad = -sk % 8

    def fn(q, k, v, mask):
        m = torch.ops.aten.slice(torch.ops.aten.constant_pad_nd(mask, [0, pad]), -1, 0, sk) if pad else mask
        m = m.expand(b, h, sq, sk)
        return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, m, False)[0]
    args = (*qkv(b, h, sq, sk, d, torch.float32), torch.randn(mask_shape))
    return make_fx(fn, tracing_mode="fake")(*args), args


@given(*shapes, st.sampled_from(["key", "query-key"]))
def test_mask_expanded_for_cudas_kernel_reaches_the_op_as_the_model_built_it(b, h, sq, sk, d, kind):
    """The sequence-parallel pass follows a key mask only in the shape the model built it ([B, 1, 1, K]); CUDA's
    front end expands it to every head and query (and pads unaligned keys): the op gets the model's mask."""
    from mindiesd_compile import CompileOptions, Report
    from mindiesd_compile.backend import build_manager
    gm, (q, k, v, mask) = _cuda_sdpa_graph(b, h, sq, sk, d, (b, 1, 1, sk) if kind == "key" else (b, 1, sq, sk))
    report = Report(CompileOptions().patterns)
    build_manager(CompileOptions.from_dict({"strict": True}), "eager", report)(gm.graph)
    gm.recompile()
    attention = [n for n in gm.graph.nodes if n.target is torch.ops.mindiesd_compile.attention.default]
    assert len(attention) == 1 and attention[0].args[3].op == "placeholder"  # the mask as passed in
    assert rel_err(gm(q, k, v, mask), F.scaled_dot_product_attention(q, k, v, attn_mask=mask)) <= 1e-5


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
