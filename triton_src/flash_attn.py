"""Exact softmax attention, tiled (FlashAttention's algorithm: the T x T scores never reach memory).

Per head, with s = scale * q_i . k_j, the key j is visible to the query i unless it is masked out: by `causal`
(j > i + TK - TQ: the mask aligned to the bottom right, as FlashAttention 2.1+) or because it is past the end of
its sequence. With m_i the running row maximum and l_i the running sum of exp(s - m_i) over the key tiles,

    o_i   = sum_j exp(s_ij - lse_i) z_ij v_j,      lse_i = log sum_j exp(s_ij)   (natural log, stored [B, H, TQ])

where z_ij = keep_ij / (1 - dropout_p) under dropout (keep_ij from Philox-4x32-10 keyed on the seed, counters
(j, i, sequence * H + head, offset): the backward regenerates the same mask) and 1 otherwise. The kernels work in
base 2: scale * log2(e) is folded into one multiply and exp2 replaces exp.

The backward (the layout of Triton's fused-attention tutorial): flash_attn_bwd_preprocess writes
delta_i = o_i . do_i, flash_attn_bwd_dkdv walks the query tiles for one key tile (and every query head of its
key/value group: dk, dv need no reduction afterwards), flash_attn_bwd_dq walks the key tiles for one query tile:

    p_ij = exp(s_ij - lse_i),  dp_ij = z_ij (do_i . v_j),  ds_ij = p_ij (dp_ij - delta_i)
    dv_j = sum_i z_ij p_ij do_i,  dk_j = scale sum_i ds_ij q_i,  dq_i = scale sum_j ds_ij k_j

Causal programs skip the tiles that are fully masked and mask only the tiles the diagonal (or a sequence end)
cuts: each tile loop runs in an unmasked and a masked part. flash_attn_total_attention (FlagAttention's
return_total_attention) sums p_ij over the queries with the saved lse. The piecewise_attn_* kernels are the same
loops with FlagAttention's piecewise scores: s_ij = scale * q1_i . k1_j when |i + TK - TQ - j| < dist_threshold
and scale * q2_i . k2_j otherwise (the same bottom-right alignment of i and j as the causal mask).

Layouts: q [B, TQ, H, D], k and v [B, TK, HK, D] (H a multiple of HK: query head h reads key/value head
h // (H / HK)). Varlen: B = 1, cu_seqlens_q / cu_seqlens_k [N + 1] (int32) give the sequences; the grid then
runs over max_seqlen_q, bound from the length of a placeholder tensor. D is always a power-of-two bucket here
(fla_aot/ops/flash_attn.py zero-pads other head dims), so there are no masks along D.
"""
import triton
import triton.language as tl

from tools.kernel_spec import AlignedAxis, Bool, BoolAxis, BucketAxis, DtypeAxis, Float, OpSpec, Output, Tensor

ATTN_DTYPES = ["float16", "bfloat16"]
D_BUCKETS = [16, 32, 64, 128, 256]
LOG2E = 1.4426950408889634


@triton.jit
def _mm(a, b, acc):
    # float32 operands (the interpreter tests) get exact products; 16-bit ones run on the tensor cores
    if a.dtype == tl.float32:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _seq(cu_q, cu_k, cu_code, i_b, TQ, TK, H):
    """(first query row, query length, first key row, key length, the lse offset of head 0) of sequence i_b."""
    if cu_code != 0:
        bos_q = tl.load(cu_q + i_b)
        len_q = tl.load(cu_q + i_b + 1) - bos_q
        bos_k = tl.load(cu_k + i_b)
        len_k = tl.load(cu_k + i_b + 1) - bos_k
        lse0 = bos_q
    else:
        bos_q = i_b * TQ
        len_q = TQ + 0 * bos_q
        bos_k = i_b * TK
        len_k = TK + 0 * bos_k
        lse0 = i_b * H * TQ
    return bos_q, len_q, bos_k, len_k, lse0


@triton.jit
def _keep(seed, rng_off, seq_head, i, j, dropout_p):
    """The dropout mask for queries i and keys j (broadcast against each other): Philox-4x32-10 on counters
    (j, i, sequence * H + head, offset) under the key `seed`; kept when the top 24 bits are >= p * 2^24."""
    zero = i * 0 + j * 0
    r, _, _, _ = tl.philox(seed, j + zero, i + zero, zero + seq_head, zero + rng_off)
    return (r >> 8).to(tl.float32) >= dropout_p * 16777216.0


@triton.jit
def _scores(q, q2, kp, k2p, rows, cols, len_k, shift, qk_scale, dist, MASK_K: tl.constexpr,
            PIECEWISE: tl.constexpr):
    """The base-2 scaled scores of a query tile against the key tile at kp ([BM, BN]), and the key tile."""
    if MASK_K:
        kmask = (cols < len_k)[:, None]
        k = tl.load(kp, mask=kmask, other=0.)
    else:
        k = tl.load(kp)
    s = _mm(q, tl.trans(k), tl.zeros([q.shape[0], k.shape[0]], dtype=tl.float32))
    if PIECEWISE:
        if MASK_K:
            k2 = tl.load(k2p, mask=kmask, other=0.)
        else:
            k2 = tl.load(k2p)
        s2 = _mm(q2, tl.trans(k2), tl.zeros([q.shape[0], k.shape[0]], dtype=tl.float32))
        d = rows[:, None] + shift - cols[None, :]
        s = tl.where((d < dist) & (d > -dist), s, s2)
    return s * qk_scale


