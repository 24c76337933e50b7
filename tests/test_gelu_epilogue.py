"""GELU into the GEMM (target "cuda"'s pass list, run on the CPU): tanh-GELU of a linear's output becomes one
``addmm_gelu`` op (cuBLASLt's bias+GELU epilogue on CUDA, its reference here); near-misses stay."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st

from conftest import TOL, Compiled, rel_err


def ffn(din, dff, dtype):
    torch.manual_seed(0)
    up, down = torch.nn.Linear(din, dff).to(dtype), torch.nn.Linear(dff, din).to(dtype)
    return up, down


# tokens >= 2: Inductor's CPU decompositions turn a one-row addmm into mul+sum (not so on CUDA)
@given(st.integers(1, 3), st.integers(2, 40), st.sampled_from([8, 24, 64]), st.sampled_from([16, 48]),
       st.sampled_from([torch.float32, torch.bfloat16]))
def test_linear_then_tanh_gelu_becomes_one_gemm_with_epilogue(b, s, din, dff, dtype):
    up, down = ffn(din, dff, dtype)
    fn = lambda x: down(F.gelu(up(x), approximate="tanh"))  # noqa: E731
    x = torch.randn(b, s, din, dtype=dtype)
    got = Compiled(fn, (x,), target="cuda")
    assert got.rewritten("gelu_epilogue") == 1
    assert got.ops["addmm_gelu"] == 1 and got.ops["aten.tanh"] == 0
    assert got.ops["aten.addmm"] == 1  # the down projection stays a plain addmm
    assert rel_err(got.out, fn(x)) <= TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_two_dim_input_the_gelu_reads_the_gemm_output_directly(dtype):
    up, _ = ffn(16, 32, dtype)
    fn = lambda x: F.gelu(up(x), approximate="tanh")  # noqa: E731
    x = torch.randn(12, 16, dtype=dtype)  # no reshape between the GEMM and the GELU
    got = Compiled(fn, (x,), target="cuda")
    assert got.rewritten("gelu_epilogue") == 1 and got.ops["addmm_gelu"] == 1
    assert rel_err(got.out, fn(x)) <= TOL[dtype]


def test_diffusers_feed_forward_as_wan_uses_it():
    from diffusers.models.attention import FeedForward
    torch.manual_seed(0)
    ff = FeedForward(32, inner_dim=96, activation_fn="gelu-approximate").to(torch.bfloat16)
    x = torch.randn(2, 10, 32, dtype=torch.bfloat16)
    got = Compiled(ff, (x,), target="cuda")
    assert got.rewritten("gelu_epilogue") == 1 and got.ops["addmm_gelu"] == 1
    assert rel_err(got.out, ff(x)) <= TOL[torch.bfloat16]


@pytest.mark.parametrize("case, why", [
    ("exact", None),                                         # erf GELU: not the epilogue's function, not found
    ("not_linear", "not a linear layer's output"),
    ("shared", "other users"),
    ("no_bias", "not a linear layer's output"),              # mm without bias: no addmm
    ("constant", None),                                      # tanh-GELU look-alike with another constant
])
def test_near_misses_are_left_alone(case, why):
    up, _ = ffn(16, 32, torch.float32)
    nobias = torch.nn.Linear(16, 32, bias=False)
    fns = {
        "exact": lambda x: F.gelu(up(x)),
        "not_linear": lambda x: F.gelu(x * 2, approximate="tanh"),
        "shared": lambda x: (lambda h: F.gelu(h, approximate="tanh") + h)(up(x)),
        "no_bias": lambda x: F.gelu(nobias(x), approximate="tanh"),
        "constant": lambda x: (lambda h: 0.5 * h * (1 + torch.tanh(0.8 * (h + 0.044715 * h * h * h))))(up(x)),
    }
    x = torch.randn(2, 5, 16)
    got = Compiled(fns[case], (x,), target="cuda")
    assert got.rewritten("gelu_epilogue") == 0 and got.ops["addmm_gelu"] == 0
    skipped = got.report.stats("gelu_epilogue").skipped
    assert (why in skipped[0]["why"]) if why else not skipped
    assert rel_err(got.out, fns[case](x)) <= 1e-6


def test_only_cuda_gets_the_epilogue_and_the_pattern_can_be_turned_off():
    up, _ = ffn(16, 32, torch.float32)
    fn = lambda x: F.gelu(up(x), approximate="tanh")  # noqa: E731
    x = torch.randn(2, 5, 16)
    assert Compiled(fn, (x,), target="eager").ops["addmm_gelu"] == 0
    from mindiesd_compile import PATTERNS
    off = Compiled(fn, (x,), target="cuda", patterns=[p for p in PATTERNS if p != "gelu_epilogue"])
    assert off.ops["addmm_gelu"] == 0 and off.ops["aten.tanh"] == 1
