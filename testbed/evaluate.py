"""Evaluation: what a viewer would check (task accuracy from a frame detector) and how far an optimized
run drifts from the same seeds without the optimization (PSNR / SSIM), plus a PNG strip writer.

    python -m testbed.evaluate --steps 50 --seeds 2 --device cuda --out results/   # full evaluation
    python -m testbed.evaluate --steps 12 --seeds 1 --device cpu                   # quick CPU check

Reusable by benchmarks: ``quality(baseline_videos, optimized_videos, conditions)``.
"""
from __future__ import annotations

import argparse
import json
import math
import struct
import time
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F

from . import videos as V

THRESHOLD = 0.0      # foreground: brightest channel above the middle of [-1, 1] (background is -1)
MIN_TRAVEL = 3.0     # pixels of centroid travel below which the shape counts as not moving


# ---------------------------------------------------------------------------------------------- detector
def detect(video: torch.Tensor) -> dict:
    """Per video ``[B, 3, F, H, W]`` in [-1, 1]: detected ``shape``, ``colour``, ``direction`` indices (-1 when
    undecidable: an empty frame, or no clear motion) and the features they come from."""
    video = video.detach().float().cpu()
    b, _, f, h, w = video.shape
    fg = video.amax(dim=1) > THRESHOLD                              # [B, F, H, W]
    area = fg.sum(dim=(2, 3)).float()                               # [B, F]
    present = (area > 0).all(dim=1)
    ys = torch.arange(h, dtype=torch.float32).view(1, 1, h, 1)
    xs = torch.arange(w, dtype=torch.float32).view(1, 1, 1, w)
    safe = area.clamp_min(1)
    cx = (fg * xs).sum(dim=(2, 3)) / safe
    cy = (fg * ys).sum(dim=(2, 3)) / safe
    rows, cols = fg.any(dim=3), fg.any(dim=2)                       # [B, F, H], [B, F, W]
    top = _first(rows); bottom = h - 1 - _first(rows.flip(-1))
    left = _first(cols); right = w - 1 - _first(cols.flip(-1))
    box_h, box_w = (bottom - top + 1).clamp_min(1).float(), (right - left + 1).clamp_min(1).float()
    fill = area / (box_h * box_w)
    # share of the area in the lower half of the bounding box: 0.5 for circle/square, 0.75 for the triangle
    mid = (top.float() + bottom.float()) / 2                        # [B, F]
    lower = (fg & (ys > mid[..., None, None])).sum(dim=(2, 3)).float() + \
        0.5 * (fg & (ys == mid[..., None, None])).sum(dim=(2, 3)).float()
    lower_share = lower / safe
    fill_m = fill.median(dim=1).values
    lower_m = lower_share.median(dim=1).values
    shape = torch.where(lower_m > 0.62, 2, torch.where(fill_m > 0.94, 1, 0))
    # colour: mean foreground RGB over all frames, nearest palette entry
    rgb = (video * fg[:, None]).sum(dim=(2, 3, 4)) / fg.sum(dim=(1, 2, 3)).clamp_min(1)[:, None]
    palette = torch.tensor(list(V.COLOURS.values())) * 2 - 1
    colour = torch.cdist(rgb, palette).argmin(dim=1)
    # direction: least-squares velocity of the centroid, dominant axis and its sign
    t = torch.arange(f, dtype=torch.float32) - (f - 1) / 2
    vx = (cx * t).sum(1) / (t * t).sum()
    vy = (cy * t).sum(1) / (t * t).sum()
    horizontal = vx.abs() >= vy.abs()
    direction = torch.where(horizontal, torch.where(vx < 0, 0, 1), torch.where(vy < 0, 2, 3))
    travel = torch.maximum(vx.abs(), vy.abs()) * (f - 1)
    dominant = torch.maximum(vx.abs(), vy.abs()) > 2 * torch.minimum(vx.abs(), vy.abs())
    moving = (travel >= MIN_TRAVEL) & dominant
    bad = torch.full_like(shape, -1)
    return dict(shape=torch.where(present, shape, bad), colour=torch.where(present, colour, bad),
                direction=torch.where(present & moving, direction, bad),
                fill=fill_m, lower_share=lower_m, travel=travel, rgb=rgb)


def _first(x: torch.Tensor) -> torch.Tensor:
    """Index of the first true element along the last dim (0 when none)."""
    n = x.shape[-1]
    idx = torch.arange(n).expand_as(x)
    return torch.where(x, idx, n).amin(dim=-1).clamp_max(n - 1)


def task_scores(video: torch.Tensor, cond: torch.Tensor) -> dict:
    """Per-video correctness (bool tensors) of shape, colour, direction, shape+direction, all three."""
    d = detect(video)
    cond = cond.cpu()
    ok = {k: d[k] == cond[:, i] for i, k in enumerate(("shape", "colour", "direction"))}
    ok["shape_direction"] = ok["shape"] & ok["direction"]
    ok["all"] = ok["shape_direction"] & ok["colour"]
    return ok


def task_accuracy(video: torch.Tensor, cond: torch.Tensor) -> dict:
    """Fractions of videos whose detected shape / colour / direction / shape+direction / all match ``cond``."""
    return {k: float(v.float().mean()) for k, v in task_scores(video, cond).items()}


# ---------------------------------------------------------------------------------------------- PSNR / SSIM
DATA_RANGE = 2.0  # videos live in [-1, 1]


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over videos of each video's PSNR in dB (``inf`` when all videos are identical)."""
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    mse = (a - b).pow(2).flatten(1).mean(1)
    per = 10 * torch.log10(DATA_RANGE ** 2 / mse)      # inf where mse == 0
    return float(per.mean()) if torch.isfinite(per).any() else math.inf


