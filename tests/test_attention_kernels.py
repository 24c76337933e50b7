"""Kernel choice for attention on CUDA, exercised on the CPU: FA3 where it applies, SDPA otherwise or on failure.

The CUDA kernel (``ops/attention_kernels.py``) is called directly with CPU tensors; the card's capability and
the FA3 import are replaced by stand-ins (an FA3 double computing attention in BSHD).
"""
import sys
import types

import pytest
import torch
from hypothesis import given, settings, strategies as st

from mindiesd_compile.ops import attention_partial_ref, attention_ref, merge_partials
from mindiesd_compile.ops import attention_kernels as K


def fa3_double(calls, fail=False):
    def flash_attn_func(q, k, v, softmax_scale=None):
        calls.append(q.shape)
        if fail:
            raise RuntimeError("no kernel image")
        out = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)),
                                                               scale=softmax_scale).transpose(1, 2)
        return out.contiguous(), None  # (out, logsumexp) as some FA3 versions return
    return flash_attn_func


BF16_FP16 = frozenset({torch.bfloat16, torch.float16})


@pytest.fixture
def hopper(monkeypatch):
    calls = []
    monkeypatch.setattr(K, "capability", lambda device: ((9, 0), "H100 (stand-in)"))
    monkeypatch.setattr(K, "flash_attn_3", lambda: K.FlashAttention3("double", fa3_double(calls), BF16_FP16))
    monkeypatch.setattr(K, "CHOICES", {})
    return calls


def qkv(layout, dtype=torch.bfloat16, s=24, h=2, d=64):
    shape = (1, s, h, d) if layout == "BSHD" else (1, h, s, d)
    g = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=g).to(dtype) for _ in range(3)]


@pytest.mark.parametrize("layout", ["BSHD", "BHSD"])
def test_fa3_runs_where_it_applies_in_the_op_layout(hopper, layout):
    q, k, v = qkv(layout)
    out = K.attention_cuda(q, k, v, None, 0.125, layout, attention_ref)
    ref = attention_ref(q, k, v, None, 0.125, layout)
    assert len(hopper) == 1 and hopper[0] == (1, 24, 2, 64)  # FA3 always sees [B, S, H, D]
    assert out.shape == ref.shape and out.stride() == ref.stride()  # the op's promised memory layout
    assert torch.allclose(out.float(), ref.float(), atol=1e-2)
    assert K.CHOICES[("H100 (stand-in)", 64, torch.bfloat16)] == "fa3"


@pytest.mark.parametrize("case, why", [
    ("mask", "attention with a mask"), ("fp32", "this FA3 build takes"), ("ampere", "sm80 is not Hopper"),
    ("missing", "not installed"), ("head_dim", "head dim > 256")])
def test_sdpa_where_fa3_does_not_apply(hopper, monkeypatch, case, why):
    q, k, v = qkv("BSHD", torch.float32 if case == "fp32" else torch.bfloat16, d=288 if case == "head_dim" else 64)
    mask = torch.ones(1, 1, 24, 24, dtype=torch.bool) if case == "mask" else None
    if case == "ampere":
        monkeypatch.setattr(K, "capability", lambda device: ((8, 0), "A100 (stand-in)"))
    if case == "missing":
        monkeypatch.setattr(K, "flash_attn_3", lambda: None)
    out = K.attention_cuda(q, k, v, mask, 0.125, "BSHD", attention_ref)
    assert torch.equal(out, attention_ref(q, k, v, mask, 0.125, "BSHD")) and not hopper
    (choice,) = K.CHOICES.values()
    assert choice.startswith("sdpa") and why in choice


