"""Kernel-by-kernel checks of the delta rule's backward: float64 transcriptions of chunk_delta_bwd_state,
chunk_delta_bwd_dqkw and chunk_delta_bwd_wy (triton_src/chunk_delta.py), one chunk (or, for the reversed state
pass, one sequence) of one value head at a time from the tables.

They round to the inputs' 16-bit dtype wherever the kernels do before a product, so a kernel agrees with them up
to float32 sums; what they check is the compiled kernel, not the math (the end-to-end tests check that against
the recurrence). On Hopper, Triton has miscompiled forms of these two kernels that the end-to-end tests only
showed as a wrong dk or dbeta (docs/tuning/chunk_delta.md); compared here, the wrong kernel and output are named.

record_backward() runs one backward and keeps each kernel's arguments and outputs; compare() checks them.
"""
import torch

import fla_aot.ops.chunk_delta as chunk_delta
from tests.fused_recurrent_cases import rel_err

CHECKED = ("chunk_delta_bwd_state", "chunk_delta_bwd_dqkw", "chunk_delta_bwd_wy")


def _rows(x, t0, t1, head):
    # tokens [t0, t1) of one head of a [B, T, heads, ...] tensor, in float64
    return x.reshape(-1, *x.shape[2:])[t0:t1, head].double()


def _host(*xs):
    # the kernels' arguments on the CPU, once per transcription (None and numbers pass through)
    return [x.cpu() if isinstance(x, torch.Tensor) else x for x in xs]


def _round(x, dtype):
    # the kernel's .to(16-bit) before a product (float32 inputs: none)
    return x.to(dtype).double()


def _programs(chunks, HV, H):
    for c, (_, t0, t1, _) in enumerate(chunks.tolist()):
        for hv in range(HV):
            yield c, hv, hv // (HV // H), t0, t1


def _decay(G, strict):
    n = G.shape[0]
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    keep = (i > j) if strict else (i >= j)
    return torch.where(keep, torch.exp(torch.where(keep, G[:, None] - G[None, :], 0.)), 0.)


