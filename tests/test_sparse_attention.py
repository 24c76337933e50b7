"""Block-sparse attention: tile layout and block selection properties, op numerics against dense and
masked references, the pass on a video DiT (rewrites, near-misses), per-step runtime, options."""
import contextlib
import math
import types
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st

import mindiesd_compile  # noqa: F401  (registers the ops)
from mindiesd_compile import CompileOptions, OptionsError
from mindiesd_compile.sparse import kernels, runtime
from mindiesd_compile.sparse.layout import block_mask, expand_mask, kept_per_row, pool_blocks, select_blocks, tile_layout
from mindiesd_compile.sparse.scores import block_scores
from conftest import Compiled, rel_err
from tiny_models import wan

sparse_op = torch.ops.mindiesd_compile.sparse_attention

grids = st.tuples(st.integers(2, 5), st.integers(1, 9), st.integers(1, 9))
tiles = st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 4))  # (frames, h, w) per tile
texts = st.tuples(st.integers(0, 5), st.integers(0, 5))


def layout_of(grid, text, tile):
    tf, th, tw = tile
    return tile_layout(grid, text, (th, tw), tf * th * tw)


# --- layout ---------------------------------------------------------------------------------------

@given(grids, texts, tiles)
def test_reorder_then_inverse_is_identity_and_dense_tokens_sit_at_the_ends(grid, text, tile):
    lay = layout_of(grid, text, tile)
    frames, h, w = grid
    seq = frames * h * w + sum(text)
    x = torch.randn(seq)
    assert sorted(lay.perm.tolist()) == list(range(seq))          # a permutation
    assert torch.equal(x[lay.perm][lay.inverse], x) and torch.equal(x[lay.inverse][lay.perm], x)
    n_tiled = (frames - 1) * h * w
    assert (lay.perm[:n_tiled] >= text[0] + h * w).all()             # frames 1.. first, in tiles
    first = torch.arange(h * w) + text[0]                            # then frame 0, row-major
    assert torch.equal(lay.perm[n_tiled:n_tiled + h * w], first)
    text_tokens = torch.cat([torch.arange(text[0]), torch.arange(seq - text[1], seq)])
    assert torch.equal(lay.perm[seq - sum(text):], text_tokens)      # text last
    # a block is dense iff it holds a first-frame or text token
    dense_pos = torch.arange(seq) >= n_tiled
    expect = [bool(dense_pos[b * lay.block:(b + 1) * lay.block].any()) for b in range(math.ceil(seq / lay.block))]
    assert lay.dense.tolist() == expect