def test_fa3_failure_falls_back_to_sdpa_with_one_warning(hopper, monkeypatch):
    calls = []
    monkeypatch.setattr(K, "flash_attn_3", lambda: K.FlashAttention3("double", fa3_double(calls, fail=True), BF16_FP16))
    q, k, v = qkv("BSHD")
    with pytest.warns(RuntimeWarning, match="FA3 failed"):
        out = K.attention_cuda(q, k, v, None, 0.125, "BSHD", attention_ref)
    assert torch.equal(out, attention_ref(q, k, v, None, 0.125, "BSHD")) and len(calls) == 1
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second failure for the same (card, head dim, dtype) is silent
        K.attention_cuda(q, k, v, None, 0.125, "BSHD", attention_ref)
    assert "FA3 failed" in K.CHOICES[("H100 (stand-in)", 64, torch.bfloat16)]


def test_the_op_dispatches_to_the_cuda_kernel_only_on_cuda():
    q, k, v = qkv("BSHD", torch.float32)  # CPU tensors: the reference kernel, never the CUDA selection
    out = torch.ops.mindiesd_compile.attention(q, k, v, None, 0.125, "BSHD")
    assert torch.equal(out, attention_ref(q, k, v, None, 0.125, "BSHD"))


def fake_module(monkeypatch, name, **attrs):
    monkeypatch.setitem(sys.modules, name, types.SimpleNamespace(**attrs))


@pytest.fixture
def no_fa3_installed(monkeypatch):
    for name in ("fa3_fwd_interface", "fa3_fwd_config", "flash_attn_interface"):
        monkeypatch.setitem(sys.modules, name, None)  # None in sys.modules: the import raises ImportError
    K.flash_attn_3.cache_clear()
    yield
    K.flash_attn_3.cache_clear()


def test_the_fa3_fwd_package_is_found_first_with_the_dtypes_its_build_has(no_fa3_installed, monkeypatch):
    assert K.flash_attn_3() is None
    fwd, repo = fa3_double([]), fa3_double([])
    fake_module(monkeypatch, "flash_attn_interface", flash_attn_func=repo)
    fake_module(monkeypatch, "fa3_fwd_interface", flash_attn_func=fwd)
    fake_module(monkeypatch, "fa3_fwd_config", CONFIG={"build_flags": {"FLASHATTENTION_DISABLE_FP16": True}})
    K.flash_attn_3.cache_clear()
    fa3 = K.flash_attn_3()
    assert fa3.module == "fa3_fwd_interface" and fa3.func is fwd and fa3.dtypes == {torch.bfloat16}
    q, k, v = qkv("BSHD", torch.float16)  # fp16 left out of this build: SDPA, and the reason says so
    assert K.why_not_fa3(q, k, v, None, (9, 0)).startswith("torch.float16 (this FA3 build takes")
    assert K.why_not_fa3(*qkv("BSHD"), None, (9, 0)) is None


def test_the_repo_build_is_used_when_fa3_fwd_is_absent(no_fa3_installed, monkeypatch):
    repo = fa3_double([])
    fake_module(monkeypatch, "flash_attn_interface", flash_attn_func=repo)
    fa3 = K.flash_attn_3()
    assert fa3.module == "flash_attn_interface" and fa3.dtypes == BF16_FP16


@pytest.mark.parametrize("carveout", [None, 8])
def test_fa3_leaves_free_the_sms_the_carveout_asks_for(hopper, monkeypatch, carveout):
    margins = []  # cuBLAS reads torch's SM carve-out itself; FA3 gets it as sm_margin (0/None: not passed)

    def flash_attn_func(q, k, v, softmax_scale=None, **kwargs):
        margins.append(kwargs.get("sm_margin"))
        return fa3_double([])(q, k, v, softmax_scale)
    monkeypatch.setattr(K, "flash_attn_3", lambda: K.FlashAttention3("double", flash_attn_func, BF16_FP16))
    previous = torch._C._get_sm_carveout_experimental()
    torch._C._set_sm_carveout_experimental(carveout)
    try:
        q, k, v = qkv("BSHD")
        out = K.attention_cuda(q, k, v, None, 0.125, "BSHD", attention_ref)
    finally:
        torch._C._set_sm_carveout_experimental(previous)
    assert margins == [carveout]
    assert torch.allclose(out.float(), attention_ref(q, k, v, None, 0.125, "BSHD").float(), atol=1e-2)