@triton.jit
def _fwd_tile(acc, l_i, m_i, q, q2, kp, k2p, vp, rows, cols, len_k, shift, qk_scale, dist, seed, rng_off,
              seq_head, dropout_p, MASKED: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
              PIECEWISE: tl.constexpr):
    s = _scores(q, q2, kp, k2p, rows, cols, len_k, shift, qk_scale, dist, MASKED, PIECEWISE)
    if MASKED:
        valid = cols[None, :] < len_k
        if CAUSAL:
            valid = valid & (cols[None, :] <= rows[:, None] + shift)
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0., m_new)  # a row with no visible key yet
        v = tl.load(vp, mask=(cols < len_k)[:, None], other=0.)
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = m_new
        v = tl.load(vp)
    p = tl.math.exp2(s - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if DROPOUT:
        p = tl.where(_keep(seed, rng_off, seq_head, rows[:, None], cols[None, :], dropout_p), p, 0.)
    acc = _mm(p.to(v.dtype), v, acc)
    return acc, l_i, m_new


@triton.jit
def _key_range(m0, len_q, len_k, shift, BM: tl.constexpr, BN: tl.constexpr, CAUSAL: tl.constexpr):
    """For the query tile at m0: the keys [0, clean) every row sees in whole tiles, and the end of the visible keys."""
    if CAUSAL:
        hi = tl.minimum(tl.maximum(m0 + BM + shift, 0), len_k)
        clean = tl.minimum(tl.maximum(m0 + shift + 1, 0), len_k) // BN * BN
    else:
        hi = len_k
        clean = len_k // BN * BN
    return clean, hi


@triton.jit
def _query_tile(MQ, H, HK, BM: tl.constexpr):
    """(query tile, sequence, head, key/value head) of this program; the tiles with the longest causal rows first."""
    n_m = tl.cdiv(MQ, BM)
    pid = tl.program_id(0)
    i_bh = pid // n_m
    i_h = i_bh % H
    return n_m - 1 - pid % n_m, i_bh // H, i_h, i_h // (H // HK)


@triton.jit
def _kv_tile(bos_k, i_hk, HK, BN: tl.constexpr, BD: tl.constexpr):
    """Where a key/value tile lies: (the 64-bit offset of the head's first row, the tile's int32 offsets [BN, BD],
    the 64-bit row stride; T * HK * D may pass 2^31). Loops rebuild each tile's pointers from these: carried
    through a loop, [BN, BD] tensors of 64-bit pointers would spill the registers."""
    kv_base = (bos_k.to(tl.int64) * HK + i_hk) * BD
    kv_off = tl.arange(0, BN)[:, None] * (HK * BD) + tl.arange(0, BD)[None, :]
    return kv_base, kv_off, tl.cast(HK, tl.int64) * BD


@triton.jit
def _dropout_key(seed_ptr, DROPOUT: tl.constexpr):
    """(Philox key, counter offset) from the op's seed tensor; zeros without dropout."""
    seed = 0
    rng_off = 0
    if DROPOUT:
        seed = tl.load(seed_ptr)
        rng_off = tl.load(seed_ptr + 1).to(tl.int32)
    return seed, rng_off


@triton.jit
def _fwd_body(q, k, v, q2, k2, cu_q, cu_k, seed_ptr, o, lse, cu_code, sm_scale, dropout_p, dist, TQ, TK, H, HK, MQ,
              BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
              PIECEWISE: tl.constexpr):
    i_m, i_b, i_h, i_hk = _query_tile(MQ, H, HK, BM)
    bos_q, len_q, bos_k, len_k, lse0 = _seq(cu_q, cu_k, cu_code, i_b, TQ, TK, H)
    m0 = i_m * BM
    if m0 >= len_q:
        return
    shift = len_k - len_q
    qk_scale = sm_scale * 1.4426950408889634
    rows = m0 + tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    offs_n = tl.arange(0, BN)
    mask_m = (rows < len_q)[:, None]
    q_off = (bos_q + rows[:, None]).to(tl.int64) * (H * BD) + i_h * BD + offs_d[None, :]
    qt = tl.load(q + q_off, mask=mask_m, other=0.)
    if PIECEWISE:
        qt2 = tl.load(q2 + q_off, mask=mask_m, other=0.)
    else:
        qt2 = qt
    kv_base, kv_off, kv_stride = _kv_tile(bos_k, i_hk, HK, BN, BD)
    seed, rng_off = _dropout_key(seed_ptr, DROPOUT)
    seq_head = i_b * H + i_h

    acc = tl.zeros([BM, BD], dtype=tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    m_i = tl.full([BM], float("-inf"), dtype=tl.float32)
    clean, hi = _key_range(m0, len_q, len_k, shift, BM, BN, CAUSAL)
    for n0 in range(0, clean, BN):
        base = kv_base + n0 * kv_stride
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, qt, qt2, k + base + kv_off, k2 + base + kv_off, v + base + kv_off,
                                  rows, n0 + offs_n, len_k, shift, qk_scale, dist, seed, rng_off, seq_head, dropout_p,
                                  False, CAUSAL, DROPOUT, PIECEWISE)
    for n0 in range(clean, hi, BN):
        base = kv_base + n0 * kv_stride
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, qt, qt2, k + base + kv_off, k2 + base + kv_off, v + base + kv_off,
                                  rows, n0 + offs_n, len_k, shift, qk_scale, dist, seed, rng_off, seq_head, dropout_p,
                                  True, CAUSAL, DROPOUT, PIECEWISE)

    empty = l_i == 0.  # no visible key: o = 0, lse = -inf
    l_use = tl.where(empty, 1., l_i)
    out = acc / l_use[:, None]
    if DROPOUT:
        out = out * (1. / (1. - dropout_p))
    tl.store(o + q_off, out.to(o.dtype.element_ty), mask=mask_m)
    lse_row = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_use)) * 0.6931471805599453)
    tl.store(lse + lse0 + i_h * TQ + rows, lse_row, mask=rows < len_q)


