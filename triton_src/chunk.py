"""Chunked parallel form of the scalar-gated linear-attention family (simple GLA, retention, linear attention).

Per head, with chunks of BT = 64 tokens, G_i the running sum of the log gate inside the chunk (G_L at its
last token) and h the state [K, V] at the chunk's start:

    o_i     = scale * (exp(G_i) q_i h + sum_{j<=i} exp(G_i - G_j) (q_i . k_j) v_j)
    h_next  = exp(G_L) h + sum_j exp(G_L - G_j) k_j^T v_j
    dh_prev = exp(G_L) dh + scale * sum_i exp(G_i) q_i^T do_i                  (backward, chunks in reverse)

The chunk-to-chunk state pass is a linear recurrence, so long sequences are split into segments scanned in
parallel: `chunk_scan` run over each segment from a zero state gives the segment's own final state and total
decay, `chunk_combine` walks the segments of a sequence to get each segment's starting state, and a second
`chunk_scan` from those states writes the outputs (or the per-chunk states the backward needs); or, with no
outputs to write, `chunk_fixup` adds each segment's starting state, decayed, to the states of the first scan
(fla_aot/ops/chunk.py, SPLIT_FIXUP). A sequence that is one segment takes the second scan only. Segment and
chunk tables (int32, built by fla_aot/ops/chunk.py) carry the sequence boundaries, so varlen batches and
fixed-length ones run the same code.
"""
import triton
import triton.language as tl

from tools.kernel_spec import AlignedAxis, Bool, BoolAxis, BucketAxis, DtypeAxis, Float, OpSpec, Output, Tensor
from triton_src.fused_recurrent import _load_f32

CHUNK = 64


@triton.jit
def _dot(a, b):
    # float32 inputs get exact float32 products; 16-bit inputs run on the tensor cores with float32 sums
    if a.dtype == tl.float32:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _chunk_log_gates(g, g_gamma, i_h, H, K, t0, t1, o_k, mask_k, g_dtype, g_gamma_dtype,
                     BT: tl.constexpr, GATE_K: tl.constexpr):
    """Running sum G of the log gate over the chunk's tokens [t0, t1), and G at the chunk's last token:
    [BT] and a scalar, or with GATE_K (GLA: g is then that running sum, from chunk_gk_cumsum) [BT, BK] and [BK]."""
    o_t = t0 + tl.arange(0, BT)
    mask_t = o_t < t1
    if GATE_K:
        b_G = tl.load(g + (o_t[:, None] * H + i_h) * K + o_k[None, :], mask=mask_t[:, None] & mask_k[None, :], other=0.)
        b_GL = tl.load(g + ((t1 - 1) * H + i_h) * K + o_k, mask=mask_k & (t1 > t0), other=0.)
    else:
        b_g = _load_f32(g, o_t * H + i_h, mask_t & (g_dtype != 0), g_dtype, 0.)
        if g_gamma_dtype != 0:
            b_g += tl.where(mask_t, tl.load(g_gamma + i_h), 0.)
        b_G = tl.cumsum(b_g, 0)
        b_GL = tl.sum(tl.where(tl.arange(0, BT) == BT - 1, b_G, 0.))  # padding rows keep the last value
    return b_G, b_GL


@triton.jit
def _row_decay(b_G, GATE_K: tl.constexpr):
    # exp of a per-row ([BT]) or per-row-and-key ([BT, BK]) log decay, shaped to scale [BT, BK] tiles
    if GATE_K:
        return tl.exp(b_G)
    else:
        return tl.exp(b_G)[:, None]


@triton.jit
def _key_decay(b_GL, GATE_K: tl.constexpr):
    # exp of a chunk's total log decay, shaped to scale the [BK, BV] state
    if GATE_K:
        return tl.exp(b_GL)[:, None]
    else:
        return tl.exp(b_GL)


