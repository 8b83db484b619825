"""Chunked parallel form of GLA: the per-key gate's kernels, beside the state pass they share with the scalar-gate
family (triton_src/chunk.py, chunk_gla_scan).

Per head, with chunks of BT = 64 tokens, G_i the running sum of the per-key log gate inside the chunk (G_L at its
last token), h the state [K, V] at the chunk's start and dh its gradient at the chunk's end:

    A[i, j] = scale * sum_k q_ik k_jk exp(G_ik - G_jk)         for j <= i (zero above the diagonal)
    o_i     = scale * (q_i * exp(G_i)) h + sum_j A[i, j] v_j
    dv_j    = sum_i A[i, j] do_i + (k_j * exp(G_L - G_j)) dh
    dA[i, j] = scale * do_i . v_j                             for j <= i
    dq_i    = scale * exp(G_i) * (do_i h^T) + sum_j dA[i, j] k_j exp(G_i - G_j)
    dk_j    = exp(G_L - G_j) * (v_j dh^T) + sum_i dA[i, j] q_i exp(G_i - G_j)

The intra-chunk sums differ per key, so exp(G_i - G_j) cannot leave the sum over keys as it does for a scalar gate.
They are taken on a pairing tree over the chunk's rows instead: at level s (s = 1, 2, ..., 32) each block of 2s
rows pairs its later s rows i with its earlier s rows j, and exp(G_i - G_j) = exp(G_i - G_m) exp(G_m - G_j) with
m the first later row, both factors at most 1 (nothing overflows, and a factor underflows only where the product
it belongs to is smaller still). Every pair j < i meets at exactly one level, so a level's sums are tensor-core
products of factored rows: log2(64) = 6 levels and one exp per element and level, where a column at a time needs
an exp per element and pair (the forward takes each level's blocks as one batched product, the backward one
product masked to the level's pairs). The diagonal has no decay. Where the gate sums stay within SPAN of one row
m (a launch constexpr per dtype), exp(G_i - G_m) exp(G_m - G_j) through that single row is safe for every pair
inside it, and the tree's levels give way to one product: for the whole chunk through its middle row, else for the
16-row diagonal blocks through theirs (the levels below 16). Between kernels A [B, T, H, 64] is kept in the
inputs' dtype (the products that read it round it to that dtype anyway), dA and the state's shares of dq and dk in
float32.
"""
import triton
import triton.language as tl

from tools.kernel_spec import AlignedAxis, BucketAxis, DtypeAxis, Float, OpSpec, Output, Tensor
from triton_src.chunk import CHUNK, FLOAT_DTYPES, K_BUCKETS, _dot
from triton_src.fused_recurrent import _load_f32


@triton.jit
def _chunk_bounds(chunks, i_ch, H):
    # (head, first token, end token) of the chunk x head program i_ch
    i_c = i_ch // H
    t0 = tl.load(chunks + i_c * 4 + 1).to(tl.int64)
    t1 = tl.load(chunks + i_c * 4 + 2).to(tl.int64)
    return i_ch % H, t0, t1


@triton.jit
def _exp_where(mask, x):
    # exp(x) where mask, else 1: masked lanes hold arbitrary (possibly huge) gate differences
    return tl.exp(tl.where(mask, x, 0.))


@triton.jit
def _key_slice(i_k, BK: tl.constexpr, K, o_t, mask_t, i_h, H):
    """Slice i_k of K over the chunk's tokens o_t: its keys, their mask, the tile's mask and offsets in [B, T, H, K]."""
    o_k = i_k * BK + tl.arange(0, BK)
    mask_k = o_k < K
    return o_k, mask_k, mask_t[:, None] & mask_k[None, :], (o_t[:, None] * H + i_h) * K + o_k[None, :]


@triton.jit
def chunk_gk_cumsum_kernel(gk, q, chunks, gcum, qg, gk_dtype, H, K,
                           KP: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr):
    """GLA's gate summed up to each token of its chunk, per key (a BK-wide slice of them), in float32; and
    q exp(that sum) in q's dtype, the query the output's inter-chunk product takes (one read of q and the gate here
    instead of in chunk_gla_fwd_o)."""
    i_h, t0, t1 = _chunk_bounds(chunks, tl.program_id(0), H)
    o_t = t0 + tl.arange(0, BT)
    o_k = tl.program_id(1) * BK + tl.arange(0, BK)
    m = (o_t < t1)[:, None] & (o_k < K)[None, :]
    off = (o_t[:, None] * H + i_h) * K + o_k[None, :]
    b_g = tl.cumsum(_load_f32(gk, off, m, gk_dtype, 0.), 0)
    tl.store(gcum + off, b_g, mask=m)
    b_q = tl.load(q + off, mask=m, other=0.)
    tl.store(qg + off, (b_q * tl.exp(b_g)).to(qg.dtype.element_ty), mask=m)


@triton.jit
def _tree_operand(x, like, TF32: tl.constexpr):
    # the tree's factored rows (float32) as its products take them: kept for float32 inputs and for tf32 (TF32),
    # else rounded to the inputs' 16-bit dtype (bfloat16: 7 bits of mantissa, tf32: 10)
    if like.dtype == tl.float32 or TF32:
        return x
    else:
        return x.to(like.dtype)


@triton.jit
def _tree_dot(a, b, like, TF32: tl.constexpr):
    # exact products for float32 inputs; for 16-bit ones, tensor cores in tf32 or in the inputs' dtype
    if like.dtype == tl.float32:
        return tl.dot(a, b, input_precision="ieee")
    elif TF32:
        return tl.dot(a, b, input_precision="tf32")
    else:
        return tl.dot(a, b)


