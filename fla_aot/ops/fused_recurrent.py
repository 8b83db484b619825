"""Recurrent (token-by-token) ops: decoding and short prompts. Same signatures as fla.ops.

All six are one kernel (triton_src/fused_recurrent.py) served by the manifest op
`torch.ops.fla_aot.fused_recurrent_fwd`; CPU tensors run fla_aot.reference.fused_recurrent_reference
(differentiable by autograd). On CUDA the linear family (all but the delta rules) has a compiled
backward (`fused_recurrent_bwd`); the delta rules, when a gradient is needed, run as the chunk form
(fla_aot.ops.chunk_delta: same recurrence, with a backward) for float16/bfloat16 inputs without gk/gv; otherwise
their backward raises NotImplementedError.
Shapes: q, k [B, T, H, K]; v [B, T, HV, V] (HV = H except for the delta rules' grouped value heads);
g, beta [B, T, HV]; gk [B, T, HV, K]; gv [B, T, HV, V]; states [N, HV, K, V] float32
([N, HV, V, K] with state_v_first), N = B or the number of sequences in cu_seqlens.
"""
import torch

from fla_aot._manifest_rules import check_args
from fla_aot._registry import MANIFEST, OPS
from fla_aot.ops.utils import check_cu_seqlens, check_kwargs, gated_delta_gate
from fla_aot.reference import fused_recurrent_reference

_ENTRY = MANIFEST["ops"]["fused_recurrent_fwd"]
_run_fused_recurrent_fwd = OPS["fused_recurrent_fwd"]
_run_fused_recurrent_bwd = OPS["fused_recurrent_bwd"]
_CHUNK_DTYPES = (torch.float16, torch.bfloat16)


def _suffix_sums(x, reverse, bounds):
    """Sums of x [B, T, ...] over the rest of each sequence, in processing order (reverse: t down to 0)."""
    def one(seg):
        return seg.cumsum(1) if reverse else seg.flip(1).cumsum(1).flip(1)
    if bounds is None:
        return one(x)
    out = torch.empty_like(x)
    for bos, eos in zip(bounds[:-1], bounds[1:]):
        out[:, bos:eos] = one(x[:, bos:eos])
    return out


def _per_step(f, T, bounds):
    """A per-sequence value f [N, ...] at every step of its sequence: [B, T, ...]."""
    if bounds is None:
        return f[:, None].expand(f.shape[0], T, *f.shape[1:])
    lengths = torch.tensor([e - b for b, e in zip(bounds[:-1], bounds[1:])], device=f.device)
    return f.repeat_interleave(lengths, dim=0, output_size=T)[None]


def _gate_grads(q, k, v, o, do, dq, dk, dv, ht, dht, g, gk, gv, reverse, state_v_first, bounds):
    """Gradients of the log gates. With G the running sum of the gates, S_t is scaled by exp(G_t) and the
    inputs enter as k_s exp(-G_s), so dL/dG_t = q_t dq_t - k_t dk_t (+ o_t do_t - v_t dv_t for the
    value gate) plus, through the final state, S_T dht; each gate gets the sum over the steps it reaches."""
    T, HV = v.shape[1], v.shape[2]
    acc = torch.float64 if v.dtype == torch.float64 else torch.float32
    dg = dgk = dgv = None
    final = None if dht is None else ht * dht  # [N, HV, K, V] (or [N, HV, V, K])
    if g is not None or gk is not None:
        group = HV // q.shape[2]
        qe, ke = q.to(acc).repeat_interleave(group, 2), k.to(acc).repeat_interleave(group, 2)
        d = _suffix_sums(qe * dq - ke * dk, reverse, bounds)
        if final is not None:
            d = d + _per_step(final.sum(-2 if state_v_first else -1), T, bounds)
        dgk = None if gk is None else d.to(gk.dtype)
        dg = None if g is None else d.sum(-1).to(g.dtype)
    if gv is not None:
        d = _suffix_sums(o.to(acc) * do.to(acc) - v.to(acc) * dv, reverse, bounds)
        if final is not None:
            d = d + _per_step(final.sum(-1 if state_v_first else -2), T, bounds)
        dgv = d.to(gv.dtype)
    return dg, dgk, dgv


