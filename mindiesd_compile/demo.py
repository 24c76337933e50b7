"""Demo: compile a small Wan-architecture DiT (diffusers' WanTransformer3DModel, random weights) on the
CPU with backend="mindiesd", print the rewrite report, and compare output and time with eager.

    python -m mindiesd_compile.demo [--target cpu|eager] [--layers 4]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import mindiesd_compile


def small_wan(layers: int):
    from diffusers import WanTransformer3DModel
    torch.manual_seed(0)
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=32, in_channels=16,
                                  out_channels=16, text_dim=64, freq_dim=64, ffn_dim=256, num_layers=layers,
                                  cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=64)
    inputs = dict(hidden_states=torch.randn(1, 16, 4, 16, 16), timestep=torch.tensor([500.0]),
                  encoder_hidden_states=torch.randn(1, 32, 64), return_dict=False)
    return model.eval(), inputs


def median_ms(fn, iters: int = 10) -> float:
    fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="cpu", choices=["cpu", "eager"])
    ap.add_argument("--layers", type=int, default=4)
    args = ap.parse_args()
    model, inputs = small_wan(args.layers)
    tokens = 4 * 8 * 8
    print(f"Wan-architecture DiT: {args.layers} layers, 4 heads x 32, {tokens} video tokens, fp32, CPU")

    print("\nRewrite report (mindiesd_compile.report):")
    print(mindiesd_compile.report(model, **inputs).table())

    with torch.no_grad():
        eager_out = model(**inputs)[0]
        compiled = torch.compile(model, backend="mindiesd", options={"target": args.target}, fullgraph=True)
        start = time.perf_counter()
        out = compiled(**inputs)[0]
        compile_s = time.perf_counter() - start
        eager_ms = median_ms(lambda: model(**inputs))
        fast_ms = median_ms(lambda: compiled(**inputs))
    rel = ((out - eager_out).norm() / eager_out.norm()).item()
    print(f"\ncompile (first call): {compile_s:.1f} s")
    print(f"eager:    {eager_ms:8.2f} ms")
    print(f"mindiesd: {fast_ms:8.2f} ms  ({eager_ms / fast_ms:.2f}x eager, target {args.target!r})")
    print(f"output relative error vs eager: {rel:.2e}")


if __name__ == "__main__":
    main()
