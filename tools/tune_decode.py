#!/usr/bin/env python3
"""Experiments for the decode step's memory floor (issue 2): two other forms of the fused_recurrent forward at
T=1, timed against the frozen kernel through Triton's JIT.

    python tools/tune_decode.py [--out table.md] [--quick]     # on a GPU
    python tools/tune_decode.py --check                        # anywhere: the interpreter against the reference

At decode (T=1) the kernel streams every state once: 64 KB read and written per (sequence, head) at K=V=128.
The frozen kernel runs one program per (sequence, head, V-slice) tile and holds its tile in registers from
load to store. At B=32 the states (33.8 MB) are as large as all the multiprocessors' register files together,
so the programs run in about 1.5 waves and each wave's reads and writes come in two bursts.

- persistent: a fixed number of programs per multiprocessor; each walks tiles pid, pid + P, ... and issues the
  loads of its next tile's state before it updates and stores the current one, so reads and writes overlap as in
  a copy. Measured on an H200: 2 % faster than the frozen kernel (docs/tuning/decode.md).
- two_pass: the tile is streamed in row blocks of BKB keys and never held whole. A first pass reads it and reduces
  the decayed state against k and q (all the delta rule's correction and the output need); a second pass reads
  it again, while it is still in L2, and stores the update. Few registers a program, so every tile's program
  is resident at once, in one wave.

If one wins, it moves into triton_src/fused_recurrent.py (the persistent form needs a grid over the device's
multiprocessors from the dispatcher; the two-pass form none).

Measured like tools/tune_fused_recurrent.py: CUDA events around replays of a CUDA graph of 4 launches on 4
input sets (no launch overhead; the state is not served from L2 across launches), gated delta rule and GLA,
bf16, H=16.
"""
import argparse
import itertools
import os
import sys
from pathlib import Path

if "--check" in sys.argv and not os.environ.get("TRITON_INTERPRET"):
    os.environ["TRITON_INTERPRET"] = "1"  # before triton_src is imported

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tools.tune_fused_recurrent import CODE, graph_time_us, make_set  # noqa: E402
from tools.tune_fused_recurrent import launch as frozen_launch  # noqa: E402
from triton_src.fused_recurrent import _decay, _load_f32, _token_qkv  # noqa: E402


@triton.jit
def _state(h0, tile, n_tiles, n_v, K, V, o_k, BV: tl.constexpr):
    # the initial state of tile (sequence x head, V-slice); zeros past the last tile
    o_v = (tile % n_v) * BV + tl.arange(0, BV)
    mask = (o_k < K)[:, None] & (o_v < V)[None, :] & (tile < n_tiles)
    base = (tile // n_v).to(tl.int64) * K * V
    return tl.load(h0 + base + o_k[:, None] * V + o_v[None, :], mask=mask, other=0., eviction_policy="evict_first")


@triton.jit
def persistent_fwd_kernel(q, k, v, g, gk, beta, h0, o, ht, g_dtype, gk_dtype, beta_dtype, scale, N, T, H, K, V,
                          use_qk_l2norm, BK: tl.constexpr, BV: tl.constexpr, DELTA_RULE: tl.constexpr,
                          PREFETCH: tl.constexpr):
    """fused_recurrent_fwd_kernel's math (no varlen, reverse, grouped heads or state_v_first) over the tiles
    pid, pid + P, ... of N x H x cdiv(V, BV); with PREFETCH the next tile's state is loaded before this one is
    updated and stored."""
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    n_v = tl.cdiv(V, BV)
    n_tiles = N * H * n_v
    o_k = tl.arange(0, BK)
    mask_k = o_k < K
    b_next = _state(h0, pid, n_tiles, n_v, K, V, o_k, BV)
    for tile in range(pid, n_tiles, n_prog):
        if PREFETCH:
            b_h = b_next
            b_next = _state(h0, tile + n_prog, n_tiles, n_v, K, V, o_k, BV)
        else:
            b_h = _state(h0, tile, n_tiles, n_v, K, V, o_k, BV)
        i_nh = tile // n_v
        i_n = i_nh // H
        i_h = i_nh % H
        o_v = (tile % n_v) * BV + tl.arange(0, BV)
        mask_v = o_v < V
        for i_t in range(0, T):
            t = i_n.to(tl.int64) * T + i_t
            off_qk = (t * H + i_h) * K
            off_v = (t * H + i_h) * V
            off_g = t * H + i_h
            b_q, b_k, b_v = _token_qkv(q, k, v, off_qk, off_v, o_k, o_v, mask_k, mask_v, use_qk_l2norm, scale)
            b_h = _decay(b_h, g, gk, gk, 1., off_g, off_g * K + o_k, off_v + o_v, mask_k, mask_v,
                         g_dtype, 0, gk_dtype, 0)
            if DELTA_RULE:
                b_beta = _load_f32(beta, off_g, beta_dtype != 0, beta_dtype, 1.)
                b_v = b_beta * (b_v - tl.sum(b_h * b_k[:, None], 0))
            b_h += b_k[:, None] * b_v[None, :]
            tl.store(o + off_v + o_v, tl.sum(b_h * b_q[:, None], 0).to(o.dtype.element_ty), mask=mask_v)
        tl.store(ht + i_nh.to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :], b_h,
                 mask=mask_k[:, None] & mask_v[None, :], cache_modifier=".cs")


