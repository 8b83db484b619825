"""Recurrent (token-by-token) ops: decoding and short prompts. Same signatures as fla.ops.

All six are one kernel (triton_src/fused_recurrent.py) served by the manifest op
`torch.ops.fla_aot.fused_recurrent_fwd`; CPU tensors run fla_aot.reference.fused_recurrent_reference.
Shapes: q, k [B, T, H, K]; v [B, T, HV, V] (HV = H except for the delta rules' grouped value heads);
g, beta [B, T, HV]; gk [B, T, HV, K]; gv [B, T, HV, V]; states [N, HV, K, V] float32
([N, HV, V, K] with state_v_first), N = B or the number of sequences in cu_seqlens.
"""
import torch

from fla_aot._manifest_rules import check_args
from fla_aot._registry import MANIFEST, OPS
from fla_aot.ops.utils import check_cu_seqlens, check_kwargs, forward_only
from fla_aot.reference import fused_recurrent_reference

_ENTRY = MANIFEST["ops"]["fused_recurrent_fwd"]
_run_fused_recurrent_fwd = OPS["fused_recurrent_fwd"]


def _fused_recurrent(op, q, k, v, g, g_gamma, gk, gv, beta, scale, initial_state, output_final_state, reverse,
                     use_qk_l2norm, beta_sigmoid, allow_neg_eigval, state_v_first, cu_seqlens, cu_seqlens_cpu,
                     delta_rule):
    # Positional and branch-light: this is the per-token path of decoding.
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"{op}: q must be a tensor [B, T, H, K], got {type(q).__name__}")
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if cu_seqlens is not None:
        cu_seqlens = check_cu_seqlens(op, cu_seqlens, q.shape[1] if q.dim() == 4 else -1, cu_seqlens_cpu)
    args = (q, k, v, g, g_gamma, gk, gv, beta, initial_state, cu_seqlens, float(scale), bool(output_final_state),
            bool(reverse), bool(use_qk_l2norm), bool(beta_sigmoid), bool(allow_neg_eigval), bool(state_v_first),
            delta_rule)
    if q.is_cuda:
        o, final_state = _run_fused_recurrent_fwd(*args)
    else:
        check_args(_ENTRY, args)
        o, final_state = fused_recurrent_reference(
            q, k, v, g=g, g_gamma=g_gamma, gk=gk, gv=gv, beta=beta, scale=scale, initial_state=initial_state,
            output_final_state=output_final_state, reverse=reverse, use_qk_l2norm=use_qk_l2norm,
            beta_sigmoid=beta_sigmoid, allow_neg_eigval=allow_neg_eigval, state_v_first=state_v_first,
            cu_seqlens=cu_seqlens, delta_rule=delta_rule)
        if final_state is None:
            final_state = o.new_empty(0, dtype=torch.float32)
        o, final_state = forward_only(op, (o, final_state), args)
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
    Returns (o, final_state)."""
    op = "fused_recurrent_gated_delta_rule"
    if kwargs:
        check_kwargs(op, kwargs)
    if use_gate_in_kernel or A_log is not None or dt_bias is not None:
        raise NotImplementedError(f"{op}: use_gate_in_kernel / A_log / dt_bias are not supported yet; "
                                  f"pass the gate g already computed")
    return _fused_recurrent(op, q, k, v, g, None, gk, gv, beta, scale, initial_state, output_final_state, False,
                            use_qk_l2norm_in_kernel, use_beta_sigmoid_in_kernel, allow_neg_eigval, state_v_first,
                            cu_seqlens, kwargs.get("cu_seqlens_cpu"), True)

