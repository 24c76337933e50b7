"""qk-norm + RoPE in one op (target "cuda"'s pass list, run on the CPU with the op's reference): the chain
``rope(split_heads(rms_norm(x)))`` becomes ``rms_norm_rope``; near-misses stay; the kernel's applicability."""
import torch
from hypothesis import given, strategies as st

from conftest import TOL, Compiled, rel_err
from mindiesd_compile.ops import norm_rope as NR
from test_rope_residual import rope_wan


def wan_bf16():
    from tiny_models import wan
    model, kw = wan()
    model = model.to(torch.bfloat16).eval()
    kw = {k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in kw.items()}
    return model, kw


def test_wan_self_attention_q_and_k_each_become_one_op():
    model, kw = wan_bf16()
    from mindiesd_compile import PATTERNS
    model.rope.float()  # rotary tables in fp32, as Wan keeps them: the rope output is cast back to bf16
    got = Compiled(lambda **k: model(**k)[0], (), kw, target="cuda")
    base = Compiled(lambda **k: model(**k)[0], (), kw, target="cuda", patterns=[p for p in PATTERNS if p != "norm_rope"])
    assert got.rewritten("norm_rope") == 4 and got.ops["rms_norm_rope"] == 4  # q, k of 2 blocks
    assert got.ops["rope"] == 0 and got.ops["prims.convert_element_type"] < base.ops["prims.convert_element_type"]
    assert rel_err(got.out, model(**kw)[0]) <= TOL[torch.bfloat16]


def wan_like_chain(heads, eps, freqs_cos, freqs_sin, weight):
    """Wan's attention processor: RMSNorm across heads, split heads, rotate interleaved pairs."""
    def fn(x):
        y = torch.nn.functional.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype) * weight
        return rope_wan(y.unflatten(-1, (heads, -1)), freqs_cos, freqs_sin)
    return fn


@given(st.integers(1, 2), st.integers(2, 12), st.integers(1, 4), st.sampled_from([8, 16, 64]),
       st.floats(1e-8, 1e-3), st.sampled_from([torch.float32, torch.bfloat16]))
def test_the_chain_fuses_for_any_shape_eps_and_dtype(b, s, heads, d, eps, dtype):
    torch.manual_seed(0)
    weight = torch.randn(heads * d, dtype=dtype)
    angles = torch.rand(1, s, 1, d // 2).repeat_interleave(2, -1) * 6
    fn = wan_like_chain(heads, eps, angles.cos(), angles.sin(), weight)
    x = torch.randn(b, s, heads * d, dtype=dtype)
    got = Compiled(fn, (x,), target="cuda")
    assert got.rewritten("norm_rope") == 1 and got.ops["rms_norm_rope"] == 1
    assert rel_err(got.out, fn(x)) <= TOL[dtype]


def test_near_misses_stay_apart():
    torch.manual_seed(0)
    angles = torch.rand(1, 6, 1, 16).repeat_interleave(2, -1)
    cos, sin = angles.cos(), angles.sin()
    weight = torch.randn(64)

    def rotate(y):
        return rope_wan(y, cos, sin)

    def norm_used_twice(x):
        y = torch.nn.functional.rms_norm(x, (64,), eps=1e-6) * weight
        return rotate(y.unflatten(-1, (2, -1))) + y.unflatten(-1, (2, -1))

    def no_norm(x):
        return rotate((x * 2).unflatten(-1, (2, -1)))

    x = torch.randn(1, 6, 64)
    for fn in (norm_used_twice, no_norm):
        got = Compiled(fn, (x,), target="cuda")
        assert got.rewritten("rope") == 1 and got.ops["rms_norm_rope"] == 0  # RoPE found, left unfused
        assert "RoPE input is not" in got.report.stats("norm_rope").skipped[0]["why"]
        assert rel_err(got.out, fn(x)) <= 1e-5
    chain = wan_like_chain(2, 1e-6, angles.cos(), angles.sin(), weight)
    assert Compiled(chain, (x,), target="eager").ops["rms_norm_rope"] == 0  # a CUDA lowering only


def test_the_kernel_says_where_it_does_not_apply():
    x, w = torch.randn(1, 6, 32), torch.randn(32)
    cos = sin = torch.randn(1, 6, 1, 8)
    assert NR.why_not_kernel(x, w, torch.float32, 2, cos, sin, True) is None
    assert NR.why_not_kernel(x, w, torch.float32, 2, cos, sin, False) == "rotation by halves"
    assert "contiguous" in NR.why_not_kernel(torch.randn(1, 6, 64)[..., ::2], w, torch.float32, 2, cos, sin, True)
    assert "cos/sin" in NR.why_not_kernel(x, w, torch.float32, 2, torch.randn(6, 8), sin, True)
    assert "weight" in NR.why_not_kernel(x, None, torch.float32, 2, cos, sin, True)