@triton.jit
def two_pass_fwd_kernel(q, k, v, g, gk, beta, h0, o, ht, beta_dtype, scale, H, K, V, use_qk_l2norm,
                        BK: tl.constexpr, BKB: tl.constexpr, BV: tl.constexpr, DELTA_RULE: tl.constexpr):
    """One decode step (T=1, no varlen or grouped heads) of tile (sequence x head, V-slice), the state streamed
    in blocks of BKB rows, twice: with d the decay (exp(g), or exp(gk) per key for GLA),
    v' = beta (v - (d h)^T k) for the delta rule (else v), o = (d h)^T q + (q . k) v' and h' = d h + k v'^T."""
    i_nh = tl.program_id(0)  # with T=1 the token of sequence n, head h is row n * H + h
    o_v = tl.program_id(1) * BV + tl.arange(0, BV)
    mask_v = o_v < V
    o_k = tl.arange(0, BK)
    mask_k = o_k < K
    off_qk = i_nh.to(tl.int64) * K
    base = i_nh.to(tl.int64) * K * V
    b_q = tl.load(q + off_qk + o_k, mask=mask_k, other=0.).to(tl.float32)
    b_k = tl.load(k + off_qk + o_k, mask=mask_k, other=0.).to(tl.float32)
    q_scale = scale
    k_scale = 1.
    if use_qk_l2norm != 0:
        q_scale = scale / tl.sqrt(tl.sum(b_q * b_q) + 1e-6)
        k_scale = 1. / tl.sqrt(tl.sum(b_k * b_k) + 1e-6)
    qk = tl.sum(b_q * b_k) * q_scale * k_scale
    if DELTA_RULE:
        decay = tl.exp(tl.load(g + i_nh).to(tl.float32))
    hk = tl.zeros([BV], dtype=tl.float32)
    hq = tl.zeros([BV], dtype=tl.float32)
    for k0 in range(0, K, BKB):  # pass 1: reductions of the decayed state
        o_kb = k0 + tl.arange(0, BKB)
        m_kb = o_kb < K
        b_h = tl.load(h0 + base + o_kb[:, None] * V + o_v[None, :], mask=m_kb[:, None] & mask_v[None, :], other=0.)
        if DELTA_RULE:
            b_h = b_h * decay
        else:
            b_h = b_h * tl.exp(tl.load(gk + off_qk + o_kb, mask=m_kb, other=0.).to(tl.float32))[:, None]
        b_kb = tl.load(k + off_qk + o_kb, mask=m_kb, other=0.).to(tl.float32) * k_scale
        b_qb = tl.load(q + off_qk + o_kb, mask=m_kb, other=0.).to(tl.float32) * q_scale
        hk += tl.sum(b_h * b_kb[:, None], 0)
        hq += tl.sum(b_h * b_qb[:, None], 0)
    b_v = tl.load(v + i_nh.to(tl.int64) * V + o_v, mask=mask_v, other=0.).to(tl.float32)
    if DELTA_RULE:
        b_v = _load_f32(beta, i_nh, beta_dtype != 0, beta_dtype, 1.) * (b_v - hk)
    tl.store(o + i_nh.to(tl.int64) * V + o_v, (hq + qk * b_v).to(o.dtype.element_ty), mask=mask_v)
    for k0 in range(0, K, BKB):  # pass 2: the same blocks again (from L2), updated and stored
        o_kb = k0 + tl.arange(0, BKB)
        m_kb = o_kb < K
        m_h = m_kb[:, None] & mask_v[None, :]
        p_h = base + o_kb[:, None] * V + o_v[None, :]
        b_h = tl.load(h0 + p_h, mask=m_h, other=0., eviction_policy="evict_first")
        if DELTA_RULE:
            b_h = b_h * decay
        else:
            b_h = b_h * tl.exp(tl.load(gk + off_qk + o_kb, mask=m_kb, other=0.).to(tl.float32))[:, None]
        b_kb = tl.load(k + off_qk + o_kb, mask=m_kb, other=0.).to(tl.float32) * k_scale
        tl.store(ht + p_h, b_h + b_kb[:, None] * b_v[None, :], mask=m_h, cache_modifier=".cs")


