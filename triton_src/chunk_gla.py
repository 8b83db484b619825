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

The intra-chunk sums differ per key, so they are taken by sub-chunks of BC = 16 rows, one program each (in the
backward, one per sub-chunk and slice of K): the sub-chunks before (or after) a row's own go through a single
product, the decay factored through the gate at a row between them so that both factors are at most 1 (nothing
overflows, and a factor only underflows where the product it belongs to is smaller still); the diagonal sub-chunk
is summed exactly, column by column. A and dA are kept in float32 ([B, T, H, 64]) between kernels, as are the
state's shares of dq and dk.
"""
import triton
import triton.language as tl

from tools.kernel_spec import AlignedAxis, BucketAxis, DtypeAxis, Float, OpSpec, Output, Tensor
from triton_src.chunk import CHUNK, FLOAT_DTYPES, K_BUCKETS, _dot
from triton_src.fused_recurrent import _load_f32

SUB_CHUNK = 16


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
def chunk_gk_cumsum_kernel(gk, chunks, gcum, gk_dtype, H, K, BK: tl.constexpr, BT: tl.constexpr):
    """GLA's gate summed up to each token of its chunk, per key, in float32."""
    i_h, t0, t1 = _chunk_bounds(chunks, tl.program_id(0), H)
    o_t = t0 + tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    m = (o_t < t1)[:, None] & (o_k < K)[None, :]
    off = (o_t[:, None] * H + i_h) * K + o_k[None, :]
    tl.store(gcum + off, tl.cumsum(_load_f32(gk, off, m, gk_dtype, 0.), 0), mask=m)


@triton.jit
def _intra_diag_rows(j, r0, t1, i_h, H, K, BC: tl.constexpr, o_k, mask_k, k, g):
    """k and G at row r0 + j (zeros past the sequence's end; j = BC, the prefetch after the last step, reads the
    next sub-chunk's row, unused)."""
    r = r0 + j
    m_r = mask_k & (r < t1)
    return (tl.load(k + (r * H + i_h) * K + o_k, mask=m_r, other=0.).to(tl.float32),
            tl.load(g + (r * H + i_h) * K + o_k, mask=m_r, other=0.))


@triton.jit
def _intra_diag_column(j, b_kr, b_gr, o_c, mask_i, m_i, b_qf, b_gi, p_A, scale):
    """Column j of A's diagonal block from row j's k and G: rows i >= j take scale * sum_k q_ik k_jk exp(G_ik - G_jk)."""
    keep = (o_c >= j)[:, None] & m_i
    a = tl.sum(tl.where(keep, b_qf * b_kr[None, :] * _exp_where(keep, b_gi - b_gr[None, :]), 0.), 1)
    tl.store(p_A + j, a * scale, mask=mask_i)


