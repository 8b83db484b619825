"""Recurrent (token-by-token) forms of the gated linear-attention family and the (gated) delta rule.

One kernel serves every fused_recurrent op: per head it keeps the state S [K, V] in registers and for
each token t (row vectors q_t, k_t in R^K, v_t in R^V):

    S = exp(g_t) * exp(g_gamma) * diag(exp(gk_t)) @ S @ diag(exp(gv_t))     (each factor when given)
    S = S + k_t^T v_t                                  linear family
    S = S + k_t^T (beta_t * (v_t - k_t @ S))           delta rule (DELTA_RULE)
    o_t = scale * q_t @ S

A program owns one (sequence, value head) pair and a BV-wide slice of V. Head dims K and V are run-time
values masked inside a BK-wide block; gates and beta may be float32, bfloat16 or float16, chosen by a
run-time dtype code (0 = absent), so the dtype of q/k/v, the K bucket and two layout/algorithm flags are
the only compile-time axes.
"""
import triton
import triton.language as tl

from tools.kernel_spec import AlignedAxis, Bool, BoolAxis, BucketAxis, DtypeAxis, Float, OpSpec, Output, Tensor


@triton.jit
def _load_f32(ptr, offs, mask, dtype_code, other):
    # dtype codes follow fla_aot's manifest: 1 float32, 2 bfloat16, 3 float16 (0 = absent, masked off).
    if dtype_code == 2:
        x = tl.load(ptr.to(tl.pointer_type(tl.bfloat16)) + offs, mask=mask, other=other).to(tl.float32)
    elif dtype_code == 3:
        x = tl.load(ptr.to(tl.pointer_type(tl.float16)) + offs, mask=mask, other=other).to(tl.float32)
    else:
        x = tl.load(ptr + offs, mask=mask, other=other).to(tl.float32)
    return x


@triton.jit
def _decay(b_h, g, gk, gv, b_decay_gamma, off_g, off_gk, off_gv, mask_k, mask_v,
           g_dtype, g_gamma_dtype, gk_dtype, gv_dtype):
    # S <- exp(g_t) exp(g_gamma) diag(exp(gk_t)) S diag(exp(gv_t)); the same map carries dS back a step
    if g_dtype != 0:
        b_h *= tl.exp(_load_f32(g, off_g, True, g_dtype, 0.))
    if g_gamma_dtype != 0:
        b_h *= b_decay_gamma
    if gk_dtype != 0:
        b_h *= tl.exp(_load_f32(gk, off_gk, mask_k, gk_dtype, 0.))[:, None]
    if gv_dtype != 0:
        b_h *= tl.exp(_load_f32(gv, off_gv, mask_v, gv_dtype, 0.))[None, :]
    return b_h


@triton.jit
def _token_qkv(q, k, v, off_qk, off_v, o_k, o_v, mask_k, mask_v, use_qk_l2norm, scale):
    """One token's q (L2-normalised if asked, then scaled), k (normalised if asked) and v, in float32."""
    b_q = tl.load(q + off_qk + o_k, mask=mask_k, other=0.).to(tl.float32)
    b_k = tl.load(k + off_qk + o_k, mask=mask_k, other=0.).to(tl.float32)
    b_v = tl.load(v + off_v + o_v, mask=mask_v, other=0.).to(tl.float32)
    if use_qk_l2norm != 0:
        b_q = b_q / tl.sqrt(tl.sum(b_q * b_q) + 1e-6)
        b_k = b_k / tl.sqrt(tl.sum(b_k * b_k) + 1e-6)
    return b_q * scale, b_k, b_v


