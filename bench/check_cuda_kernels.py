"""Our Triton kernels against their torch references, on a GPU (CI has none): run on every lent device.

    python bench/check_cuda_kernels.py      # prints one line per kernel and shape, "FAIL" where one differs
"""
import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
from mindiesd_compile.ops import fp8_attention as F8, fp8_linear as FL, norm_rope as NR  # noqa: E402

dev = torch.device("cuda")


def check(name, ok, detail):
    return f"{'ok  ' if ok else 'FAIL'} {name}: {detail}"


def fp8_roundings():
    lines = []
    for shape in [(1, 4096, 12, 128), (2, 999, 40, 64)]:
        t = (torch.randn(shape, device=dev) * 3).to(torch.bfloat16)
        (t8, s), (r8, rs) = F8.quantize_cuda(t), F8.quantize_per_head(t)
        differ = float((t8.float() != r8.float()).float().mean())
        lines.append(check(f"per-head e4m3 rounding {shape}", torch.equal(s, rs) and differ < 1e-4,
                           f"scales equal {torch.equal(s, rs)}, values differing {differ:.1e}"))
    for shape in [(4096, 1536), (333, 13824), (70, 48)]:
        x = (torch.randn(shape, device=dev) * 3).to(torch.bfloat16)
        (x8, s), (r8, rs) = FL.quantize_rows_cuda(x), FL.quantize_rows(x)
        scale_diff = float(((s - rs).abs() / rs).max())
        differ = float((x8.float() != r8.float()).float().mean())
        lines.append(check(f"per-row e4m3 rounding {shape}", scale_diff < 1e-6 and differ < 1e-4,
                           f"scales max rel diff {scale_diff:.1e}, values differing {differ:.1e}"))
    return lines


def norm_rope():
    lines = []
    for b, s, heads, d, half in [(1, 4096, 12, 128, True), (2, 333, 40, 128, True), (1, 100, 3, 64, False)]:
        x = torch.randn(b, s, heads * d, device=dev, dtype=torch.bfloat16)
        w = torch.randn(heads * d, device=dev, dtype=torch.bfloat16)
        freqs = torch.rand(1, s, 1, d, device=dev) * 6  # Wan: fp32 [1, S, 1, D]; the chain slices pairs
        cos, sin = (freqs.cos()[..., 0::2], freqs.sin()[..., 1::2]) if half else (freqs.cos(), freqs.sin())
        for norm_dtype in (torch.bfloat16, torch.float32):
            out = NR.rms_norm_rope_cuda(x, w, 1e-6, norm_dtype, heads, cos, sin, True, torch.bfloat16)
            ref = NR.rms_norm_rope_ref(x, w, 1e-6, norm_dtype, heads, cos, sin, True, torch.bfloat16)
            err = float((out.float() - ref.float()).norm() / ref.float().norm())
            lines.append(check(f"rms_norm_rope {(b, s, heads, d)} cos {'pairs' if half else 'full'} norm "
                               f"{norm_dtype}", out.dtype == ref.dtype and out.shape == ref.shape and err < 8e-3,
                               f"rel err {err:.1e}, dtype {out.dtype}"))
    return lines


def token_gather():
    from mindiesd_compile.sparse.reorder import gather_tokens
    lines = []
    for b, s, heads, d in [(1, 32760, 12, 128), (2, 333, 5, 64), (1, 100, 3, 48)]:
        x = torch.randn(b, s, heads, d, device=dev, dtype=torch.bfloat16)  # the model's [B, S, H, D]
        perm = torch.randperm(s, device=dev)
        padded = torch.cat([perm, perm[:7]])
        tiles = gather_tokens(x.transpose(1, 2), padded)  # -> [B, H, S + 7, D], tile order
        back = x.new_empty(b, s, heads, d)
        gather_tokens(tiles, torch.argsort(perm), back.transpose(1, 2))  # -> [B, S, H, D], model order
        ok = torch.equal(tiles, x.transpose(1, 2)[:, :, padded]) and torch.equal(back, x)
        lines.append(check(f"gather_tokens {(b, s, heads, d)}", ok, "tile order and back: exact"))
    return lines