@triton.jit
def chunk_gla_intra_kernel(q, k, g, chunks, A, scale, H, K,
                           KP: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, PREFETCH: tl.constexpr):
    """The rows of A in sub-chunk i_i: earlier sub-chunks through the gate at the sub-chunk's first row r0
    (exp(G_i - G_r0) and exp(G_r0 - G_j) are both <= 1), the diagonal block exactly, a column at a time."""
    i_h, t0, t1 = _chunk_bounds(chunks, tl.program_id(0), H)
    i_i = tl.program_id(1)
    r0 = t0 + i_i * BC
    o_c = tl.arange(0, BC)
    o_i = r0 + o_c
    mask_i = o_i < t1
    o_j = tl.arange(0, BT)
    before = (o_j < i_i * BC) & (r0 < t1)  # earlier sub-chunks, when this one has a row
    o_k = tl.arange(0, KP)
    mask_k = o_k < K
    m_i = mask_i[:, None] & mask_k[None, :]
    p_i = (o_i[:, None] * H + i_h) * K + o_k[None, :]
    b_q = tl.load(q + p_i, mask=m_i, other=0.)
    b_gi = tl.load(g + p_i, mask=m_i, other=0.)
    b_gn = tl.load(g + (r0 * H + i_h) * K + o_k, mask=mask_k & (r0 < t1), other=0.)
    m_j = before[:, None] & mask_k[None, :]
    p_j = ((t0 + o_j)[:, None] * H + i_h) * K + o_k[None, :]
    b_k = tl.load(k + p_j, mask=m_j, other=0.)
    b_qg = (b_q * _exp_where(m_i, b_gi - b_gn[None, :])).to(b_q.dtype)
    b_kg = (b_k * _exp_where(m_j, b_gn[None, :] - tl.load(g + p_j, mask=m_j, other=0.))).to(b_k.dtype)
    b_A = _dot(b_qg, tl.trans(b_kg)) * scale
    p_A = A + (o_i * H + i_h) * BT
    # earlier sub-chunks, and the zeros right of the diagonal block
    diag = (o_j >= i_i * BC) & (o_j < i_i * BC + BC)
    tl.store(p_A[:, None] + o_j[None, :], b_A, mask=mask_i[:, None] & ~diag[None, :])

    b_qf = b_q.to(tl.float32)
    if PREFETCH:
        # Triton does not pipeline these row loads, and each column waits on its own: load the next column's
        # rows before this one's sums, and keep the block in registers (a store per column moves its sums
        # between layouts through shared memory, with two barriers) to store it once
        b_Ad = tl.zeros([BC, BC], dtype=tl.float32)
        b_kr, b_gr = _intra_diag_rows(0, r0, t1, i_h, H, K, BC, o_k, mask_k, k, g)
        for j in range(0, BC):
            b_kn, b_gn = _intra_diag_rows(j + 1, r0, t1, i_h, H, K, BC, o_k, mask_k, k, g)
            keep = (o_c >= j)[:, None] & m_i
            a = tl.sum(tl.where(keep, b_qf * b_kr[None, :] * _exp_where(keep, b_gi - b_gr[None, :]), 0.), 1)
            b_Ad = tl.where(o_c[None, :] == j, a[:, None], b_Ad)
            b_kr, b_gr = b_kn, b_gn
        tl.store(p_A[:, None] + i_i * BC + o_c[None, :], b_Ad * scale, mask=mask_i[:, None])
    else:
        for j in range(0, BC):
            b_kr, b_gr = _intra_diag_rows(j, r0, t1, i_h, H, K, BC, o_k, mask_k, k, g)
            _intra_diag_column(j, b_kr, b_gr, o_c, mask_i, m_i, b_qf, b_gi, p_A + i_i * BC, scale)


