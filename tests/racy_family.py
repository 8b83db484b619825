"""chunk_delta_bwd_dqkw's spec with the body its pipelined form once had in part, for tests/test_compile_kernels.py
(imported only by the tool's subprocess, as `--families tests.racy_family`): h feeds the products dq and dw and a
register sum as well, so on num_stages=2 its load gets one buffer slot, refilled while the products reading it may
still run (tools/pipeline_races.py); the build must refuse it."""
import dataclasses

import triton
import triton.language as tl

from triton_src.chunk import _dot
from triton_src.chunk_delta import SPECS as DELTA_SPECS, _tile
from triton_src.chunk_gla import _chunk_bounds


@triton.jit
def register_sum_dqkw(q, k, v_new, gcum, do, dv_new, states, dstates, chunks, dq, dk, dw, dG, scale,
                      H, HV, K, V, KP: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr):
    """dq = do h^T and dw = -dv_new h^T scaled by sum_v h h: not a gradient, only the loop shape that races."""
    i_ch = tl.program_id(0)
    i_hv, t0, t1 = _chunk_bounds(chunks, i_ch, HV)
    o_t = t0 + tl.arange(0, BT)
    mask_t = o_t < t1
    o_k = tl.program_id(1) * BK + tl.arange(0, BK)
    mask_k = o_k < K
    b_dq = tl.zeros([BT, BK], dtype=tl.float32)
    b_dw = tl.zeros([BT, BK], dtype=tl.float32)
    b_hh = tl.zeros([BK], dtype=tl.float32)
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        mask_v = o_v < V
        b_h = tl.load(states + i_ch.to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :],
                      mask=mask_k[:, None] & mask_v[None, :], other=0.)
        b_dq += _dot(_tile(do, o_t, mask_t, HV, i_hv, V, o_v, mask_v), tl.trans(b_h))
        b_dw += _dot(_tile(dv_new, o_t, mask_t, HV, i_hv, V, o_v, mask_v), tl.trans(b_h))
        b_hh += tl.sum(b_h.to(tl.float32) * b_h.to(tl.float32), 1)
    p = (o_t[:, None] * HV + i_hv) * K + o_k[None, :]
    m = mask_t[:, None] & mask_k[None, :]
    tl.store(dq + p, (b_dq * b_hh[None, :]).to(dq.dtype.element_ty), mask=m)
    tl.store(dw + p, (-b_dw).to(dw.dtype.element_ty), mask=m)


_DQKW = next(s for s in DELTA_SPECS if s.name == "chunk_delta_bwd_dqkw")
SPECS = [dataclasses.replace(_DQKW, name="pipelined_dqkw", kernel=register_sum_dqkw,
                             launch_config=lambda **axes: dict(_DQKW.launch_config(**axes), num_stages=2))]
