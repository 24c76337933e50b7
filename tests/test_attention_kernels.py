"""Kernel choice for attention on CUDA, exercised on the CPU: FA3 where it applies, SDPA otherwise or on failure.

The CUDA kernel (``ops/attention_kernels.py``) is called directly with CPU tensors; the card's capability and
the FA3 import are replaced by stand-ins (an FA3 double computing attention in BSHD).
"""
import sys
import types

import pytest
import torch

from mindiesd_compile.ops import attention_ref
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