@triton.jit
def _causal_decay(b_G, mask_t, BT: tl.constexpr):
    # exp(G_i - G_j) on i >= j, zero above the diagonal
    o = tl.arange(0, BT)
    causal = (o[:, None] >= o[None, :]) & mask_t[:, None]
    return tl.exp(tl.where(causal, b_G[:, None] - b_G[None, :], float("-inf")))


@triton.jit
def _state_offsets(o_k, o_v, K, V, v_first):
    # [K, V] row-major, or [V, K] for fla's state_v_first layout
    if v_first != 0:
        off = o_v[None, :] * K + o_k[:, None]
    else:
        off = o_k[:, None] * V + o_v[None, :]
    return off


@triton.jit
def chunk_scan_kernel(
    x, y, q, g, g_gamma, h0, segments,
    o, states, ht, seg_decay, chunk_decay,
    g_dtype, g_gamma_dtype, h0_dtype,
    scale, H, K, V, state_v_first, store_states, output_ht, reverse, store_decay,
    BK: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr, WRITE_O: tl.constexpr, GATE_K: tl.constexpr,
):
    """One segment's chunks in order. Forward (x = k, y = v): h is the state; with WRITE_O, o from q.
    reverse (x = q, y = do): h is the state's gradient, chunks walked backwards. store_states keeps h as
    each chunk sees it (forward: at its start; reverse: at its end) in `states`, for the backward kernels;
    store_decay also keeps the segment's log decay up to there (chunk_decay: what chunk_fixup scales a segment's
    starting state by, to add it to states taken from a zero start).
    GATE_K: GLA's per-key gate (g = its running sum per chunk; its outputs come from triton_src/chunk_gla.py, so
    never with WRITE_O)."""
    i_sh = tl.program_id(0)
    i_v = tl.program_id(1)
    i_s = i_sh // H
    i_h = i_sh % H
    bos = tl.load(segments + i_s * 4 + 1).to(tl.int64)
    eos = tl.load(segments + i_s * 4 + 2).to(tl.int64)
    c0 = tl.load(segments + i_s * 4 + 3).to(tl.int64)
    NT = tl.cdiv((eos - bos).to(tl.int32), BT)

    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    mask_k = o_k < K
    mask_v = o_v < V
    mask_h = mask_k[:, None] & mask_v[None, :]
    o_state = o_k[:, None] * V + o_v[None, :]
    o_user = _state_offsets(o_k, o_v, K, V, state_v_first)

    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if h0_dtype != 0:
        b_h += tl.load(h0 + (i_s * H + i_h).to(tl.int64) * K * V + o_user, mask=mask_h, other=0.)
    b_decay = tl.zeros([BK], dtype=tl.float32)  # the segment's total log decay (per key for GLA)

    for i in range(0, NT):
        i_c = i
        if reverse != 0:
            i_c = NT - 1 - i
        t0 = bos + i_c * BT
        t1 = tl.minimum(t0 + BT, eos)
        o_t = t0 + tl.arange(0, BT)
        mask_t = o_t < eos
        b_G, b_GL = _chunk_log_gates(g, g_gamma, i_h, H, K, t0, t1, o_k, mask_k, g_dtype, g_gamma_dtype, BT, GATE_K)
        p_x = x + (o_t[:, None] * H + i_h) * K + o_k[None, :]
        b_x = tl.load(p_x, mask=mask_t[:, None] & mask_k[None, :], other=0.)
        p_y = y + (o_t[:, None] * H + i_h) * V + o_v[None, :]
        b_y = tl.load(p_y, mask=mask_t[:, None] & mask_v[None, :], other=0.)
        if store_states != 0:
            p_s = states + ((c0 + i_c) * H + i_h) * K * V + o_state
            tl.store(p_s, b_h.to(states.dtype.element_ty), mask=mask_h)
            if store_decay != 0 and i_v == 0:
                tl.store(chunk_decay + ((c0 + i_c) * H + i_h) * K + o_k, b_decay, mask=mask_k)
        if WRITE_O:
            # a compile-time branch: on sm_90 Triton 3.6 computed wrong outputs with these dots under a run-time if
            b_q = tl.load(q + (o_t[:, None] * H + i_h) * K + o_k[None, :],
                          mask=mask_t[:, None] & mask_k[None, :], other=0.)
            b_A = _dot(b_q, tl.trans(b_x)) * _causal_decay(b_G, mask_t, BT)
            b_o = _dot(b_A.to(b_y.dtype), b_y)
            b_o += _dot((b_q * _row_decay(b_G, GATE_K)).to(b_q.dtype), b_h.to(b_q.dtype))
            p_o = o + (o_t[:, None] * H + i_h) * V + o_v[None, :]
            tl.store(p_o, (b_o * scale).to(o.dtype.element_ty), mask=mask_t[:, None] & mask_v[None, :])
        if reverse != 0:
            b_w = _row_decay(b_G, GATE_K) * scale
        else:
            b_w = _row_decay(b_GL - b_G, GATE_K)
        b_xw = tl.where(mask_t[:, None], b_x * b_w, 0.).to(b_x.dtype)
        b_h = b_h * _key_decay(b_GL, GATE_K) + _dot(tl.trans(b_xw), b_y)
        b_decay += b_GL

    if output_ht != 0:
        tl.store(ht + (i_s * H + i_h).to(tl.int64) * K * V + o_user, b_h, mask=mask_h)
        if i_v == 0:
            tl.store(seg_decay + (i_s * H + i_h) * K + o_k, b_decay, mask=mask_k)