@triton.jit
def fused_recurrent_fwd_kernel(
    q, k, v, g, g_gamma, gk, gv, beta, initial_state, cu_seqlens,
    o, final_state,
    g_dtype, g_gamma_dtype, gk_dtype, gv_dtype, beta_dtype, initial_state_dtype, cu_seqlens_dtype,
    scale, T, H, HV, K, V,
    output_final_state, reverse, use_qk_l2norm, beta_sigmoid, allow_neg_eigval,
    BK: tl.constexpr, BV: tl.constexpr, STATE_V_FIRST: tl.constexpr, DELTA_RULE: tl.constexpr,
):
    i_nh = tl.program_id(0)  # (sequence, value head) on x: the only grid dim allowed past 65535
    i_v = tl.program_id(1)
    i_n = i_nh // HV
    i_hv = i_nh % HV
    i_h = i_hv // (HV // H)  # grouped value heads: HV / H value heads share one q/k head

    if cu_seqlens_dtype != 0:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    else:
        bos = i_n.to(tl.int64) * T
        eos = bos + T
    seq_len = (eos - bos).to(tl.int32)

    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    mask_k = o_k < K
    mask_v = o_v < V
    mask_h = mask_k[:, None] & mask_v[None, :]
    if STATE_V_FIRST:
        o_state = o_v[None, :] * K + o_k[:, None]
    else:
        o_state = o_k[:, None] * V + o_v[None, :]
    state_base = i_nh.to(tl.int64) * K * V

    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if initial_state_dtype != 0:
        # states stream through once: keep them from evicting q/k/v from L2
        b_h += tl.load(initial_state + state_base + o_state, mask=mask_h, other=0., eviction_policy="evict_first")
    b_decay_gamma = tl.exp(_load_f32(g_gamma, i_hv, g_gamma_dtype != 0, g_gamma_dtype, 0.))

    for i_t in range(0, seq_len):
        t = bos + i_t
        if reverse != 0:
            t = eos - 1 - i_t
        off_qk = (t * H + i_h) * K
        off_v = (t * HV + i_hv) * V
        off_g = t * HV + i_hv

        b_q, b_k, b_v = _token_qkv(q, k, v, off_qk, off_v, o_k, o_v, mask_k, mask_v, use_qk_l2norm, scale)
        b_h = _decay(b_h, g, gk, gv, b_decay_gamma, off_g, off_g * K + o_k, off_v + o_v, mask_k, mask_v,
                     g_dtype, g_gamma_dtype, gk_dtype, gv_dtype)
        if DELTA_RULE:
            b_beta = _load_f32(beta, off_g, beta_dtype != 0, beta_dtype, 1.)
            if beta_sigmoid != 0:
                if beta_dtype != 0:  # an absent beta means ones, not sigmoid(1)
                    b_beta = tl.sigmoid(b_beta)
            if allow_neg_eigval != 0:
                b_beta = b_beta * 2.
            b_v = b_beta * (b_v - tl.sum(b_h * b_k[:, None], 0))
        b_h += b_k[:, None] * b_v[None, :]
        b_o = tl.sum(b_h * b_q[:, None], 0)
        tl.store(o + off_v + o_v, b_o.to(o.dtype.element_ty), mask=mask_v)

    if output_final_state != 0:
        tl.store(final_state + state_base + o_state, b_h, mask=mask_h, cache_modifier=".cs")


