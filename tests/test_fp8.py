"""Opt-in FP8 attention and linear layers: the rewrites fire only when asked and only where they apply; the
numerics are the operands rounded to e4m3 with per-head / per-row scales; the CUDA kernel choices (FA3 FP8,
torch._scaled_mm, or bf16) are exercised with stand-ins for the card and the kernels (CI has no GPU)."""
import pytest
import torch
from hypothesis import given, strategies as st

from conftest import Compiled, rel_err
from mindiesd_compile import CompileOptions, OptionsError
from mindiesd_compile.ops import attention_ref
from mindiesd_compile.ops import attention_kernels as K
from mindiesd_compile.ops import fp8_attention as F8
from mindiesd_compile.ops import fp8_linear as FL


def wan_blocks(dtype=torch.float32):
    from tiny_models import wan
    model, kw = wan()
    model = model.to(dtype).eval()
    kw = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in kw.items()}
    return model, kw


def test_fp8_attention_rewrites_every_unmasked_site_of_wan_and_stays_close():
    model, kw = wan_blocks()
    ref = model(**kw)[0]
    got = Compiled(lambda **k: model(**k)[0], (), kw, fp8={"attention": True})
    assert got.rewritten("attention") == 4 and got.rewritten("fp8_attention") == 4
    assert got.ops["attention_fp8"] == 4 and got.ops["attention"] == 0
    err = rel_err(got.out, ref)
    assert 1e-4 < err < 5e-2  # the rounding happened (fp32 model) and costs what e4m3 costs


def test_fp8_is_never_on_by_default():
    model, kw = wan_blocks()
    got = Compiled(lambda **k: model(**k)[0], (), kw)
    assert got.ops["attention_fp8"] == 0 and got.ops["attention"] == 4


def test_masked_attention_stays_bf16():
    q, k, v = (torch.randn(1, 2, 12, 16) for _ in range(3))
    mask = torch.rand(1, 1, 12, 12) > 0.3
    mask[..., 0] = True
    fn = lambda q, k, v, m: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=m)  # noqa: E731
    got = Compiled(fn, (q, k, v, mask), fp8={"attention": True})
    assert got.ops["attention"] == 1 and got.ops["attention_fp8"] == 0
    assert "mask" in got.report.stats("fp8_attention").skipped[0]["why"]
    assert rel_err(got.out, fn(q, k, v, mask)) <= 1e-5


@pytest.mark.parametrize("fp8, error", [
    ({"attention": "yes"}, "must be True or False"), ({"linear": 1}, "must be True or False"),
    ({"gemm": True}, r"unknown options\['fp8'\] key"),
    ("on", "must be a dict of Fp8Config fields")])
def test_bad_fp8_options(fp8, error):
    with pytest.raises(OptionsError, match=error):
        CompileOptions.from_dict({"fp8": fp8})


def test_fp8_for_npu_is_refused_before_any_work():
    with pytest.raises(OptionsError, match="no NPU kernels"):
        CompileOptions.from_dict({"fp8": {"attention": True}, "target": "npu"})


@given(st.integers(1, 2), st.integers(1, 20), st.integers(1, 3), st.sampled_from([16, 64]),
       st.floats(1e-3, 1e3), st.sampled_from([torch.float32, torch.bfloat16]))
def test_per_head_quantisation_error_is_e4m3s(b, s, h, d, magnitude, dtype):
    t = (torch.randn(b, s, h, d) * magnitude).to(dtype)
    t8, scale = F8.quantize_per_head(t)
    assert t8.dtype == torch.float8_e4m3fn and t8.float().abs().max() <= 448
    back = t8.float() * scale[:, None, :, None]
    bound = torch.maximum(t.float().abs() * 2 ** -4, scale[:, None, :, None] * 2 ** -10)  # half an e4m3 step
    assert (back - t.float()).abs().le(bound * 1.01 + 1e-30).all()
    amax = t.float().abs().amax(dim=(1, 3))
    assert torch.allclose(t8.float().abs().amax(dim=(1, 3)), torch.full_like(amax, 448.0))  # full range used


# --- the CUDA kernel choice, with stand-ins --------------------------------------------------------------

def fa3_fp8_double(calls, fail=False):
    def flash_attn_func(q, k, v, softmax_scale=None, q_descale=None, k_descale=None, v_descale=None):
        calls.append((q.dtype, tuple(q_descale.shape)))
        if fail:
            raise RuntimeError("no FP8 kernel image")
        deq = [t.float() * s[:, None, :, None] for t, s in ((q, q_descale), (k, k_descale), (v, v_descale))]
        return attention_ref(*(t.to(torch.bfloat16) for t in deq), None, softmax_scale, "BSHD")
    return flash_attn_func