@triton.jit
def flash_attn_fwd_kernel(q, k, v, cu_seqlens_q, cu_seqlens_k, seed, o, lse, cu_seqlens_q_dtype,
                          sm_scale, dropout_p, TQ, TK, H, HK, MQ, BD: tl.constexpr, CAUSAL: tl.constexpr,
                          DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One query tile of one head: o and lse."""
    _fwd_body(q, k, v, q, k, cu_seqlens_q, cu_seqlens_k, seed, o, lse, cu_seqlens_q_dtype, sm_scale, dropout_p, 0,
              TQ, TK, H, HK, MQ, BLOCK_M, BLOCK_N, BD, CAUSAL, DROPOUT, False)


@triton.jit
def piecewise_attn_fwd_kernel(q1, k1, q2, k2, v, o, lse, sm_scale, dist_threshold, TQ, TK, H, HK,
                              BD: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One query tile of one head with piecewise scores: o and lse."""
    _fwd_body(q1, k1, v, q2, k2, q1, k1, q1, o, lse, 0, sm_scale, 0., dist_threshold, TQ, TK, H, HK,
              TQ, BLOCK_M, BLOCK_N, BD, CAUSAL, False, True)


@triton.jit
def flash_attn_bwd_preprocess_kernel(o, do, delta, TQ, H, BD: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta = rowsum(o * do) (float32, [B, H, TQ]) for a tile of rows of one head."""
    n_m = tl.cdiv(TQ, BLOCK_M)
    pid = tl.program_id(0)
    i_m = pid % n_m
    i_bh = pid // n_m
    i_b = i_bh // H
    i_h = i_bh % H
    rows = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask = rows < TQ
    off = (i_b * TQ + rows[:, None]).to(tl.int64) * (H * BD) + i_h * BD + tl.arange(0, BD)[None, :]
    b_o = tl.load(o + off, mask=mask[:, None], other=0.).to(tl.float32)
    b_do = tl.load(do + off, mask=mask[:, None], other=0.).to(tl.float32)
    tl.store(delta + i_bh * TQ + rows, tl.sum(b_o * b_do, 1), mask=mask)


@triton.jit
def _dkdv_tile(dk, dk2, dv, kt, k2t, vt, qp, q2p, dop, lse_p, delta_p, rows, cols, len_q, shift, qk_scale, dist,
               seed, rng_off, seq_head, dropout_p, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
               DROPOUT: tl.constexpr, PIECEWISE: tl.constexpr):
    # transposed tiles: keys along dim 0 (cols: key positions), queries along dim 1 (rows: query positions)
    if MASKED:
        mrow = rows < len_q
        q = tl.load(qp, mask=mrow[:, None], other=0.)
        do = tl.load(dop, mask=mrow[:, None], other=0.)
        lse = tl.load(lse_p, mask=mrow, other=0.)
        delta = tl.load(delta_p, mask=mrow, other=0.)
        if PIECEWISE:
            q2 = tl.load(q2p, mask=mrow[:, None], other=0.)
    else:
        q = tl.load(qp)
        do = tl.load(dop)
        lse = tl.load(lse_p)
        delta = tl.load(delta_p)
        if PIECEWISE:
            q2 = tl.load(q2p)
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634  # empty rows: p = 0
    zeros = tl.zeros([kt.shape[0], q.shape[0]], dtype=tl.float32)
    s = _mm(kt, tl.trans(q), zeros)
    if PIECEWISE:
        s2 = _mm(k2t, tl.trans(q2), zeros)
        d = rows[None, :] + shift - cols[:, None]
        near = (d < dist) & (d > -dist)
        s = tl.where(near, s, s2)
    p = tl.math.exp2(s * qk_scale - lse[None, :])
    if MASKED:
        if CAUSAL:
            p = tl.where(cols[:, None] <= rows[None, :] + shift, p, 0.)
    dp = _mm(vt, tl.trans(do), zeros)
    if DROPOUT:
        keep = _keep(seed, rng_off, seq_head, rows[None, :], cols[:, None], dropout_p)
        rp = 1. / (1. - dropout_p)
        dv = _mm(tl.where(keep, p * rp, 0.).to(do.dtype), do, dv)
        dp = tl.where(keep, dp * rp, 0.)
    else:
        dv = _mm(p.to(do.dtype), do, dv)
    ds = p * (dp - delta[None, :])
    if PIECEWISE:
        dk = _mm(tl.where(near, ds, 0.).to(q.dtype), q, dk)
        dk2 = _mm(tl.where(near, 0., ds).to(q.dtype), q2, dk2)
    else:
        dk = _mm(ds.to(q.dtype), q, dk)
    return dk, dk2, dv


@triton.jit
def _query_range(n0, len_q, shift, BM: tl.constexpr, BN: tl.constexpr, CAUSAL: tl.constexpr):
    """For the key tile at n0: query tiles from lo; those in [a, b) see every key of it and are inside the
    sequence (no mask); [lo, a) and [b, len_q) are masked."""
    if CAUSAL:
        lo = tl.maximum(n0 - shift, 0) // BM * BM
        a = tl.maximum(tl.cdiv(tl.maximum(n0 + BN - 1 - shift, 0), BM) * BM, lo)
    else:
        lo = n0 * 0
        a = lo
    b = len_q // BM * BM
    a = tl.minimum(a, b)
    b = tl.maximum(b, a)
    return lo, a, b


@triton.jit
def _dkdv_rows(dk, dk2, dv, kt, k2t, vt, q, q2, do, lse, delta, q_head, l_head, q_off, offs_m, start, end, cols, len_q,
               shift, qk_scale, dist, seed, rng_off, seq_head, dropout_p, H, BM: tl.constexpr, BD: tl.constexpr,
               MASKED: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, PIECEWISE: tl.constexpr):
    # the query tiles [start, end) of one query head against the key tile
    for m0 in range(start, end, BM):
        qb = q_head + m0 * (tl.cast(H, tl.int64) * BD)
        lb = l_head + m0
        dk, dk2, dv = _dkdv_tile(dk, dk2, dv, kt, k2t, vt, q + qb + q_off, q2 + qb + q_off, do + qb + q_off,
                                 lse + lb + offs_m, delta + lb + offs_m, m0 + offs_m, cols, len_q, shift, qk_scale,
                                 dist, seed, rng_off, seq_head, dropout_p, MASKED, CAUSAL, DROPOUT, PIECEWISE)
    return dk, dk2, dv


@triton.jit
def _dkdv_body(q, k, v, q2, k2, do, lse, delta, cu_q, cu_k, seed_ptr, dk, dk2, dv, cu_code, sm_scale, dropout_p,
               dist, TQ, TK, H, HK, MK, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, CAUSAL: tl.constexpr,
               DROPOUT: tl.constexpr, PIECEWISE: tl.constexpr):
    n_n = tl.cdiv(MK, BN)
    pid = tl.program_id(0)
    i_n = pid % n_n
    i_bh = pid // n_n
    i_b = i_bh // HK
    i_hk = i_bh % HK
    group = H // HK
    bos_q, len_q, bos_k, len_k, lse0 = _seq(cu_q, cu_k, cu_code, i_b, TQ, TK, H)
    n0 = i_n * BN
    if n0 >= len_k:
        return
    shift = len_k - len_q
    qk_scale = sm_scale * 1.4426950408889634
    cols = n0 + tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    offs_m = tl.arange(0, BM)
    mask_n = (cols < len_k)[:, None]
    kv_off = (bos_k + cols[:, None]).to(tl.int64) * (HK * BD) + i_hk * BD + offs_d[None, :]
    kt = tl.load(k + kv_off, mask=mask_n, other=0.)
    vt = tl.load(v + kv_off, mask=mask_n, other=0.)
    if PIECEWISE:
        k2t = tl.load(k2 + kv_off, mask=mask_n, other=0.)
    else:
        k2t = kt
    seed, rng_off = _dropout_key(seed_ptr, DROPOUT)
    b_dk = tl.zeros([BN, BD], dtype=tl.float32)
    if PIECEWISE:
        b_dk2 = tl.zeros([BN, BD], dtype=tl.float32)
    else:
        b_dk2 = tl.zeros([1, 1], dtype=tl.float32)  # unused: no registers held for it through the loops
    b_dv = tl.zeros([BN, BD], dtype=tl.float32)
    lo, a, b = _query_range(n0, len_q, shift, BM, BN, CAUSAL)
    q_off = offs_m[:, None] * (H * BD) + offs_d[None, :]  # per-step pointers, as in _fwd_body
    for g in range(0, group):  # the query heads that read this key/value head
        i_h = i_hk * group + g
        seq_head = i_b * H + i_h
        q_head = bos_q.to(tl.int64) * (H * BD) + i_h * BD
        l_head = lse0 + i_h * TQ
        # query tiles the diagonal cuts, those that see every key of this tile, those past the sequence's end
        b_dk, b_dk2, b_dv = _dkdv_rows(b_dk, b_dk2, b_dv, kt, k2t, vt, q, q2, do, lse, delta, q_head, l_head, q_off,
                                       offs_m, lo, a, cols, len_q, shift, qk_scale, dist, seed, rng_off, seq_head,
                                       dropout_p, H, BM, BD, True, CAUSAL, DROPOUT, PIECEWISE)
        b_dk, b_dk2, b_dv = _dkdv_rows(b_dk, b_dk2, b_dv, kt, k2t, vt, q, q2, do, lse, delta, q_head, l_head, q_off,
                                       offs_m, a, b, cols, len_q, shift, qk_scale, dist, seed, rng_off, seq_head,
                                       dropout_p, H, BM, BD, False, CAUSAL, DROPOUT, PIECEWISE)
        b_dk, b_dk2, b_dv = _dkdv_rows(b_dk, b_dk2, b_dv, kt, k2t, vt, q, q2, do, lse, delta, q_head, l_head, q_off,
                                       offs_m, b, len_q, cols, len_q, shift, qk_scale, dist, seed, rng_off, seq_head,
                                       dropout_p, H, BM, BD, True, CAUSAL, DROPOUT, PIECEWISE)
    tl.store(dk + kv_off, (b_dk * sm_scale).to(dk.dtype.element_ty), mask=mask_n)
    tl.store(dv + kv_off, b_dv.to(dv.dtype.element_ty), mask=mask_n)
    if PIECEWISE:
        tl.store(dk2 + kv_off, (b_dk2 * sm_scale).to(dk2.dtype.element_ty), mask=mask_n)


@triton.jit
def flash_attn_bwd_dkdv_kernel(q, k, v, do, lse, delta, cu_seqlens_q, cu_seqlens_k, seed, dk, dv,
                               cu_seqlens_q_dtype, sm_scale, dropout_p, TQ, TK, H, HK, MK, BD: tl.constexpr,
                               CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr,
                               BLOCK_N: tl.constexpr):
    """dk, dv of one key tile of one key/value head (summed over its query heads)."""
    _dkdv_body(q, k, v, q, k, do, lse, delta, cu_seqlens_q, cu_seqlens_k, seed, dk, dk, dv, cu_seqlens_q_dtype,
               sm_scale, dropout_p, 0, TQ, TK, H, HK, MK, BLOCK_M, BLOCK_N, BD, CAUSAL, DROPOUT, False)


@triton.jit
def piecewise_attn_bwd_dkdv_kernel(q1, k1, q2, k2, v, do, lse, delta, dk1, dk2, dv, sm_scale, dist_threshold,
                                   TQ, TK, H, HK, BD: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
                                   BLOCK_N: tl.constexpr):
    """dk1, dk2, dv of one key tile of one key/value head, piecewise scores."""
    _dkdv_body(q1, k1, v, q2, k2, do, lse, delta, q1, k1, q1, dk1, dk2, dv, 0, sm_scale, 0.,
               dist_threshold, TQ, TK, H, HK, TK, BLOCK_M, BLOCK_N, BD, CAUSAL, False, True)


@triton.jit
def _dq_tile(dq, dq2, q, q2, do, lse, delta, kp, k2p, vp, rows, cols, len_k, shift, qk_scale, dist, seed, rng_off,
             seq_head, dropout_p, MASKED: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
             PIECEWISE: tl.constexpr):
    if MASKED:
        mcol = (cols < len_k)[:, None]
        k = tl.load(kp, mask=mcol, other=0.)
        v = tl.load(vp, mask=mcol, other=0.)
        if PIECEWISE:
            k2 = tl.load(k2p, mask=mcol, other=0.)
    else:
        k = tl.load(kp)
        v = tl.load(vp)
        if PIECEWISE:
            k2 = tl.load(k2p)
    zeros = tl.zeros([q.shape[0], k.shape[0]], dtype=tl.float32)
    s = _mm(q, tl.trans(k), zeros)
    if PIECEWISE:
        s2 = _mm(q2, tl.trans(k2), zeros)
        d = rows[:, None] + shift - cols[None, :]
        near = (d < dist) & (d > -dist)
        s = tl.where(near, s, s2)
    p = tl.math.exp2(s * qk_scale - lse[:, None])
    if MASKED:
        valid = cols[None, :] < len_k
        if CAUSAL:
            valid = valid & (cols[None, :] <= rows[:, None] + shift)
        p = tl.where(valid, p, 0.)
    dp = _mm(do, tl.trans(v), zeros)
    if DROPOUT:
        keep = _keep(seed, rng_off, seq_head, rows[:, None], cols[None, :], dropout_p)
        dp = tl.where(keep, dp * (1. / (1. - dropout_p)), 0.)
    ds = p * (dp - delta[:, None])
    if PIECEWISE:
        dq = _mm(tl.where(near, ds, 0.).to(k.dtype), k, dq)
        dq2 = _mm(tl.where(near, 0., ds).to(k.dtype), k2, dq2)
    else:
        dq = _mm(ds.to(k.dtype), k, dq)
    return dq, dq2


@triton.jit
def _dq_body(q, k, v, q2, k2, do, lse, delta, cu_q, cu_k, seed_ptr, dq, dq2, cu_code, sm_scale, dropout_p, dist,
             TQ, TK, H, HK, MQ, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, CAUSAL: tl.constexpr,
             DROPOUT: tl.constexpr, PIECEWISE: tl.constexpr):
    i_m, i_b, i_h, i_hk = _query_tile(MQ, H, HK, BM)
    bos_q, len_q, bos_k, len_k, lse0 = _seq(cu_q, cu_k, cu_code, i_b, TQ, TK, H)
    m0 = i_m * BM
    if m0 >= len_q:
        return
    shift = len_k - len_q
    qk_scale = sm_scale * 1.4426950408889634
    rows = m0 + tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    offs_n = tl.arange(0, BN)
    mrow = rows < len_q
    q_off = (bos_q + rows[:, None]).to(tl.int64) * (H * BD) + i_h * BD + offs_d[None, :]
    qt = tl.load(q + q_off, mask=mrow[:, None], other=0.)
    dot = tl.load(do + q_off, mask=mrow[:, None], other=0.)
    if PIECEWISE:
        qt2 = tl.load(q2 + q_off, mask=mrow[:, None], other=0.)
    else:
        qt2 = qt
    b_lse = tl.load(lse + lse0 + i_h * TQ + rows, mask=mrow, other=0.)
    b_lse = tl.where(b_lse == float("-inf"), float("inf"), b_lse) * 1.4426950408889634
    b_delta = tl.load(delta + lse0 + i_h * TQ + rows, mask=mrow, other=0.)
    kv_base, kv_off, kv_stride = _kv_tile(bos_k, i_hk, HK, BN, BD)
    seed, rng_off = _dropout_key(seed_ptr, DROPOUT)
    seq_head = i_b * H + i_h
    b_dq = tl.zeros([BM, BD], dtype=tl.float32)
    if PIECEWISE:
        b_dq2 = tl.zeros([BM, BD], dtype=tl.float32)
    else:
        b_dq2 = tl.zeros([1, 1], dtype=tl.float32)  # unused
    clean, hi = _key_range(m0, len_q, len_k, shift, BM, BN, CAUSAL)
    for n0 in range(0, clean, BN):
        base = kv_base + n0 * kv_stride
        b_dq, b_dq2 = _dq_tile(b_dq, b_dq2, qt, qt2, dot, b_lse, b_delta, k + base + kv_off, k2 + base + kv_off,
                               v + base + kv_off, rows, n0 + offs_n, len_k, shift, qk_scale, dist, seed, rng_off,
                               seq_head, dropout_p, False, CAUSAL, DROPOUT, PIECEWISE)
    for n0 in range(clean, hi, BN):
        base = kv_base + n0 * kv_stride
        b_dq, b_dq2 = _dq_tile(b_dq, b_dq2, qt, qt2, dot, b_lse, b_delta, k + base + kv_off, k2 + base + kv_off,
                               v + base + kv_off, rows, n0 + offs_n, len_k, shift, qk_scale, dist, seed, rng_off,
                               seq_head, dropout_p, True, CAUSAL, DROPOUT, PIECEWISE)
    tl.store(dq + q_off, (b_dq * sm_scale).to(dq.dtype.element_ty), mask=mrow[:, None])
    if PIECEWISE:
        tl.store(dq2 + q_off, (b_dq2 * sm_scale).to(dq2.dtype.element_ty), mask=mrow[:, None])


@triton.jit
def flash_attn_bwd_dq_kernel(q, k, v, do, lse, delta, cu_seqlens_q, cu_seqlens_k, seed, dq,
                             cu_seqlens_q_dtype, sm_scale, dropout_p, TQ, TK, H, HK, MQ, BD: tl.constexpr,
                             CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK_N: tl.constexpr):
    """dq of one query tile of one head."""
    _dq_body(q, k, v, q, k, do, lse, delta, cu_seqlens_q, cu_seqlens_k, seed, dq, dq, cu_seqlens_q_dtype, sm_scale,
             dropout_p, 0, TQ, TK, H, HK, MQ, BLOCK_M, BLOCK_N, BD, CAUSAL, DROPOUT, False)


@triton.jit
def piecewise_attn_bwd_dq_kernel(q1, k1, q2, k2, v, do, lse, delta, dq1, dq2, sm_scale, dist_threshold, TQ, TK, H,
                                 HK, BD: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
                                 BLOCK_N: tl.constexpr):
    """dq1, dq2 of one query tile of one head, piecewise scores."""
    _dq_body(q1, k1, v, q2, k2, do, lse, delta, q1, k1, q1, dq1, dq2, 0, sm_scale, 0., dist_threshold,
             TQ, TK, H, HK, TQ, BLOCK_M, BLOCK_N, BD, CAUSAL, False, True)


@triton.jit
def flash_attn_total_attention_kernel(q, k, lse, tot, sm_scale, TQ, TK, H, HK, BD: tl.constexpr,
                                      CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """FlagAttention's total attention: sum over the queries of p_ij (float32, [B, H, TK]) for one key tile of one
    query head, from the forward's lse."""
    n_n = tl.cdiv(TK, BLOCK_N)
    pid = tl.program_id(0)
    i_n = pid % n_n
    i_bh = pid // n_n
    i_b = i_bh // H
    i_h = i_bh % H
    i_hk = i_h // (H // HK)
    shift = TK - TQ
    qk_scale = sm_scale * 1.4426950408889634
    n0 = i_n * BLOCK_N
    cols = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BD)
    offs_m = tl.arange(0, BLOCK_M)
    mask_n = cols < TK
    kt = tl.load(k + (i_b * TK + cols[:, None]).to(tl.int64) * (HK * BD) + i_hk * BD + offs_d[None, :],
                 mask=mask_n[:, None], other=0.)
    lo, a, b = _query_range(n0, TQ, shift, BLOCK_M, BLOCK_N, CAUSAL)
    total = tl.zeros([BLOCK_N], dtype=tl.float32)
    for m0 in range(lo, TQ, BLOCK_M):
        rows = m0 + offs_m
        mrow = rows < TQ
        qt = tl.load(q + (i_b * TQ + rows[:, None]).to(tl.int64) * (H * BD) + i_h * BD + offs_d[None, :],
                     mask=mrow[:, None], other=0.)
        b_lse = tl.load(lse + i_bh * TQ + rows, mask=mrow, other=float("inf"))
        b_lse = tl.where(b_lse == float("-inf"), float("inf"), b_lse) * 1.4426950408889634
        s = _mm(kt, tl.trans(qt), tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32))
        p = tl.math.exp2(s * qk_scale - b_lse[None, :])
        if CAUSAL:
            p = tl.where(cols[:, None] <= rows[None, :] + shift, p, 0.)
        total += tl.sum(p, 1)
    tl.store(tot + i_bh * TK + cols, total, mask=mask_n)