@triton.jit
def chunk_gla_fwd_o_kernel(q, v, g, states, A, chunks, o, scale, H, K, V,
                           KP: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr):
    """o of one chunk and BV-wide slice of V from the chunk's starting state and its intra-chunk scores A."""
    i_ch = tl.program_id(0)
    i_v = tl.program_id(1)
    i_h, t0, t1 = _chunk_bounds(chunks, i_ch, H)
    o_t = t0 + tl.arange(0, BT)
    mask_t = o_t < t1
    o_v = i_v * BV + tl.arange(0, BV)
    mask_v = o_v < V
    state_base = i_ch.to(tl.int64) * K * V  # states [C, H, K, V]
    b_o = tl.zeros([BT, BV], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        mask_k = o_k < K
        m = mask_t[:, None] & mask_k[None, :]
        p = (o_t[:, None] * H + i_h) * K + o_k[None, :]
        b_q = tl.load(q + p, mask=m, other=0.)
        b_g = tl.load(g + p, mask=m, other=0.)
        b_h = tl.load(states + state_base + o_k[:, None] * V + o_v[None, :],
                      mask=mask_k[:, None] & mask_v[None, :], other=0.)
        b_o += _dot((b_q * tl.exp(b_g)).to(b_q.dtype), b_h.to(b_q.dtype))
    m_tv = mask_t[:, None] & mask_v[None, :]
    p_tv = (o_t[:, None] * H + i_h) * V + o_v[None, :]
    b_v = tl.load(v + p_tv, mask=m_tv, other=0.)
    b_A = tl.load(A + (o_t[:, None] * H + i_h) * BT + tl.arange(0, BT)[None, :], mask=mask_t[:, None], other=0.)
    b_o = b_o * scale + _dot(b_A.to(b_v.dtype), b_v)
    tl.store(o + p_tv, b_o.to(o.dtype.element_ty), mask=m_tv)


@triton.jit
def chunk_gla_bwd_inter_kernel(v, g, do, states, dstates, chunks, dq, dk, dA, scale, H, K, V,
                               KP: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr):
    """The state's shares of dq and dk (float32) for one chunk and BK-wide slice of K, and dA (written by the
    first slice's programs)."""
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
    m = mask_t[:, None] & mask_k[None, :]
    p = (o_t[:, None] * H + i_h) * K + o_k[None, :]
    b_g = tl.load(g + p, mask=m, other=0.)
    b_gl = tl.load(g + ((t1 - 1) * H + i_h) * K + o_k, mask=mask_k, other=0.)
    tl.store(dq + p, b_dq * tl.exp(b_g) * scale, mask=m)
    tl.store(dk + p, b_dk * _exp_where(m, b_gl[None, :] - b_g), mask=m)
    causal = (o_j[:, None] >= o_j[None, :]) & mask_t[:, None]
    tl.store(dA + (o_t[:, None] * H + i_h) * BT + o_j[None, :], tl.where(causal, b_dA * scale, 0.),
             mask=mask_t[:, None] & (i_k == 0))


@triton.jit
def _bwd_diag_rows(j, r0, t1, i_h, H, K, BT: tl.constexpr, i_i, BC: tl.constexpr, o_c, o_i, mask_i, o_k, mask_k,
                   q, k, g, dA):
    """Step j of the diagonal block: k, q and G at row r = r0 + j, dA's column r (rows i >= r) and its row r
    (columns i <= r); zeros past the sequence's end (j = BC, the prefetch after the last step, masks dA's column
    off and reads rows it does not use)."""
    r = r0 + j
    m_r = mask_k & (r < t1)
    p_r = (r * H + i_h) * K + o_k
    return (tl.load(k + p_r, mask=m_r, other=0.).to(tl.float32),
            tl.load(q + p_r, mask=m_r, other=0.).to(tl.float32),
            tl.load(g + p_r, mask=m_r, other=0.),
            tl.load(dA + (o_i * H + i_h) * BT + i_i * BC + j, mask=mask_i & (o_c >= j), other=0.),
            tl.load(dA + (r * H + i_h) * BT + i_i * BC + o_c, mask=(o_c <= j) & (r < t1), other=0.))


@triton.jit
def _bwd_diag_terms(j, b_kr, b_qr, b_gr, dA_col, dA_row, o_c, m_i, b_gi, b_dq, b_dk):
    """Rows i >= r of dq take dA[i, r] k_r exp(G_i - G_r), rows i <= r of dk take dA[r, i] q_r exp(G_r - G_i):
    each row needs only one of the two exponents (both 0 where i = r), so one exp per element serves both."""
    ge = (o_c >= j)[:, None] & m_i
    le = (o_c <= j)[:, None] & m_i
    d = b_gi - b_gr[None, :]
    e = tl.exp(tl.where(m_i, tl.where(ge, d, -d), 0.))
    return (b_dq + tl.where(ge, dA_col[:, None] * b_kr[None, :] * e, 0.),
            b_dk + tl.where(le, dA_row[:, None] * b_qr[None, :] * e, 0.))


@triton.jit
def chunk_gla_bwd_intra_kernel(q, k, g, dA, dq_inter, dk_inter, chunks, dq, dk, dg, dg_chunk, H, K,
                               KP: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
                               PREFETCH: tl.constexpr):
    """dq, dk of sub-chunk i_i's rows and the BK-wide slice i_k of K: the state's shares plus the intra-chunk sums
    (earlier sub-chunks for dq through the gate at the sub-chunk's first row, later ones for dk through the gate at
    its last row, the diagonal block exactly, a row and column at a time); and q.dq - k.dk per key, the gate's
    gradient before its suffix sum, with its sum over the chunk (dg_chunk, summed over the sub-chunks).
    The slices of K are independent programs (1.21 against 1.84 ms looping over them in one, B=8 T=2048 on an
    H200), so the dA tiles are read once per slice."""
    i_h, t0, t1 = _chunk_bounds(chunks, tl.program_id(0), H)
    i_i = tl.program_id(1)
    i_k = tl.program_id(2)
    r0 = t0 + i_i * BC
    o_c = tl.arange(0, BC)
    o_i = r0 + o_c
    mask_i = o_i < t1
    o_j = tl.arange(0, BT)
    o_t = t0 + o_j
    before = (o_j < i_i * BC) & (r0 < t1)
    after = (o_j >= (i_i + 1) * BC) & (o_t < t1)
    r1 = tl.minimum(r0 + BC, t1) - 1  # the sub-chunk's last row (when it has one)
    b_dA_rows = tl.load(dA + (o_i[:, None] * H + i_h) * BT + o_j[None, :], mask=mask_i[:, None] & before[None, :],
                        other=0.).to(k.dtype.element_ty)  # [BC, BT]: dA[i, j], j in earlier sub-chunks
    b_dA_cols = tl.load(dA + (o_t[:, None] * H + i_h) * BT + i_i * BC + o_c[None, :], mask=after[:, None],
                        other=0.).to(q.dtype.element_ty)  # [BT, BC]: dA[i, j], i in later sub-chunks
    o_k = i_k * BK + tl.arange(0, BK)
    mask_k = o_k < K
    m_i = mask_i[:, None] & mask_k[None, :]
    p_i = (o_i[:, None] * H + i_h) * K + o_k[None, :]
    b_q = tl.load(q + p_i, mask=m_i, other=0.)
    b_k = tl.load(k + p_i, mask=m_i, other=0.)
    b_gi = tl.load(g + p_i, mask=m_i, other=0.)
    p_t = (o_t[:, None] * H + i_h) * K + o_k[None, :]
    # dq_i += sum_j dA[i, j] k_j exp(G_i - G_j), j in earlier sub-chunks
    b_gn = tl.load(g + (r0 * H + i_h) * K + o_k, mask=mask_k & (r0 < t1), other=0.)
    m_b = before[:, None] & mask_k[None, :]
    b_kb = tl.load(k + p_t, mask=m_b, other=0.)
    b_kb = (b_kb * _exp_where(m_b, b_gn[None, :] - tl.load(g + p_t, mask=m_b, other=0.))).to(b_k.dtype)
    b_dq = _exp_where(m_i, b_gi - b_gn[None, :]) * _dot(b_dA_rows, b_kb)
    # dk_j += sum_i dA[i, j] q_i exp(G_i - G_j), i in later sub-chunks
    b_gm = tl.load(g + (r1 * H + i_h) * K + o_k, mask=mask_k & (r0 < t1), other=0.)
    m_a = after[:, None] & mask_k[None, :]
    b_qa = tl.load(q + p_t, mask=m_a, other=0.)
    b_qa = (b_qa * _exp_where(m_a, tl.load(g + p_t, mask=m_a, other=0.) - b_gm[None, :])).to(b_q.dtype)
    b_dk = _exp_where(m_i, b_gm[None, :] - b_gi) * _dot(tl.trans(b_dA_cols), b_qa)
    # the diagonal block, a row and column r at a time
    if PREFETCH:
        # as in chunk_gla_intra_kernel, the next step's rows load while this one's terms are summed; and the terms
        # go into accumulators of their own, added once after the loop (adding each step into the products'
        # layout converts it through shared memory, with barriers)
        d_dq = tl.zeros([BC, BK], dtype=tl.float32)
        d_dk = tl.zeros([BC, BK], dtype=tl.float32)
        b_kr, b_qr, b_gr, dA_col, dA_row = _bwd_diag_rows(0, r0, t1, i_h, H, K, BT, i_i, BC, o_c, o_i, mask_i, o_k,
                                                          mask_k, q, k, g, dA)
        for j in range(0, BC):
            n_kr, n_qr, n_gr, n_col, n_row = _bwd_diag_rows(j + 1, r0, t1, i_h, H, K, BT, i_i, BC, o_c, o_i, mask_i,
                                                            o_k, mask_k, q, k, g, dA)
            d_dq, d_dk = _bwd_diag_terms(j, b_kr, b_qr, b_gr, dA_col, dA_row, o_c, m_i, b_gi, d_dq, d_dk)
            b_kr, b_qr, b_gr, dA_col, dA_row = n_kr, n_qr, n_gr, n_col, n_row
        b_dq += d_dq
        b_dk += d_dk
    else:
        for j in range(0, BC):
            b_kr, b_qr, b_gr, dA_col, dA_row = _bwd_diag_rows(j, r0, t1, i_h, H, K, BT, i_i, BC, o_c, o_i, mask_i,
                                                              o_k, mask_k, q, k, g, dA)
            b_dq, b_dk = _bwd_diag_terms(j, b_kr, b_qr, b_gr, dA_col, dA_row, o_c, m_i, b_gi, b_dq, b_dk)

    b_dq += tl.load(dq_inter + p_i, mask=m_i, other=0.)
    b_dk += tl.load(dk_inter + p_i, mask=m_i, other=0.)
    tl.store(dq + p_i, b_dq.to(dq.dtype.element_ty), mask=m_i)
    tl.store(dk + p_i, b_dk.to(dk.dtype.element_ty), mask=m_i)
    b_dg = tl.where(m_i, b_q.to(tl.float32) * b_dq - b_k.to(tl.float32) * b_dk, 0.)
    tl.store(dg + p_i, b_dg, mask=m_i)
    tl.atomic_add(dg_chunk + tl.program_id(0).to(tl.int64) * K + o_k, tl.sum(b_dg, 0), mask=mask_k)


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
        o_k = i_k * BK + tl.arange(0, BK)
        mask_k = o_k < K
        m = mask_t[:, None] & mask_k[None, :]
        p = (o_t[:, None] * H + i_h) * K + o_k[None, :]
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


@triton.jit
def chunk_gla_gate_grad_kernel(dg_token, dg_later, chunks, dg, H, K,
                               KP: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr):
    """The per-key gate's gradient: at each token, the sum of q.dq - k.dk over the rest of its sequence, that is
    the suffix sum inside its chunk plus dg_later (the later chunks' sums and the final state's share)."""
    i_ch = tl.program_id(0)
    i_h, t0, t1 = _chunk_bounds(chunks, i_ch, H)
    o_t = t0 + tl.arange(0, BT)
    o_k = tl.program_id(1) * BK + tl.arange(0, BK)
    mask_k = o_k < K
    m = (o_t < t1)[:, None] & mask_k[None, :]
    p = (o_t[:, None] * H + i_h) * K + o_k[None, :]
    b_dg = tl.cumsum(tl.load(dg_token + p, mask=m, other=0.), 0, reverse=True)
    b_dg += tl.load(dg_later + i_ch.to(tl.int64) * K + o_k, mask=mask_k, other=0.)[None, :]
    tl.store(dg + p, b_dg, mask=m)


# ---- launch configs: tools/tune_chunk.py, output in docs/tuning/chunk.md (H100, bf16, K=V=128) -------------

# PREFETCH (both intra kernels): off, the loops compile to the same code as before; on, the sm_90 SASS of their
# diagonal loops has no barriers or shared-memory moves left (bf16 K=128), but it is not yet timed on a GPU
# (tune_chunk has it among the candidates). With float32 inputs ptxas spills the backward's form (2.4 KB a thread).
def _intra_config(KP, **_):
    # one tile spans K; 8 warps: 0.67 ms summed over the three shapes against 0.87 with 4
    return dict(BT=CHUNK, BC=SUB_CHUNK, PREFETCH=False, num_warps=8, num_stages=1)


def _bwd_intra_config(KP, **_):
    # B=8 T=2048 on an H200, one launch: 1.21 ms; BK=64: 1.25; 8 warps: 1.85; 2 warps: 1.38 (docs/tuning/chunk.md)
    return dict(BK=min(KP, 32), BT=CHUNK, BC=SUB_CHUNK, PREFETCH=False, num_warps=4, num_stages=1)


def _fwd_o_config(KP, **_):
    return dict(BK=min(KP, 64), BV=64, BT=CHUNK, num_warps=4, num_stages=3)


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
        doc="GLA's per-key gate summed within each chunk (float32).",
        args=[Tensor("gk", "B T H K", dtypes=FLOAT_DTYPES), _CHUNKS],
        outputs=[Output("gcum", "B T H K", dtype="float32")],
        axes=[BucketAxis("BK", "K", K_BUCKETS)],
        launch_config=lambda BK: dict(BT=CHUNK, num_warps=4, num_stages=1),
        grid=["C * H"],
    ),
    OpSpec(
        name="chunk_gla_intra",
        kernel=chunk_gla_intra_kernel,
        doc="GLA's intra-chunk scores A [B, T, H, 64] (float32, scaled, zero above the diagonal).",
        args=[*_qk(), _GCUM, _CHUNKS, Float("scale")],
        outputs=[Output("A", f"B T H {CHUNK}", dtype="float32")],
        axes=_AXES_QK,
        launch_config=_intra_config,
        grid=["C * H", f"cdiv({CHUNK}, BC)"],
    ),
    OpSpec(
        name="chunk_gla_fwd_o",
        kernel=chunk_gla_fwd_o_kernel,
        doc="GLA's output from each chunk's starting state and its intra-chunk scores.",
        args=[Tensor("q", "B T H K", dtypes=FLOAT_DTYPES), Tensor("v", "B T H V", same_dtype_as="q"), _GCUM,
              Tensor("states", "C H K V", same_dtype_as="q"), Tensor("A", f"B T H {CHUNK}", dtypes=["float32"]),
              _CHUNKS, Float("scale")],
        outputs=[Output("o", "B T H V", dtype_of="q")],
        axes=_AXES_QKV,
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
                 Output("dA", f"B T H {CHUNK}", dtype="float32")],
        axes=[DtypeAxis("v"), BucketAxis("KP", "K", K_BUCKETS), AlignedAxis(["K", "V"])],
        launch_config=_inter_config,
        grid=["C * H", "cdiv(K, BK)"],
    ),
    OpSpec(
        name="chunk_gla_bwd_intra",
        kernel=chunk_gla_bwd_intra_kernel,
        doc="GLA backward: dq, dk (the states' shares plus the intra-chunk sums) and the gate's per-key gradient "
            "before its suffix sum.",
        args=[*_qk(), _GCUM, Tensor("dA", f"B T H {CHUNK}", dtypes=["float32"]),
              Tensor("dq_inter", "B T H K", dtypes=["float32"]), Tensor("dk_inter", "B T H K", dtypes=["float32"]),
              _CHUNKS],
        outputs=[Output("dq", "B T H K", dtype_of="q"), Output("dk", "B T H K", dtype_of="q"),
                 Output("dg", "B T H K", dtype="float32"), Output("dg_chunk", "C H K", dtype="float32", zeros=True)],
        axes=_AXES_QK,
        launch_config=_bwd_intra_config,
        grid=["C * H", f"cdiv({CHUNK}, BC)", "cdiv(K, BK)"],
    ),
    OpSpec(
        name="chunk_gla_bwd_dv",
        kernel=chunk_gla_bwd_dv_kernel,
        doc="GLA backward: dv.",
        args=[Tensor("k", "B T H K", dtypes=FLOAT_DTYPES), _GCUM, Tensor("do", "B T H V", same_dtype_as="k"),
              Tensor("dstates", "C H K V", same_dtype_as="k"), Tensor("A", f"B T H {CHUNK}", dtypes=["float32"]),
              _CHUNKS],
        outputs=[Output("dv", "B T H V", dtype_of="k")],
        axes=[DtypeAxis("k"), BucketAxis("KP", "K", K_BUCKETS), AlignedAxis(["K", "V"])],
        launch_config=_dv_config,
        grid=["C * H", "cdiv(V, BV)"],
    ),
    OpSpec(
        name="chunk_gla_gate_grad",
        kernel=chunk_gla_gate_grad_kernel,
        doc="GLA backward: the per-key gate's gradient from its per-token terms and each chunk's later sum.",
        args=[Tensor("dg_token", "B T H K", dtypes=["float32"]), Tensor("dg_later", "C H K", dtypes=["float32"]),
              _CHUNKS],
        outputs=[Output("dg", "B T H K", dtype="float32")],
        axes=[BucketAxis("KP", "K", K_BUCKETS)],
        launch_config=lambda KP: dict(BK=min(KP, 64), BT=CHUNK, num_warps=4, num_stages=1),
        grid=["C * H", "cdiv(K, BK)"],
    ),
]
