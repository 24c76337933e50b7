"""Tile order, block pooling and top-k block selection: the mask half of block-sparse attention.

Token order. The model's sequence is ``[text_before, video (f, h, w) row-major, text_after]``. The
kernel sees it permuted to ``[frames 1.. in spatio-temporal tiles | first frame | text]``: frames
after the first are cut into tiles of ``frames_per_tile x tile_h x tile_w`` tokens (tiles in (t, y, x)
order, tokens inside a tile row-major), so most ``block``-token chunks are one compact tile. Grids
that the tile does not divide get *ragged* edge tiles, not padding: a block then spans the end of one
tile and the start of the next (its neighbour), so no compute is spent on pad tokens. Blocks are
consecutive ``block``-token chunks of the permuted sequence; the last may be short. The tiles come
first so that they start block-aligned (a first frame of 30x52 tokens is not a whole number of blocks).

Dense rows and columns. Every block holding a first-frame or text token is dense: its queries see all
keys and all queries see it (the first frame anchors the video, text carries the prompt).

Selection. Block pairs are scored by ``scores.block_scores``; each query block keeps its
``ceil((1 - sparsity) * n_blocks)`` best-scoring key blocks among the non-dense ones, plus every dense
one. Sparsity 0 keeps everything: exactly dense attention.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional, Sequence

import torch
from torch import Tensor


@dataclasses.dataclass(frozen=True)
class TileLayout:
    perm: Tensor          # [S] long: permuted position i holds the model's token perm[i]
    inverse: Tensor       # [S] long: the model's token j sits at permuted position inverse[j]
    dense: Tensor         # [n_blocks] bool: the block holds a first-frame or text token
    block: int
    n_dense: int          # dense.sum(), kept on the host
    padded_perm: Tensor   # [n_blocks * block] long: perm, its tail repeated up to whole blocks (rows nobody reads)

    @property
    def seq_len(self) -> int:
        return self.perm.numel()

    @property
    def n_blocks(self) -> int:
        return self.dense.numel()


@functools.lru_cache(maxsize=64)
def tile_layout(grid: Sequence[int], text: Sequence[int], tile: Sequence[int], block: int,
                device: str = "cpu") -> TileLayout:
    """Layout of ``grid`` = (frames, h, w) video tokens with ``text`` = (before, after) text tokens."""
    frames, h, w = grid
    before, after = text
    th, tw = tile
    tf = block // (th * tw)
    per_frame = h * w
    n_video = frames * per_frame
    # frames 1..: stable sort of the row-major tokens by tile id keeps them row-major inside a tile
    f = torch.arange(1, frames).view(-1, 1, 1)
    y = torch.arange(h).view(1, -1, 1)
    x = torch.arange(w).view(1, 1, -1)
    tile_id = (((f - 1) // tf) * math.ceil(h / th) + y // th) * math.ceil(w / tw) + x // tw
    rest = torch.argsort(tile_id.flatten(), stable=True) + per_frame
    perm = torch.cat([rest, torch.arange(per_frame)]) + before
    perm = torch.cat([perm, torch.arange(before), torch.arange(before + n_video, before + n_video + after)])
    seq = perm.numel()
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(seq)
    n_blocks = math.ceil(seq / block)
    position = torch.arange(n_blocks * block)
    dense_pos = (position >= n_video - per_frame) & (position < seq)  # first frame and text: the tail
    dense = dense_pos.view(n_blocks, block).any(-1)
    padded = torch.cat([perm, perm[:n_blocks * block - seq]])
    return TileLayout(perm.to(device), inverse.to(device), dense.to(device), block, int(dense.sum()), padded.to(device))


def pool_blocks(x: Tensor, block: int) -> Tensor:
    """[B, H, S, D] -> [B, H, ceil(S/block), D]: mean over each block (the short last one too), summed in fp32
    straight from ``x`` (no fp32 or padded copy of the whole tensor: that copy was most of the op's overhead)."""
    b, h, s, d = x.shape
    full = s // block * block
    sums = [x[:, :, :full].reshape(b, h, full // block, block, d).sum(3, dtype=torch.float32) / block]
    if full < s:
        sums.append(x[:, :, full:].sum(2, keepdim=True, dtype=torch.float32) / (s - full))
    return torch.cat(sums, 2) if len(sums) > 1 else sums[0]


def kept_per_row(n_blocks: int, n_dense: int, sparsity: float) -> int:
    """Key blocks chosen by score in a sparse query block (the dense blocks come on top)."""
    k = math.ceil(round((1.0 - sparsity) * n_blocks, 6))  # round: 0.3 * 10 must be 3, not 4
    return min(k, n_blocks - n_dense)


def select_blocks(scores: Tensor, dense: Tensor, sparsity: float, n_dense: Optional[int] = None) -> Tensor:
    """[B, H, nq, nk] block scores -> bool keep mask with the dense rows and columns forced on.
    ``n_dense`` (= ``dense.sum()``, known to the layout) spares a device sync per call."""
    n_dense = int(dense.sum()) if n_dense is None else n_dense
    k = kept_per_row(scores.shape[-1], n_dense, sparsity)
    free = scores.masked_fill(dense, float("-inf"))
    keep = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    keep.scatter_(-1, free.topk(k, dim=-1).indices, True)
    return keep | dense | dense.unsqueeze(-1)  # dense columns, dense rows (broadcast: no boolean indexing, no sync)


def expand_mask(keep: Tensor, seq_len: int, block: int) -> Tensor:
    """Block keep mask -> token mask [B, H, S, S] (the CPU reference kernel's mask)."""
    return keep.repeat_interleave(block, -2).repeat_interleave(block, -1)[..., :seq_len, :seq_len]


def block_mask(keep: Tensor, seq_len: int, block: int):
    """Block keep mask -> FlexAttention ``BlockMask``: every kept block is a full block (no mask_mod runs)."""
    from torch.nn.attention.flex_attention import BlockMask
    counts = keep.sum(-1, dtype=torch.int32)
    indices = keep.to(torch.int32).argsort(dim=-1, descending=True, stable=True).to(torch.int32)
    return BlockMask.from_kv_blocks(torch.zeros_like(counts), indices, counts, indices, BLOCK_SIZE=block,
                                    seq_lengths=(seq_len, seq_len), compute_q_blocks=False)