@triton.jit
def chunk_combine_kernel(
    local, seg_decay, h0, seg_offsets,
    seg_init, ht,
    h0_dtype,
    H, K, V, state_v_first, output_ht,
    BK: tl.constexpr, BV: tl.constexpr, REVERSE: tl.constexpr,
):
    """Walks the segments of one sequence (backwards with REVERSE): each segment's starting state is the
    previous one's, decayed by that segment's total gate (per key), plus that segment's own (zero-start) final state."""
    i_nh = tl.program_id(0)
    i_v = tl.program_id(1)
    i_n = i_nh // H
    i_h = i_nh % H
    s0 = tl.load(seg_offsets + i_n)
    s1 = tl.load(seg_offsets + i_n + 1)

    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    mask_h = (o_k < K)[:, None] & (o_v < V)[None, :]
    o_state = o_k[:, None] * V + o_v[None, :]
    o_user = _state_offsets(o_k, o_v, K, V, state_v_first)

    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if h0_dtype != 0:
        b_h += tl.load(h0 + i_nh.to(tl.int64) * K * V + o_user, mask=mask_h, other=0.)
    for i in range(0, s1 - s0):
        i_s = s0 + i
        if REVERSE:
            i_s = s1 - 1 - i
        base = (i_s * H + i_h).to(tl.int64) * K * V
        tl.store(seg_init + base + o_state, b_h, mask=mask_h)
        b_d = tl.load(seg_decay + (i_s * H + i_h) * K + o_k, mask=o_k < K, other=0.)
        b_h = b_h * tl.exp(b_d)[:, None] + tl.load(local + base + o_state, mask=mask_h, other=0.)
    if output_ht != 0:
        tl.store(ht + i_nh.to(tl.int64) * K * V + o_user, b_h, mask=mask_h)


