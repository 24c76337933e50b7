"""Opt-in FP8 at Wan2.1 shapes, op by op: speed next to deviation (the Triton roundings are checked by
bench/check_cuda_kernels.py).

    python bench/bench_fp8.py            # H100/H200; prints a markdown table

Attention: B=1, S=32,760, D=128, 12 heads (1.3B) and 40 (14B): cuDNN SDPA and FA3 in bf16, FA3 FP8 with the
rounding included (the ``attention_fp8`` op) and without it. Linear layers: the token GEMMs of a block
(dim -> dim, dim -> ffn, ffn -> dim): bf16 addmm vs ``scaled_linear``, and the activation rounding alone
(in a compiled model Inductor fuses it into the kernel that produces the activation). Deviation:
relative Frobenius error against an fp32 computation on the same inputs, bf16 next to FP8.
"""
import statistics
import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1])]
import mindiesd_compile  # noqa: E402,F401
from mindiesd_compile.ops import attention_kernels as K  # noqa: E402
from mindiesd_compile.ops import fp8_attention as F8  # noqa: E402
from mindiesd_compile.ops import fp8_linear as FL  # noqa: E402

ops = torch.ops.mindiesd_compile
dev = torch.device("cuda")


def ms(fn, n=20):
    for _ in range(3):
        fn()
    times = []
    for _ in range(n):
        a, b = torch.cuda.Event(True), torch.cuda.Event(True)
        a.record(); fn(); b.record(); b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def attention_rows(heads, s=32760, d=128):
    q, k, v = (torch.randn(1, s, heads, d, device=dev, dtype=torch.bfloat16) for _ in range(3))
    scale = d ** -0.5
    flops = 4 * heads * s * s * d
    ref = torch.nn.functional.scaled_dot_product_attention(*(t.float().transpose(1, 2) for t in (q, k, v)),
                                                           scale=scale).transpose(1, 2)
    fa3 = K.flash_attn_3().func
    pre = [F8.quantize_cuda(t) for t in (q, k, v)]
    variants = {
        "cuDNN SDPA bf16": lambda: torch.nn.functional.scaled_dot_product_attention(
            *(t.transpose(1, 2) for t in (q, k, v)), scale=scale).transpose(1, 2),
        "FA3 bf16": lambda: fa3(q, k, v, softmax_scale=scale),
        "FA3 FP8, kernel only": lambda: fa3(pre[0][0], pre[1][0], pre[2][0], softmax_scale=scale,
                                            q_descale=pre[0][1], k_descale=pre[1][1], v_descale=pre[2][1]),
        "rounding q, k, v only": lambda: [F8.quantize_cuda(t) for t in (q, k, v)],
        "attention_fp8 op (rounding + FA3 FP8)": lambda: ops.attention_fp8(q, k, v, None, scale, "BSHD"),
    }
    rows = []
    for name, fn in variants.items():
        t = ms(fn)
        out = fn()
        out = out[0] if isinstance(out, tuple) and not isinstance(out[0], tuple) else out
        err = rel(out, ref) if isinstance(out, torch.Tensor) else float("nan")
        rows.append(f"| attention, {heads} heads | {name} | {t:.2f} | {flops / t / 1e9:.0f} TFLOP/s | {err:.2e} |")
    return rows


def linear_rows(m, k, n):
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    w = torch.nn.Parameter(torch.randn(n, k, device=dev, dtype=torch.bfloat16) * k ** -0.5, requires_grad=False)
    b = torch.randn(n, device=dev, dtype=torch.bfloat16)
    ref = torch.addmm(b.float(), x.float(), w.float().t())
    rounding = torch.compile(FL.quantize_rows)  # in a model Inductor fuses it into x's producer
    x8, xs = rounding(x)
    rows = []
    for name, fn in {"bf16 addmm": lambda: torch.addmm(b, x, w.t()),
                     "scaled_linear op (x pre-rounded)": lambda: ops.scaled_linear(x8, xs, w, b, torch.bfloat16),
                     "rounding x alone (compiled)": lambda: rounding(x)}.items():
        t = ms(fn)
        out = fn()
        err = rel(out, ref) if isinstance(out, torch.Tensor) else float("nan")
        rows.append(f"| linear {m}x{k} -> {n} | {name} | {t:.3f} | {2 * m * k * n / t / 1e9:.0f} TFLOP/s | {err:.2e} |")
    return rows


def main():
    print(f"# {torch.cuda.get_device_name(dev)}, torch {torch.__version__}, FA3: {K.flash_attn_3()}")
    rows = ["| shape | variant | ms | rate | rel err vs fp32 |", "|---|---|---|---|---|"]
    for heads in (12, 40):
        rows += attention_rows(heads)
    for m, k, n in [(32760, 1536, 1536), (32760, 1536, 8960), (32760, 8960, 1536),
                    (32760, 5120, 5120), (32760, 5120, 13824), (32760, 13824, 5120)]:
        rows += linear_rows(m, k, n)
    print("\n".join(rows))
    print(f"choices: {K.CHOICES} {FL.CHOICES}")


if __name__ == "__main__":
    main()