# ---- launch configs: one table per kernel; Hopper starting points, not yet timed (tools/tune_flash_attn.py) --------
# BLOCK_M / BLOCK_N: query / key tile rows. Shared memory stays under the A100's 164 KB for every bucket.

def _by_bucket(table):
    """A launch config from a table: head-dim bucket -> (BLOCK_M, BLOCK_N, num_warps, num_stages)."""
    def config(BD, **_):
        return dict(zip(("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"), table[BD]))
    return config


# the query tile stays on chip, key/value tiles stream through num_stages buffers
_fwd_table = _by_bucket({16: (128, 128, 4, 3), 32: (128, 128, 4, 3), 64: (128, 128, 8, 3), 128: (128, 64, 8, 3),
                         256: (64, 32, 4, 2)})


def _fwd_config(BD, DROPOUT=False, **_):
    config = _fwd_table(BD)
    if DROPOUT and BD <= 32:
        # the Philox bits of a 128 x 128 score tile on 4 warps spill about 4 KB a thread (sm_90 resource report)
        config["num_warps"] = 8
    return config
# one key tile (dk, dv accumulators on chip) against streaming query tiles; at D=64, 32 query rows a step keep the
# causal kernel's spills to 48 B on sm_90 (256 B with 64 rows), by the compiler's resource report
_dkdv_config = _by_bucket({16: (32, 128, 8, 3), 32: (32, 128, 8, 3), 64: (32, 128, 8, 3), 128: (32, 128, 8, 3),
                           256: (32, 64, 8, 2)})