@triton.jit
def _level_rows(g, b_g, b_q, b_k, i_h, H, K, t0, t1, o_j, o_k, mask_k, s: tl.constexpr, TF32: tl.constexpr):
    """Level s of the chunk's pairing tree: in each block of 2s rows, the s later rows pair with the s earlier
    ones, and exp(G_i - G_j) of a pair factors through G at m, the first of the later rows: e = exp(G_i - G_m) on
    later rows, exp(G_m - G_j) on earlier ones (the gate only decays, so both are <= 1, and a factor underflows
    only where the product it belongs to is smaller still). Returns e and the factored rows as the tree's products
    take them: q e on the later rows, k e on the earlier ones, zero elsewhere and where a row or m lies past the
    sequence's end."""
    later = ((o_j % (2 * s)) >= s)[:, None]
    o_m = (o_j // (2 * s)) * (2 * s) + s
    ok = (t0 + tl.maximum(o_j, o_m) < t1)[:, None] & mask_k[None, :]
    b_gm = tl.load(g + ((t0 + o_m)[:, None] * H + i_h) * K + o_k[None, :], mask=ok, other=0.)
    d = b_g - b_gm
    e = tl.exp(tl.where(ok, tl.where(later, d, -d), 0.))
    return (e, _tree_operand(tl.where(ok & later, b_q * e, 0.), b_q, TF32),
            _tree_operand(tl.where(ok & ~later, b_k * e, 0.), b_k, TF32))


@triton.jit
def _rows_tile(rows, o_k, i_h, H, K, t0, t1, mask_k):
    """Offsets into [B, T, H, K] of the chunk's rows `rows` [X, Y] (rows past t1 masked) x keys o_k, and their mask."""
    offsets = ((t0 + rows)[:, :, None] * H + i_h) * K + o_k[None, None, :]
    return offsets, ((t0 + rows) < t1)[:, :, None] & mask_k[None, None, :]


@triton.jit
def _diagonal_level(g, b_g, b_q, b_k, rows, o_s, o_c, o_k, mask_k, i_h, H, K, t0, t1, S: tl.constexpr,
                    TF32: tl.constexpr):
    """Level S < 16 of the pairing tree inside the 16-row diagonal blocks [NS, 16, BK]: its pairs' products."""
    later = ((o_c % (2 * S)) >= S)[None, :, None]
    o_m = o_s * 16 + (o_c[None, :] // (2 * S)) * (2 * S) + S
    p_m, _ = _rows_tile(o_m, o_k, i_h, H, K, t0, t1, mask_k)
    _, ok = _rows_tile(tl.maximum(rows, o_m), o_k, i_h, H, K, t0, t1, mask_k)
    d = b_g - tl.load(g + p_m, mask=ok, other=0.)
    e = tl.exp(tl.where(ok, tl.where(later, d, -d), 0.))
    b_qe = _tree_operand(tl.where(ok & later, b_q * e, 0.), b_q, TF32)
    b_ke = _tree_operand(tl.where(ok & ~later, b_k * e, 0.), b_k, TF32)
    block = ((o_c[:, None] // (2 * S)) == (o_c[None, :] // (2 * S)))[None]
    return tl.where(block, _tree_dot(b_qe, tl.permute(b_ke, (0, 2, 1)), b_q, TF32), 0.)


@triton.jit
def _block_level(q, k, g, A, a_row, scale, i_h, H, K, t0, t1, BK: tl.constexpr, BT: tl.constexpr, S: tl.constexpr,
                 TF32: tl.constexpr):
    """Level S >= 16 of the pairing tree: in block b of 2S rows, the later rows b 2S + S + r pair with the earlier
    rows b 2S + r through the gate at row m = b 2S + S, one batched product [BT / 2S, S, S] stored to its block of
    A, and zeros to the mirrored block above the diagonal."""
    NB: tl.constexpr = BT // (2 * S)
    o_b = tl.arange(0, NB)[:, None]
    o_r = tl.arange(0, S)
    r_e = o_b * (2 * S) + o_r[None, :]  # [NB, S]
    r_l = r_e + S
    r_m = o_b * (2 * S) + S  # [NB, 1]
    b_A = tl.zeros([NB, S, S], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        mask_k = o_k < K
        p_l, ok_l = _rows_tile(r_l, o_k, i_h, H, K, t0, t1, mask_k)
        p_e, ok_e = _rows_tile(r_e, o_k, i_h, H, K, t0, t1, mask_k)
        p_m, ok_m = _rows_tile(r_m, o_k, i_h, H, K, t0, t1, mask_k)
        ok_e = ok_e & ok_m  # an anchor past the sequence's end: no later rows to pair with
        b_gm = tl.load(g + p_m, mask=ok_m, other=0.)
        b_q = tl.load(q + p_l, mask=ok_l, other=0.)
        b_k = tl.load(k + p_e, mask=ok_e, other=0.)
        e_l = tl.exp(tl.where(ok_l, tl.load(g + p_l, mask=ok_l, other=0.) - b_gm, 0.))
        e_e = tl.exp(tl.where(ok_e, b_gm - tl.load(g + p_e, mask=ok_e, other=0.), 0.))
        b_qe = _tree_operand(tl.where(ok_l, b_q * e_l, 0.), b_q, TF32)
        b_ke = _tree_operand(tl.where(ok_e, b_k * e_e, 0.), b_q, TF32)
        b_A += _tree_dot(b_qe, tl.permute(b_ke, (0, 2, 1)), b_q, TF32)
    cols = (o_b * (2 * S))[:, :, None] + o_r[None, None, :]
    tl.store(A + a_row + r_l[:, :, None] * H * BT + cols, (b_A * scale).to(A.dtype.element_ty),
             mask=((t0 + r_l) < t1)[:, :, None])
    tl.store(A + a_row + r_e[:, :, None] * H * BT + cols + S, tl.zeros([NB, S, S], dtype=A.dtype.element_ty),
             mask=((t0 + r_e) < t1)[:, :, None])


@triton.jit
def _reference_rows(g, t0, t1, i_h, H, K, o_k, mask_k, rows_ref):
    """The gate sums at the chunk's rows rows_ref (clamped to the sequence's last row) x keys o_k (broadcast)."""
    r = tl.minimum(t0 + rows_ref, t1 - 1)
    return tl.load(g + (r * H + i_h) * K + o_k, mask=mask_k, other=0.)


@triton.jit
def _spans(g, i_h, H, K, t0, t1, BK: tl.constexpr, BT: tl.constexpr):
    """How far the chunk's gate sums stray from its reference rows, over all keys: max |G_i - G_ref| for the
    chunk's middle row (one reference row for all of A where it is at most SPAN) and for each 16-row block's middle
    row over its own rows (one per block)."""
    NS: tl.constexpr = BT // 16
    rows = tl.arange(0, NS)[:, None] * 16 + tl.arange(0, 16)[None, :]  # [NS, 16]
    chunk_span = tl.zeros([NS, 16, BK], dtype=tl.float32)
    block_span = tl.zeros([NS, 16, BK], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        mask_k = o_k < K
        p, m = _rows_tile(rows, o_k, i_h, H, K, t0, t1, mask_k)
        b_g = tl.load(g + p, mask=m, other=0.)
        o_k3, mask_k3 = o_k[None, None, :], mask_k[None, None, :]
        d = b_g - _reference_rows(g, t0, t1, i_h, H, K, o_k3, mask_k3, BT // 2)
        chunk_span = tl.maximum(chunk_span, tl.where(m, tl.abs(d), 0.))
        d = b_g - _reference_rows(g, t0, t1, i_h, H, K, o_k3, mask_k3, (tl.arange(0, NS) * 16 + 8)[:, None, None])
        block_span = tl.maximum(block_span, tl.where(m, tl.abs(d), 0.))
    return tl.max(tl.max(tl.max(chunk_span, 2), 1), 0), tl.max(tl.max(tl.max(block_span, 2), 1), 0)


@triton.jit
def _factored_rows(b_q, b_k, d, TF32: tl.constexpr):
    """For the products through one reference row, d = G - G_ref (|d| <= SPAN): e = exp(d), 1 / e, and the rows as
    the products take them, q e on the query side and k / e on the key side."""
    e = tl.exp(d)
    e_inv = tl.exp(-d)
    return e, e_inv, _tree_operand(b_q * e, b_q, TF32), _tree_operand(b_k * e_inv, b_q, TF32)


@triton.jit
def _lower_with_diagonal(b_A, b_diag, rows, cols):
    # the one-reference product below the diagonal, the diagonal (no decay) from unrounded rows: there the product
    # would carry two roundings of rows whose pair decays least, the largest scores under a strong gate
    return tl.where(rows == cols, b_diag, tl.where(rows > cols, b_A, 0.))


@triton.jit
def _one_reference_scores(q, k, g, A, a_row, scale, i_h, H, K, t0, t1, BK: tl.constexpr, BT: tl.constexpr,
                          TF32: tl.constexpr):
    """Stores A of the chunk [t0, t1) as one product: exp(G_i - G_j) = exp(G_i - G_ref) exp(G_ref - G_j) for every
    pair, G_ref at the chunk's middle row (_factored_rows). Taken only where |G - G_ref| <= SPAN, so no factor
    overflows or leaves the normal range of the rows' dtype; the products of pairs above the diagonal may be huge
    and are dropped."""
    o_j = tl.arange(0, BT)
    o_t = t0 + o_j
    mask_t = o_t < t1
    b_A = tl.zeros([BT, BT], dtype=tl.float32)
    b_diag = tl.zeros([BT], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k, mask_k, m, p = _key_slice(i_k, BK, K, o_t, mask_t, i_h, H)
        b_gr = _reference_rows(g, t0, t1, i_h, H, K, o_k[None, :], mask_k[None, :], BT // 2)
        d = tl.where(m, tl.load(g + p, mask=m, other=0.) - b_gr, 0.)
        b_q = tl.load(q + p, mask=m, other=0.)
        b_k = tl.load(k + p, mask=m, other=0.)
        _, _, b_qe, b_ke = _factored_rows(b_q, b_k, d, TF32)
        b_A += _tree_dot(b_qe, tl.trans(b_ke), b_q, TF32)
        b_diag += tl.sum(b_q.to(tl.float32) * b_k.to(tl.float32), 1)
    tl.store(A + a_row + o_j[:, None] * H * BT + o_j[None, :],
             (_lower_with_diagonal(b_A, b_diag[:, None], o_j[:, None], o_j[None, :]) * scale).to(A.dtype.element_ty),
             mask=mask_t[:, None])


@triton.jit
def _block_tiles(q, k, rows, i_k, BK: tl.constexpr, i_h, H, K, t0, t1):
    """Slice i_k of K over the chunk's rows [NS, 16]: its keys and their mask, the [NS, 16, BK] tile's offsets and
    mask, and q and k on it."""
    o_k = i_k * BK + tl.arange(0, BK)
    mask_k = o_k < K
    p, m = _rows_tile(rows, o_k, i_h, H, K, t0, t1, mask_k)
    return o_k, mask_k, p, m, tl.load(q + p, mask=m, other=0.), tl.load(k + p, mask=m, other=0.)


@triton.jit
def _intra_scores(q, k, g, A, scale, i_h, H, K, t0, t1, BK: tl.constexpr, BT: tl.constexpr, LEVELS: tl.constexpr,
                  TF32: tl.constexpr, SPAN: tl.constexpr):
    """Stores A of the chunk [t0, t1). Where the gate sums stay within SPAN of the chunk's middle row, as one
    product through that row (_one_reference_scores). Else each pair (i, j) at the level of the pairing tree where
    i and j fall in the two halves of one block, as a product of factored rows. A level's pairs fill disjoint
    blocks of A, so each level is a batched product of just its rows: levels of 16 rows and more block by block;
    inside the chunk's 16-row diagonal blocks one product through each block's middle row where every block's sums
    stay within SPAN of it, else the levels below 16 and the diagonal (no decay)."""
    a_row = (t0 * H + i_h) * BT  # A [B, T, H, BT] at row t0
    chunk_span, block_span = _spans(g, i_h, H, K, t0, t1, BK, BT)
    if chunk_span <= SPAN:
        _one_reference_scores(q, k, g, A, a_row, scale, i_h, H, K, t0, t1, BK, BT, TF32)
    else:
        NS: tl.constexpr = BT // 16
        o_c = tl.arange(0, 16)
        o_s = tl.arange(0, NS)[:, None]
        rows = o_s * 16 + o_c[None, :]  # [NS, 16]
        b_Ad = tl.zeros([NS, 16, 16], dtype=tl.float32)
        if block_span <= SPAN:
            b_diag = tl.zeros([NS, 16], dtype=tl.float32)
            for i_k in range(0, tl.cdiv(K, BK)):
                o_k, mask_k, p, m, b_q, b_k = _block_tiles(q, k, rows, i_k, BK, i_h, H, K, t0, t1)
                b_gm = _reference_rows(g, t0, t1, i_h, H, K, o_k[None, None, :], mask_k[None, None, :],
                                       o_s[:, :, None] * 16 + 8)
                d = tl.where(m, tl.load(g + p, mask=m, other=0.) - b_gm, 0.)
                _, _, b_qe, b_ke = _factored_rows(b_q, b_k, d, TF32)
                b_Ad += _tree_dot(b_qe, tl.permute(b_ke, (0, 2, 1)), b_q, TF32)
                b_diag += tl.sum(b_q.to(tl.float32) * b_k.to(tl.float32), 2)
            b_Ad = _lower_with_diagonal(b_Ad, b_diag[:, :, None], o_c[None, :, None], o_c[None, None, :])
        else:
            for i_k in range(0, tl.cdiv(K, BK)):
                o_k, mask_k, p, m, b_q, b_k = _block_tiles(q, k, rows, i_k, BK, i_h, H, K, t0, t1)
                b_g = tl.load(g + p, mask=m, other=0.)
                b_Ad += tl.where((o_c[:, None] == o_c[None, :])[None], _dot(b_q, tl.permute(b_k, (0, 2, 1))), 0.)
                for lvl in tl.static_range(0, 4):
                    b_Ad += _diagonal_level(g, b_g, b_q, b_k, rows, o_s, o_c, o_k, mask_k, i_h, H, K, t0, t1,
                                            1 << lvl, TF32)
        tl.store(A + a_row + rows[:, :, None] * H * BT + o_s[:, :, None] * 16 + o_c[None, None, :],
                 (b_Ad * scale).to(A.dtype.element_ty),
                 mask=((t0 + rows) < t1)[:, :, None])
        for lvl in tl.static_range(4, LEVELS):
            _block_level(q, k, g, A, a_row, scale, i_h, H, K, t0, t1, BK, BT, 1 << lvl, TF32)


@triton.jit
def _output_tile(qg, v, states, A, o, scale, i_ch, i_v, i_h, t0, t1, H, K, V,
                 BK: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr):
    """Stores o of the chunk [t0, t1) (chunk x head program i_ch) and BV-wide slice i_v of V, from the chunk's
    starting state, q exp(G) (qg) and its intra-chunk scores A."""
    o_t = t0 + tl.arange(0, BT)
    mask_t = o_t < t1
    o_v = i_v * BV + tl.arange(0, BV)
    mask_v = o_v < V
    state_base = i_ch.to(tl.int64) * K * V  # states [C, H, K, V]
    b_o = tl.zeros([BT, BV], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k, mask_k, m, p = _key_slice(i_k, BK, K, o_t, mask_t, i_h, H)
        b_qg = tl.load(qg + p, mask=m, other=0.)
        b_h = tl.load(states + state_base + o_k[:, None] * V + o_v[None, :],
                      mask=mask_k[:, None] & mask_v[None, :], other=0.)
        b_o += _dot(b_qg, b_h.to(b_qg.dtype))
    m_tv = mask_t[:, None] & mask_v[None, :]
    p_tv = (o_t[:, None] * H + i_h) * V + o_v[None, :]
    b_v = tl.load(v + p_tv, mask=m_tv, other=0.)
    b_A = tl.load(A + (o_t[:, None] * H + i_h) * BT + tl.arange(0, BT)[None, :], mask=mask_t[:, None], other=0.)
    b_o = b_o * scale + _dot(b_A.to(b_v.dtype), b_v)
    tl.store(o + p_tv, b_o.to(o.dtype.element_ty), mask=m_tv)


@triton.jit
def chunk_gla_intra_kernel(q, k, g, chunks, A, scale, H, K,
                           KP: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr, LEVELS: tl.constexpr,
                           TF32: tl.constexpr, SPAN: tl.constexpr):
    """A of one chunk (_intra_scores)."""
    i_h, t0, t1 = _chunk_bounds(chunks, tl.program_id(0), H)
    _intra_scores(q, k, g, A, scale, i_h, H, K, t0, t1, BK, BT, LEVELS, TF32, SPAN)


@triton.jit
def chunk_gla_fwd_o_kernel(qg, v, states, A, chunks, o, scale, H, K, V,
                           KP: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr):
    """o of one chunk and BV-wide slice of V from the chunk's starting state and its intra-chunk scores A."""
    i_ch = tl.program_id(0)
    i_h, t0, t1 = _chunk_bounds(chunks, i_ch, H)
    _output_tile(qg, v, states, A, o, scale, i_ch, tl.program_id(1), i_h, t0, t1, H, K, V, BK, BV, BT)


@triton.jit
def chunk_gla_bwd_inter_kernel(v, g, do, states, dstates, chunks, dq, dk, dA, dg_state, scale, H, K, V,
                               KP: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr):
    """The state's shares of dq and dk (float32) for one chunk and BK-wide slice of K, dA (written by the first
    slice's programs), and exp(G_L) sum_v h dh per key: the starting state's share of the gate's gradient after
    the chunk (chunk_gla_bwd_intra_kernel)."""
    i_ch = tl.program_id(0)
    i_k = tl.program_id(1)
    i_h, t0, t1 = _chunk_bounds(chunks, i_ch, H)
    o_j = tl.arange(0, BT)
    o_t = t0 + o_j
    mask_t = o_t < t1
    o_k = i_k * BK + tl.arange(0, BK)
    mask_k = o_k < K
    state_base = i_ch.to(tl.int64) * K * V  # states [C, H, K, V]
    b_dA = tl.zeros([BT, BT], dtype=tl.float32)
    b_dq = tl.zeros([BT, BK], dtype=tl.float32)
    b_dk = tl.zeros([BT, BK], dtype=tl.float32)
    b_hdh = tl.zeros([BK], dtype=tl.float32)
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        mask_v = o_v < V
        p_tv = (o_t[:, None] * H + i_h) * V + o_v[None, :]
        b_do = tl.load(do + p_tv, mask=mask_t[:, None] & mask_v[None, :], other=0.)
        b_v = tl.load(v + p_tv, mask=mask_t[:, None] & mask_v[None, :], other=0.)
        p_h = state_base + o_k[:, None] * V + o_v[None, :]
        mask_h = mask_k[:, None] & mask_v[None, :]
        b_h = tl.load(states + p_h, mask=mask_h, other=0.).to(b_do.dtype)
        b_dh = tl.load(dstates + p_h, mask=mask_h, other=0.).to(b_do.dtype)
        b_dA += _dot(b_do, tl.trans(b_v))
        b_dq += _dot(b_do, tl.trans(b_h))
        b_dk += _dot(b_v, tl.trans(b_dh))
        b_hdh += tl.sum(b_h.to(tl.float32) * b_dh.to(tl.float32), 1)
    m = mask_t[:, None] & mask_k[None, :]
    p = (o_t[:, None] * H + i_h) * K + o_k[None, :]
    b_g = tl.load(g + p, mask=m, other=0.)
    b_gl = tl.load(g + ((t1 - 1) * H + i_h) * K + o_k, mask=mask_k, other=0.)
    tl.store(dq + p, b_dq * tl.exp(b_g) * scale, mask=m)
    tl.store(dk + p, b_dk * _exp_where(m, b_gl[None, :] - b_g), mask=m)
    tl.store(dg_state + i_ch.to(tl.int64) * K + o_k, b_hdh * tl.exp(b_gl), mask=mask_k)
    causal = (o_j[:, None] >= o_j[None, :]) & mask_t[:, None]
    tl.store(dA + (o_t[:, None] * H + i_h) * BT + o_j[None, :], tl.where(causal, b_dA * scale, 0.),
             mask=mask_t[:, None] & (i_k == 0))


@triton.jit
def _level_grads(g, b_g, b_q, b_k, b_dA, i_h, H, K, t0, t1, o_j, o_k, mask_k, lvl, TF32: tl.constexpr):
    """The shares of dq and dk of level 2^lvl of the pairing tree: dq_i = e_i sum_j dA[i, j] (k_j e_j) over its later
    rows i, dk_j = e_j sum_i dA[i, j] (q_i e_i) over its earlier rows j."""
    e, b_qe, b_ke = _level_rows(g, b_g, b_q, b_k, i_h, H, K, t0, t1, o_j, o_k, mask_k, 1 << lvl, TF32)
    pair = (((o_j[:, None] >> (lvl + 1)) == (o_j[None, :] >> (lvl + 1)))
            & ((o_j[:, None] >> lvl) % 2 == 1) & ((o_j[None, :] >> lvl) % 2 == 0))
    b_dAl = _tree_operand(tl.where(pair, b_dA, 0.), b_q, TF32)
    return e * _tree_dot(b_dAl, b_ke, b_q, TF32), e * _tree_dot(tl.trans(b_dAl), b_qe, b_q, TF32)


@triton.jit
def _one_reference_grads(b_dA, pairs, d, b_q, b_k, TF32: tl.constexpr):
    """The shares of dq and dk of the pairs `pairs` through one reference row: with e = exp(d) = exp(G - G_ref)
    (|d| <= SPAN), dq_i = e_i sum_j dA[i, j] (k_j / e_j) and dk_j = (1 / e_j) sum_i dA[i, j] (q_i e_i)."""
    e, e_inv, b_qe, b_ke = _factored_rows(b_q, b_k, d, TF32)
    b_dAp = _tree_operand(tl.where(pairs, b_dA, 0.), b_q, TF32)
    return e * _tree_dot(b_dAp, b_ke, b_q, TF32), e_inv * _tree_dot(tl.trans(b_dAp), b_qe, b_q, TF32)


@triton.jit
def chunk_gla_bwd_intra_kernel(q, k, g, dA, dq_inter, dk_inter, dg_state, chunks, dq, dk, dg, H, K,
                               KP: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr, LEVELS: tl.constexpr,
                               TF32: tl.constexpr, SPAN: tl.constexpr):
    """dq, dk of one chunk and BK-wide slice i_k of K: the state's shares plus the intra-chunk sums, taken pair by
    pair as chunk_gla_intra_kernel takes A (each level's pairs as two products of factored rows); and the gate's
    gradient per key. At token t that is the sum of q.dq - k.dk over the rest of its sequence (plus the final
    state's share), taken as the sum inside the chunk plus what lies after it, sum_v h_L dh_L for the state h_L at
    the chunk's end and its gradient dh_L: exp(G_L) sum_v h dh (dg_state) + sum_j k_j dk_j from the state's share of
    dk. A suffix sum over the whole sequence instead cancels: it lost two digits by T = 8192."""
    i_h, t0, t1 = _chunk_bounds(chunks, tl.program_id(0), H)
    i_k = tl.program_id(1)
    o_j = tl.arange(0, BT)
    o_t = t0 + o_j
    mask_t = o_t < t1
    b_dA = tl.load(dA + (o_t[:, None] * H + i_h) * BT + o_j[None, :], mask=mask_t[:, None], other=0.)
    o_k, mask_k, m, p = _key_slice(i_k, BK, K, o_t, mask_t, i_h, H)
    b_q = tl.load(q + p, mask=m, other=0.)
    b_k = tl.load(k + p, mask=m, other=0.)
    b_g = tl.load(g + p, mask=m, other=0.)
    # the diagonal (no decay), in float32
    b_dAd = tl.sum(tl.where(o_j[:, None] == o_j[None, :], b_dA, 0.), 1)[:, None]
    b_dq = b_dAd * b_k.to(tl.float32)
    b_dk = b_dAd * b_q.to(tl.float32)
    # the pairs below the diagonal through one reference row where the sums of this slice of K stay within SPAN
    # of it (as the forward takes them): the chunk's middle row for all of them; else each 16-row block's middle
    # row for the pairs inside the blocks (the tree's levels below 16); the rest on the tree
    d = tl.where(m, b_g - _reference_rows(g, t0, t1, i_h, H, K, o_k[None, :], mask_k[None, :], BT // 2), 0.)
    first = 0
    if tl.max(tl.max(tl.abs(d), 1), 0) <= SPAN:
        dq_r, dk_r = _one_reference_grads(b_dA, o_j[:, None] > o_j[None, :], d, b_q, b_k, TF32)
        b_dq += dq_r
        b_dk += dk_r
        first = LEVELS
    else:
        d = tl.where(m, b_g - _reference_rows(g, t0, t1, i_h, H, K, o_k[None, :], mask_k[None, :],
                                              (o_j // 16 * 16 + 8)[:, None]), 0.)
        if tl.max(tl.max(tl.abs(d), 1), 0) <= SPAN:
            pairs = (o_j[:, None] // 16 == o_j[None, :] // 16) & (o_j[:, None] > o_j[None, :])
            dq_r, dk_r = _one_reference_grads(b_dA, pairs, d, b_q, b_k, TF32)
            b_dq += dq_r
            b_dk += dk_r
            first = 4
    for lvl in range(first, LEVELS):
        dq_r, dk_r = _level_grads(g, b_g, b_q, b_k, b_dA, i_h, H, K, t0, t1, o_j, o_k, mask_k, lvl, TF32)
        b_dq += dq_r
        b_dk += dk_r
    b_dq += tl.load(dq_inter + p, mask=m, other=0.)
    b_dk_state = tl.load(dk_inter + p, mask=m, other=0.)
    b_dk += b_dk_state
    tl.store(dq + p, b_dq.to(dq.dtype.element_ty), mask=m)
    tl.store(dk + p, b_dk.to(dk.dtype.element_ty), mask=m)
    b_later = (tl.load(dg_state + tl.program_id(0).to(tl.int64) * K + o_k, mask=mask_k, other=0.)
               + tl.sum(b_k.to(tl.float32) * b_dk_state, 0))
    b_dg = tl.where(m, b_q.to(tl.float32) * b_dq - b_k.to(tl.float32) * b_dk, 0.)
    tl.store(dg + p, tl.cumsum(b_dg, 0, reverse=True) + b_later[None, :], mask=m)


@triton.jit
def chunk_gla_bwd_dv_kernel(k, g, do, dstates, A, chunks, dv, H, K, V,
                            KP: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr):
    """dv of one chunk and BV-wide slice of V: A's transpose applied to do, plus the decayed keys applied to the
    state gradient at the chunk's end."""
    i_ch = tl.program_id(0)
    i_v = tl.program_id(1)
    i_h, t0, t1 = _chunk_bounds(chunks, i_ch, H)
    o_t = t0 + tl.arange(0, BT)
    mask_t = o_t < t1
    o_v = i_v * BV + tl.arange(0, BV)
    mask_v = o_v < V
    state_base = i_ch.to(tl.int64) * K * V  # states [C, H, K, V]
    b_dv = tl.zeros([BT, BV], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k, mask_k, m, p = _key_slice(i_k, BK, K, o_t, mask_t, i_h, H)
        b_k = tl.load(k + p, mask=m, other=0.)
        b_g = tl.load(g + p, mask=m, other=0.)
        b_gl = tl.load(g + ((t1 - 1) * H + i_h) * K + o_k, mask=mask_k, other=0.)
        b_kw = tl.where(m, b_k * _exp_where(m, b_gl[None, :] - b_g), 0.).to(b_k.dtype)
        b_dh = tl.load(dstates + state_base + o_k[:, None] * V + o_v[None, :],
                       mask=mask_k[:, None] & mask_v[None, :], other=0.)
        b_dv += _dot(b_kw, b_dh.to(b_k.dtype))
    m_tv = mask_t[:, None] & mask_v[None, :]
    p_tv = (o_t[:, None] * H + i_h) * V + o_v[None, :]
    b_do = tl.load(do + p_tv, mask=m_tv, other=0.)
    b_A = tl.load(A + (o_t[:, None] * H + i_h) * BT + tl.arange(0, BT)[None, :], mask=mask_t[:, None], other=0.)
    b_dv += _dot(tl.trans(b_A).to(b_do.dtype), b_do)
    tl.store(dv + p_tv, b_dv.to(dv.dtype.element_ty), mask=m_tv)


# ---- launch configs: tools/tune_chunk.py, output in docs/tuning/chunk.md (H100, bf16, K=V=128) -------------

LEVELS = CHUNK.bit_length() - 1  # of the pairing tree: blocks of 2, 4, ..., CHUNK rows


def _cumsum_config(KP, **_):
    # memory-bound: the gate and q read, the sums and q exp(G) written once. H200, per chunk_gla step
    # (tools/tune_chunk.py --kernels chunk_gk_cumsum, before q exp(G)): K in slices of 64 on 4 warps 0.065 / 0.065 /
    # 0.129 ms, 32: 0.070 / 0.070 / 0.144, all of K in one program: 0.072 / 0.071 / 0.141; with q exp(G) 0.112 /
    # 0.111 / 0.221 (docs/tuning/chunk.md)
    return dict(BK=min(KP, 64), BT=CHUNK, num_warps=4, num_stages=1)


# GLA's intra kernels. TF32 takes their products in tf32 (off: 9-11% slower end to end). The factored rows rounded
# to bfloat16 are what is left of the gate gradient's error: 8.8e-3 from the float32 recurrence on the H200 (fla-core
# 0.6.0: 5.6e-4), about 1.1e-3 with tf32 products in the float64 replay of tools/gla_gate_grad_rounding.py
# (docs/tuning/chunk.md).
def _span(dtype):
    # the largest |G_i - G_ref| the one-reference products take: rows scaled by exp(+-40) (2e17) stay finite and
    # normal in float32 and bfloat16 for |q|, |k| between 1e-20 and 1e21 (the products of pairs above the diagonal,
    # dropped, may overflow); float16's narrow range allows exp(+-2) (rows up to ~8e3 finite, down to ~5e-4 normal)
    return 2.0 if dtype == "float16" else 40.0


def _intra_config(KP, dtype, **_):
    # H200, ms per chunk_gla fwd+bwd step at B8 T2048 / B2 T8192 / B1 T32768 (JIT, docs/tuning/chunk.md), with the
    # benchmark's gates (nearly every chunk on one reference row) / SPAN=30 (16-row blocks on one) / the tree alone:
    # BK=64 0.162 / 0.229 / 0.407 at B8 T2048, BK=32 0.185 / 0.281 / 0.440, BK=16 0.176 / 0.297 / 0.474 (8 warps and
    # 2 stages lost before); the tree alone before the one-reference products: 0.385. BK=64 takes 255 registers and
    # 184 bytes of stack a thread at K=128 for 16-bit inputs (sm_90 resource report), float32 360 bytes (timed before
    # the diagonal was taken from unrounded rows: 168 bytes)
    return dict(BK=min(KP, 64), BT=CHUNK, LEVELS=LEVELS, TF32=False, SPAN=_span(dtype), num_warps=4, num_stages=1)


def _bwd_intra_config(KP, dtype, **_):
    # same run and gates: BK=32 0.531 / 0.711 / 0.976, BK=64 0.508 / 0.882 / 1.137, BK=16 0.684 / 0.827 / 1.151; the
    # tree alone before the one-reference products: 0.889. BK=32: 250 registers, no stack (float32: 254)
    return dict(BK=min(KP, 32), BT=CHUNK, LEVELS=LEVELS, TF32=False, SPAN=_span(dtype), num_warps=4, num_stages=1)


def _fwd_o_config(KP, dtype, **_):
    # H200: BV=128 (q exp(G) read once per chunk) 0.088 / 0.088 / 0.171 ms (reading q and the gate sums instead:
    # 0.141 / 0.143 / 0.273, and 0.192 / 0.192 / 0.375 for BV=64); float32 takes BV=64 on 8 warps (on 4 warps it
    # spilled 0.5 KB a thread, sm_90 resource report)
    if dtype == "float32":
        return dict(BK=min(KP, 64), BV=64, BT=CHUNK, num_warps=8, num_stages=3)
    return dict(BK=min(KP, 64), BV=128, BT=CHUNK, num_warps=4, num_stages=3)


def _inter_config(KP, **_):
    return dict(BK=min(KP, 64), BV=64, BT=CHUNK, num_warps=4, num_stages=3)


def _dv_config(KP, **_):
    return dict(BK=min(KP, 64), BV=64, BT=CHUNK, num_warps=8, num_stages=2)


def _qk(dtype_arg="q"):
    return [Tensor("q", "B T H K", dtypes=FLOAT_DTYPES), Tensor("k", "B T H K", same_dtype_as=dtype_arg)]


_GCUM = Tensor("g", "B T H K", dtypes=["float32"])  # the gate's running sum per chunk, from chunk_gk_cumsum
_CHUNKS = Tensor("chunks", "C CF", dtypes=["int32"])
_AXES_QK = [DtypeAxis("q"), BucketAxis("KP", "K", K_BUCKETS), AlignedAxis(["K"])]
_AXES_QKV = [DtypeAxis("q"), BucketAxis("KP", "K", K_BUCKETS), AlignedAxis(["K", "V"])]

SPECS = [
    OpSpec(
        name="chunk_gk_cumsum",
        kernel=chunk_gk_cumsum_kernel,
        doc="GLA's per-key gate summed within each chunk (float32), and q exp(that sum) (q's dtype).",
        args=[Tensor("gk", "B T H K", dtypes=FLOAT_DTYPES), Tensor("q", "B T H K", dtypes=FLOAT_DTYPES), _CHUNKS],
        outputs=[Output("gcum", "B T H K", dtype="float32"), Output("qg", "B T H K", dtype_of="q")],
        axes=_AXES_QK,
        launch_config=_cumsum_config,
        grid=["C * H", "cdiv(K, BK)"],
    ),
    OpSpec(
        name="chunk_gla_intra",
        kernel=chunk_gla_intra_kernel,
        doc="GLA's intra-chunk scores A [B, T, H, 64] (in q's dtype, scaled, zero above the diagonal).",
        args=[*_qk(), _GCUM, _CHUNKS, Float("scale")],
        outputs=[Output("A", f"B T H {CHUNK}", dtype_of="q")],
        axes=_AXES_QK,
        launch_config=_intra_config,
        grid=["C * H"],
    ),
    OpSpec(
        name="chunk_gla_fwd_o",
        kernel=chunk_gla_fwd_o_kernel,
        doc="GLA's output from each chunk's starting state and its intra-chunk scores.",
        args=[Tensor("qg", "B T H K", dtypes=FLOAT_DTYPES), Tensor("v", "B T H V", same_dtype_as="qg"),
              Tensor("states", "C H K V", same_dtype_as="qg"), Tensor("A", f"B T H {CHUNK}", same_dtype_as="qg"),
              _CHUNKS, Float("scale")],
        outputs=[Output("o", "B T H V", dtype_of="qg")],
        axes=[DtypeAxis("qg"), BucketAxis("KP", "K", K_BUCKETS), AlignedAxis(["K", "V"])],
        launch_config=_fwd_o_config,
        grid=["C * H", "cdiv(V, BV)"],
    ),
    OpSpec(
        name="chunk_gla_bwd_inter",
        kernel=chunk_gla_bwd_inter_kernel,
        doc="GLA backward: the states' shares of dq, dk (float32) and dA (float32, scaled, zero above the diagonal).",
        args=[Tensor("v", "B T H V", dtypes=FLOAT_DTYPES), _GCUM, Tensor("do", "B T H V", same_dtype_as="v"),
              Tensor("states", "C H K V", same_dtype_as="v"), Tensor("dstates", "C H K V", same_dtype_as="v"),
              _CHUNKS, Float("scale")],
        outputs=[Output("dq", "B T H K", dtype="float32"), Output("dk", "B T H K", dtype="float32"),
                 Output("dA", f"B T H {CHUNK}", dtype="float32"), Output("dg_state", "C H K", dtype="float32")],
        axes=[DtypeAxis("v"), BucketAxis("KP", "K", K_BUCKETS), AlignedAxis(["K", "V"])],
        launch_config=_inter_config,
        grid=["C * H", "cdiv(K, BK)"],
    ),
    OpSpec(
        name="chunk_gla_bwd_intra",
        kernel=chunk_gla_bwd_intra_kernel,
        doc="GLA backward: dq, dk (the states' shares plus the intra-chunk sums) and the gate's per-key gradient.",
        args=[*_qk(), _GCUM, Tensor("dA", f"B T H {CHUNK}", dtypes=["float32"]),
              Tensor("dq_inter", "B T H K", dtypes=["float32"]), Tensor("dk_inter", "B T H K", dtypes=["float32"]),
              Tensor("dg_state", "C H K", dtypes=["float32"]), _CHUNKS],
        outputs=[Output("dq", "B T H K", dtype_of="q"), Output("dk", "B T H K", dtype_of="q"),
                 Output("dg", "B T H K", dtype="float32")],
        axes=_AXES_QK,
        launch_config=_bwd_intra_config,
        grid=["C * H", "cdiv(K, BK)"],
    ),
    OpSpec(
        name="chunk_gla_bwd_dv",
        kernel=chunk_gla_bwd_dv_kernel,
        doc="GLA backward: dv.",
        args=[Tensor("k", "B T H K", dtypes=FLOAT_DTYPES), _GCUM, Tensor("do", "B T H V", same_dtype_as="k"),
              Tensor("dstates", "C H K V", same_dtype_as="k"), Tensor("A", f"B T H {CHUNK}", same_dtype_as="k"),
              _CHUNKS],
        outputs=[Output("dv", "B T H V", dtype_of="k")],
        axes=[DtypeAxis("k"), BucketAxis("KP", "K", K_BUCKETS), AlignedAxis(["K", "V"])],
        launch_config=_dv_config,
        grid=["C * H", "cdiv(V, BV)"],
    ),
]