@triton.jit
def chunk_fixup_kernel(local, chunk_decay, seg_init, chunks, states, H, K, V, BK: tl.constexpr, BV: tl.constexpr):
    """A split pass's states from the states each segment saw from a zero start: plus the segment's starting
    state decayed up to the chunk (the state's recurrence is linear, and without outputs nothing else changes)."""
    i_ch = tl.program_id(0)
    i_v = tl.program_id(1)
    i_s = tl.load(chunks + (i_ch // H) * 4 + 3)  # the chunk's segment
    i_h = i_ch % H
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    mask_k = o_k < K
    mask_h = mask_k[:, None] & (o_v < V)[None, :]
    o_state = o_k[:, None] * V + o_v[None, :]
    b_d = tl.exp(tl.load(chunk_decay + i_ch.to(tl.int64) * K + o_k, mask=mask_k, other=0.))
    b_h0 = tl.load(seg_init + (i_s * H + i_h).to(tl.int64) * K * V + o_state, mask=mask_h, other=0.)
    p = i_ch.to(tl.int64) * K * V + o_state
    b_h = tl.load(local + p, mask=mask_h, other=0.).to(tl.float32) + b_d[:, None] * b_h0
    tl.store(states + p, b_h.to(states.dtype.element_ty), mask=mask_h)


@triton.jit
def chunk_bwd_dqk_kernel(
    q, k, v, g, g_gamma, do, states, dstates, chunks,
    dq, dk, dg,
    g_dtype, g_gamma_dtype,
    scale, H, K, V,
    KP: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr,
):
    """dq, dk of one chunk and BK-wide slice of K from the chunk's state h (at its start) and state gradient dh
    (at its end), and this slice's share of the gate's gradient: at token t the sum of q.dq - k.dk over the rest
    of its sequence (plus the final state's share), taken as the sum inside the chunk plus sum h_L dh_L for the
    state h_L at the chunk's end, exp(G_L) sum h dh + sum_j k_j dk_j over the state's share of dk (a suffix sum
    over the whole sequence cancels: two digits lost by T = 8192)."""
    i_ch = tl.program_id(0)
    i_k = tl.program_id(1)
    i_c = i_ch // H
    i_h = i_ch % H
    t0 = tl.load(chunks + i_c * 4 + 1).to(tl.int64)
    t1 = tl.load(chunks + i_c * 4 + 2).to(tl.int64)
    o_t = t0 + tl.arange(0, BT)
    mask_t = o_t < t1
    o_k = i_k * BK + tl.arange(0, BK)
    mask_k = o_k < K
    mask_tk = mask_t[:, None] & mask_k[None, :]
    b_G, b_GL = _chunk_log_gates(g, g_gamma, i_h, H, K, t0, t1, o_k, mask_k, g_dtype, g_gamma_dtype, BT, False)

    p_qk = (o_t[:, None] * H + i_h) * K + o_k[None, :]
    b_q = tl.load(q + p_qk, mask=mask_tk, other=0.)
    b_k = tl.load(k + p_qk, mask=mask_tk, other=0.)
    b_dA = tl.zeros([BT, BT], dtype=tl.float32)
    b_dq = tl.zeros([BT, BK], dtype=tl.float32)
    b_dk = tl.zeros([BT, BK], dtype=tl.float32)
    b_hdh = tl.zeros([BK], dtype=tl.float32)
    state_base = (i_c * H + i_h).to(tl.int64) * K * V
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
        if g_dtype != 0:
            b_hdh += tl.sum(b_h.to(tl.float32) * b_dh.to(tl.float32), 1)

    b_dA = (b_dA * _causal_decay(b_G, mask_t, BT) * scale).to(b_q.dtype)
    b_dq = b_dq * tl.exp(b_G)[:, None] * scale + _dot(b_dA, b_k)
    b_dk_state = tl.where(mask_tk, b_dk * tl.exp(b_GL - b_G)[:, None], 0.)
    b_dk = b_dk_state + _dot(tl.trans(b_dA), b_q)
    tl.store(dq + p_qk, b_dq.to(dq.dtype.element_ty), mask=mask_tk)
    tl.store(dk + p_qk, b_dk.to(dk.dtype.element_ty), mask=mask_tk)
    if g_dtype != 0:
        b_later = tl.exp(b_GL) * tl.sum(b_hdh) + tl.sum(b_k.to(tl.float32) * b_dk_state)
        b_dg = tl.sum(b_q.to(tl.float32) * b_dq - b_k.to(tl.float32) * b_dk, 1)
        tl.atomic_add(dg + o_t * H + i_h, tl.cumsum(b_dg, 0, reverse=True) + b_later, mask=mask_t)


@triton.jit
def chunk_bwd_dv_kernel(
    q, k, g, g_gamma, do, dstates, chunks,
    dv,
    g_dtype, g_gamma_dtype,
    scale, H, K, V,
    KP: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr,
):
    """dv of one chunk and BV-wide slice of V: the intra-chunk attention's transpose applied to do, plus
    the (decayed) keys applied to the state gradient at the chunk's end."""
    i_ch = tl.program_id(0)
    i_v = tl.program_id(1)
    i_c = i_ch // H
    i_h = i_ch % H
    t0 = tl.load(chunks + i_c * 4 + 1).to(tl.int64)
    t1 = tl.load(chunks + i_c * 4 + 2).to(tl.int64)
    o_t = t0 + tl.arange(0, BT)
    mask_t = o_t < t1
    o_v = i_v * BV + tl.arange(0, BV)
    mask_v = o_v < V

    b_At = tl.zeros([BT, BT], dtype=tl.float32)  # [j, i]: the intra-chunk score of key j for query i
    b_dv = tl.zeros([BT, BV], dtype=tl.float32)
    state_base = (i_c * H + i_h).to(tl.int64) * K * V
    o_k = tl.arange(0, BK)
    b_G, b_GL = _chunk_log_gates(g, g_gamma, i_h, H, K, t0, t1, o_k, o_k < K, g_dtype, g_gamma_dtype, BT, False)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        mask_k = o_k < K
        p_qk = (o_t[:, None] * H + i_h) * K + o_k[None, :]
        b_q = tl.load(q + p_qk, mask=mask_t[:, None] & mask_k[None, :], other=0.)
        b_k = tl.load(k + p_qk, mask=mask_t[:, None] & mask_k[None, :], other=0.)
        b_dh = tl.load(dstates + state_base + o_k[:, None] * V + o_v[None, :],
                       mask=mask_k[:, None] & mask_v[None, :], other=0.).to(b_k.dtype)
        b_At += _dot(b_k, tl.trans(b_q))
        b_dv += _dot(b_k, b_dh)

    b_At = b_At * tl.trans(_causal_decay(b_G, mask_t, BT)) * scale
    b_dv = b_dv * tl.where(mask_t, tl.exp(b_GL - b_G), 0.)[:, None]
    p_tv = (o_t[:, None] * H + i_h) * V + o_v[None, :]
    b_do = tl.load(do + p_tv, mask=mask_t[:, None] & mask_v[None, :], other=0.)
    b_dv += _dot(b_At.to(b_do.dtype), b_do)
    tl.store(dv + p_tv, b_dv.to(dv.dtype.element_ty), mask=mask_t[:, None] & mask_v[None, :])


# ---- launch configs: tools/tune_chunk.py, output in docs/tuning/chunk.md (H100, bf16, K=V=128) -------------

def _scan_config(BK, **_):
    # the state tile [BK, BV] in float32 plus a chunk of x, y (and q) per step; BV=64, 4 warps, 2 stages was the
    # fastest of BV 32/64 x warps 4/8 x stages 1-3 in both modes (with and without the output)
    return dict(BV={16: 64, 32: 64, 64: 64, 128: 64, 256: 32}[BK], BT=CHUNK, num_warps=4, num_stages=2)


def _gla_scan_config(BK, dtype, **_):
    # GLA's pass (per-key gates, no output), H200, chunk_gla fwd+bwd at K=128: the whole state row per program
    # (BV=128, 8 warps, 3 stages) 0.376 / 0.789 / 1.389 ms against 0.536 / 1.155 / 2.223 for BV=64, 4 warps,
    # 2 stages: each chunk's keys and gates are read once, not once per slice of V. float32 and K=256 take
    # narrower tiles, on 8 warps: by the sm_90 resource report, the widest that do not spill (4 warps spilled
    # 8 KB a thread in float32 at K=128, 0.6 KB in bf16 at K=256).
    if BK == 256:
        return dict(BV=32, BT=CHUNK, num_warps=8, num_stages=1)
    if dtype == "float32":
        return dict(BV=64, BT=CHUNK, num_warps=8, num_stages=1)
    return dict(BV=128, BT=CHUNK, num_warps=8, num_stages=3)


def _fixup_config(BK, **_):
    # memory-bound; H200, chunk_gla fwd+bwd (two calls) at B2T8192 / B1T32768: BV=64 on 4 warps 0.220 / 0.427 ms,
    # BV=128 0.222 / 0.432, the combine's BV=32 0.360 / 0.717 (K=256 keeps the combine's untimed BV=16)
    return dict(BV={16: 64, 32: 64, 64: 64, 128: 64, 256: 16}[BK], num_warps=4, num_stages=1)


def _combine_config(BK, **_):
    return dict(BV={16: 64, 32: 64, 64: 64, 128: 32, 256: 16}[BK], num_warps=4, num_stages=1)


def _dqk_config(KP, **_):
    # BV=32 with 4 warps and 3 stages: 1.17 ms summed over the three shapes, against 1.28 for BV=64 with 8 warps
    return dict(BK=min(KP, 128), BV=32, BT=CHUNK, num_warps=4, num_stages=3)


def _dv_config(KP, **_):
    return dict(BK=min(KP, 64), BV=64, BT=CHUNK, num_warps=4, num_stages=2)


FLOAT_DTYPES = ["float16", "bfloat16", "float32"]
K_BUCKETS = [16, 32, 64, 128, 256]


def _scan_spec(name, gates, gate_k):
    """The state pass for scalar gates (g [B, T, H], g_gamma [H]; outputs too, with write_o) or, with gate_k, for
    GLA (g: the per-key gate's running sum per chunk [B, T, H, K], from chunk_gk_cumsum; states only: write_o
    must be False, GLA's outputs come from triton_src/chunk_gla.py)."""
    write_o_axis = [] if gate_k else [BoolAxis("WRITE_O", "write_o")]
    return OpSpec(
        name=name,
        kernel=chunk_scan_kernel,
        doc="Chunk-by-chunk state pass over segments: forward states (and outputs), or reversed, state gradients.",
        args=[
            Tensor("x", "B T H K", dtypes=FLOAT_DTYPES),
            Tensor("y", "B T H V", same_dtype_as="x"),
            Tensor("q", "B T H K", optional=True, same_dtype_as="x"),
            *gates,
            Tensor("h0", "S H K V", optional=True, dtypes=["float32"], transposed_if="state_v_first"),
            Tensor("segments", "S SF", dtypes=["int32"]),
            Tensor("chunks", "C CF", dtypes=["int32"]),
            Float("scale"),
            Bool("state_v_first"),
            Bool("write_o"),
            Bool("store_states"),
            Bool("output_ht"),
            Bool("reverse"),
            Bool("store_decay"),
        ],
        outputs=[
            Output("o", "B T H V", dtype_of="y", when="write_o"),
            Output("states", "C H K V", dtype_of="x", when="store_states"),
            Output("ht", "S H K V", dtype="float32", when="output_ht", transposed_if="state_v_first"),
            Output("seg_decay", "S H K", dtype="float32", when="output_ht"),
            Output("chunk_decay", "C H K", dtype="float32", when="store_decay"),
        ],
        axes=[DtypeAxis("x"), BucketAxis("BK", "K", K_BUCKETS), *write_o_axis, AlignedAxis(["K", "V"])],
        launch_config=lambda **axes: dict(_gla_scan_config(**axes), GATE_K=True, WRITE_O=False) if gate_k
        else dict(_scan_config(**axes), GATE_K=False),
        grid=["S * H", "cdiv(V, BV)"],
    )


_SCALAR_GATES = [Tensor("g", "B T H", optional=True, dtypes=FLOAT_DTYPES),
                 Tensor("g_gamma", "H", optional=True, dtypes=["float32"])]

SPECS = [
    _scan_spec("chunk_scan", _SCALAR_GATES, False),
    _scan_spec("chunk_gla_scan", [Tensor("g", "B T H K", dtypes=["float32"]),
                                  Tensor("g_gamma", "H", optional=True, dtypes=["float32"])], True),
    OpSpec(
        name="chunk_bwd_dqk",
        kernel=chunk_bwd_dqk_kernel,
        doc="Backward per chunk: dq, dk and the gate's gradient.",
        args=[
            Tensor("q", "B T H K", dtypes=FLOAT_DTYPES),
            Tensor("k", "B T H K", same_dtype_as="q"),
            Tensor("v", "B T H V", same_dtype_as="q"),
            *_SCALAR_GATES,
            Tensor("do", "B T H V", same_dtype_as="q"),
            Tensor("states", "C H K V", same_dtype_as="q"),
            Tensor("dstates", "C H K V", same_dtype_as="q"),
            Tensor("chunks", "C CF", dtypes=["int32"]),
            Float("scale"),
        ],
        outputs=[
            Output("dq", "B T H K", dtype_of="q"),
            Output("dk", "B T H K", dtype_of="q"),
            Output("dg", "B T H", dtype="float32", zeros=True),  # summed over the K blocks
        ],
        axes=[DtypeAxis("q"), BucketAxis("KP", "K", K_BUCKETS), AlignedAxis(["K", "V"])],
        launch_config=_dqk_config,
        grid=["C * H", "cdiv(K, BK)"],
    ),
    OpSpec(
        name="chunk_bwd_dv",
        kernel=chunk_bwd_dv_kernel,
        doc="Backward per chunk: dv.",
        args=[
            Tensor("q", "B T H K", dtypes=FLOAT_DTYPES),
            Tensor("k", "B T H K", same_dtype_as="q"),
            *_SCALAR_GATES,
            Tensor("do", "B T H V", same_dtype_as="q"),
            Tensor("dstates", "C H K V", same_dtype_as="q"),
            Tensor("chunks", "C CF", dtypes=["int32"]),
            Float("scale"),
        ],
        outputs=[Output("dv", "B T H V", dtype_of="q")],
        axes=[DtypeAxis("q"), BucketAxis("KP", "K", K_BUCKETS), AlignedAxis(["K", "V"])],
        launch_config=_dv_config,
        grid=["C * H", "cdiv(V, BV)"],
    ),
    OpSpec(
        name="chunk_fixup",
        kernel=chunk_fixup_kernel,
        doc="A split state pass's per-chunk states, from each segment's zero-start ones and its starting state.",
        args=[
            Tensor("local", "C H K V", dtypes=FLOAT_DTYPES),
            Tensor("chunk_decay", "C H K", dtypes=["float32"]),
            Tensor("seg_init", "S H K V", dtypes=["float32"]),
            Tensor("chunks", "C CF", dtypes=["int32"]),
        ],
        outputs=[Output("states", "C H K V", dtype_of="local")],
        axes=[DtypeAxis("local"), BucketAxis("BK", "K", K_BUCKETS), AlignedAxis(["K", "V"])],
        launch_config=_fixup_config,
        grid=["C * H", "cdiv(V, BV)"],
    ),
    OpSpec(
        name="chunk_combine",
        kernel=chunk_combine_kernel,
        doc="Each segment's starting state from the segments' own final states and decays.",
        args=[
            Tensor("local", "S H K V", dtypes=["float32"]),
            Tensor("seg_decay", "S H K", dtypes=["float32"]),
            Tensor("h0", "N H K V", optional=True, dtypes=["float32"], transposed_if="state_v_first"),
            Tensor("seg_offsets", "N+1", dtypes=["int32"]),
            Bool("state_v_first"),
            Bool("output_ht"),
            Bool("reverse"),
        ],
        outputs=[
            Output("seg_init", "S H K V", dtype="float32"),
            Output("ht", "N H K V", dtype="float32", when="output_ht", transposed_if="state_v_first"),
        ],
        axes=[BucketAxis("BK", "K", K_BUCKETS), BoolAxis("REVERSE", "reverse"), AlignedAxis(["K", "V"])],
        launch_config=_combine_config,
        grid=["N * H", "cdiv(V, BV)"],
    ),
]
