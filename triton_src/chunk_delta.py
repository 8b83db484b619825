"""Chunked parallel form of the delta rule and the gated delta rule (WY representation, chunks of 64 tokens).

Per value head, with G_i the running sum of the scalar log gate inside the chunk (zero for the plain delta rule),
G_L its value at the chunk's last token, beta_i the step size and h the state [K, V] at the chunk's start:

    A[i, j]  = beta_i (k_i . k_j) exp(G_i - G_j)                       for j < i (zero elsewhere)
    T        = (I + A)^-1                                              (unit lower triangular)
    w        = T (beta * exp(G) * k),   u = T (beta * v)               (the chunk's steps as one update)
    v_new    = u - w h                                                 (what each step writes, given h)
    h_next   = exp(G_L) h + sum_j exp(G_L - G_j) k_j^T v_new_j
    o_i      = scale * (exp(G_i) q_i h + sum_{j<=i} exp(G_i - G_j) (q_i . k_j) v_new_j)

chunk_delta_solve builds T per chunk (forward substitution on the 16 x 16 diagonal blocks, then the blocks below
them by products), chunk_delta_wu w and u; chunk_delta_state walks each sequence's chunks in order (the state
update is not diagonal, so there is no segment split); chunk_delta_fwd_o writes the output per chunk.

The backward keeps T and G from the forward, reruns chunk_delta_wu and chunk_delta_state (w, u, the states and
v_new are not saved), then: chunk_delta_bwd_dv_local (the output's
intra-chunk share of dv_new), chunk_delta_bwd_state (chunks in reverse: the state's gradient dh at each chunk's
end, and dv_new), chunk_delta_bwd_dqkw (dq, dk through the state and the output, dw = -dv_new h^T, and the gate's
per-token terms) and chunk_delta_bwd_wy (through T, w and u to dk, dv, dbeta; the gate's gradient as the in-chunk
suffix sum of its per-token terms). q and k have H heads, v, beta and g HV = m * H (grouped value heads): value
head hv reads query/key head hv // m, and dq, dk come out per value head to be summed over the group.
dq and dk (and the state's share of dk, added in chunk_delta_bwd_wy) are stored in the inputs' 16-bit dtype, as fla
stores them: one rounding more than float32, and no casts after the kernels (a step 2.10 -> 1.84 ms at B8 T2048
H16 on an H200). dv_new and dw stay float32: stored in 16 bits, chunk_delta_bwd_wy's dk and dbeta came out wrong
on Hopper (Triton 3.6), though the interpreter computes them right (docs/tuning/chunk_delta.md).
"""
import triton
import triton.language as tl

from tools.kernel_spec import AlignedAxis, Bool, BoolAxis, BucketAxis, DtypeAxis, Float, OpSpec, Output, Tensor
from triton_src.chunk import CHUNK, K_BUCKETS, _causal_decay, _dot, _state_offsets
from triton_src.chunk_gla import _chunk_bounds
from triton_src.fused_recurrent import _load_f32

SUB_CHUNK = 16
DELTA_DTYPES = ["float16", "bfloat16"]  # the WY products run on the tensor cores


@triton.jit
def _gates(gcum, o_t, mask_t, t1, i_hv, HV):
    # G over the chunk's tokens [BT] and at its last token (scalar); padding rows are masked to 0
    b_G = tl.load(gcum + o_t * HV + i_hv, mask=mask_t, other=0.)
    b_GL = tl.load(gcum + (t1 - 1) * HV + i_hv)
    return b_G, b_GL


@triton.jit
def _tile(ptr, o_t, mask_t, heads, i_head, width, o_c, mask_c):
    # rows o_t, columns o_c of a [B, T, heads, width] tensor
    return tl.load(ptr + (o_t[:, None] * heads + i_head) * width + o_c[None, :],
                   mask=mask_t[:, None] & mask_c[None, :], other=0.)


