"""Weight transforms: rotary permutation, tensor-parallel slicing, fusion and padding."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from lmkiln.convert.rope import apply_rotary, cos_sin, inv_freq
from lmkiln.convert.transforms import (
    fuse_qkv_rank, fuse_w13_rank, kv_rank_heads, pad_cols, pad_rows, permute_rotary, rank_cols, rank_rows, unpermute_rotary,
)
from lmkiln.formats.engine import check_tp
from lmkiln.formats.packing import round_up

FAST = settings(max_examples=25, deadline=None)

heads_st = st.integers(1, 6)
head_dim_st = st.integers(1, 8).map(lambda n: 2 * n)


# -- rotary permutation -------------------------------------------------------------------


@FAST
@given(heads_st, head_dim_st, st.integers(1, 5), st.integers(0, 2**16))
def test_permute_unpermute_round_trip(n_heads, head_dim, cols, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n_heads * head_dim, cols, generator=g)
    p = permute_rotary(w, n_heads, head_dim)
    assert p.shape == w.shape
    assert torch.equal(unpermute_rotary(p, n_heads, head_dim), w)
    assert torch.equal(permute_rotary(unpermute_rotary(w, n_heads, head_dim), n_heads, head_dim), w)
    # Rows are only reordered, within their own head.
    for h in range(n_heads):
        blk = slice(h * head_dim, (h + 1) * head_dim)
        assert sorted(p[blk, 0].tolist()) == sorted(w[blk, 0].tolist())


@FAST
@given(heads_st, head_dim_st)
def test_permute_row_mapping(n_heads, head_dim):
    """New row 2j+c of a head takes old row c*head_dim/2 + j (the documented mapping)."""
    rows = torch.arange(n_heads * head_dim)
    p = permute_rotary(rows, n_heads, head_dim)  # 1-D: works like a bias
    half = head_dim // 2
    for h in range(n_heads):
        for j in range(half):
            for c in range(2):
                assert int(p[h * head_dim + 2 * j + c]) == h * head_dim + c * half + j


def test_permute_is_not_identity():
    w = torch.arange(8.0)
    assert not torch.equal(permute_rotary(w, 1, 8), w)
    assert permute_rotary(w, 1, 8).tolist() == [0, 4, 1, 5, 2, 6, 3, 7]


def test_permute_shape_mismatch():
    with pytest.raises(AssertionError):
        permute_rotary(torch.zeros(10, 3), 2, 4)


def _hf_rotary(x, freq, positions):
    """transformers' own rotate_half rotary on x (B, T, heads, dim)."""
    angles = positions.float()[..., None] * freq
    emb = torch.cat([angles, angles], dim=-1)
    out, _ = apply_rotary_pos_emb(x, x, emb.cos(), emb.sin(), unsqueeze_dim=2)
    return out


@FAST
@given(heads_st, head_dim_st, st.integers(1, 6), st.sampled_from(["default", "linear", "llama3"]), st.integers(0, 2**16))
def test_rotary_commutes_with_permutation(n_heads, head_dim, T, rope_type, seed):
    """rotate_half rotary on W x, then permuted == interleaved rotary on permute(W) x."""
    g = torch.Generator().manual_seed(seed)
    hidden = 8
    W = torch.randn(n_heads * head_dim, hidden, generator=g, dtype=torch.float64).float()
    x = torch.randn(2, T, hidden, generator=g)
    positions = torch.tensor([list(range(T)), list(range(3, 3 + T))])
    scaling = {"linear": {"factor": 4.0},
               "llama3": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16}}.get(rope_type)
    freq = inv_freq({"type": rope_type, "base": 10000.0, "dim": head_dim, "scaling": scaling})

    q_hf = (x @ W.t()).view(2, T, n_heads, head_dim)
    hf_rot = _hf_rotary(q_hf, freq, positions)

    q_int = (x @ permute_rotary(W, n_heads, head_dim).t()).view(2, T, n_heads, head_dim)
    cos, sin = cos_sin(freq, positions)
    int_rot = apply_rotary(q_int, cos, sin)

    expected = permute_rotary(hf_rot.reshape(-1, n_heads * head_dim).t(), n_heads, head_dim).t().reshape(2, T, n_heads, head_dim)
    torch.testing.assert_close(int_rot, expected, rtol=1e-5, atol=1e-5)
    # And back: un-permuting the engine's rotated q gives HF's.
    back = unpermute_rotary(int_rot.reshape(-1, n_heads * head_dim).t(), n_heads, head_dim).t().reshape(2, T, n_heads, head_dim)
    torch.testing.assert_close(back, hf_rot, rtol=1e-5, atol=1e-5)