class _LinearRecurrence(torch.autograd.Function):
    """The linear family (no delta rule) on CUDA, with the compiled backward (fused_recurrent_bwd)."""

    @staticmethod
    def forward(ctx, q, k, v, g, g_gamma, gk, gv, initial_state, cu_seqlens, scale, reverse, state_v_first, bounds):
        o, ht = _run_fused_recurrent_fwd(q, k, v, g, g_gamma, gk, gv, None, initial_state, cu_seqlens, scale, True,
                                         reverse, False, False, False, state_v_first, False)
        ctx.save_for_backward(q, k, v, g, g_gamma, gk, gv, initial_state, cu_seqlens, o, ht)
        ctx.args = (scale, reverse, state_v_first, bounds)
        ctx.set_materialize_grads(False)
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, g_gamma, gk, gv, initial_state, cu_seqlens, o, ht = ctx.saved_tensors
        scale, reverse, state_v_first, bounds = ctx.args
        do = torch.zeros_like(o) if do is None else do.to(o.dtype)
        dq, dk, dv, dh0 = _run_fused_recurrent_bwd(q, k, v, g, g_gamma, gk, gv, initial_state, do, dht, cu_seqlens,
                                                   scale, reverse, state_v_first)
        dg, dgk, dgv = _gate_grads(q, k, v, o, do, dq, dk, dv, ht, dht, g, gk, gv, reverse, state_v_first, bounds)
        B, T, H, K = q.shape
        if v.shape[2] != H:  # grouped value heads share q, k
            dq, dk = (x.view(B, T, H, -1, K).sum(3) for x in (dq, dk))
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dg, None, dgk, dgv,
                None if initial_state is None else dh0, None, None, None, None, None)


def _fused_recurrent(op, q, k, v, g, g_gamma, gk, gv, beta, scale, initial_state, output_final_state, reverse,
                     use_qk_l2norm, beta_sigmoid, allow_neg_eigval, state_v_first, cu_seqlens, cu_seqlens_cpu,
                     delta_rule):
    # Positional and branch-light: this is the per-token path of decoding.
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"{op}: q must be a tensor [B, T, H, K], got {type(q).__name__}")
    if scale is None:
        scale = q.shape[-1] ** -0.5
    cu_host = None
    if cu_seqlens is not None:
        cu_seqlens, cu_host = check_cu_seqlens(op, cu_seqlens, q.shape[1] if q.dim() == 4 else -1, cu_seqlens_cpu)
    args = (q, k, v, g, g_gamma, gk, gv, beta, initial_state, cu_seqlens, float(scale), bool(output_final_state),
            bool(reverse), bool(use_qk_l2norm), bool(beta_sigmoid), bool(allow_neg_eigval), bool(state_v_first),
            delta_rule)
    if q.is_cuda:
        if (delta_rule and gk is None and gv is None and q.dtype in _CHUNK_DTYPES and torch.is_grad_enabled()
                and any(x is not None and x.requires_grad for x in (q, k, v, g, beta, initial_state))):
            # training: the chunk form computes the same recurrence, and has a backward
            from fla_aot.ops.chunk_delta import chunk_delta  # (imports this module)
            if beta is None:
                beta = torch.ones(v.shape[:3], dtype=q.dtype, device=q.device)
            return chunk_delta(op, q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm,
                               beta_sigmoid, allow_neg_eigval, state_v_first, cu_seqlens, cu_host, g is not None)
        if not delta_rule and torch.is_grad_enabled() and any(
                x is not None and x.requires_grad for x in (q, k, v, g, gk, gv, initial_state)):
            # the host copy the checks read; made here only if they were skipped (capture, tracing)
            bounds = None if cu_seqlens is None else (cu_host if cu_host is not None else cu_seqlens.cpu()).tolist()
            o, final_state = _LinearRecurrence.apply(q, k, v, g, g_gamma, gk, gv, initial_state, cu_seqlens,
                                                     float(scale), bool(reverse), bool(state_v_first), bounds)
        else:
            o, final_state = _run_fused_recurrent_fwd(*args)
    else:
        check_args(_ENTRY, args)
        o, final_state = fused_recurrent_reference(
            q, k, v, g=g, g_gamma=g_gamma, gk=gk, gv=gv, beta=beta, scale=scale, initial_state=initial_state,
            output_final_state=output_final_state, reverse=reverse, use_qk_l2norm=use_qk_l2norm,
            beta_sigmoid=beta_sigmoid, allow_neg_eigval=allow_neg_eigval, state_v_first=state_v_first,
            cu_seqlens=cu_seqlens, delta_rule=delta_rule)
    return o, (final_state if output_final_state else None)


def fused_recurrent_linear_attn(q, k, v, scale=None, initial_state=None, output_final_state=False, reverse=False,
                                normalize=False, cu_seqlens=None, **kwargs):
    """Linear attention, S_t = S_{t-1} + k_t^T v_t, o_t = scale * q_t S_t. Returns (o, final_state)."""
    op = "fused_recurrent_linear_attn"
    if kwargs:
        check_kwargs(op, kwargs)
    if normalize:
        raise NotImplementedError(f"{op}: normalize=True is not supported yet")
    return _fused_recurrent(op, q, k, v, None, None, None, None, None, scale, initial_state, output_final_state,
                            reverse, False, False, False, False, cu_seqlens, kwargs.get("cu_seqlens_cpu"), False)