@pytest.fixture
def hopper(monkeypatch):
    calls = []
    monkeypatch.setattr(K, "capability", lambda device: ((9, 0), "H100 (stand-in)"))
    monkeypatch.setattr(K, "flash_attn_3", lambda: K.FlashAttention3("double", fa3_fp8_double(calls),
                                                                      frozenset({torch.bfloat16})))
    monkeypatch.setattr(F8, "quantize_cuda", F8.quantize_per_head)  # the Triton kernels need a GPU
    monkeypatch.setattr(K, "CHOICES", {})
    return calls


@pytest.mark.parametrize("layout", ["BSHD", "BHSD"])
def test_fa3_fp8_gets_e4m3_inputs_and_per_head_descales(hopper, layout):
    shape = (1, 24, 2, 64) if layout == "BSHD" else (1, 2, 24, 64)
    q, k, v = (torch.randn(shape).to(torch.bfloat16) for _ in range(3))
    out = F8.attention_fp8_cuda(q, k, v, None, 0.125, layout)
    ref = F8.attention_fp8_ref(q, k, v, None, 0.125, layout)
    assert hopper == [(torch.float8_e4m3fn, (1, 2))]
    assert out.shape == ref.shape and out.stride() == ref.stride() and out.dtype == torch.bfloat16
    assert rel_err(out, ref) <= 1e-2
    assert K.CHOICES[("H100 (stand-in)", 64, torch.float8_e4m3fn)] == "fa3-fp8"


def test_without_the_fp8_kernel_attention_runs_bf16_and_says_why(hopper, monkeypatch):
    monkeypatch.setattr(K, "capability", lambda device: ((8, 0), "A100 (stand-in)"))
    q, k, v = (torch.randn(1, 24, 2, 64).to(torch.bfloat16) for _ in range(3))
    out = F8.attention_fp8_cuda(q, k, v, None, 0.125, "BSHD")
    assert torch.equal(out, attention_ref(q, k, v, None, 0.125, "BSHD")) and not hopper
    assert K.CHOICES[("A100 (stand-in)", 64, torch.float8_e4m3fn)] == "bf16: sm80 is not Hopper"


def test_fp8_kernel_failure_falls_back_to_bf16_with_one_warning(hopper, monkeypatch):
    calls = []
    monkeypatch.setattr(K, "flash_attn_3", lambda: K.FlashAttention3("double", fa3_fp8_double(calls, fail=True),
                                                                      frozenset({torch.bfloat16})))
    q, k, v = (torch.randn(1, 24, 2, 64).to(torch.bfloat16) for _ in range(3))
    with pytest.warns(RuntimeWarning, match="FA3 FP8 failed"):
        out = F8.attention_fp8_cuda(q, k, v, None, 0.125, "BSHD")
    assert torch.equal(out, attention_ref(q, k, v, None, 0.125, "BSHD"))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        F8.attention_fp8_cuda(q, k, v, None, 0.125, "BSHD")


# --- FP8 linear layers ---------------------------------------------------------------------------------------

def test_fp8_linear_rewrites_the_token_gemms_of_a_bf16_wan_and_rounds_each_input_once():
    model, kw = wan_blocks(torch.bfloat16)
    ref = model(**kw)[0]
    got = Compiled(lambda **k: model(**k)[0], (), kw, fp8={"linear": True})
    stats = got.report.stats("fp8_linear")
    # per block: self q/k/v/o, cross q/o, FFN up/down over the 32 video tokens (x2 blocks), and proj_out;
    # the timestep (1 row) and text (8 rows) projections stay bf16
    assert stats.rewritten == got.ops["scaled_linear"] >= 17
    assert stats.found == stats.rewritten + len(stats.skipped)
    assert all("too few for an FP8 GEMM" in s["why"] for s in stats.skipped) and stats.skipped
    assert got.ops["quantize_rows"] == stats.rewritten - 4  # q, k and v of each block's self-attention share one
    assert got.ops["attention_fp8"] == 0 and got.ops["attention"] == 4  # attention untouched
    assert rel_err(got.out, ref) < 0.1


def test_fp8_linear_near_misses():
    w, wb, w12 = torch.randn(32, 16), torch.randn(32, 16, dtype=torch.bfloat16), torch.randn(32, 12).bfloat16()
    fns = {"float32 model": (lambda x: torch.nn.functional.linear(x, w), torch.float32, 16),
           "not a parameter": (lambda x: x @ (wb * 2).t(), torch.bfloat16, 16),
           "not a multiple of 16": (lambda x: torch.nn.functional.linear(x, w12), torch.bfloat16, 12)}
    for why, (fn, dtype, k) in fns.items():
        x = torch.randn(40, k, dtype=dtype)
        got = Compiled(fn, (x,), fp8={"linear": True})
        assert got.ops["scaled_linear"] == 0, why
        assert why in got.report.stats("fp8_linear").skipped[0]["why"]
        assert rel_err(got.out, fn(x)) <= 1e-5


