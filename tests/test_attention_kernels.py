"""Kernel choice for attention on CUDA, exercised on the CPU: FA3 where it applies, SDPA otherwise or on failure.

The CUDA kernel (``ops/attention_kernels.py``) is called directly with CPU tensors; the card's capability and
the ``flash_attn_interface`` import are replaced by stand-ins (an FA3 double computing attention in BSHD).
"""
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


@pytest.fixture
def hopper(monkeypatch):
    calls = []
    monkeypatch.setattr(K, "capability", lambda device: ((9, 0), "H100 (stand-in)"))
    monkeypatch.setattr(K, "flash_attn_3", lambda: fa3_double(calls))
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
    ("mask", "attention with a mask"), ("fp32", "(FA3 takes bf16/fp16)"), ("ampere", "sm80 is not Hopper"),
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
    monkeypatch.setattr(K, "flash_attn_3", lambda: fa3_double(calls, fail=True))
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
