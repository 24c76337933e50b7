"""Procedural videos: one shape on a black background, moving at constant velocity.

A condition is a triple of indices ``(shape, colour, direction)`` into ``SHAPES``, ``COLOURS`` and
``DIRECTIONS``; ``render`` draws videos that satisfy it by construction (random size, start position and
speed), ``encode`` turns it into the transformer's ``encoder_hidden_states``: three one-hot tokens (one per
attribute, each in its own slice of ``TEXT_DIM``), all zeros for the null (unconditional) condition.

Videos are ``[B, 3, FRAMES, SIZE, SIZE]`` float tensors in [-1, 1] (the layout WanTransformer3DModel takes).
Image coordinates: x to the right, y down, so "up" decreases y.
"""
from __future__ import annotations

import itertools

import torch

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0), "yellow": (1.0, 1.0, 0.0)}
DIRECTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
COLOUR_NAMES = tuple(COLOURS)
DIRECTION_NAMES = tuple(DIRECTIONS)
FRAMES, SIZE = 8, 32
TEXT_DIM = 16
SLICES = (0, len(SHAPES), len(SHAPES) + len(COLOURS))  # where each attribute's one-hot starts in TEXT_DIM
RADIUS = (5.0, 7.0)   # shape half-size in pixels (uniform)
SPEED = (1.2, 2.0)    # pixels per frame (uniform)
BACKGROUND = -1.0


def all_conditions() -> torch.Tensor:
    """Every (shape, colour, direction) combination: ``[48, 3]`` int64."""
    return torch.tensor(list(itertools.product(range(len(SHAPES)), range(len(COLOURS)), range(len(DIRECTIONS)))))


def random_conditions(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    sizes = torch.tensor([len(SHAPES), len(COLOURS), len(DIRECTIONS)])
    dev = generator.device if generator is not None else "cpu"
    return (torch.rand(n, 3, generator=generator, device=dev) * sizes.to(dev)).long().clamp_max(sizes.to(dev) - 1)


def describe(cond) -> str:
    s, c, d = (int(v) for v in cond)
    return f"{COLOUR_NAMES[c]} {SHAPES[s]} moving {DIRECTION_NAMES[d]}"


def encode(cond: torch.Tensor, drop: torch.Tensor | None = None, text_dim: int = TEXT_DIM,
           dtype=torch.float32) -> torch.Tensor:
    """``[B, 3]`` condition -> ``[B, 3, text_dim]`` tokens; rows where ``drop`` is true are all zeros (null)."""
    tokens = torch.zeros(cond.shape[0], 3, text_dim, device=cond.device, dtype=dtype)
    for k in range(3):
        tokens[torch.arange(cond.shape[0], device=cond.device), k, SLICES[k] + cond[:, k]] = 1.0
    if drop is not None:
        tokens[drop] = 0.0
    return tokens


def null_tokens(n: int, device="cpu", text_dim: int = TEXT_DIM, dtype=torch.float32) -> torch.Tensor:
    return torch.zeros(n, 3, text_dim, device=device, dtype=dtype)


def masks(shape: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor, r: torch.Tensor, size: int = SIZE) -> torch.Tensor:
    """Boolean masks ``[B, F, size, size]`` of shapes centred at ``cx, cy`` (``[B, F]``) with half-size ``r`` (``[B]``).
    Pixel (i, j) has its centre at x = j, y = i."""
    grid = torch.arange(size, device=cx.device, dtype=cx.dtype)
    dx = grid.view(1, 1, 1, size) - cx[..., None, None]
    dy = grid.view(1, 1, size, 1) - cy[..., None, None]
    r = r.view(-1, 1, 1, 1)
    circle = dx * dx + dy * dy <= r * r
    square = torch.maximum(dx.abs(), dy.abs()) <= 0.85 * r
    # pointing up: apex at y = cy - r, base (half-width r) at y = cy + r
    triangle = (dy >= -r) & (dy <= r) & (dx.abs() <= (dy + r) / 2)
    kind = shape.view(-1, 1, 1, 1)
    return torch.where(kind == 0, circle, torch.where(kind == 1, square, triangle))


def render(cond: torch.Tensor, generator: torch.Generator | None = None, frames: int = FRAMES,
           size: int = SIZE) -> torch.Tensor:
    """Videos ``[B, 3, frames, size, size]`` in [-1, 1] showing ``cond``; random size, start and speed drawn
    from ``generator`` (on the conditions' device)."""
    dev = cond.device
    n = cond.shape[0]

    def uniform(lo, hi):
        return lo + (hi - lo) * torch.rand(n, generator=generator, device=dev)

    r = uniform(*RADIUS)
    speed = uniform(*SPEED)
    travel = speed * (frames - 1)
    vel = torch.tensor(list(DIRECTIONS.values()), device=dev)[cond[:, 2]] * speed[:, None]  # [B, 2] (x, y)
    lo, hi = r, (size - 1) - r  # centre range keeping the shape inside the frame
    start = []
    for axis in range(2):
        moving = vel[:, axis] != 0
        forward = vel[:, axis] > 0
        a = torch.where(moving & ~forward, lo + travel, lo)
        b = torch.where(moving & forward, hi - travel, hi)
        start.append(a + (b - a) * torch.rand(n, generator=generator, device=dev))
    t = torch.arange(frames, device=dev, dtype=torch.float32)
    cx = start[0][:, None] + vel[:, 0:1] * t
    cy = start[1][:, None] + vel[:, 1:2] * t
    m = masks(cond[:, 0], cx, cy, r, size)  # [B, F, H, W]
    colour = torch.tensor(list(COLOURS.values()), device=dev)[cond[:, 1]] * 2 - 1  # [B, 3] in [-1, 1]
    video = torch.where(m[:, None], colour[:, :, None, None, None], torch.full((), BACKGROUND, device=dev))
    return video.float()


def with_frame_index(x: torch.Tensor) -> torch.Tensor:
    """``[B, 3, F, H, W]`` -> ``[B, 4, F, H, W]``: a fourth input channel holding each frame's index, scaled to
    [-1, 1] (not noised; like the condition channels Wan's image-to-video model concatenates). Without it the
    model sees the order of frames only through the temporal part of its relative RoPE, and learned the axis
    of the motion but not its sign (testbed/README.md)."""
    b, _, f, h, w = x.shape
    index = torch.linspace(-1, 1, f, device=x.device, dtype=x.dtype).view(1, 1, f, 1, 1)
    return torch.cat([x, index.expand(b, 1, f, h, w)], dim=1)