@FAST
@given(head_dim_st, st.integers(0, 2**16))
def test_attention_scores_invariant(head_dim, seed):
    """Permuting q and k alike leaves every q.k score (what attention sees) unchanged."""
    g = torch.Generator().manual_seed(seed)
    n_heads, hidden, T = 2, 8, 5
    Wq, Wk = torch.randn(n_heads * head_dim, hidden, generator=g), torch.randn(n_heads * head_dim, hidden, generator=g)
    bq, bk = torch.randn(n_heads * head_dim, generator=g), torch.randn(n_heads * head_dim, generator=g)
    x = torch.randn(1, T, hidden, generator=g)
    pos = torch.arange(T)[None]
    freq = inv_freq({"type": "default", "base": 10000.0, "dim": head_dim, "scaling": None})
    q = _hf_rotary((x @ Wq.t() + bq).view(1, T, n_heads, head_dim), freq, pos)
    k = _hf_rotary((x @ Wk.t() + bk).view(1, T, n_heads, head_dim), freq, pos)
    cos, sin = cos_sin(freq, pos)
    pq = apply_rotary((x @ permute_rotary(Wq, n_heads, head_dim).t() + permute_rotary(bq, n_heads, head_dim)).view(1, T, n_heads, head_dim), cos, sin)
    pk = apply_rotary((x @ permute_rotary(Wk, n_heads, head_dim).t() + permute_rotary(bk, n_heads, head_dim)).view(1, T, n_heads, head_dim), cos, sin)
    scores = torch.einsum("bthd,bshd->bhts", q, k)
    pscores = torch.einsum("bthd,bshd->bhts", pq, pk)
    torch.testing.assert_close(pscores, scores, rtol=1e-4, atol=1e-4)


def test_per_head_norm_permutation():
    """A per-head norm weight (head_dim,) is permuted with n_heads=1, consistent with the rows."""
    hd = 6
    w = torch.arange(hd, dtype=torch.float32) + 1
    q = torch.randn(3, hd)
    normed = q * w  # the RMSNorm scaling part, per head
    # Permuting (q rows) and the norm weight alike commutes with the elementwise scale.
    torch.testing.assert_close(permute_rotary(normed.t(), 1, hd).t(), permute_rotary(q.t(), 1, hd).t() * permute_rotary(w, 1, hd))


# -- tensor parallel ----------------------------------------------------------------------


def test_kv_rank_heads_split():
    assert [kv_rank_heads(8, 4, r) for r in range(4)] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert [kv_rank_heads(2, 1, r) for r in range(1)] == [(0, 2)]
    assert [kv_rank_heads(4, 4, r) for r in range(4)] == [(0, 1), (1, 2), (2, 3), (3, 4)]


def test_kv_rank_heads_replicated():
    # tp > kv heads: each kv head on tp/kv consecutive ranks.
    assert [kv_rank_heads(2, 4, r) for r in range(4)] == [(0, 1), (0, 1), (1, 2), (1, 2)]
    assert [kv_rank_heads(1, 4, r) for r in range(4)] == [(0, 1)] * 4
    assert [kv_rank_heads(2, 8, r)[0] for r in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]


@st.composite
def valid_heads(draw):
    kv = draw(st.sampled_from([1, 2, 4, 8]))
    group = draw(st.sampled_from([1, 2, 4]))
    hq = kv * group
    tp = draw(st.sampled_from([t for t in (1, 2, 4, 8, 16) if check_tp(hq, kv, t) is None]))
    return hq, kv, tp