@triton.jit
def fused_recurrent_bwd_kernel(
    q, k, v, g, g_gamma, gk, gv, initial_state, do, dht, cu_seqlens,
    dq, dk, dv, dh0,
    g_dtype, g_gamma_dtype, gk_dtype, gv_dtype, initial_state_dtype, dht_dtype, cu_seqlens_dtype,
    scale, T, H, HV, K, V, reverse,
    BK: tl.constexpr, BV: tl.constexpr, STATE_V_FIRST: tl.constexpr,
):
    """Backward of the linear family (no delta rule): dq, dk (float32, summed over V blocks with atomics),
    dv and dh0. Gate gradients follow from these in fla_aot/ops/fused_recurrent.py."""
    i_nh = tl.program_id(0)
    i_v = tl.program_id(1)
    i_n = i_nh // HV
    i_hv = i_nh % HV
    i_h = i_hv // (HV // H)
    if cu_seqlens_dtype != 0:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    else:
        bos = i_n.to(tl.int64) * T
        eos = bos + T
    seq_len = (eos - bos).to(tl.int32)

    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    mask_k = o_k < K
    mask_v = o_v < V
    mask_h = mask_k[:, None] & mask_v[None, :]
    if STATE_V_FIRST:
        o_state = o_v[None, :] * K + o_k[:, None]
    else:
        o_state = o_k[:, None] * V + o_v[None, :]
    state_base = i_nh.to(tl.int64) * K * V
    b_decay_gamma = tl.exp(_load_f32(g_gamma, i_hv, g_gamma_dtype != 0, g_gamma_dtype, 0.))

    # Pass 1, in processing order: rebuild S_t and take this V block's share of dq_t = scale * S_t do_t^T.
    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if initial_state_dtype != 0:
        b_h += tl.load(initial_state + state_base + o_state, mask=mask_h, other=0.)
    for i_t in range(0, seq_len):
        t = bos + i_t
        if reverse != 0:
            t = eos - 1 - i_t
        off_qk = (t * H + i_h) * K
        off_v = (t * HV + i_hv) * V
        off_g = t * HV + i_hv
        b_k = tl.load(k + off_qk + o_k, mask=mask_k, other=0.).to(tl.float32)
        b_v = tl.load(v + off_v + o_v, mask=mask_v, other=0.).to(tl.float32)
        b_do = tl.load(do + off_v + o_v, mask=mask_v, other=0.).to(tl.float32)
        b_h = _decay(b_h, g, gk, gv, b_decay_gamma, off_g, off_g * K + o_k, off_v + o_v, mask_k, mask_v,
                     g_dtype, g_gamma_dtype, gk_dtype, gv_dtype)
        b_h += b_k[:, None] * b_v[None, :]
        tl.atomic_add(dq + off_g * K + o_k, tl.sum(b_h * b_do[None, :], 1) * scale, mask=mask_k)

    # Pass 2, against processing order: dS_t = dS from later steps + scale q_t^T do_t.
    b_dh = tl.zeros([BK, BV], dtype=tl.float32)
    if dht_dtype != 0:
        b_dh += tl.load(dht + state_base + o_state, mask=mask_h, other=0.)
    for i_t in range(0, seq_len):
        t = eos - 1 - i_t
        if reverse != 0:
            t = bos + i_t
        off_qk = (t * H + i_h) * K
        off_v = (t * HV + i_hv) * V
        off_g = t * HV + i_hv
        b_q = tl.load(q + off_qk + o_k, mask=mask_k, other=0.).to(tl.float32) * scale
        b_k = tl.load(k + off_qk + o_k, mask=mask_k, other=0.).to(tl.float32)
        b_v = tl.load(v + off_v + o_v, mask=mask_v, other=0.).to(tl.float32)
        b_do = tl.load(do + off_v + o_v, mask=mask_v, other=0.).to(tl.float32)
        b_dh += b_q[:, None] * b_do[None, :]
        tl.atomic_add(dk + off_g * K + o_k, tl.sum(b_dh * b_v[None, :], 1), mask=mask_k)
        tl.store(dv + off_v + o_v, tl.sum(b_dh * b_k[:, None], 0), mask=mask_v)
        b_dh = _decay(b_dh, g, gk, gv, b_decay_gamma, off_g, off_g * K + o_k, off_v + o_v, mask_k, mask_v,
                      g_dtype, g_gamma_dtype, gk_dtype, gv_dtype)
    tl.store(dh0 + state_base + o_state, b_dh, mask=mask_h)


def _launch_config(BK, **_):
    # Registers hold a BK x BV float32 state tile, at most 128 values per thread. Chosen from
    # docs/tuning/fused_recurrent.md (H200, decode T=1, H=16, B=1 and 32): BV=32 with one warp was
    # fastest at B=32 for K=V=64 and 128 (25.1 us at 128, against 27.1 us with four warps), BV=32 with
    # two warps at K=V=256; B=1 preferred BV=16 by about 1 us, which B=32 does not afford.
    BV = {16: 64, 32: 64, 64: 32, 128: 32, 256: 32}[BK]
    num_warps = {16: 1, 32: 1, 64: 1, 128: 1, 256: 2}[BK]
    return dict(BV=BV, num_warps=num_warps, num_stages=1)


def _bwd_launch_config(BK, **_):
    # two BK x BV float32 tiles (S in pass 1, dS in pass 2), at most 128 values per thread
    return dict(BV=32, num_warps={16: 1, 32: 1, 64: 1, 128: 1, 256: 2}[BK], num_stages=1)