@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3), tiles)
def test_blocks_are_whole_tiles_when_the_tile_divides_the_grid(nt, ny, nx, tile):
    tf, th, tw = tile
    frames, h, w = 1 + nt * tf, ny * th, nx * tw
    lay = layout_of((frames, h, w), (0, 0), tile)
    f, rem = lay.perm // (h * w), lay.perm % (h * w)
    y, x = rem // w, rem % w
    assert (frames - 1) * h * w % lay.block == 0
    for b in range((frames - 1) * h * w // lay.block):               # the tiled frames: whole tiles
        sl = slice(b * lay.block, (b + 1) * lay.block)
        assert f[sl].max() - f[sl].min() < tf and y[sl].max() - y[sl].min() < th and x[sl].max() - x[sl].min() < tw


@given(st.integers(1, 2), st.integers(1, 3), st.integers(2, 12), st.data(), st.sampled_from([0.0, 0.3, 0.5, 0.8, 0.95]))
def test_selected_blocks_per_row(b, h, n, data, sparsity):
    dense = torch.tensor(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    scores = torch.randn(b, h, n, n)
    keep = select_blocks(scores, dense, sparsity)
    assert keep[..., dense, :].all() and keep[..., :, dense].all()   # dense rows and columns
    k = kept_per_row(n, int(dense.sum()), sparsity)
    assert k == min(math.ceil(round((1 - sparsity) * n, 6)), n - int(dense.sum()))
    rows = keep[..., ~dense, :]
    assert (rows.sum(-1) == k + int(dense.sum())).all()
    free = scores[..., ~dense, :][..., ~dense]                         # chosen = best scores among the free
    chosen = rows[..., ~dense]
    if 0 < k < free.shape[-1]:
        assert (free.masked_fill(~chosen, math.inf).amin(-1) >= free.masked_fill(chosen, -math.inf).amax(-1)).all()
    if sparsity == 0:
        assert keep.all()


def test_block_mask_holds_exactly_the_kept_blocks():
    keep = torch.rand(2, 3, 5, 5) > 0.5
    assert torch.equal(block_mask(keep, 70, 16).to_dense().bool(), keep)


@given(st.integers(1, 70), st.sampled_from([4, 16]), st.sampled_from([torch.float32, torch.bfloat16]))
def test_pooled_blocks_are_block_means_with_a_short_last_block(seq, block, dtype):
    x = torch.randn(2, seq, 3, 8).to(dtype).transpose(1, 2)  # the op's [B, H, S, D] view of [B, S, H, D] memory
    blocks = x.float().split(block, dim=2)
    assert torch.allclose(pool_blocks(x, block), torch.stack([c.mean(2) for c in blocks], 2), atol=1e-6)


@given(st.integers(1, 70), st.sampled_from([4, 16]), st.integers(1, 3), st.sampled_from([torch.float32, torch.bfloat16]))
def test_block_scores_are_log_masses_of_the_mean_query(seq, block, heads, dtype):
    q, k = (torch.randn(2, seq, heads, 8).to(dtype).transpose(1, 2) for _ in range(2))
    q_mean = pool_blocks(q, block).to(dtype).float()
    expected = torch.stack([(q_mean @ kb.float().transpose(-1, -2) * 0.3).logsumexp(-1)
                            for kb in k.split(block, dim=2)], -1)
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    assert torch.allclose(block_scores(q, k, block, 0.3), expected, atol=tol, rtol=tol)


def test_a_block_with_one_matching_key_outranks_a_block_of_mild_matches():
    """The case mean-pooled keys get wrong: block A's keys all match a little (mean 0.5), block B holds one
    strong match among opposites (mean 0). Attention puts far more mass on B."""
    e = torch.eye(8)[0]
    q = (2 * e).expand(4, 8)
    k = torch.stack([0.5 * e] * 4 + [3 * e, -e, -e, -e])
    q, k = (t.view(1, 1, -1, 8) for t in (q, k))
    scores = block_scores(q, k, 4, 1.0)[0, 0, 0]
    pooled = pool_blocks(q, 4) @ pool_blocks(k, 4).transpose(-1, -2)
    assert scores[1] > scores[0] and pooled[0, 0, 0, 0] > pooled[0, 0, 0, 1]


@pytest.mark.parametrize("capability, tma, options", [((9, 0), True, {"USE_TMA": True}), ((9, 0), False, None),
                                                      ((8, 0), True, None)])
def test_flex_loads_blocks_by_tma_on_hopper_only(monkeypatch, capability, tma, options):
    import torch.utils._triton
    monkeypatch.setattr(kernels, "capability", lambda device: (capability, "a card"))
    monkeypatch.setattr(torch.utils._triton, "has_triton_tma_device", lambda: tma)
    assert kernels.flex_kernel_options(torch.device("cuda", 0)) == options
    tiles = {"BLOCK_M": 64, "BLOCK_N": 64}  # a 64-token block: tiles that divide it, else FlexAttention refuses
    assert kernels.flex_kernel_options(torch.device("cuda", 0), 64) == {**(options or {}), **tiles}
    assert kernels.flex_kernel_options(torch.device("cuda", 0), 96)["BLOCK_M"] == 32


# --- the op ---------------------------------------------------------------------------------------

def qkv(b, h, s, d, layout, dtype=torch.float32):
    shape = (b, s, h, d) if layout == "BSHD" else (b, h, s, d)
    return [torch.randn(shape, dtype=dtype) for _ in range(3)]


def dense(q, k, v, layout, scale):
    t = (lambda x: x.transpose(1, 2)) if layout == "BSHD" else (lambda x: x)
    return t(F.scaled_dot_product_attention(t(q), t(k), t(v), scale=scale))


@given(grids, texts, tiles, st.sampled_from(["BSHD", "BHSD"]))
def test_sparsity_zero_is_dense_attention(grid, text, tile, layout):
    tf, th, tw = tile
    seq = math.prod(grid) + sum(text)
    q, k, v = qkv(2, 2, seq, 8, layout)
    out = sparse_op(q, k, v, 0.3, layout, list(grid), list(text), [th, tw], tf * th * tw, 0.0, 0, 1)
    like = torch.ops.mindiesd_compile.attention(q, k, v, None, 0.3, layout)
    assert out.shape == like.shape and out.stride() == like.stride()  # same memory layout as the dense op
    assert rel_err(out, dense(q, k, v, layout, 0.3)) <= 1e-5


def paged_kv_attention(q, k_cache, v_cache, cache_seqlens, page_table, softmax_scale, return_softmax_lse=False):
    """FA3's ``flash_attn_with_kvcache`` with a page table, as documented, in plain torch: sequence ``row`` of
    the batch reads the first ``cache_seqlens[row]`` tokens of its pages ``page_table[row]`` in order; with
    ``return_softmax_lse`` also the log-sum-exp of each row's logits, [batch, heads, seqlen]."""
    page, outs, lses = k_cache.shape[1], [], []
    for row in range(q.shape[0]):
        n = int(cache_seqlens[row])
        pages = page_table[row, :-(-n // page)].long()
        k, v = (c[pages].flatten(0, 1)[:n].transpose(0, 1) for c in (k_cache, v_cache))
        logits = q[row].transpose(0, 1) @ k.transpose(-1, -2) * softmax_scale
        outs.append((logits.softmax(-1) @ v).transpose(0, 1))
        lses.append(logits.logsumexp(-1))
    return (torch.stack(outs), torch.stack(lses)) if return_softmax_lse else torch.stack(outs)


def flex_attention(q, k, v, block_mask, scale, kernel_options=None, return_aux=None):
    """FlexAttention with a ``BlockMask`` of full blocks, as documented, in plain torch (its CPU lowering does not
    compile here); with ``return_aux`` also the natural-log log-sum-exp of each row, as ``aux.lse``."""
    keep = block_mask.to_dense().bool()
    logits = (q @ k.transpose(-1, -2) * scale).masked_fill(~expand_mask(keep, q.shape[2], block_mask.BLOCK_SIZE[0]),
                                                           -math.inf)
    out = logits.softmax(-1) @ v
    return (out, types.SimpleNamespace(lse=logits.logsumexp(-1))) if return_aux is not None else out


@contextlib.contextmanager
def block_sparse_kernel(kind, paged=paged_kv_attention):
    """Run the op's ``kind`` kernel on the CPU (until a failure records a fallback, as ``choose`` does on CUDA);
    "fa3-paged" with ``paged`` standing in for FA3's kernel, "flex" with ``flex_attention`` above."""
    saved = kernels.choose, kernels.fa3_paged, kernels._flex, kernels.flex_kernel_options, dict(kernels.CHOICES)
    kernels.CHOICES.clear()
    if kind != "reference":
        kernels.choose = lambda q: kernels.CHOICES.get(kernels._key(q), kind).split(":")[0]
        kernels.fa3_paged = lambda: paged
        kernels._flex = lambda: flex_attention
        kernels.flex_kernel_options = lambda device, block: None
    try:
        yield
    finally:
        kernels.choose, kernels.fa3_paged, kernels._flex, kernels.flex_kernel_options = saved[:4]
        kernels.CHOICES.clear()
        kernels.CHOICES.update(saved[4])


@given(grids, texts, st.sampled_from(["BSHD", "BHSD"]), st.sampled_from([0.5, 0.7, 0.9]),
       st.sampled_from(["reference", "fa3-paged", "flex"]))
def test_sparse_matches_block_masked_attention_in_model_order(grid, text, layout, sparsity, kind):
    """Oracle without any reordering: the selected blocks, mapped back to model positions, as an SDPA mask.
    "fa3-paged": the page table and sequence lengths the op gives FA3 (pages = kept blocks; a short last
    block) reproduce the same attention through the paged-KV semantics."""
    tile, block = (2, 2), 4
    seq = math.prod(grid) + sum(text)
    q, k, v = qkv(1, 2, seq, 8, layout)
    with block_sparse_kernel(kind):
        out = sparse_op(q, k, v, 0.3, layout, list(grid), list(text), list(tile), block, sparsity, 0, 1)
    lay = tile_layout(grid, text, tile, block)
    bhsd = (lambda x: x.transpose(1, 2)) if layout == "BSHD" else (lambda x: x)
    qh, kh, vh = (bhsd(t) for t in (q, k, v))
    keep = select_blocks(block_scores(qh[:, :, lay.perm], kh[:, :, lay.perm], block, 0.3), lay.dense, sparsity)
    blk = lay.inverse // block                       # block of each model token
    mask = keep[:, :, blk][..., blk]
    ref = bhsd(F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=0.3))
    assert rel_err(out, ref) <= 1e-5
    # first-frame and text queries attend densely
    frames, h, w = grid
    dense_rows = torch.cat([torch.arange(text[0] + h * w), torch.arange(seq - text[1], seq)])  # text, frame 0
    o, d = bhsd(out), bhsd(dense(q, k, v, layout, 0.3))
    assert rel_err(o[:, :, dense_rows], d[:, :, dense_rows]) <= 1e-5


def remainder_oracle(q, k, v, keep, block, scale):
    """One softmax per query over [its kept blocks' tokens; one key per skipped block: the block's mean key with
    log(tokens) added to its logit, and its mean value]; q/k/v [B, H, S, D] in tile order."""
    s = q.shape[2]
    starts = range(0, s, block)
    k_mean, v_mean = (torch.stack([t[:, :, j:j + block].mean(2) for j in starts], 2) for t in (k, v))
    log_n = torch.tensor([math.log(min(block, s - j)) for j in starts])
    rows = torch.arange(s) // block
    kept_tokens, kept_blocks = keep[:, :, rows][..., rows], keep[:, :, rows]  # per query token: [S] keys, [nk] blocks
    bias = torch.cat([torch.zeros(kept_tokens.shape).masked_fill(~kept_tokens, -math.inf),
                      log_n.expand(kept_blocks.shape).masked_fill(kept_blocks, -math.inf)], -1)
    return F.scaled_dot_product_attention(q, torch.cat([k, k_mean], 2), torch.cat([v, v_mean], 2), attn_mask=bias,
                                          scale=scale)


@given(grids, texts, st.sampled_from([0.5, 0.8]), st.sampled_from(["reference", "fa3-paged", "flex"]))
def test_remainder_adds_each_skipped_block_as_its_pooled_key_and_value(grid, text, sparsity, kind):
    tile, block = (2, 2), 4
    seq = math.prod(grid) + sum(text)
    q, k, v = qkv(1, 2, seq, 8, "BSHD")
    with block_sparse_kernel(kind):
        out = sparse_op(q, k, v, 0.3, "BSHD", list(grid), list(text), list(tile), block, sparsity, 0, 1, True)
        plain = sparse_op(q, k, v, 0.3, "BSHD", list(grid), list(text), list(tile), block, sparsity, 0, 1)
    lay = tile_layout(grid, text, tile, block)
    qt, kt, vt = (t.transpose(1, 2)[:, :, lay.perm] for t in (q, k, v))
    keep = select_blocks(block_scores(qt, kt, block, 0.3), lay.dense, sparsity)
    ref = remainder_oracle(qt, kt, vt, keep, block, 0.3)[:, :, lay.inverse].transpose(1, 2)
    assert rel_err(out, ref) <= 1e-5
    if not keep.all():  # something was skipped: the remainder changed the rows that skipped it
        assert rel_err(out, plain) > 1e-4


@given(grids, st.sampled_from([0.5, 0.9]), st.sampled_from([torch.float32, torch.bfloat16]))
def test_remainder_is_exact_where_each_block_holds_one_key_and_value(grid, sparsity, dtype):
    """Blocks whose tokens share one key and value: a block's mean is every token of it, so the pooled
    remainder recovers dense attention; without it the skipped blocks are missing."""
    tile, block = (2, 2), 4
    lay = tile_layout(grid, (0, 0), tile, block)
    seq = lay.seq_len
    blocks = torch.arange(seq) // block
    q = torch.randn(1, seq, 2, 8)
    k, v = (torch.randn(1, lay.n_blocks, 2, 8)[:, blocks][:, lay.inverse] for _ in range(2))  # model order
    q, k, v = (t.to(dtype) for t in (q, k, v))
    args = (0.3, "BSHD", list(grid), [0, 0], list(tile), block, sparsity, 0, 1)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert rel_err(sparse_op(q, k, v, *args, True), dense(q, k, v, "BSHD", 0.3)) <= tol
    if lay.n_blocks - lay.n_dense > kept_per_row(lay.n_blocks, lay.n_dense, sparsity):
        assert rel_err(sparse_op(q, k, v, *args), dense(q, k, v, "BSHD", 0.3)) > 10 * tol


def test_failing_fa3_paged_kernel_falls_back_with_one_warning():
    def broken(*args, **kwargs):
        raise RuntimeError("This flash attention build does not support paged KV.")
    q, k, v = qkv(1, 2, 3 * 16, 8, "BSHD")
    call = lambda: sparse_op(q, k, v, 0.3, "BSHD", [3, 4, 4], [0, 0], [2, 2], 4, 0.5, 0, 1)  # noqa: E731
    expected = call()
    with block_sparse_kernel("fa3-paged", paged=broken), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first, second = call(), call()
        assert kernels.CHOICES[("cpu", 8, torch.float32)].startswith("reference: FA3 paged KV failed")
    assert len([w for w in caught if "paged KV" in str(w.message)]) == 1
    assert torch.equal(first, expected) and torch.equal(second, expected)


def test_page_table_lists_kept_blocks_in_order_and_stops_at_the_last_token():
    keep = torch.tensor([[[[True, False, True], [True, True, True]]]])  # 1 x 1 x 2 query blocks x 3 key blocks
    table, lengths = kernels.page_table(keep, block=4, seq_len=10)   # the last block holds 2 tokens
    assert table[:, :2].tolist() == [[0, 2], [0, 1]] and table[1, 2] == 2
    assert lengths.tolist() == [4 + 2, 4 + 4 + 2]
    table, lengths = kernels.page_table(torch.stack([keep, ~keep]).view(2, 1, 2, 3), block=4, seq_len=12)
    assert table[2, 0] == 3 + 1 and lengths.tolist() == [8, 12, 4, 0]  # batch 1's pages start after batch 0's


# --- the pass on a video DiT ------------------------------------------------------------------------

SMALL = {"block": 4, "tile": (2, 2)}  # tiny grids: 4-token blocks (1 frame x 2x2)


def tiny_wan(frames=3):
    torch.manual_seed(0)
    model, kw = wan()
    kw["hidden_states"] = torch.randn(1, 4, frames, 8, 8)  # grid frames x 4 x 4
    return model.eval(), kw


def test_wan_self_attention_rewritten_cross_attention_left_alone():
    model, kw = tiny_wan()
    got = Compiled(lambda **a: model(**a), (), kw, sparse_attention={"sparsity": 0.0, **SMALL})
    stats = got.report.stats("sparse_attention")
    assert stats.rewritten == 2 and got.ops["sparse_attention"] == 2 and got.ops["attention"] == 2
    assert {s["why"] for s in stats.skipped} == {"cross-attention (48 queries, 8 keys)"}
    with torch.no_grad():
        assert rel_err(got.out[0], model(**kw)[0]) <= 1e-5


def compiled_wan(model, **sparse):
    torch._dynamo.reset()
    return torch.compile(model, backend="mindiesd", options={"target": "eager", "sparse_attention": {**SMALL, **sparse}})


def test_dense_before_start_step_sparse_after_without_recompiling():
    from torch._dynamo.utils import counters
    model, kw = tiny_wan()
    fast = compiled_wan(model, sparsity=0.5, start_step=1)
    outs, refs = [], []
    with torch.no_grad():
        for t in (900.0, 800.0):
            step_kw = dict(kw, timestep=torch.tensor([t]))
            outs.append(fast(**step_kw)[0])
            refs.append(model(**step_kw)[0])
            if t == 900.0:
                graphs = counters["stats"]["unique_graphs"]
    assert counters["stats"]["unique_graphs"] == graphs                  # step 1 compiled nothing new
    stats = runtime.latest().stats
    assert stats["dense"] == 2 and stats["sparse"] == 2                  # 2 sites: step 0 dense, step 1 sparse
    assert rel_err(outs[0], refs[0]) <= 1e-5
    assert 1e-4 < rel_err(outs[1], refs[1]) < 0.1                        # sparse: close, not equal


def test_remainder_option_reaches_the_op_and_brings_the_model_closer_to_dense():
    model, kw = tiny_wan(frames=5)
    with torch.no_grad():
        ref = model(**kw)[0]
        with_rem, without = (compiled_wan(model, sparsity=0.7, **extra)(**kw)[0] for extra in ({}, {"remainder": False}))
    assert rel_err(with_rem, without) > 1e-4                            # the default (remainder on) changed the op
    assert rel_err(with_rem, ref) < rel_err(without, ref) < 0.1


def test_dense_steps_run_the_attention_op_and_its_kernel_choice():
    """Before start_step the op is the ``attention`` op (FA3 on Hopper), not a fixed SDPA call."""
    from torch.profiler import profile
    q, k, v = qkv(1, 2, 3 * 16, 8, "BSHD")
    sparse = runtime.SparseRuntime()
    sparse.begin_call(999.0, ("signature",))
    with sparse.active(), profile() as prof:
        out = sparse_op(q, k, v, 0.3, "BSHD", [3, 4, 4], [0, 0], [2, 2], 4, 0.8, 1, 1)
    assert "mindiesd_compile::attention" in {e.name for e in prof.events()} and sparse.stats["dense"] == 1
    assert torch.equal(out, torch.ops.mindiesd_compile.attention(q, k, v, None, 0.3, "BSHD"))


def test_masks_reused_for_mask_refresh_steps_per_cfg_branch():
    model, kw = tiny_wan()
    fast = compiled_wan(model, sparsity=0.5, start_step=1, mask_refresh=2)
    uncond = dict(kw, encoder_hidden_states=torch.randn_like(kw["encoder_hidden_states"]))
    with torch.no_grad():
        for t in (900.0, 800.0, 700.0, 600.0):                           # steps 0..3, two CFG branches each
            for branch in (kw, uncond):
                fast(**dict(branch, timestep=torch.tensor([t])))
    stats = runtime.latest().stats
    # 2 sites x 2 branches: step 0 dense, step 1 computes, step 2 reuses, step 3 computes
    assert stats["dense"] == 4 and stats["masks_computed"] == 8 and stats["masks_reused"] == 4


def joint(text_first):
    """Joint attention over [text; video] or [video; text] tokens."""
    def fn(x, txt, wq, wk, wv):
        seq = torch.cat([txt, x] if text_first else [x, txt], dim=1)
        q, k, v = ((seq @ w).unflatten(-1, (2, 8)).transpose(1, 2) for w in (wq, wk, wv))
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
    return fn


@pytest.mark.parametrize("text_first", [True, False])
def test_joint_attention_keeps_text_dense(text_first):
    fn = joint(text_first)
    args = (torch.randn(1, 48, 16), torch.randn(1, 5, 16), *(torch.randn(16, 16) for _ in range(3)))
    got = Compiled(fn, args, sparse_attention={"sparsity": 0.7, "grid": (3, 4, 4), **SMALL})
    assert got.rewritten("sparse_attention") == 1 and got.ops["sparse_attention"] == 1
    ref = fn(*args)
    text_rows = slice(0, 5) if text_first else slice(48, 53)
    first_frame = slice(5, 21) if text_first else slice(0, 16)
    assert rel_err(got.out[:, text_rows], ref[:, text_rows]) <= 1e-5       # text queries: dense
    assert rel_err(got.out[:, first_frame], ref[:, first_frame]) <= 1e-5   # first frame queries: dense
    assert rel_err(got.out, ref) > 1e-4


@pytest.mark.parametrize("case, why", [
    ("not_grid", "sequence of 50 tokens is not the video grid 3x4x4 = 48 (plus text)"),
    ("masked", "attention with a mask"),
    ("one_frame", "a single frame"),
])
def test_near_misses_are_left_alone(case, why):
    seq = 50 if case == "not_grid" else 48
    grid = (1, 8, 6) if case == "one_frame" else (3, 4, 4)
    mask = torch.randn(seq, seq) if case == "masked" else None
    fn = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # noqa: E731
    args = [torch.randn(1, 2, seq, 8) for _ in range(3)]
    got = Compiled(fn, args, sparse_attention={"sparsity": 0.5, "grid": grid, **SMALL})
    assert got.ops["sparse_attention"] == 0 and got.ops["attention"] == 1
    assert got.report.stats("sparse_attention").skipped[0]["why"].startswith(why)
    assert rel_err(got.out, fn(*args)) <= 1e-5


def test_no_grid_in_graph_is_reported():
    fn = lambda q, k, v: F.scaled_dot_product_attention(q, k, v)  # noqa: E731
    got = Compiled(fn, [torch.randn(1, 2, 48, 8) for _ in range(3)], sparse_attention={"sparsity": 0.5})
    assert got.ops["sparse_attention"] == 0
    assert "no video grid" in got.report.stats("sparse_attention").skipped[0]["why"]


# --- options ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("value, message", [
    ({"sparsity": 0.8, "blok": 64}, r"unknown sparse_attention option\(s\) \['blok'\]; valid sparse_attention options"),
    ({"sparsity": 1.0}, r"'sparsity'\] must be a number in \[0, 1\)"),
    ({"sparsity": -0.1}, r"'sparsity'\] must be a number in \[0, 1\)"),
    ({"block": 100}, r"block \(100\) must be a multiple of tile_h \* tile_w \(64\)"),
    ({"start_step": -1}, r"'start_step'\] must be an int >= 0"),
    ({"tile": (8,)}, r"'tile'\] must be two ints"),
    ({"grid": (2, 3)}, r"'grid'\] must be three ints"),
    ({"remainder": 1}, r"'remainder'\] must be True or False"),
    (0.8, r"must be a dict"),
])
def test_bad_sparse_options_name_the_problem(value, message):
    with pytest.raises(OptionsError, match=message):
        CompileOptions.from_dict({"sparse_attention": value})


def test_sparse_options_against_other_options():
    with pytest.raises(OptionsError, match="needs the 'attention' pattern"):
        CompileOptions.from_dict({"sparse_attention": {}, "patterns": ["rms_norm"]})
    with pytest.raises(OptionsError, match="mask_refresh'\\] > 1 cannot be combined with options\\['cache'\\]"):
        CompileOptions.from_dict({"sparse_attention": {"mask_refresh": 2}, "cache": {"policy": "block"}})
    assert CompileOptions.from_dict({"sparse_attention": {"sparsity": 0.8}}).sparse_attention.frames_per_tile == 2


def test_the_runtime_reads_the_timestep_of_an_unboxed_call():
    """Dynamo calls the backend's result with the inputs as arguments, even where the compiled forward carries
    Inductor's ``_boxed_call`` (a graph without repeated blocks): the runtime tracks steps by the real timestep."""
    gm = torch.fx.symbolic_trace(lambda x, timestep: x * timestep)
    forward = lambda x, timestep: gm(x, timestep)  # noqa: E731
    forward._boxed_call = True  # as aot_autograd's forward says, though it takes the inputs unboxed
    call = runtime.with_runtime(forward, gm)
    seen = []
    call.sparse_runtime.begin_call = lambda timestep, signature: seen.append(timestep)
    for t in (900.0, 800.0):
        torch.testing.assert_close(call(torch.ones(2), torch.tensor([t])), torch.full((2,), t))
    assert seen == [900.0, 800.0]