def launch_two_pass(s, BKB, BV, num_warps, delta):
    B, T, H, K = s["q"].shape
    assert T == 1, "the two-pass form is a decode step"
    V = s["v"].shape[-1]
    dummy = s["h0"]
    two_pass_fwd_kernel[(B * H, triton.cdiv(V, BV))](
        s["q"], s["k"], s["v"], s.get("g", dummy), s.get("gk", dummy), s.get("beta", dummy), s["h0"], s["o"],
        s["ht"], CODE[s["beta"].dtype] if "beta" in s else 0, K ** -0.5, H, K, V, int(delta),
        BK=triton.next_power_of_2(K), BKB=BKB, BV=BV, DELTA_RULE=delta, num_warps=num_warps, num_stages=1)


def launch(s, programs, BV, num_warps, prefetch, delta):
    B, T, H, K = s["q"].shape
    V = s["v"].shape[-1]
    dummy = s["h0"]

    def code(name):
        return CODE[s[name].dtype] if name in s else 0

    persistent_fwd_kernel[(programs,)](
        s["q"], s["k"], s["v"], s.get("g", dummy), s.get("gk", dummy), s.get("beta", dummy), s["h0"], s["o"], s["ht"],
        code("g"), code("gk"), code("beta"), K ** -0.5, B, T, H, K, V, int(delta),
        BK=triton.next_power_of_2(K), BV=BV, DELTA_RULE=delta, PREFETCH=prefetch, num_warps=num_warps, num_stages=1)


def _check_against_reference(s, delta, label):
    from fla_aot.reference import fused_recurrent_reference
    ref_o, ref_ht = fused_recurrent_reference(
        s["q"].float(), s["k"].float(), s["v"].float(), g=s.get("g"), gk=s.get("gk"),
        beta=None if "beta" not in s else s["beta"].float(), initial_state=s["h0"], output_final_state=True,
        use_qk_l2norm=delta, delta_rule=delta)
    err_o = ((s["o"].float() - ref_o.float()).norm() / ref_o.float().norm()).item()
    err_h = ((s["ht"] - ref_ht).norm() / ref_ht.norm()).item()
    print(f"{label}: o {err_o:.1e}, state {err_h:.1e}")
    assert err_o < 1e-2 and err_h < 1e-5, (label, err_o, err_h)