@given(st.integers(1, 50), st.sampled_from([16, 48]), st.floats(1e-3, 1e3))
def test_row_quantisation_error_is_e4m3s(rows, cols, magnitude):
    x = (torch.randn(rows, cols) * magnitude).to(torch.bfloat16)
    x8, scale = FL.quantize_rows(x)
    back = x8.float() * scale
    bound = torch.maximum(x.float().abs() * 2 ** -4, scale * 2 ** -10)
    assert (back - x.float()).abs().le(bound * 1.01 + 1e-30).all()
    assert torch.allclose(x8.float().abs().amax(-1), torch.full((rows,), 448.0))


@pytest.fixture
def scaled_mm_double(monkeypatch):
    calls = {"gemm": []}

    def scaled_mm(a, b, scale_a, scale_b, bias=None, out_dtype=None, use_fast_accum=False):
        calls["gemm"].append((a.dtype, b.dtype, tuple(scale_a.shape), tuple(scale_b.shape), b.stride()))
        out = (a.float() * scale_a) @ (b.float() * scale_b)
        return (out if bias is None else out + bias.float()).to(out_dtype)
    monkeypatch.setattr(K, "capability", lambda device: ((9, 0), "H100 (stand-in)"))
    monkeypatch.setattr(torch, "_scaled_mm", scaled_mm)
    monkeypatch.setattr(FL, "_WEIGHTS", {})
    monkeypatch.setattr(FL, "CHOICES", {})
    return calls


def test_scaled_mm_gets_rowwise_e4m3_operands_and_each_weight_is_rounded_once(scaled_mm_double):
    x8, xs = FL.quantize_rows(torch.randn(40, 32, dtype=torch.bfloat16))
    w = torch.nn.Parameter(torch.randn(48, 32, dtype=torch.bfloat16), requires_grad=False)
    b = torch.randn(48, dtype=torch.bfloat16)
    out = FL.scaled_linear_cuda(x8, xs, w, b, torch.bfloat16)
    assert scaled_mm_double["gemm"] == [(torch.float8_e4m3fn, torch.float8_e4m3fn, (40, 1), (1, 48), (1, 32))]
    assert rel_err(out, FL.scaled_linear_ref(x8, xs, w, b, torch.bfloat16)) <= 1e-2
    cached = FL._WEIGHTS[id(w)]
    FL.scaled_linear_cuda(x8, xs, w, b, torch.bfloat16)
    assert FL._WEIGHTS[id(w)] is cached  # rounded once
    with torch.no_grad():
        w.mul_(2)  # a new weight version: rounded again
    out = FL.scaled_linear_cuda(x8, xs, w, b, torch.bfloat16)
    assert FL._WEIGHTS[id(w)] is not cached and FL._WEIGHTS[id(w)][1] == w._version
    assert rel_err(out, FL.scaled_linear_ref(x8, xs, w, b, torch.bfloat16)) <= 1e-2
    assert FL.CHOICES == {"H100 (stand-in)": "scaled_mm"}


def test_fp8_gemm_failure_runs_the_reference_with_one_warning(scaled_mm_double, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no FP8 GEMM for this layout")
    monkeypatch.setattr(torch, "_scaled_mm", broken)
    x8, xs = FL.quantize_rows(torch.randn(40, 32, dtype=torch.bfloat16))
    w = torch.randn(48, 32, dtype=torch.bfloat16)
    with pytest.warns(RuntimeWarning, match="FP8 GEMM failed"):
        out = FL.scaled_linear_cuda(x8, xs, w, None, torch.bfloat16)
    assert torch.equal(out, FL.scaled_linear_ref(x8, xs, w, None, torch.bfloat16))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        FL.scaled_linear_cuda(x8, xs, w, None, torch.bfloat16)


def test_fp8_on_the_trained_testbed_model():
    """The shipped testbed DiT in bf16 (bench/bench_testbed_fp8.py samples it): every attention site goes FP8,
    the token GEMMs go W8A8 (at batch 2 the text and timestep projections have too few rows), and one
    prediction stays close to the bf16 model's."""
    from testbed import sample as S, videos as V
    model = S.load(dtype=torch.bfloat16)
    kw = dict(hidden_states=S.model_input(S.noise(2, 0).bfloat16(), model.config.in_channels),
              timestep=torch.full((2,), 500.0), encoder_hidden_states=V.encode(V.all_conditions()[:2],
                                                                               dtype=torch.bfloat16))
    fn = lambda **k: model(**k, return_dict=False)[0]  # noqa: E731
    with torch.no_grad():
        ref = fn(**kw)
    got = Compiled(fn, (), kw, fp8={"attention": True, "linear": True})
    assert got.ops["attention_fp8"] == 8 and got.ops["attention"] == 0  # 4 blocks x (self, cross)
    stats = got.report.stats("fp8_linear")
    assert stats.rewritten == got.ops["scaled_linear"] == 33  # 4 x (q, k, v, o, cross q, o, FFN 2) + proj_out
    assert sum("float32 model" in s["why"] for s in stats.skipped) == 2  # the fp32 time embedder
    assert 1e-3 < rel_err(got.out, ref) < 0.1