@pytest.mark.parametrize("layout", ["BSHD", "BHSD"])
@pytest.mark.parametrize("margin, carveout", [(0, None), (2, None), (2, 8)])
def test_partial_attention_gets_fa3s_logsumexp_and_leaves_the_sms_asked_for(hopper, monkeypatch, layout, margin,
                                                                           carveout):
    """The attention that runs beside the key/value exchange leaves ``sm_margin`` SMs (or the user's larger
    carve-out) and returns FA3's log-sum-exp ([B, H, S], asked for by ``return_attn_probs``)."""
    seen = []

    def flash_attn_func(q, k, v, softmax_scale=None, sm_margin=0, return_attn_probs=False):
        seen.append((sm_margin, return_attn_probs))  # FA3's contract on [B, S, H, D]: (out, lse [B, H, S] fp32)
        out, lse = attention_partial_ref(q, k, v, None, softmax_scale, "BSHD", 0)
        return (out, lse) if return_attn_probs else out
    monkeypatch.setattr(K, "flash_attn_3", lambda: K.FlashAttention3("double", flash_attn_func, BF16_FP16))
    previous = torch._C._get_sm_carveout_experimental()
    torch._C._set_sm_carveout_experimental(carveout)
    try:
        q, k, v = qkv(layout)
        out, lse = K.attention_partial_cuda(q, k, v, None, 0.125, layout, margin, attention_partial_ref)
    finally:
        torch._C._set_sm_carveout_experimental(previous)
    ref_out, ref_lse = attention_partial_ref(q, k, v, None, 0.125, layout, margin)
    assert seen == [(max(margin, carveout or 0), True)]
    assert out.shape == ref_out.shape and out.stride() == ref_out.stride() and lse.shape == ref_lse.shape
    assert torch.allclose(out.float(), ref_out.float(), atol=1e-2) and torch.allclose(lse, ref_lse, atol=1e-3)


@settings(deadline=None, max_examples=60)
@given(st.integers(1, 2), st.integers(1, 3), st.integers(1, 9), st.integers(2, 12), st.data(), st.sampled_from([4, 8]),
       st.sampled_from([torch.float32, torch.bfloat16]), st.sampled_from(["BSHD", "BHSD"]),
       st.sampled_from([None, "bool keys", "additive per head"]))
def test_partial_attentions_over_split_keys_merge_into_attention(b, h, sq, sk, data, d, dtype, layout, mask_kind):
    """gather_kv's overlap: attention over keys [0, cut) and over [cut, S) (each with its log-sum-exp), merged,
    is attention over all keys, for any split, shape, dtype, layout and key mask (fp32 1e-5, bf16 2e-2)."""
    cut = data.draw(st.integers(1, sk - 1))
    g = torch.Generator().manual_seed(sq * 100 + sk)
    q = torch.randn(b, sq, h, d, generator=g).to(dtype)
    k, v = (torch.randn(b, sk, h, d, generator=g).to(dtype) for _ in range(2))
    mask = None
    if mask_kind == "bool keys":  # a padding mask: each part's last key off where it has more than one
        mask = torch.ones(b, 1, 1, sk, dtype=torch.bool)
        for last, n in ((cut - 1, cut), (sk - 1, sk - cut)):
            mask[..., last] = n == 1
    elif mask_kind == "additive per head":
        mask = torch.randn(b, h, 1, sk, generator=g).to(dtype)
    if layout == "BHSD":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    keys = 1 if layout == "BSHD" else 2
    parts = [attention_partial_ref(q, k.narrow(keys, a, n), v.narrow(keys, a, n),
                                   None if mask is None else mask[..., a:a + n], 0.3, layout, 2)
             for a, n in ((0, cut), (cut, sk - cut))]
    merged = merge_partials(*parts[0], *parts[1], layout)
    ref = attention_ref(q, k, v, mask, 0.3, layout)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert merged.shape == ref.shape and merged.dtype == dtype
    assert torch.allclose(merged.float(), ref.float(), atol=tol, rtol=tol)