def check():
    """Both forms under the interpreter against fla_aot's reference. Persistent: tiles that do not divide among
    the programs, a masked head dim, several tokens, with and without prefetch. Two-pass: row blocks that do not
    divide K, masked V-slices."""
    torch.manual_seed(0)
    for delta, prefetch, (B, T, H, K, V, programs, BV) in itertools.product(
            [True, False], [True, False], [(3, 1, 2, 20, 24, 5, 8), (2, 3, 2, 16, 32, 3, 16)]):
        s = make_set(B, T, H, K, V, delta, "cpu")
        launch(s, programs, BV, 1, prefetch, delta)
        _check_against_reference(s, delta, f"persistent delta={delta} prefetch={prefetch} B={B} T={T} K={K} "
                                           f"V={V} P={programs} BV={BV}")
    for delta, (B, H, K, V, BKB, BV) in itertools.product([True, False], [(3, 2, 20, 24, 8, 16),
                                                                          (2, 2, 32, 16, 16, 16)]):
        s = make_set(B, 1, H, K, V, delta, "cpu")
        launch_two_pass(s, BKB, BV, 1, delta)
        _check_against_reference(s, delta, f"two_pass delta={delta} B={B} K={K} V={V} BKB={BKB} BV={BV}")
    print("check passed")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    p.add_argument("--check", action="store_true", help="run the interpreter check (no GPU needed) and stop")
    p.add_argument("--quick", action="store_true", help="gated delta rule at B=32 only, a few candidates")
    args = p.parse_args()
    if args.check:
        return check()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = ["| op | B | K=V | kernel | programs / SM | BV | warps | form's own | µs per call |",
            "|---|---|---|---|---|---|---|---|---|"]
    cases = [(True, 32, 128)] if args.quick else itertools.product([True, False], [1, 32], [128])
    for delta, B, K in cases:
        H, name = 16, "gated_delta_rule" if delta else "gla"
        frozen = [make_set(B, 1, H, K, K, delta) for _ in range(4)]
        us = graph_time_us(lambda: [frozen_launch(x, B, 1, H, K, K, 32, 1, delta) for x in frozen]) / 4
        rows.append(f"| {name} | {B} | {K} | frozen | - | 32 | 1 | - | {us:.2f} |")
        sets = [make_set(B, 1, H, K, K, delta) for _ in range(4)]
        results = []
        # one warp spills here whatever BV (the compiler's report on sm_90), unlike the frozen kernel's one warp
        grid = (([2, 4, 8], [16, 32], [2, 4], [True, False]) if args.quick else
                ([1, 2, 4, 8, 16], [16, 32, 64], [2, 4, 8], [True, False]))
        for per_sm, BV, w, prefetch in itertools.product(*grid):
            if K * BV // (32 * w) * (2 if prefetch else 1) > 128:  # state values per thread (two tiles: prefetch)
                continue
            programs = min(per_sm * sms, B * H * triton.cdiv(K, BV))
            t = graph_time_us(lambda: [launch(x, programs, BV, w, prefetch, delta) for x in sets]) / 4
            results.append((t, f"persistent | {per_sm} | {BV} | {w} | prefetch={prefetch}"))
        grid = (([16, 32], [32, 64, 128], [1, 2, 4]) if args.quick else
                ([8, 16, 32, 64], [16, 32, 64, 128], [1, 2, 4, 8]))
        for BKB, BV, w in itertools.product(*grid):
            if BKB * BV // (32 * w) > 64:  # a block's state values per thread
                continue
            t = graph_time_us(lambda: [launch_two_pass(x, BKB, BV, w, delta) for x in sets]) / 4
            results.append((t, f"two_pass | - | {BV} | {w} | BKB={BKB}"))
        results.sort()
        for t, row in results[:8]:
            rows.append(f"| {name} | {B} | {K} | {row} | {t:.2f} |")
        print(name, B, K, "frozen", us, "best", results[:3], flush=True)
    text = "\n".join(rows)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