# one query tile (dq accumulator on chip) against streaming key tiles
_dq_config = _by_bucket({16: (128, 64, 8, 3), 32: (128, 64, 8, 3), 64: (128, 64, 8, 3), 128: (128, 32, 8, 3),
                         256: (64, 32, 8, 2)})
# piecewise: two score products per tile, so smaller tiles; D=256 single-buffered for the A100's shared memory
_piecewise_fwd_config = _by_bucket({16: (128, 64, 8, 3), 32: (128, 64, 8, 3), 64: (128, 64, 8, 3),
                                    128: (64, 32, 4, 2), 256: (64, 32, 4, 2)})
_piecewise_dkdv_config = _by_bucket({16: (32, 128, 8, 2), 32: (32, 128, 8, 2), 64: (32, 128, 8, 2),
                                     128: (32, 64, 8, 2), 256: (32, 32, 4, 1)})
_piecewise_dq_config = _by_bucket({16: (128, 32, 8, 2), 32: (128, 32, 8, 2), 64: (128, 32, 8, 2),
                                   128: (64, 32, 8, 2), 256: (32, 32, 4, 1)})


def _preprocess_config(BD, **_):
    return dict(BLOCK_M=64, num_warps=4, num_stages=1)


def _total_attention_config(BD, **_):
    return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2)