def block_scores():
    from mindiesd_compile.sparse.layout import pool_blocks
    from mindiesd_compile.sparse.scores import _scores_torch, block_scores
    from bench_wan import time_calls
    lines = []
    for b, s, heads, d, block in [(1, 32760, 12, 128, 128), (2, 333, 5, 64, 16), (1, 100, 3, 48, 32)]:
        q, k = (torch.randn(b, heads, s, d, device=dev, dtype=torch.bfloat16) for _ in range(2))
        got = block_scores(q, k, block, d ** -0.5)
        ref = _scores_torch(pool_blocks(q, block).bfloat16().float(), k.float(), block, d ** -0.5)  # same bf16 inputs
        err = (got - ref).abs().max().item()
        ms = sorted(time_calls(lambda: block_scores(q, k, block, d ** -0.5), dev, 20))[10]
        lines.append(check(f"block_scores {(b, s, heads, d, block)}", err <= 1e-3, f"max abs err {err:.1e} vs fp32 "
                           f"torch on the same bf16 inputs; {ms:.3f} ms"))
    return lines


def pooled_remainder():
    from mindiesd_compile.sparse.layout import select_blocks
    from mindiesd_compile.sparse.remainder import _remainder_torch, add_remainder, pooled_kv
    from bench_wan import time_calls
    lines = []
    for b, s, heads, d, block in [(1, 32760, 12, 128, 128), (2, 333, 5, 64, 16), (1, 100, 3, 48, 32)]:
        n = -(-s // block)
        q, k, v = (torch.randn(b, heads, n * block, d, device=dev, dtype=torch.bfloat16) for _ in range(3))
        dense = torch.zeros(n, dtype=torch.bool, device=dev)
        dense[-1] = True
        keep = select_blocks(torch.randn(b, heads, n, n, device=dev), dense, 0.8)
        out = torch.randn(b, heads, n * block, d, device=dev, dtype=torch.bfloat16)
        lse = torch.randn(b, heads, n * block, device=dev) + 5
        kp, vp, log_n = pooled_kv(k, v, block, s)
        ref = _remainder_torch(out.float(), lse, q.float(), kp.float(), vp.float(), log_n, keep, d ** -0.5, block, s)
        got = add_remainder(out.clone(), lse, q, k, v, keep, d ** -0.5, block, s)[:, :, :s].float()
        err = float((got - ref).norm() / ref.norm())
        ms = sorted(time_calls(lambda: add_remainder(out, lse, q, k, v, keep, d ** -0.5, block, s), dev, 20))[10]
        lines.append(check(f"pooled remainder {(b, s, heads, d, block)}", err <= 8e-3, f"rel err {err:.1e} vs fp32 "
                           f"torch on the same bf16 inputs; {ms:.3f} ms (pooling K/V and the merge, in place)"))
    return lines


def sparse_op_kernels():
    """The whole sparse op on each CUDA kernel path (FA3 paged where built, FlexAttention), with and without the
    remainder, against the same op on the reference kernel with the torch remainder, same bf16 inputs: the same
    scores, so the same blocks; only the kernels differ."""
    from mindiesd_compile.sparse import kernels, remainder as R
    lines, choose, fits = [], kernels.choose, R._triton_fits
    op = torch.ops.mindiesd_compile.sparse_attention
    for grid, block, tile in [((5, 16, 24), 128, (8, 8)), ((3, 10, 14), 64, (4, 8))]:
        q, k, v = (torch.randn(1, grid[0] * grid[1] * grid[2], 12, 128, device=dev, dtype=torch.bfloat16)
                   for _ in range(3))
        for rem in (False, True):
            args = (128 ** -0.5, "BSHD", list(grid), [0, 0], list(tile), block, 0.8, 0, 1, rem)
            call = lambda: op(q, k, v, *args)  # noqa: E731
            for kind in dict.fromkeys([choose(q.transpose(1, 2)), "flex"]):
                name = f"sparse op {grid} block {block} remainder {rem} on {kind}"
                try:
                    kernels.choose, R._triton_fits = (lambda t: "reference"), (lambda *a: False)
                    ref = call().float()
                    kernels.choose, R._triton_fits = (lambda t, kind=kind: kind), fits
                    kernels.CHOICES.clear()
                    err = float((call().float() - ref).norm() / ref.norm())
                    ran = kernels.CHOICES.get(kernels._key(q.transpose(1, 2)), "?")
                    lines.append(check(name, err <= 1e-2 and ran == kind, f"rel err {err:.1e} vs the reference kernel "
                                       f"and torch remainder; ran {ran}"))
                except Exception as err:  # noqa: BLE001 - reported as a failing line, the other checks go on
                    lines.append(check(name, False, f"{type(err).__name__}: {str(err)[:150]}"))
                finally:
                    kernels.choose, R._triton_fits = choose, fits
                    kernels.CHOICES.clear()
    return lines


def main():
    lines = fp8_roundings() + norm_rope() + token_gather() + block_scores() + pooled_remainder() + sparse_op_kernels()
    print("\n".join(lines))
    return 1 if any(line.startswith("FAIL") for line in lines) else 0


if __name__ == "__main__":
    sys.exit(main())
