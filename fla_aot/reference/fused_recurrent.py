"""The recurrent form, token by token, in float32 (float64 when given float64 inputs).

Per sequence and value head, with row vectors q_t, k_t in R^K and v_t in R^V and state S in R^{K x V}:

    S <- exp(g_t) * exp(g_gamma) * diag(exp(gk_t)) S diag(exp(gv_t))     (each factor when given)
    S <- S + k_t^T v_t                                                    (linear family)
    S <- S + beta_t k_t^T (v_t - k_t S)                                   (delta rule)
    o_t = scale * q_t S
"""
import torch


def _sequences(T, B, cu_seqlens):
    """(batch index, start, end) of each independent sequence."""
    if cu_seqlens is None:
        return [(b, 0, T) for b in range(B)]
    bounds = cu_seqlens.tolist()
    return [(0, bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]


def fused_recurrent_reference(q, k, v, g=None, g_gamma=None, gk=None, gv=None, beta=None, scale=None,
                              initial_state=None, output_final_state=False, reverse=False, use_qk_l2norm=False,
                              beta_sigmoid=False, allow_neg_eigval=False, state_v_first=False, cu_seqlens=None,
                              delta_rule=False):
    """q, k: [B, T, H, K]; v: [B, T, HV, V]; g, beta: [B, T, HV]; g_gamma: [HV]; gk: [B, T, HV, K];
    gv: [B, T, HV, V]; initial_state: [N, HV, K, V] ([N, HV, V, K] with state_v_first).

    Returns o [B, T, HV, V] in v's dtype and the final state (float32, or float64 for float64 inputs)
    in initial_state's layout, or None unless output_final_state.
    """
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    out_dtype = v.dtype
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = K ** -0.5 if scale is None else scale

    def f(x):
        return None if x is None else x.to(acc)

    q, k, v, g, gk, gv, beta = map(f, (q, k, v, g, gk, gv, beta))
    q, k = q.repeat_interleave(HV // H, dim=2), k.repeat_interleave(HV // H, dim=2)
    if use_qk_l2norm:
        q = q / torch.sqrt((q * q).sum(-1, keepdim=True) + 1e-6)
        k = k / torch.sqrt((k * k).sum(-1, keepdim=True) + 1e-6)
    if beta is not None and beta_sigmoid:
        beta = torch.sigmoid(beta)
    decay_gamma = None if g_gamma is None else torch.exp(g_gamma.to(acc))[:, None, None]
    device = q.device
    # per-token views, split once: indexing x[b, t] at every step would make autograd add a gradient the size of
    # all of x per step (quadratic in T)
    q, k, v, g, gk, gv, beta = (None if x is None else [xb.unbind(0) for xb in x.unbind(0)]
                                for x in (q, k, v, g, gk, gv, beta))

    # each token's output, stacked at the end (written into one tensor in place, autograd would copy its whole
    # gradient at every step)
    zero = torch.zeros(HV, V, dtype=acc, device=device)
    rows = [[zero] * T for _ in range(B)]
    seqs = _sequences(T, B, cu_seqlens)
    finals = []
    for n, (b, bos, eos) in enumerate(seqs):
        S = torch.zeros(HV, K, V, dtype=acc, device=device)
        if initial_state is not None:
            h0 = initial_state[n].to(acc)
            S = S + (h0.transpose(-1, -2) if state_v_first else h0)
        steps = range(eos - 1, bos - 1, -1) if reverse else range(bos, eos)
        for t in steps:
            if g is not None:
                S = S * torch.exp(g[b][t])[:, None, None]
            if decay_gamma is not None:
                S = S * decay_gamma
            if gk is not None:
                S = S * torch.exp(gk[b][t])[:, :, None]
            if gv is not None:
                S = S * torch.exp(gv[b][t])[:, None, :]
            kt, vt = k[b][t], v[b][t]
            if delta_rule:
                bt = torch.ones(HV, dtype=acc, device=device) if beta is None else beta[b][t]
                if allow_neg_eigval:
                    bt = bt * 2
                vt = bt[:, None] * (vt - torch.einsum("hk,hkv->hv", kt, S))
            S = S + kt[:, :, None] * vt[:, None, :]
            rows[b][t] = scale * torch.einsum("hk,hkv->hv", q[b][t], S)
        finals.append(S.transpose(-1, -2) if state_v_first else S)
    o = torch.stack([torch.stack(r) for r in rows]) if T else torch.zeros(B, 0, HV, V, dtype=acc, device=device)
    final = None
    if output_final_state:
        final = torch.stack(finals) if finals else torch.zeros(0, HV, *((V, K) if state_v_first else (K, V)), dtype=acc)
    return o.to(out_dtype), final

