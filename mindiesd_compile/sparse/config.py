"""``options={"sparse_attention": {...}}``: validated before any work starts."""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Tuple

from ..options import OptionsError, from_mapping


@dataclasses.dataclass(frozen=True)
class SparseAttentionConfig:
    """Block-sparse self-attention over video tokens (RainFusion / Sparse VideoGen style).

    sparsity:     share of key blocks each query block drops, in [0, 1): a query block keeps
                  ceil((1 - sparsity) * key blocks) blocks of highest score (scores.py), plus the dense ones.
    start_step:   denoising steps before this one run dense attention (the layout forms early).
    block:        tokens per block (query and key); a multiple of tile_h * tile_w. 128 = 2 frames x 8x8.
    tile:         (tile_h, tile_w) spatial tile in latent tokens; block // (tile_h * tile_w) frames per tile.
    mask_refresh: a mask is recomputed every ``mask_refresh`` sparse steps and reused in between
                  (1: every step; scoring, top-k and the page table cost ~0.35 ms per call at Wan2.1-1.3B shapes
                  on an H100, a tenth of the sparse op at 0.8: a forward 281.3 ms fresh vs 272.9 ms with
                  mask_refresh 5, bench/RESULTS.md).
    remainder:    the key blocks a query block skips still enter its softmax, each as one pooled key and value
                  (remainder.py); False: they are dropped. On the testbed at 0.8 it lifts PSNR vs dense from
                  19 to 27 dB and keeps the task metric; it costs ~0.4 ms per call at Wan2.1-1.3B shapes on an H100
                  (~4 % of a sparse forward; bench/RESULTS.md).
    grid:         (frames, height, width) of the video tokens; None: read from the graph's patch embedding.
    """

    sparsity: float = 0.8
    start_step: int = 0
    block: int = 128
    tile: Tuple[int, int] = (8, 8)
    mask_refresh: int = 1
    remainder: bool = True
    grid: Optional[Tuple[int, int, int]] = None

    def __post_init__(self):
        def bad(name, what):
            raise OptionsError(f"options['sparse_attention']['{name}'] must be {what}, got {getattr(self, name)!r}")

        if not isinstance(self.sparsity, (int, float)) or isinstance(self.sparsity, bool) \
                or not 0 <= self.sparsity < 1:
            bad("sparsity", "a number in [0, 1) (0: dense; 0.8 keeps a fifth of the key blocks)")
        for name in ("start_step", "block", "mask_refresh"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "start_step" else 1):
                bad(name, "an int >= 0" if name == "start_step" else "an int >= 1")
        if not isinstance(self.remainder, bool):
            bad("remainder", "True or False")
        if not _ints(self.tile, 2):
            bad("tile", "two ints >= 1 (tile_h, tile_w)")
        object.__setattr__(self, "tile", tuple(self.tile))
        if self.block % (self.tile[0] * self.tile[1]):
            raise OptionsError(f"options['sparse_attention']: block ({self.block}) must be a multiple of tile_h * "
                               f"tile_w ({self.tile[0] * self.tile[1]}): a block is whole spatial tiles of one or "
                               "more frames")
        if self.grid is not None:
            if not _ints(self.grid, 3):
                bad("grid", "three ints >= 1 (frames, height, width) or None")
            object.__setattr__(self, "grid", tuple(self.grid))

    @property
    def frames_per_tile(self) -> int:
        return self.block // (self.tile[0] * self.tile[1])

    @classmethod
    def from_value(cls, value: Any) -> Optional["SparseAttentionConfig"]:
        if value is None or isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise OptionsError(f"options['sparse_attention'] must be a dict (e.g. {{'sparsity': 0.8}}) or "
                               f"SparseAttentionConfig, got {type(value).__name__}")
        return from_mapping(cls, value, "sparse_attention option")

    def check(self, options) -> None:
        """Constraints against the other options (called from CompileOptions)."""
        if "attention" not in options.patterns:
            raise OptionsError("options['sparse_attention'] needs the 'attention' pattern: it rewrites its sites")
        cache = options.cache.config if hasattr(options.cache, "config") else options.cache
        if self.mask_refresh > 1 and cache.enabled:
            raise OptionsError("options['sparse_attention']['mask_refresh'] > 1 cannot be combined with "
                               "options['cache']: masks are matched to their site by call order, which a cache "
                               "that skips blocks changes; use mask_refresh=1")


def _ints(value, n: int) -> bool:
    return isinstance(value, (tuple, list)) and len(value) == n and all(
        isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in value)