def bwd_state(q, k, w, gcum, do, dv_local, dht, seqs, chunks, scale, state_v_first, output_dh0, *_slicing):
    """(dstates, dv_new, dh0) as chunk_delta_bwd_state computes them, in float64 (the V slicing does not change
    them)."""
    q, k, w, gcum, do, dv_local, dht, seqs, chunks = _host(q, k, w, gcum, do, dv_local, dht, seqs, chunks)
    H, HV, K, V = q.shape[2], do.shape[2], q.shape[3], do.shape[3]
    dt = q.dtype
    dstates = torch.zeros((chunks.shape[0], HV, K, V), dtype=torch.float64)
    dv_new = torch.zeros(do.shape, dtype=torch.float64)
    dh0 = torch.zeros((seqs.shape[0], HV, V, K) if state_v_first else (seqs.shape[0], HV, K, V), dtype=torch.float64)
    for n, (_, bos, eos, c0) in enumerate(seqs.tolist()):
        for hv in range(HV):
            h = hv // (HV // H)
            dh = torch.zeros(K, V, dtype=torch.float64)
            if dht is not None:
                dh = dht[n, hv].double()
                dh = dh.T if state_v_first else dh
            nt = -(-(eos - bos) // 64)
            for i_c in reversed(range(nt)):
                t0, t1 = bos + i_c * 64, min(bos + (i_c + 1) * 64, eos)
                dstates[c0 + i_c, hv] = dh
                G = _rows(gcum, t0, t1, hv)
                GL = G[-1]
                Q, Kk = _rows(q, t0, t1, h), _rows(k, t0, t1, h)
                W, DO, DVL = (_rows(x, t0, t1, hv) for x in (w, do, dv_local))
                qdo = Q.T @ _round(DO * (torch.exp(G) * scale)[:, None], dt)
                dvn = DVL + (Kk @ _round(dh, dt)) * torch.exp(GL - G)[:, None]
                dv_new.view(-1, HV, V)[t0:t1, hv] = dvn
                dh = dh * torch.exp(GL) + qdo - W.T @ _round(dvn, dt)
            if output_dh0:
                dh0[n, hv] = dh.T if state_v_first else dh
    return dstates, dv_new, dh0 if output_dh0 else None


def dqkw(q, k, v_new, gcum, do, dv_new, states, dstates, chunks, scale):
    """(dq, dk, dw, dG) as chunk_delta_bwd_dqkw computes them, in float64."""
    q, k, v_new, gcum, do, dv_new, states, dstates, chunks = _host(q, k, v_new, gcum, do, dv_new, states, dstates,
                                                                  chunks)
    H, HV = q.shape[2], v_new.shape[2]
    dt = q.dtype
    shape_k = (*v_new.shape[:3], q.shape[3])
    dq, dk, dw = (torch.zeros(shape_k, dtype=torch.float64) for _ in range(3))
    dG = torch.zeros(v_new.shape[:3], dtype=torch.float64)
    for c, hv, h, t0, t1 in _programs(chunks, HV, H):
        Q, Kk = _rows(q, t0, t1, h), _rows(k, t0, t1, h)
        VN, DO, DVN = (_rows(x, t0, t1, hv) for x in (v_new, do, dv_new))
        Hs, DH = states[c, hv].double(), dstates[c, hv].double()
        G = _rows(gcum, t0, t1, hv)
        GL = G[-1]
        b_dq = (DO @ Hs.T) * (torch.exp(G) * scale)[:, None]
        b_dk = (VN @ DH.T) * torch.exp(GL - G)[:, None]
        b_dw = _round(DVN, dt) @ Hs.T
        b_dG = (Q * b_dq - Kk * b_dk).sum(1)
        dGL = (Kk * b_dk).sum() + torch.exp(GL) * (Hs * DH).sum()
        ds = (DO @ VN.T) * _decay(G, strict=False) * scale
        b_dq = b_dq + _round(ds, dt) @ Kk
        b_dk = b_dk + _round(ds, dt).T @ Q
        m = ds * (Q @ Kk.T)
        b_dG = b_dG + m.sum(1) - m.sum(0)
        b_dG[-1] += dGL
        for out, x in ((dq, b_dq), (dk, b_dk), (dw, -b_dw)):
            out.view(-1, HV, out.shape[3])[t0:t1, hv] = x
        dG.view(-1, HV)[t0:t1, hv] = b_dG
    return dq, dk, dw, dG


def wy(k, v, beta, gcum, Ai, dw, dv_new, dk_state, dG, chunks):
    """(dk, dv, dbeta, dg) as chunk_delta_bwd_wy computes them, in float64."""
    k, v, beta, gcum, Ai, dw, dv_new, dk_state, dG, chunks = _host(k, v, beta, gcum, Ai, dw, dv_new, dk_state, dG,
                                                                   chunks)
    H, HV = k.shape[2], v.shape[2]
    dt = k.dtype
    dk = torch.zeros((*v.shape[:3], k.shape[3]), dtype=torch.float64)
    dv = torch.zeros(v.shape, dtype=torch.float64)
    dbeta, dg = (torch.zeros(v.shape[:3], dtype=torch.float64) for _ in range(2))
    for c, hv, h, t0, t1 in _programs(chunks, HV, H):
        n = t1 - t0
        Kk, Vv = _rows(k, t0, t1, h), _rows(v, t0, t1, hv)
        DW, DU, DKS = (_rows(x, t0, t1, hv) for x in (dw, dv_new, dk_state))
        b, G = _rows(beta, t0, t1, hv), _rows(gcum, t0, t1, hv)
        eG = torch.exp(G)
        Tt = _round(_rows(Ai, t0, t1, hv)[:, :n].T, dt)
        DWr, DUr = _round(DW, dt), _round(DU, dt)
        dT = DWr @ _round(Kk * (b * eG)[:, None], dt).T + DUr @ _round(Vv * b[:, None], dt).T
        dA = -(_round(Tt @ _round(dT, dt), dt) @ Tt) * _decay(G, strict=True)
        kk = Kk @ Kk.T
        b_dbeta = (dA * kk).sum(1)
        dkk = dA * b[:, None]
        z = dkk * kk
        b_dG = z.sum(1) - z.sum(0)
        dkb = Tt @ DWr
        b_dk = dkb * (b * eG)[:, None] + _round(dkk, dt) @ Kk + _round(dkk.T, dt) @ Kk + DKS
        t = (dkb * Kk).sum(1) * eG
        b_dbeta = b_dbeta + t
        b_dG = b_dG + t * b
        dvb = Tt @ DUr
        b_dbeta = b_dbeta + (dvb * Vv).sum(1)
        b_dG = b_dG + _rows(dG, t0, t1, hv)
        dk.view(-1, HV, dk.shape[3])[t0:t1, hv] = b_dk
        dv.view(-1, HV, dv.shape[3])[t0:t1, hv] = dvb * b[:, None]
        dbeta.view(-1, HV)[t0:t1, hv] = b_dbeta
        dg.view(-1, HV)[t0:t1, hv] = b_dG.flip(0).cumsum(0).flip(0)
    return dk, dv, dbeta, dg


REFERENCES = {"chunk_delta_bwd_state": (bwd_state, ("dstates", "dv_new", "dh0")),
              "chunk_delta_bwd_dqkw": (dqkw, ("dq", "dk", "dw", "dG")),
              "chunk_delta_bwd_wy": (wy, ("dk", "dv", "dbeta", "dg"))}


def record_backward(run):
    """Calls run() (a forward + backward) with the checked kernels' arguments and outputs recorded: {name: (args,
    outputs)} of each one's last call. The ops are put back afterwards."""
    calls, ops = {}, {name: chunk_delta._ops[name] for name in CHECKED}

    def recording(name):
        def run_op(*args):
            out = ops[name](*args)
            calls[name] = (args, out)
            return out
        return run_op
    chunk_delta._ops.update({name: recording(name) for name in CHECKED})
    try:
        run()
    finally:
        chunk_delta._ops.update(ops)
    return calls


def compare(calls):
    """{kernel: {output: relative error against the transcription rounded to the output's dtype}}; NaN where an
    output holds a non-finite value."""
    errs = {}
    for name, (args, outs) in calls.items():
        ref_fn, names = REFERENCES[name]
        refs = ref_fn(*args)
        errs[name] = {n: (rel_err(o, r.to(o.dtype)) if torch.isfinite(o).all() else float("nan"))
                      for n, o, r in zip(names, outs, refs) if r is not None}
    return errs