def _gaussian(size=11, sigma=1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x * x / (2 * sigma * sigma))
    return (g / g.sum()).float()


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5) -> float:
    """Mean SSIM (Wang et al. 2004: gaussian window 11, sigma 1.5, K1 0.01, K2 0.03) over every frame and
    channel of videos ``[B, C, F, H, W]``, each frame compared as a 2-D image."""
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    bsz, c, f, h, w = a.shape
    x = a.permute(0, 2, 1, 3, 4).reshape(-1, 1, h, w)
    y = b.permute(0, 2, 1, 3, 4).reshape(-1, 1, h, w)
    g = _gaussian(window, sigma)
    kx, ky = g.view(1, 1, 1, -1), g.view(1, 1, -1, 1)

    def blur(z):
        return F.conv2d(F.conv2d(z, kx), ky)

    mx, my = blur(x), blur(y)
    vx = blur(x * x) - mx * mx
    vy = blur(y * y) - my * my
    cxy = blur(x * y) - mx * my
    c1, c2 = (0.01 * DATA_RANGE) ** 2, (0.03 * DATA_RANGE) ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(s.mean())


def quality(baseline: torch.Tensor, optimized: torch.Tensor, cond: torch.Tensor) -> dict:
    """The two quality numbers every speedup is reported with: fidelity of ``optimized`` to ``baseline``
    (same seeds and conditions; PSNR dB, SSIM) and the task accuracy of ``optimized`` (plus the baseline's)."""
    acc = task_accuracy(optimized, cond)
    base = task_accuracy(baseline, cond)
    return dict(psnr=psnr(baseline, optimized), ssim=ssim(baseline, optimized),
                task_accuracy=acc["shape_direction"], task_accuracy_all=acc["all"],
                baseline_task_accuracy=base["shape_direction"], baseline_task_accuracy_all=base["all"])


# ---------------------------------------------------------------------------------------------- PNG strip
def to_uint8(video: torch.Tensor) -> torch.Tensor:
    """``[3, F, H, W]`` in [-1, 1] -> ``[F, H, W, 3]`` uint8."""
    return ((video.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0)


def strip(rows, scale: int = 4, gap: int = 2) -> torch.Tensor:
    """An image ``[H, W, 3]`` uint8: one row per video ``[3, F, H, W]``, its frames left to right, upscaled."""
    frames = [to_uint8(v) for v in rows]
    f, h, w, _ = frames[0].shape
    hs, ws = h * scale, w * scale
    out = torch.full((len(rows) * (hs + gap) - gap, f * (ws + gap) - gap, 3), 255, dtype=torch.uint8)
    for r, fr in enumerate(frames):
        big = fr.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
        for k in range(f):
            out[r * (hs + gap):r * (hs + gap) + hs, k * (ws + gap):k * (ws + gap) + ws] = big[k]
    return out


def write_png(path, image: torch.Tensor) -> None:
    """``[H, W, 3]`` uint8 -> an RGB PNG file (standard library only)."""
    h, w, _ = image.shape
    raw = b"".join(b"\x00" + bytes(image[i].contiguous().flatten().tolist()) for i in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + \
        chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    Path(path).write_bytes(png)


# ---------------------------------------------------------------------------------------------- CLI
def evaluate(model, steps: int, seeds: int, guidance: float, device, dtype=torch.float32, batch: int = 48,
             transformer=None, shift: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample every condition once per seed (seed s: noise from ``seed=1000 s``); returns (videos, conditions)."""
    from .sample import SHIFT, sample
    conds = V.all_conditions()
    outs, cs = [], []
    for s in range(seeds):
        for i in range(0, len(conds), batch):
            c = conds[i:i + batch]
            outs.append(sample(model, c, seed=1000 * s + i, steps=steps, guidance=guidance, device=device,
                               dtype=dtype, transformer=transformer, shift=SHIFT if shift is None else shift).cpu())
            cs.append(c)
    return torch.cat(outs), torch.cat(cs)


def main(argv=None):
    from .sample import GUIDANCE, SHIFT, STEPS, load
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None, help="model folder (default: testbed/checkpoint)")
    ap.add_argument("--steps", default=str(STEPS), help="sampling steps (a comma list sweeps)")
    ap.add_argument("--seeds", type=int, default=2, help="videos per condition (48 conditions)")
    ap.add_argument("--guidance", default=str(GUIDANCE), help="CFG scale (a comma list sweeps)")
    ap.add_argument("--shift", default=str(SHIFT), help="scheduler shift (a comma list sweeps)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None, help="folder for evaluation.json and samples_*.png")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    model = load(args.checkpoint, device=dev)
    gt_cond = V.all_conditions().repeat(4, 1)
    gt = task_accuracy(V.render(gt_cond, torch.Generator().manual_seed(0)), gt_cond)
    card = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    results = []
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    for steps in (int(v) for v in args.steps.split(",")):
        for shift in (float(v) for v in args.shift.split(",")):
            for guidance in (float(v) for v in args.guidance.split(",")):
                start = time.perf_counter()
                with torch.no_grad():
                    vids, conds = evaluate(model, steps, args.seeds, guidance, dev, shift=shift)
                res = dict(steps=steps, shift=shift, guidance=guidance, seeds=args.seeds, videos=len(vids),
                           device=card, seconds=round(time.perf_counter() - start, 2),
                           accuracy=task_accuracy(vids, conds))
                print(json.dumps(res), flush=True)
                results.append(res)
                if out:
                    write_png(out / f"samples_s{steps}_shift{shift:g}_g{guidance:g}.png",
                              strip([vids[i] for i in range(0, 48, 4)]))
    if out:
        (out / "evaluation.json").write_text(json.dumps(dict(results=results, detector_on_ground_truth=gt), indent=1))
    return results


if __name__ == "__main__":
    main()