@triton.jit
def _ai_block(Ai, t0, t1, i_hv, HV, r: tl.constexpr, c: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    # the [BC, BC] block (r, c) of a chunk's [BT, BT] matrix stored row by row in Ai [B, T, HV, BT]
    o_r = t0 + r * BC + tl.arange(0, BC)
    return tl.load(Ai + (o_r[:, None] * HV + i_hv) * BT + c * BC + tl.arange(0, BC)[None, :],
                   mask=(o_r < t1)[:, None], other=0.)


@triton.jit
def _store_ai_block(Ai, x, t0, t1, i_hv, HV, r: tl.constexpr, c: tl.constexpr, BT: tl.constexpr,
                    BC: tl.constexpr):
    o_r = t0 + r * BC + tl.arange(0, BC)
    tl.store(Ai + (o_r[:, None] * HV + i_hv) * BT + c * BC + tl.arange(0, BC)[None, :], x,
             mask=(o_r < t1)[:, None])


@triton.jit
def chunk_delta_solve_kernel(k, beta, g, chunks, Ai, gcum, beta_dtype, g_dtype, H, HV, K,
                             KP: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    """One chunk of one value head: the gate's running sum and T = (I + A)^-1 (float32, in Ai)."""
    i_hv, t0, t1 = _chunk_bounds(chunks, tl.program_id(0), HV)
    i_h = i_hv // (HV // H)
    o = tl.arange(0, BT)
    o_t = t0 + o
    mask_t = o_t < t1
    b_beta = _load_f32(beta, o_t * HV + i_hv, mask_t, beta_dtype, 0.)
    b_G = tl.cumsum(_load_f32(g, o_t * HV + i_hv, mask_t & (g_dtype != 0), g_dtype, 0.), 0)
    tl.store(gcum + o_t * HV + i_hv, b_G, mask=mask_t)

    b_kk = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        b_k = _tile(k, o_t, mask_t, H, i_h, K, o_k, o_k < K)
        b_kk += _dot(b_k, tl.trans(b_k))
    strict = (o[:, None] > o[None, :]) & mask_t[:, None]
    b_A = tl.where(strict, b_kk * b_beta[:, None] * tl.exp(tl.where(strict, b_G[:, None] - b_G[None, :], 0.)), 0.)
    p_ai = Ai + (o_t[:, None] * HV + i_hv) * BT + o[None, :]
    tl.store(p_ai, b_A, mask=mask_t[:, None])
    tl.debug_barrier()

    # the diagonal blocks' inverses, all four at once as [4, BC, BC]: row i = e_i - sum_{j<i} A[i, j] row j
    NB: tl.constexpr = BT // BC
    ob = tl.arange(0, NB)
    oc = tl.arange(0, BC)
    eye = (ob[:, None, None] >= 0) & (oc[None, :, None] == oc[None, None, :])
    b_T = tl.where(eye, 1., 0.)
    for i in range(1, BC):
        o_r = t0 + ob * BC + i  # row i of each diagonal block
        b_a = tl.load(Ai + (o_r[:, None] * HV + i_hv) * BT + ob[:, None] * BC + oc[None, :],
                      mask=(o_r < t1)[:, None], other=0.)
        b_row = tl.where(oc[None, :] == i, 1., 0.) - tl.sum(b_a[:, :, None] * b_T, 1)
        b_T = tl.where(oc[None, :, None] == i, b_row[:, None, :], b_T)
    o_rows = t0 + ob[:, None, None] * BC + oc[None, :, None]
    tl.store(Ai + (o_rows * HV + i_hv) * BT + ob[:, None, None] * BC + oc[None, None, :], b_T,
             mask=o_rows < t1)
    tl.debug_barrier()

    # below the diagonal: T_rc = -T_rr sum_{c <= m < r} A_rm T_mc
    b_T00 = _ai_block(Ai, t0, t1, i_hv, HV, 0, 0, BT, BC)
    b_T11 = _ai_block(Ai, t0, t1, i_hv, HV, 1, 1, BT, BC)
    b_T22 = _ai_block(Ai, t0, t1, i_hv, HV, 2, 2, BT, BC)
    b_T33 = _ai_block(Ai, t0, t1, i_hv, HV, 3, 3, BT, BC)
    b_A10 = _ai_block(Ai, t0, t1, i_hv, HV, 1, 0, BT, BC)
    b_A20 = _ai_block(Ai, t0, t1, i_hv, HV, 2, 0, BT, BC)
    b_A21 = _ai_block(Ai, t0, t1, i_hv, HV, 2, 1, BT, BC)
    b_A30 = _ai_block(Ai, t0, t1, i_hv, HV, 3, 0, BT, BC)
    b_A31 = _ai_block(Ai, t0, t1, i_hv, HV, 3, 1, BT, BC)
    b_A32 = _ai_block(Ai, t0, t1, i_hv, HV, 3, 2, BT, BC)
    b_T10 = -_dot(b_T11, _dot(b_A10, b_T00))
    b_T21 = -_dot(b_T22, _dot(b_A21, b_T11))
    b_T20 = -_dot(b_T22, _dot(b_A20, b_T00) + _dot(b_A21, b_T10))
    b_T32 = -_dot(b_T33, _dot(b_A32, b_T22))
    b_T31 = -_dot(b_T33, _dot(b_A31, b_T11) + _dot(b_A32, b_T21))
    b_T30 = -_dot(b_T33, _dot(b_A30, b_T00) + _dot(b_A31, b_T10) + _dot(b_A32, b_T20))
    _store_ai_block(Ai, b_T10, t0, t1, i_hv, HV, 1, 0, BT, BC)
    _store_ai_block(Ai, b_T20, t0, t1, i_hv, HV, 2, 0, BT, BC)
    _store_ai_block(Ai, b_T21, t0, t1, i_hv, HV, 2, 1, BT, BC)
    _store_ai_block(Ai, b_T30, t0, t1, i_hv, HV, 3, 0, BT, BC)
    _store_ai_block(Ai, b_T31, t0, t1, i_hv, HV, 3, 1, BT, BC)
    _store_ai_block(Ai, b_T32, t0, t1, i_hv, HV, 3, 2, BT, BC)


@triton.jit
def chunk_delta_wu_kernel(k, v, beta, gcum, Ai, chunks, w, u, beta_dtype, H, HV, K, V,
                          KP: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr):
    """One chunk of one value head: w = T (beta exp(G) k) and u = T (beta v)."""
    i_hv, t0, t1 = _chunk_bounds(chunks, tl.program_id(0), HV)
    i_h = i_hv // (HV // H)
    o = tl.arange(0, BT)
    o_t = t0 + o
    mask_t = o_t < t1
    b_beta = _load_f32(beta, o_t * HV + i_hv, mask_t, beta_dtype, 0.)
    b_G = tl.load(gcum + o_t * HV + i_hv, mask=mask_t, other=0.)
    b_Ti = tl.load(Ai + (o_t[:, None] * HV + i_hv) * BT + o[None, :], mask=mask_t[:, None],
                   other=0.).to(k.dtype.element_ty)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        mask_k = o_k < K
        b_k = _tile(k, o_t, mask_t, H, i_h, K, o_k, mask_k)
        b_kb = (b_k * (b_beta * tl.exp(b_G))[:, None]).to(b_k.dtype)
        tl.store(w + (o_t[:, None] * HV + i_hv) * K + o_k[None, :], _dot(b_Ti, b_kb).to(w.dtype.element_ty),
                 mask=mask_t[:, None] & mask_k[None, :])
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        mask_v = o_v < V
        b_v = _tile(v, o_t, mask_t, HV, i_hv, V, o_v, mask_v)
        b_vb = (b_v * b_beta[:, None]).to(b_v.dtype)
        tl.store(u + (o_t[:, None] * HV + i_hv) * V + o_v[None, :], _dot(b_Ti, b_vb).to(u.dtype.element_ty),
                 mask=mask_t[:, None] & mask_v[None, :])


@triton.jit
def chunk_delta_state_kernel(k, w, u, gcum, h0, seqs, states, v_new, ht, h0_dtype, H, HV, K, V, state_v_first,
                             output_ht, KP: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr, NARROW: tl.constexpr,
                             NARROWEST: tl.constexpr):
    """One sequence's chunks in order, for one value head and BV-wide slice of V: stores the state each chunk
    starts from and v_new = u - w h, and updates h."""
    i_nh = tl.program_id(0)
    i_n = i_nh // HV
    i_hv = i_nh % HV
    i_h = i_hv // (HV // H)
    bos = tl.load(seqs + i_n * 4 + 1).to(tl.int64)
    eos = tl.load(seqs + i_n * 4 + 2).to(tl.int64)
    c0 = tl.load(seqs + i_n * 4 + 3).to(tl.int64)
    o_k = tl.arange(0, KP)
    o_v = tl.program_id(1) * BV + tl.arange(0, BV)
    mask_k = o_k < K
    mask_v = o_v < V
    mask_h = mask_k[:, None] & mask_v[None, :]
    o_state = o_k[:, None] * V + o_v[None, :]
    o_user = _state_offsets(o_k, o_v, K, V, state_v_first)
    b_h = tl.zeros([KP, BV], dtype=tl.float32)
    if h0_dtype != 0:
        b_h += tl.load(h0 + i_nh.to(tl.int64) * K * V + o_user, mask=mask_h, other=0.)
    for i in range(0, tl.cdiv((eos - bos).to(tl.int32), BT)):
        t0 = bos + i * BT
        t1 = tl.minimum(t0 + BT, eos)
        o_t = t0 + tl.arange(0, BT)
        mask_t = o_t < t1
        tl.store(states + ((c0 + i) * HV + i_hv) * K * V + o_state, b_h.to(states.dtype.element_ty), mask=mask_h)
        b_w = _tile(w, o_t, mask_t, HV, i_hv, K, o_k, mask_k)
        b_vn = _tile(u, o_t, mask_t, HV, i_hv, V, o_v, mask_v).to(tl.float32) - _dot(b_w, b_h.to(b_w.dtype))
        tl.store(v_new + (o_t[:, None] * HV + i_hv) * V + o_v[None, :], b_vn.to(v_new.dtype.element_ty),
                 mask=mask_t[:, None] & mask_v[None, :])
        b_G, b_GL = _gates(gcum, o_t, mask_t, t1, i_hv, HV)
        b_k = _tile(k, o_t, mask_t, H, i_h, K, o_k, mask_k)
        b_vd = tl.where(mask_t[:, None], b_vn * tl.exp(b_GL - b_G)[:, None], 0.).to(b_k.dtype)
        b_h = b_h * tl.exp(b_GL) + _dot(tl.trans(b_k), b_vd)
    if output_ht != 0:
        tl.store(ht + i_nh.to(tl.int64) * K * V + o_user, b_h, mask=mask_h)


@triton.jit
def chunk_delta_fwd_o_kernel(q, k, v_new, gcum, states, chunks, o, scale, H, HV, K, V,
                             KP: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr):
    """o of one chunk and BV-wide slice of V from the chunk's starting state and its v_new."""
    i_ch = tl.program_id(0)
    i_hv, t0, t1 = _chunk_bounds(chunks, i_ch, HV)
    i_h = i_hv // (HV // H)
    o_t = t0 + tl.arange(0, BT)
    mask_t = o_t < t1
    o_v = tl.program_id(1) * BV + tl.arange(0, BV)
    mask_v = o_v < V
    state_base = i_ch.to(tl.int64) * K * V
    b_o = tl.zeros([BT, BV], dtype=tl.float32)
    b_s = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        mask_k = o_k < K
        b_q = _tile(q, o_t, mask_t, H, i_h, K, o_k, mask_k)
        b_k = _tile(k, o_t, mask_t, H, i_h, K, o_k, mask_k)
        b_h = tl.load(states + state_base + o_k[:, None] * V + o_v[None, :],
                      mask=mask_k[:, None] & mask_v[None, :], other=0.)
        b_o += _dot(b_q, b_h.to(b_q.dtype))
        b_s += _dot(b_q, tl.trans(b_k))
    b_G, b_GL = _gates(gcum, o_t, mask_t, t1, i_hv, HV)
    b_vn = _tile(v_new, o_t, mask_t, HV, i_hv, V, o_v, mask_v)
    b_o = b_o * tl.exp(b_G)[:, None] + _dot((b_s * _causal_decay(b_G, mask_t, BT)).to(b_vn.dtype), b_vn)
    tl.store(o + (o_t[:, None] * HV + i_hv) * V + o_v[None, :], (b_o * scale).to(o.dtype.element_ty),
             mask=mask_t[:, None] & mask_v[None, :])


@triton.jit
def chunk_delta_bwd_dv_local_kernel(q, k, gcum, do, chunks, dv, scale, H, HV, K, V,
                                    KP: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr):
    """The output's intra-chunk share of dv_new: dv_j = scale * sum_{i>=j} exp(G_i - G_j) (q_i . k_j) do_i."""
    i_hv, t0, t1 = _chunk_bounds(chunks, tl.program_id(0), HV)
    i_h = i_hv // (HV // H)
    o_t = t0 + tl.arange(0, BT)
    mask_t = o_t < t1
    o_v = tl.program_id(1) * BV + tl.arange(0, BV)
    mask_v = o_v < V
    b_s = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        mask_k = o_k < K
        b_q = _tile(q, o_t, mask_t, H, i_h, K, o_k, mask_k)
        b_k = _tile(k, o_t, mask_t, H, i_h, K, o_k, mask_k)
        b_s += _dot(b_k, tl.trans(b_q))
    b_G, b_GL = _gates(gcum, o_t, mask_t, t1, i_hv, HV)
    b_do = _tile(do, o_t, mask_t, HV, i_hv, V, o_v, mask_v)
    b_s = b_s * tl.trans(_causal_decay(b_G, mask_t, BT)) * scale
    tl.store(dv + (o_t[:, None] * HV + i_hv) * V + o_v[None, :], _dot(b_s.to(b_do.dtype), b_do),
             mask=mask_t[:, None] & mask_v[None, :])


@triton.jit
def chunk_delta_bwd_state_kernel(q, k, w, gcum, do, dv_local, dht, seqs, dstates, dv_new, dh0, dht_dtype,
                                 scale, H, HV, K, V, state_v_first, output_dh0,
                                 KP: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr, NARROW: tl.constexpr,
                                 NARROWEST: tl.constexpr):
    """One sequence's chunks in reverse: stores the state's gradient at each chunk's end and dv_new (the output's
    share plus the later states'), and steps dh back over the chunk."""
    i_nh = tl.program_id(0)
    i_n = i_nh // HV
    i_hv = i_nh % HV
    i_h = i_hv // (HV // H)
    bos = tl.load(seqs + i_n * 4 + 1).to(tl.int64)
    eos = tl.load(seqs + i_n * 4 + 2).to(tl.int64)
    c0 = tl.load(seqs + i_n * 4 + 3).to(tl.int64)
    o_k = tl.arange(0, KP)
    o_v = tl.program_id(1) * BV + tl.arange(0, BV)
    mask_k = o_k < K
    mask_v = o_v < V
    mask_h = mask_k[:, None] & mask_v[None, :]
    o_state = o_k[:, None] * V + o_v[None, :]
    o_user = _state_offsets(o_k, o_v, K, V, state_v_first)
    b_dh = tl.zeros([KP, BV], dtype=tl.float32)
    if dht_dtype != 0:
        b_dh += tl.load(dht + i_nh.to(tl.int64) * K * V + o_user, mask=mask_h, other=0.)
    NT = tl.cdiv((eos - bos).to(tl.int32), BT)
    for i in range(0, NT):
        i_c = NT - 1 - i
        t0 = bos + i_c * BT
        t1 = tl.minimum(t0 + BT, eos)
        o_t = t0 + tl.arange(0, BT)
        mask_t = o_t < t1
        tl.store(dstates + ((c0 + i_c) * HV + i_hv) * K * V + o_state, b_dh.to(dstates.dtype.element_ty),
                 mask=mask_h)
        b_G, b_GL = _gates(gcum, o_t, mask_t, t1, i_hv, HV)
        # the gates scale the narrow [BT, BV] operands and results, so that q, k and w go from memory straight into
        # the products (which lets them be prefetched), and the output's share, which does not need dh, goes first
        b_do = _tile(do, o_t, mask_t, HV, i_hv, V, o_v, mask_v)
        b_dod = (b_do * tl.where(mask_t, tl.exp(b_G) * scale, 0.)[:, None]).to(b_do.dtype)
        b_qdo = _dot(tl.trans(_tile(q, o_t, mask_t, H, i_h, K, o_k, mask_k)), b_dod)
        p_dv = (o_t[:, None] * HV + i_hv) * V + o_v[None, :]
        m_dv = mask_t[:, None] & mask_v[None, :]
        b_k = _tile(k, o_t, mask_t, H, i_h, K, o_k, mask_k)
        b_dvn = (tl.load(dv_local + p_dv, mask=m_dv, other=0.)
                 + _dot(b_k, b_dh.to(b_k.dtype)) * tl.where(mask_t, tl.exp(b_GL - b_G), 0.)[:, None])
        tl.store(dv_new + p_dv, b_dvn.to(dv_new.dtype.element_ty), mask=m_dv)
        b_w = _tile(w, o_t, mask_t, HV, i_hv, K, o_k, mask_k)
        b_dh = b_dh * tl.exp(b_GL) + b_qdo - _dot(tl.trans(b_w), b_dvn.to(b_w.dtype))
    if output_dh0 != 0:
        tl.store(dh0 + i_nh.to(tl.int64) * K * V + o_user, b_dh, mask=mask_h)


@triton.jit
def chunk_delta_bwd_dqkw_kernel(q, k, v_new, gcum, do, dv_new, states, dstates, chunks, dq, dk, dw, dG, scale,
                                H, HV, K, V, KP: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr):
    """For one chunk and BK-wide slice of K: dq and dk through the output and the state, dw = -dv_new h^T, and
    this slice's share of the gate's per-token terms (added into dG)."""
    i_ch = tl.program_id(0)
    i_hv, t0, t1 = _chunk_bounds(chunks, i_ch, HV)
    i_h = i_hv // (HV // H)
    o = tl.arange(0, BT)
    o_t = t0 + o
    mask_t = o_t < t1
    o_k = tl.program_id(1) * BK + tl.arange(0, BK)
    mask_k = o_k < K
    state_base = i_ch.to(tl.int64) * K * V
    b_dP = tl.zeros([BT, BT], dtype=tl.float32)
    b_dq = tl.zeros([BT, BK], dtype=tl.float32)
    b_dk = tl.zeros([BT, BK], dtype=tl.float32)
    b_dw = tl.zeros([BT, BK], dtype=tl.float32)
    b_hh = tl.zeros([BK, BK], dtype=tl.float32)
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        mask_v = o_v < V
        p_h = state_base + o_k[:, None] * V + o_v[None, :]
        m_h = mask_k[:, None] & mask_v[None, :]
        b_h = tl.load(states + p_h, mask=m_h, other=0.)
        b_dh = tl.load(dstates + p_h, mask=m_h, other=0.)
        b_do = _tile(do, o_t, mask_t, HV, i_hv, V, o_v, mask_v)
        b_vn = _tile(v_new, o_t, mask_t, HV, i_hv, V, o_v, mask_v)
        b_dvn = _tile(dv_new, o_t, mask_t, HV, i_hv, V, o_v, mask_v)
        b_dP += _dot(b_do, tl.trans(b_vn))
        b_dq += _dot(b_do, tl.trans(b_h))
        b_dk += _dot(b_vn, tl.trans(b_dh))
        b_dw += _dot(b_dvn.to(b_h.dtype), tl.trans(b_h))
        # sum_v h dh as the diagonal of h dh^T: h and dh then feed products only, and on sm_90 a pipelined loop
        # gives each two buffer slots (a register use leaves them one, refilled while async products read it)
        b_hh += _dot(b_h, tl.trans(b_dh))
    b_hdh = tl.sum(tl.where(o_k[:, None] == o_k[None, :], b_hh, 0.), 1)
    b_G, b_GL = _gates(gcum, o_t, mask_t, t1, i_hv, HV)
    b_q = _tile(q, o_t, mask_t, H, i_h, K, o_k, mask_k)
    b_k = _tile(k, o_t, mask_t, H, i_h, K, o_k, mask_k)
    b_dq = b_dq * (tl.exp(b_G) * scale)[:, None]
    b_dk = tl.where(mask_t[:, None], b_dk * tl.exp(b_GL - b_G)[:, None], 0.)
    # the gate's terms: q . dq and -k . dk through the states, the chunk's total gate through h
    b_dG = tl.sum(b_q.to(tl.float32) * b_dq - b_k.to(tl.float32) * b_dk, 1)
    b_dGL = tl.sum(b_k.to(tl.float32) * b_dk) + tl.exp(b_GL) * tl.sum(b_hdh)
    b_ds = b_dP * _causal_decay(b_G, mask_t, BT) * scale
    b_dq += _dot(b_ds.to(b_k.dtype), b_k)
    b_dk += _dot(tl.trans(b_ds).to(b_q.dtype), b_q)
    b_m = b_ds * _dot(b_q, tl.trans(b_k))
    b_dG += tl.sum(b_m, 1) - tl.sum(b_m, 0) + tl.where(o_t == t1 - 1, b_dGL, 0.)
    p = (o_t[:, None] * HV + i_hv) * K + o_k[None, :]
    m = mask_t[:, None] & mask_k[None, :]
    tl.store(dq + p, b_dq.to(dq.dtype.element_ty), mask=m)
    tl.store(dk + p, b_dk.to(dk.dtype.element_ty), mask=m)
    tl.store(dw + p, (-b_dw).to(dw.dtype.element_ty), mask=m)
    tl.atomic_add(dG + o_t * HV + i_hv, b_dG, mask=mask_t)


@triton.jit
def chunk_delta_bwd_wy_kernel(k, v, beta, gcum, Ai, dw, dv_new, dk_state, dG, chunks, dk, dv, dbeta, dg,
                              beta_dtype, H, HV, K, V, KP: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr):
    """Through w = T (beta exp(G) k), u = T (beta v) and T = (I + A)^-1 for one chunk: dk (plus dk_state), dv,
    dbeta, and the gate's gradient (the in-chunk suffix sum of its per-token terms, dG plus this kernel's)."""
    i_hv, t0, t1 = _chunk_bounds(chunks, tl.program_id(0), HV)
    i_h = i_hv // (HV // H)
    o = tl.arange(0, BT)
    o_t = t0 + o
    mask_t = o_t < t1
    b_beta = _load_f32(beta, o_t * HV + i_hv, mask_t, beta_dtype, 0.)
    b_G, b_GL = _gates(gcum, o_t, mask_t, t1, i_hv, HV)
    b_eG = tl.exp(b_G)
    b_T = tl.load(Ai + (o_t[:, None] * HV + i_hv) * BT + o[None, :], mask=mask_t[:, None], other=0.)
    b_Tt = tl.trans(b_T).to(k.dtype.element_ty)

    # dT = dw (beta exp(G) k)^T + du (beta v)^T, and k k^T
    b_dT = tl.zeros([BT, BT], dtype=tl.float32)
    b_kk = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        mask_k = o_k < K
        b_k = _tile(k, o_t, mask_t, H, i_h, K, o_k, mask_k)
        b_dw = _tile(dw, o_t, mask_t, HV, i_hv, K, o_k, mask_k)
        b_kb = (b_k * (b_beta * b_eG)[:, None]).to(b_k.dtype)
        b_dT += _dot(b_dw.to(b_k.dtype), tl.trans(b_kb))
        b_kk += _dot(b_k, tl.trans(b_k))
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        mask_v = o_v < V
        b_v = _tile(v, o_t, mask_t, HV, i_hv, V, o_v, mask_v)
        b_du = _tile(dv_new, o_t, mask_t, HV, i_hv, V, o_v, mask_v)
        b_dT += _dot(b_du.to(b_v.dtype), tl.trans((b_v * b_beta[:, None]).to(b_v.dtype)))
    # dA = -T^T dT T^T below the diagonal; A = beta_i (k_i . k_j) exp(G_i - G_j)
    strict = (o[:, None] > o[None, :]) & mask_t[:, None]
    b_dA = -_dot(_dot(b_Tt, b_dT.to(b_Tt.dtype)).to(b_Tt.dtype), b_Tt)
    b_decay = tl.exp(tl.where(strict, b_G[:, None] - b_G[None, :], 0.))
    b_dA = tl.where(strict, b_dA, 0.) * b_decay
    b_dbeta = tl.sum(b_dA * b_kk, 1)
    b_dkk = b_dA * b_beta[:, None]  # the gradient of k_i . k_j
    b_z = b_dkk * b_kk
    b_dG = tl.sum(b_z, 1) - tl.sum(b_z, 0)

    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        mask_k = o_k < K
        b_k = _tile(k, o_t, mask_t, H, i_h, K, o_k, mask_k)
        b_dw = _tile(dw, o_t, mask_t, HV, i_hv, K, o_k, mask_k)
        b_dkb = _dot(b_Tt, b_dw.to(b_k.dtype))  # the gradient of beta exp(G) k
        b_kf = b_k.to(tl.float32)
        b_dk = b_dkb * (b_beta * b_eG)[:, None] + _dot(b_dkk.to(b_k.dtype), b_k) \
            + _dot(tl.trans(b_dkk).to(b_k.dtype), b_k)
        b_t = tl.sum(b_dkb * b_kf, 1) * b_eG
        b_dbeta += b_t
        b_dG += b_t * b_beta
        p = (o_t[:, None] * HV + i_hv) * K + o_k[None, :]
        m = mask_t[:, None] & mask_k[None, :]
        b_dk += tl.load(dk_state + p, mask=m, other=0.).to(tl.float32)
        tl.store(dk + p, b_dk.to(dk.dtype.element_ty), mask=m)
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        mask_v = o_v < V
        b_v = _tile(v, o_t, mask_t, HV, i_hv, V, o_v, mask_v)
        b_du = _tile(dv_new, o_t, mask_t, HV, i_hv, V, o_v, mask_v)
        b_dvb = _dot(b_Tt, b_du.to(b_v.dtype))  # the gradient of beta v
        b_dbeta += tl.sum(b_dvb * b_v.to(tl.float32), 1)
        tl.store(dv + (o_t[:, None] * HV + i_hv) * V + o_v[None, :],
                 (b_dvb * b_beta[:, None]).to(dv.dtype.element_ty), mask=mask_t[:, None] & mask_v[None, :])
    tl.store(dbeta + o_t * HV + i_hv, b_dbeta, mask=mask_t)
    b_dG += tl.load(dG + o_t * HV + i_hv, mask=mask_t, other=0.)
    tl.store(dg + o_t * HV + i_hv, tl.cumsum(tl.where(mask_t, b_dG, 0.), 0, reverse=True), mask=mask_t)


# ---- launch configs: tools/tune_chunk.py, output in docs/tuning/chunk_delta.md (H100, bf16, K=V=128) ----------

def _solve_config(KP, **_):
    # H200, ms per step at B8 T2048 / B2 T8192 / B1 T32768 (through the JIT, docs/tuning/chunk_delta.md): 1 warp
    # 0.121 / 0.120 / 0.233, 2 warps 0.132 / 0.131 / 0.261, 4 warps 0.215 / 0.216 / 0.431 (the substitution's
    # reductions); 1 warp spills 504 bytes a thread at K=128 (sm_90) and is still the fastest
    return dict(BK=min(KP, 64), BT=CHUNK, BC=SUB_CHUNK, num_warps=1, num_stages=1)


def _wu_config(KP, **_):
    return dict(BK=min(KP, 64), BV=64, BT=CHUNK, num_warps=4, num_stages=2)


# dv_new and dw are stored in the 16-bit dtype (every consumer rounds them to it before its product: the same
# gradients as from float32, with less traffic). Read that way, chunk_delta_bwd_wy's dk and chunk_delta_bwd_dqkw's dw
# came out wrong on the H200 with K slices of 32 or less, so the slices are 64 wide at every head dim. H200 through
# the JIT, per forward + backward step at B8 T2048 / B2 T8192 / B1 T32768 (docs/tuning/chunk_delta.md): wy 0.273 /
# 0.273 / 0.529 ms against 0.312 / 0.311 / 0.607 with float32 dw and dv_new, the reversed state pass 0.212 / 0.309 /
# 0.989 against 0.233 / 0.326 / 1.018
def _wy_bwd_config(KP, **_):
    return dict(BK=64, BV=64, BT=CHUNK, num_warps=4, num_stages=1)


def _state_config(KP, NARROW, NARROWEST, **_):
    # the state slice [KP, BV] in float32 stays in registers across the sequence. When the sequences x heads in
    # slices of 64 leave SMs idle, narrower slices spread the pass: BV=32 where that gives at least half as many
    # programs as SMs (NARROW: e.g. B=2 H=16), else BV=16 (NARROWEST: e.g. B=1 H=16). H100, per step (two calls):
    # BV=16 1.28 ms at B=1 T=32768 against 2.11 for BV=64; BV=32 0.40 ms at B=2 T=8192 against 0.46 for BV=16
    # (docs/tuning/chunk_delta.md)
    if NARROWEST:
        return dict(BV=16, BT=CHUNK, num_warps=4, num_stages=3)
    if NARROW:
        return dict(BV=32, BT=CHUNK, num_warps=4, num_stages=3)
    return dict(BV={16: 64, 32: 64, 64: 64, 128: 64, 256: 32}[KP], BT=CHUNK, num_warps=4, num_stages=2)


def _bwd_state_config(KP, NARROW, NARROWEST, **_):
    # H200, the pass alone through the JIT (docs/tuning/chunk_delta.md, December 2026): BV=64 0.291 ms at B=8
    # T=2048, BV=32 0.384 at B=2 T=8192, BV=16 1.073 at B=1 T=32768, all on 8 warps. 4 warps were faster at B=1
    # (0.881) but their narrow slicings gave wrong gradients for K not a multiple of 16 on the H200 (test_head_dims)
    if NARROWEST:
        return dict(BV=16, BT=CHUNK, num_warps=8, num_stages=3)
    if NARROW:
        return dict(BV=32, BT=CHUNK, num_warps=8, num_stages=3)
    return dict(BV={16: 64, 32: 64, 64: 64, 128: 64, 256: 32}[KP], BT=CHUNK, num_warps=8, num_stages=3)


def _dqkw_config(KP, **_):
    # pipelined (num_stages=2) now that h and dh feed products only (sum_v h dh is the diagonal of h dh^T): while it
    # was a register sum, their loads got one buffer slot each and dw was wrong at T=2048 H=16 (tools/pipeline_races.py
    # refuses that). H200 through the JIT, per step at B8 / B2 / B1: 0.375 / 0.370 / 0.724 ms against 0.480 / 0.471 /
    # 0.925 for the register sum unpipelined (docs/tuning/chunk_delta.md)
    return dict(BK=64, BV=64, BT=CHUNK, num_warps=4, num_stages=2)


def _output_config(KP, **_):
    # the output and dv's intra-chunk share take a chunk's q k^T once for all of V up to 128 (BV=128) instead of
    # once per slice of 64: H200, per forward + backward step at B8 T2048 / B2 T8192 / B1 T32768, chunk_delta_fwd_o
    # 0.119 / 0.116 / 0.222 ms against 0.162 / 0.159 / 0.305 for BV=64 on 4 warps, chunk_delta_bwd_dv_local 0.115 /
    # 0.115 / 0.316 against 0.160 / 0.160 / 0.459 (docs/tuning/chunk_delta.md)
    return dict(BK=min(KP, 64), BV=128, BT=CHUNK, num_warps=8, num_stages=3)


_QK = [Tensor("q", "B T H K", dtypes=DELTA_DTYPES), Tensor("k", "B T H K", same_dtype_as="q")]
_GCUM = Tensor("gcum", "B T HV", dtypes=["float32"])  # the gate's running sum per chunk, from chunk_delta_solve
_CHUNKS = Tensor("chunks", "C CF", dtypes=["int32"])
_GATE_DTYPES = ["float16", "bfloat16", "float32"]  # beta and g: a run-time dtype code
_SEQS = Tensor("seqs", "N SF", dtypes=["int32"])  # per sequence: (sequence, first token, end token, first chunk)
_AXES = [DtypeAxis("k"), BucketAxis("KP", "K", K_BUCKETS), AlignedAxis(["K", "V"])]
_GROUPED = [("HV", "H")]
# the state passes: narrower V slices when the batch leaves SMs idle (fla_aot.ops.chunk_delta._slicing)
_NARROW = [BoolAxis("NARROW", "narrow"), BoolAxis("NARROWEST", "narrowest", only_with="NARROW")]

SPECS = [
    OpSpec(
        name="chunk_delta_solve",
        kernel=chunk_delta_solve_kernel,
        doc="Delta rule, per chunk: the gate's running sum and T = (I + A)^-1 (float32).",
        args=[Tensor("k", "B T H K", dtypes=DELTA_DTYPES), Tensor("beta", "B T HV", dtypes=_GATE_DTYPES),
              Tensor("g", "B T HV", optional=True, dtypes=_GATE_DTYPES), _CHUNKS],
        outputs=[Output("Ai", f"B T HV {CHUNK}", dtype="float32"), Output("gcum", "B T HV", dtype="float32")],
        axes=[DtypeAxis("k"), BucketAxis("KP", "K", K_BUCKETS), AlignedAxis(["K"])],
        launch_config=_solve_config,
        grid=["C * HV"],
        divisible=_GROUPED,
    ),
    OpSpec(
        name="chunk_delta_wu",
        kernel=chunk_delta_wu_kernel,
        doc="Delta rule, per chunk: w = T (beta exp(G) k) and u = T (beta v).",
        args=[Tensor("k", "B T H K", dtypes=DELTA_DTYPES), Tensor("v", "B T HV V", same_dtype_as="k"),
              Tensor("beta", "B T HV", dtypes=_GATE_DTYPES), _GCUM, Tensor("Ai", f"B T HV {CHUNK}", dtypes=["float32"]),
              _CHUNKS],
        outputs=[Output("w", "B T HV K", dtype_of="k"), Output("u", "B T HV V", dtype_of="k")],
        axes=_AXES,
        launch_config=_wu_config,
        grid=["C * HV"],
        divisible=_GROUPED,
    ),
    OpSpec(
        name="chunk_delta_state",
        kernel=chunk_delta_state_kernel,
        doc="Delta rule: each sequence's chunk-to-chunk state pass (states at chunk starts, v_new, final state).",
        args=[Tensor("k", "B T H K", dtypes=DELTA_DTYPES), Tensor("w", "B T HV K", same_dtype_as="k"),
              Tensor("u", "B T HV V", same_dtype_as="k"), _GCUM,
              Tensor("h0", "N HV K V", optional=True, dtypes=["float32"], transposed_if="state_v_first"),
              _SEQS, _CHUNKS, Bool("state_v_first"), Bool("output_ht"), Bool("narrow"), Bool("narrowest")],
        outputs=[Output("states", "C HV K V", dtype_of="k"), Output("v_new", "B T HV V", dtype_of="k"),
                 Output("ht", "N HV K V", dtype="float32", when="output_ht", transposed_if="state_v_first")],
        axes=[*_AXES, *_NARROW],
        launch_config=_state_config,
        grid=["N * HV", "cdiv(V, BV)"],
        divisible=_GROUPED,
        symbol_defaults={},  # N: the rows of seqs
    ),
    OpSpec(
        name="chunk_delta_fwd_o",
        kernel=chunk_delta_fwd_o_kernel,
        doc="Delta rule: the output of each chunk from its starting state and v_new.",
        args=[*_QK, Tensor("v_new", "B T HV V", same_dtype_as="q"), _GCUM,
              Tensor("states", "C HV K V", same_dtype_as="q"), _CHUNKS, Float("scale")],
        outputs=[Output("o", "B T HV V", dtype_of="q")],
        axes=[DtypeAxis("q"), BucketAxis("KP", "K", K_BUCKETS), AlignedAxis(["K", "V"])],
        launch_config=_output_config,
        grid=["C * HV", "cdiv(V, BV)"],
        divisible=_GROUPED,
    ),
    OpSpec(
        name="chunk_delta_bwd_dv_local",
        kernel=chunk_delta_bwd_dv_local_kernel,
        doc="Delta rule backward: the output's intra-chunk share of dv_new (float32).",
        args=[*_QK, _GCUM, Tensor("do", "B T HV V", same_dtype_as="q"), _CHUNKS, Float("scale")],
        outputs=[Output("dv", "B T HV V", dtype="float32")],
        axes=[DtypeAxis("q"), BucketAxis("KP", "K", K_BUCKETS), AlignedAxis(["K", "V"])],
        launch_config=_output_config,
        grid=["C * HV", "cdiv(V, BV)"],
        divisible=_GROUPED,
    ),
    OpSpec(
        name="chunk_delta_bwd_state",
        kernel=chunk_delta_bwd_state_kernel,
        doc="Delta rule backward: each sequence's state gradients in reverse (at chunk ends), dv_new, dh0.",
        args=[*_QK, Tensor("w", "B T HV K", same_dtype_as="q"), _GCUM, Tensor("do", "B T HV V", same_dtype_as="q"),
              Tensor("dv_local", "B T HV V", dtypes=["float32"]),
              Tensor("dht", "N HV K V", optional=True, dtypes=["float32"], transposed_if="state_v_first"),
              _SEQS, _CHUNKS, Float("scale"), Bool("state_v_first"), Bool("output_dh0"), Bool("narrow"),
              Bool("narrowest")],
        outputs=[Output("dstates", "C HV K V", dtype_of="q"), Output("dv_new", "B T HV V", dtype_of="q"),
                 Output("dh0", "N HV K V", dtype="float32", when="output_dh0", transposed_if="state_v_first")],
        axes=[DtypeAxis("q"), BucketAxis("KP", "K", K_BUCKETS), AlignedAxis(["K", "V"]), *_NARROW],
        launch_config=_bwd_state_config,
        grid=["N * HV", "cdiv(V, BV)"],
        divisible=_GROUPED,
        symbol_defaults={},  # N: the rows of seqs
    ),
    OpSpec(
        name="chunk_delta_bwd_dqkw",
        kernel=chunk_delta_bwd_dqkw_kernel,
        doc="Delta rule backward: dq, dk through the output and states, dw, and the gate's per-token terms.",
        args=[*_QK, Tensor("v_new", "B T HV V", same_dtype_as="q"), _GCUM, Tensor("do", "B T HV V", same_dtype_as="q"),
              Tensor("dv_new", "B T HV V", same_dtype_as="q"), Tensor("states", "C HV K V", same_dtype_as="q"),
              Tensor("dstates", "C HV K V", same_dtype_as="q"), _CHUNKS, Float("scale")],
        outputs=[Output("dq", "B T HV K", dtype_of="q"), Output("dk", "B T HV K", dtype_of="q"),
                 Output("dw", "B T HV K", dtype_of="q"), Output("dG", "B T HV", dtype="float32", zeros=True)],
        axes=[DtypeAxis("q"), BucketAxis("KP", "K", K_BUCKETS), AlignedAxis(["K", "V"])],
        launch_config=_dqkw_config,
        grid=["C * HV", "cdiv(K, BK)"],
        divisible=_GROUPED,
    ),
    OpSpec(
        name="chunk_delta_bwd_wy",
        kernel=chunk_delta_bwd_wy_kernel,
        doc="Delta rule backward through the WY representation: dk, dv, dbeta and the gate's gradient.",
        args=[Tensor("k", "B T H K", dtypes=DELTA_DTYPES), Tensor("v", "B T HV V", same_dtype_as="k"),
              Tensor("beta", "B T HV", dtypes=_GATE_DTYPES), _GCUM,
              Tensor("Ai", f"B T HV {CHUNK}", dtypes=["float32"]), Tensor("dw", "B T HV K", same_dtype_as="k"),
              Tensor("dv_new", "B T HV V", same_dtype_as="k"), Tensor("dk_state", "B T HV K", same_dtype_as="k"),
              Tensor("dG", "B T HV", dtypes=["float32"]), _CHUNKS],
        outputs=[Output("dk", "B T HV K", dtype_of="k"), Output("dv", "B T HV V", dtype_of="v"),
                 Output("dbeta", "B T HV", dtype="float32"), Output("dg", "B T HV", dtype="float32")],
        axes=_AXES,
        launch_config=_wy_bwd_config,
        grid=["C * HV"],
        divisible=_GROUPED,
    ),
]