def fused_recurrent_simple_gla(q, k, v, g=None, g_gamma=None, scale=None, initial_state=None,
                               output_final_state=False, reverse=False, state_v_first=False, cu_seqlens=None,
                               **kwargs):
    """Simple GLA, S_t = exp(g_t) S_{t-1} + k_t^T v_t with a scalar gate g [B, T, H] and/or a per-head
    constant g_gamma [H] (log space, <= 0). Returns (o, final_state)."""
    op = "fused_recurrent_simple_gla"
    if kwargs:
        check_kwargs(op, kwargs)
    if g_gamma is not None and g_gamma.dtype != torch.float32:
        g_gamma = g_gamma.float()
    return _fused_recurrent(op, q, k, v, g, g_gamma, None, None, None, scale, initial_state, output_final_state,
                            reverse, False, False, False, state_v_first, cu_seqlens, kwargs.get("cu_seqlens_cpu"), False)


_RETENTION_GAMMA = {}


def retention_log_decay(H, device):
    """RetNet's per-head decay, log(1 - 2^(-5 - h)), cached per (H, device)."""
    key = (H, str(device))
    if key not in _RETENTION_GAMMA:
        h = torch.arange(H, dtype=torch.float64)
        _RETENTION_GAMMA[key] = torch.log1p(-torch.pow(2.0, -5.0 - h)).float().to(device)
    return _RETENTION_GAMMA[key]


def fused_recurrent_retention(q, k, v, scale=None, initial_state=None, output_final_state=False, reverse=False,
                              state_v_first=False, cu_seqlens=None, **kwargs):
    """Retention (RetNet): simple GLA with g_gamma[h] = log(1 - 2^(-5-h)). Returns (o, final_state)."""
    op = "fused_recurrent_retention"
    if kwargs:
        check_kwargs(op, kwargs)
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise ValueError(f"{op}: q must be a tensor [B, T, H, K]")
    return _fused_recurrent(op, q, k, v, None, retention_log_decay(q.shape[2], q.device), None, None, None, scale,
                            initial_state, output_final_state, reverse, False, False, False, state_v_first,
                            cu_seqlens, kwargs.get("cu_seqlens_cpu"), False)


def fused_recurrent_gla(q, k, v, gk=None, gv=None, scale=None, initial_state=None, output_final_state=False,
                        reverse=False, state_v_first=False, cu_seqlens=None, **kwargs):
    """Gated linear attention, S_t = diag(exp(gk_t)) S_{t-1} diag(exp(gv_t)) + k_t^T v_t with
    gk [B, T, H, K] and/or gv [B, T, H, V] in log space. Returns (o, final_state)."""
    op = "fused_recurrent_gla"
    if kwargs:
        check_kwargs(op, kwargs)
    return _fused_recurrent(op, q, k, v, None, None, gk, gv, None, scale, initial_state, output_final_state, reverse,
                            False, False, False, state_v_first, cu_seqlens, kwargs.get("cu_seqlens_cpu"), False)


def fused_recurrent_delta_rule(q, k, v, beta=None, scale=None, initial_state=None, output_final_state=False,
                               use_qk_l2norm_in_kernel=False, cu_seqlens=None, **kwargs):
    """Delta rule, S_t = S_{t-1} + beta_t k_t^T (v_t - k_t S_{t-1}); beta [B, T, HV] defaults to ones.
    Returns (o, final_state)."""
    op = "fused_recurrent_delta_rule"
    if kwargs:
        check_kwargs(op, kwargs)
    return _fused_recurrent(op, q, k, v, None, None, None, None, beta, scale, initial_state, output_final_state,
                            False, use_qk_l2norm_in_kernel, False, False, False, cu_seqlens,
                            kwargs.get("cu_seqlens_cpu"), True)


def fused_recurrent_gated_delta_rule(q, k, v, g=None, gk=None, gv=None, beta=None, scale=None, initial_state=None,
                                     output_final_state=False, use_qk_l2norm_in_kernel=False,
                                     use_gate_in_kernel=False, A_log=None, dt_bias=None,
                                     use_beta_sigmoid_in_kernel=False, allow_neg_eigval=False, state_v_first=False,
                                     cu_seqlens=None, **kwargs):
    """Gated delta rule, S' = exp(g_t) S_{t-1}; S_t = S' + beta_t k_t^T (v_t - k_t S'), with optional
    key/value gates gk, gv; grouped value heads (v [B, T, HV, V], HV a multiple of H).
    use_beta_sigmoid_in_kernel applies sigmoid to beta, allow_neg_eigval doubles it (range (0, 2)).
    use_gate_in_kernel takes g as the raw gate input: the decay is -exp(A_log) * softplus(g + dt_bias).
    Returns (o, final_state)."""
    op = "fused_recurrent_gated_delta_rule"
    if kwargs:
        check_kwargs(op, kwargs)
    if use_gate_in_kernel:  # else fla ignores A_log and dt_bias
        g = gated_delta_gate(op, g, A_log, dt_bias)
    return _fused_recurrent(op, q, k, v, g, None, gk, gv, beta, scale, initial_state, output_final_state, False,
                            use_qk_l2norm_in_kernel, use_beta_sigmoid_in_kernel, allow_neg_eigval, state_v_first,
                            cu_seqlens, kwargs.get("cu_seqlens_cpu"), True)