@FAST
@given(valid_heads())
def test_kv_heads_match_q_heads_on_every_rank(heads):
    """For every split check_tp accepts, each rank holds the kv heads its q heads attend with."""
    hq, kv, tp = heads
    group = hq // kv
    held = []
    for r in range(tp):
        a, b = kv_rank_heads(kv, tp, r)
        assert 0 <= a < b <= kv
        held.append((a, b))
        for qh in range(r * hq // tp, (r + 1) * hq // tp):
            assert a <= qh // group < b, (hq, kv, tp, r, qh)
    # Every kv head is held by some rank; without replication the ranks partition them.
    assert set().union(*(range(a, b) for a, b in held)) == set(range(kv))
    if tp <= kv:
        assert sum(b - a for a, b in held) == kv


@pytest.mark.parametrize("hq, kv, tp", [(4, 2, 1), (4, 2, 2), (4, 2, 4), (8, 8, 4), (8, 2, 8)])
def test_fuse_qkv_rank(hq, kv, tp):
    hd, h = 4, 12
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(hq * hd, h, generator=g), torch.randn(kv * hd, h, generator=g), torch.randn(kv * hd, h, generator=g)
    kv_r = max(kv // tp, 1)
    qs = []
    for r in range(tp):
        fused = fuse_qkv_rank(q, k, v, hd, kv, tp, r)
        assert fused.shape == ((hq // tp + 2 * kv_r) * hd, h)
        a, b = kv_rank_heads(kv, tp, r)
        nq = hq // tp * hd
        qs.append(fused[:nq])
        assert torch.equal(fused[nq:nq + kv_r * hd], k[a * hd:b * hd])
        assert torch.equal(fused[nq + kv_r * hd:], v[a * hd:b * hd])
    assert torch.equal(torch.cat(qs), q)
    # Biases (1-D) fuse the same way.
    qb, kb, vb = q[:, 0].contiguous(), k[:, 0].contiguous(), v[:, 0].contiguous()
    assert torch.equal(fuse_qkv_rank(qb, kb, vb, hd, kv, tp, tp - 1), fuse_qkv_rank(q, k, v, hd, kv, tp, tp - 1)[:, 0])


def test_rank_rows_cols():
    w = torch.arange(24).reshape(4, 6)
    assert torch.equal(torch.cat([rank_rows(w, 2, r) for r in range(2)]), w)
    assert torch.equal(torch.cat([rank_cols(w, 3, r) for r in range(3)], 1), w)
    assert rank_cols(w, 3, 1).tolist() == [[2, 3], [8, 9], [14, 15], [20, 21]]
    with pytest.raises(AssertionError):
        rank_rows(w, 3, 0)
    with pytest.raises(AssertionError):
        rank_cols(w, 4, 0)


@pytest.mark.parametrize(
    "hq, kv, tp, message",
    [
        (4, 2, 0, "at least 1"),
        (4, 2, -1, "at least 1"),
        (4, 2, 3, "4 attention heads do not split into 3 ranks"),
        (12, 3, 2, "3 kv heads do not split into 2 ranks"),
        (12, 2, 3, "3 ranks cannot replicate 2 kv heads evenly"),
    ],
)
def test_check_tp_refusals(hq, kv, tp, message):
    why = check_tp(hq, kv, tp)
    assert why is not None and message in why


@pytest.mark.parametrize("hq, kv, tp", [(4, 2, 1), (4, 2, 2), (4, 2, 4), (8, 1, 8), (8, 8, 8), (32, 8, 4)])
def test_check_tp_accepts(hq, kv, tp):
    assert check_tp(hq, kv, tp) is None


def test_round_up():
    assert [round_up(x, 4) for x in (1, 4, 5, 8, 9)] == [4, 4, 8, 8, 12]
    assert round_up(96, 1) == 96
    assert round_up(0, 3) == 0


# -- padding and the MLP ------------------------------------------------------------------


def _mlp(x, gate, up, down):
    return (F.silu(x @ gate.t()) * (x @ up.t())) @ down.t()


@FAST
@given(st.integers(1, 20), st.integers(0, 12), st.integers(0, 2**16))
def test_padding_leaves_mlp_output_unchanged(inter, extra, seed):
    g = torch.Generator().manual_seed(seed)
    h = 8
    gate, up, down = torch.randn(inter, h, generator=g), torch.randn(inter, h, generator=g), torch.randn(h, inter, generator=g)
    x = torch.randn(3, h, generator=g)
    ref = _mlp(x, gate, up, down)
    rows = inter + extra
    pg, pu, pd = pad_rows(gate, rows), pad_rows(up, rows), pad_cols(down, rows)
    assert pg.shape == (rows, h) and pu.shape == (rows, h) and pd.shape == (h, rows)
    assert torch.equal(pg[:inter], gate) and torch.equal(pd[:, :inter], down)
    assert not pg[inter:].any() and not pd[:, inter:].any()
    torch.testing.assert_close(_mlp(x, pg, pu, pd), ref, rtol=1e-5, atol=1e-5)


def test_pad_is_noop_when_already_sized():
    w = torch.randn(4, 3)
    assert pad_rows(w, 4) is w
    assert pad_cols(w, 3) is w
    with pytest.raises(AssertionError):
        pad_rows(w, 2)
    with pytest.raises(AssertionError):
        pad_cols(w, 2)


@pytest.mark.parametrize("inter, tp", [(96, 1), (96, 4), (10, 4), (7, 2), (5, 8)])
def test_tensor_parallel_mlp_sums_to_full(inter, tp):
    """Pad to a multiple of tp, split w13 by rows and w2 by cols: summed rank outputs == full MLP."""
    g = torch.Generator().manual_seed(inter * 10 + tp)
    h = 16
    gate, up, down = torch.randn(inter, h, generator=g), torch.randn(inter, h, generator=g), torch.randn(h, inter, generator=g)
    x = torch.randn(2, h, generator=g)
    inter_p = round_up(inter, tp)
    pg, pu, pd = pad_rows(gate, inter_p), pad_rows(up, inter_p), pad_cols(down, inter_p)
    total = torch.zeros(2, h)
    for r in range(tp):
        w13 = fuse_w13_rank(pg, pu, tp, r)
        assert w13.shape == (2 * inter_p // tp, h)
        gr, ur = w13.chunk(2, dim=0)
        total += (F.silu(x @ gr.t()) * (x @ ur.t())) @ rank_cols(pd, tp, r).t()
    torch.testing.assert_close(total, _mlp(x, gate, up, down), rtol=1e-4, atol=1e-4)