_Q = Tensor("q", "B TQ H D", dtypes=ATTN_DTYPES)
_K = Tensor("k", "B TK HK D", same_dtype_as="q")
_V = Tensor("v", "B TK HK D", same_dtype_as="q")
_VARLEN = [Tensor("cu_seqlens_q", "N+1", dtypes=["int32"], optional=True, varlen=True),
           Tensor("cu_seqlens_k", "N+1", dtypes=["int32"], optional=True, varlen=True)]
_SEED = Tensor("seed", "2", dtypes=["int64"], optional=True)  # (Philox key, counter offset), from torch's generator
_ROWS = [Tensor("do", "B TQ H D", same_dtype_as="q"), Tensor("lse", "B H TQ", dtypes=["float32"]),
         Tensor("delta", "B H TQ", dtypes=["float32"])]
_PW = [Tensor("q1", "B TQ H D", dtypes=ATTN_DTYPES), Tensor("k1", "B TK HK D", same_dtype_as="q1"),
       Tensor("q2", "B TQ H D", same_dtype_as="q1"), Tensor("k2", "B TK HK D", same_dtype_as="q1"),
       Tensor("v", "B TK HK D", same_dtype_as="q1")]
# D always equals its bucket (the ops pad it); inputs are 16-byte aligned (the ops copy those that are not)
_ALIGNED = AlignedAxis([], fallback=False)
# D equal to a bucket: the kernels do not mask along D (fla_aot/ops/flash_attn.py zero-pads other head dims), so a
# raw torch.ops call with another D must find no variant rather than read past the rows
_D_BUCKET = BucketAxis("BD", "D", D_BUCKETS, exact=True)
_AXES = [DtypeAxis("q"), _D_BUCKET, BoolAxis("CAUSAL", "causal"),
         BoolAxis("DROPOUT", "dropout"), _ALIGNED]