FLOAT_DTYPES = ["float16", "bfloat16", "float32"]

SPECS = [
    OpSpec(
        name="fused_recurrent_fwd",
        kernel=fused_recurrent_fwd_kernel,
        doc="Forward of every fused_recurrent op: gated linear attention family and (gated) delta rule.",
        args=[
            Tensor("q", "B T H K", dtypes=FLOAT_DTYPES),
            Tensor("k", "B T H K", same_dtype_as="q"),
            Tensor("v", "B T HV V", same_dtype_as="q"),
            Tensor("g", "B T HV", optional=True, dtypes=FLOAT_DTYPES),
            Tensor("g_gamma", "HV", optional=True, dtypes=["float32"]),
            Tensor("gk", "B T HV K", optional=True, dtypes=FLOAT_DTYPES),
            Tensor("gv", "B T HV V", optional=True, dtypes=FLOAT_DTYPES),
            Tensor("beta", "B T HV", optional=True, dtypes=FLOAT_DTYPES),
            Tensor("initial_state", "N HV K V", optional=True, dtypes=["float32"], transposed_if="state_v_first"),
            Tensor("cu_seqlens", "N+1", optional=True, dtypes=["int64"], varlen=True),
            Float("scale"),
            Bool("output_final_state"),
            Bool("reverse"),
            Bool("use_qk_l2norm"),
            Bool("beta_sigmoid"),
            Bool("allow_neg_eigval"),
            Bool("state_v_first"),
            Bool("delta_rule"),
        ],
        outputs=[
            Output("o", "B T HV V", dtype_of="v"),
            Output("final_state", "N HV K V", dtype="float32", when="output_final_state", transposed_if="state_v_first"),
        ],
        divisible=[("HV", "H")],
        axes=[
            DtypeAxis("q"),
            BucketAxis("BK", "K", [16, 32, 64, 128, 256]),
            BoolAxis("STATE_V_FIRST", "state_v_first"),
            BoolAxis("DELTA_RULE", "delta_rule"),
            AlignedAxis(["K", "V"]),
        ],
        launch_config=_launch_config,
        grid=["N * HV", "cdiv(V, BV)"],
    ),
    OpSpec(
        name="fused_recurrent_bwd",
        kernel=fused_recurrent_bwd_kernel,
        doc="Backward of the linear-family fused_recurrent ops: dq, dk, dv (float32) and dh0.",
        args=[
            Tensor("q", "B T H K", dtypes=FLOAT_DTYPES),
            Tensor("k", "B T H K", same_dtype_as="q"),
            Tensor("v", "B T HV V", same_dtype_as="q"),
            Tensor("g", "B T HV", optional=True, dtypes=FLOAT_DTYPES),
            Tensor("g_gamma", "HV", optional=True, dtypes=["float32"]),
            Tensor("gk", "B T HV K", optional=True, dtypes=FLOAT_DTYPES),
            Tensor("gv", "B T HV V", optional=True, dtypes=FLOAT_DTYPES),
            Tensor("initial_state", "N HV K V", optional=True, dtypes=["float32"], transposed_if="state_v_first"),
            Tensor("do", "B T HV V", same_dtype_as="q"),
            Tensor("dht", "N HV K V", optional=True, dtypes=["float32"], transposed_if="state_v_first"),
            Tensor("cu_seqlens", "N+1", optional=True, dtypes=["int64"], varlen=True),
            Float("scale"),
            Bool("reverse"),
            Bool("state_v_first"),
        ],
        outputs=[
            Output("dq", "B T HV K", dtype="float32", zeros=True),
            Output("dk", "B T HV K", dtype="float32", zeros=True),
            Output("dv", "B T HV V", dtype="float32"),
            Output("dh0", "N HV K V", dtype="float32", transposed_if="state_v_first"),
        ],
        divisible=[("HV", "H")],
        axes=[
            DtypeAxis("q"),
            BucketAxis("BK", "K", [16, 32, 64, 128, 256]),
            BoolAxis("STATE_V_FIRST", "state_v_first"),
            AlignedAxis(["K", "V"]),
        ],
        launch_config=_bwd_launch_config,
        grid=["N * HV", "cdiv(V, BV)"],
    ),
]