_PW_AXES = [DtypeAxis("q1"), _D_BUCKET, BoolAxis("CAUSAL", "causal"), _ALIGNED]
_GQA = [("H", "HK")]
_DEFAULTS = {"N": "B", "MQ": "TQ", "MK": "TK"}

SPECS = [
    OpSpec(
        name="flash_attn_fwd",
        kernel=flash_attn_fwd_kernel,
        doc="Exact attention forward: o and the natural-log lse [B, H, TQ] (float32).",
        args=[_Q, _K, _V, *_VARLEN, Tensor("max_seqlen_q", "MQ", dtypes=["int32"], optional=True, varlen=True),
              _SEED, Float("sm_scale"), Float("dropout_p"), Bool("causal"), Bool("dropout")],
        outputs=[Output("o", "B TQ H D", dtype_of="q"), Output("lse", "B H TQ", dtype="float32")],
        axes=_AXES,
        launch_config=_fwd_config,
        grid=["N * H * cdiv(MQ, BLOCK_M)"],
        divisible=_GQA,
        symbol_defaults=_DEFAULTS,
    ),
    OpSpec(
        name="flash_attn_bwd_preprocess",
        kernel=flash_attn_bwd_preprocess_kernel,
        doc="Exact attention backward: delta = rowsum(o * do) [B, H, TQ] (float32).",
        args=[Tensor("o", "B TQ H D", dtypes=ATTN_DTYPES), Tensor("do", "B TQ H D", same_dtype_as="o")],
        outputs=[Output("delta", "B H TQ", dtype="float32")],
        axes=[DtypeAxis("o"), _D_BUCKET, _ALIGNED],
        launch_config=_preprocess_config,
        grid=["B * H * cdiv(TQ, BLOCK_M)"],
    ),
    OpSpec(
        name="flash_attn_bwd_dkdv",
        kernel=flash_attn_bwd_dkdv_kernel,
        doc="Exact attention backward: dk, dv (each key/value head summed over its query heads).",
        args=[_Q, _K, _V, *_ROWS, *_VARLEN, Tensor("max_seqlen_k", "MK", dtypes=["int32"], optional=True, varlen=True),
              _SEED, Float("sm_scale"), Float("dropout_p"), Bool("causal"), Bool("dropout")],
        outputs=[Output("dk", "B TK HK D", dtype_of="q"), Output("dv", "B TK HK D", dtype_of="q")],
        axes=_AXES,
        launch_config=_dkdv_config,
        grid=["N * HK * cdiv(MK, BLOCK_N)"],
        divisible=_GQA,
        symbol_defaults=_DEFAULTS,
    ),
    OpSpec(
        name="flash_attn_bwd_dq",
        kernel=flash_attn_bwd_dq_kernel,
        doc="Exact attention backward: dq.",
        args=[_Q, _K, _V, *_ROWS, *_VARLEN, Tensor("max_seqlen_q", "MQ", dtypes=["int32"], optional=True, varlen=True),
              _SEED, Float("sm_scale"), Float("dropout_p"), Bool("causal"), Bool("dropout")],
        outputs=[Output("dq", "B TQ H D", dtype_of="q")],
        axes=_AXES,
        launch_config=_dq_config,
        grid=["N * H * cdiv(MQ, BLOCK_M)"],
        divisible=_GQA,
        symbol_defaults=_DEFAULTS,
    ),
    OpSpec(
        name="flash_attn_total_attention",
        kernel=flash_attn_total_attention_kernel,
        doc="FlagAttention's total attention: attention weights summed over the queries [B, H, TK] (float32).",
        args=[_Q, _K, Tensor("lse", "B H TQ", dtypes=["float32"]), Float("sm_scale"), Bool("causal")],
        outputs=[Output("tot", "B H TK", dtype="float32")],
        axes=[DtypeAxis("q"), _D_BUCKET, BoolAxis("CAUSAL", "causal"), _ALIGNED],
        launch_config=_total_attention_config,
        grid=["B * H * cdiv(TK, BLOCK_N)"],
        divisible=_GQA,
    ),
    OpSpec(
        name="piecewise_attn_fwd",
        kernel=piecewise_attn_fwd_kernel,
        doc="Piecewise attention forward (q1.k1 within dist_threshold, q2.k2 beyond): o and lse.",
        args=[*_PW, Float("sm_scale"), Float("dist_threshold"), Bool("causal")],
        outputs=[Output("o", "B TQ H D", dtype_of="q1"), Output("lse", "B H TQ", dtype="float32")],
        axes=_PW_AXES,
        launch_config=_piecewise_fwd_config,
        grid=["B * H * cdiv(TQ, BLOCK_M)"],
        divisible=_GQA,
    ),
    OpSpec(
        name="piecewise_attn_bwd_dkdv",
        kernel=piecewise_attn_bwd_dkdv_kernel,
        doc="Piecewise attention backward: dk1, dk2, dv.",
        args=[*_PW, Tensor("do", "B TQ H D", same_dtype_as="q1"), *_ROWS[1:], Float("sm_scale"),
              Float("dist_threshold"), Bool("causal")],
        outputs=[Output("dk1", "B TK HK D", dtype_of="q1"), Output("dk2", "B TK HK D", dtype_of="q1"),
                 Output("dv", "B TK HK D", dtype_of="q1")],
        axes=_PW_AXES,
        launch_config=_piecewise_dkdv_config,
        grid=["B * HK * cdiv(TK, BLOCK_N)"],
        divisible=_GQA,
    ),
    OpSpec(
        name="piecewise_attn_bwd_dq",
        kernel=piecewise_attn_bwd_dq_kernel,
        doc="Piecewise attention backward: dq1, dq2.",
        args=[*_PW, Tensor("do", "B TQ H D", same_dtype_as="q1"), *_ROWS[1:], Float("sm_scale"),
              Float("dist_threshold"), Bool("causal")],
        outputs=[Output("dq1", "B TQ H D", dtype_of="q1"), Output("dq2", "B TQ H D", dtype_of="q1")],
        axes=_PW_AXES,
        launch_config=_piecewise_dq_config,
        grid=["B * H * cdiv(TQ, BLOCK_M)"],
        divisible=_GQA,
    ),
]
