"""Chunked (prefill and training) ops of the delta-rule family: chunk_delta_rule and chunk_gated_delta_rule, same
signatures as fla.ops.

Both are one computation (triton_src/chunk_delta.py, WY representation in chunks of 64 tokens), forward and
backward; the plain delta rule runs it without a gate. The forward saves the inputs and each chunk's T = (I + A)^-1
(float32, [B, T, HV, 64]); the backward reruns the state pass, then takes the gradients per chunk around a
reversed state pass. q and k L2-normalised in
the op (use_qk_l2norm_in_kernel), beta's sigmoid and doubling (use_beta_sigmoid_in_kernel, allow_neg_eigval) are
torch ops around the kernels, differentiated by autograd. The same autograd function gives the recurrent delta
rules (fla_aot.ops.fused_recurrent) their backward. CPU tensors run the reference.
"""
import torch

from fla_aot._registry import OPS
from fla_aot.ops.chunk import _tables, sm_count
from fla_aot.ops.utils import Concurrent, check_cu_seqlens, check_kwargs, gated_delta_gate
from fla_aot.reference import fused_recurrent_reference

_KERNEL_DTYPES = (torch.float16, torch.bfloat16)
_FLOAT = (torch.float16, torch.bfloat16, torch.float32)
_MAX_HEAD_DIM = 256  # the largest K bucket of triton_src/chunk_delta.py

# the manifest ops these ops run, by name (tests swap them for Triton launches)
_ops = {name: OPS[name] for name in ("chunk_delta_solve", "chunk_delta_wu", "chunk_delta_state", "chunk_delta_fwd_o",
                                     "chunk_delta_bwd_dv_local", "chunk_delta_bwd_state", "chunk_delta_bwd_dqkw",
                                     "chunk_delta_bwd_wy")}


def _slicing(tabs, v):
    """(narrow, narrowest): how narrow the V slices of the state passes should be. Sequences x heads in slices of
    64 that leave SMs idle take slices of 32, or of 16 when even those would give fewer programs than half the
    SMs (triton_src/chunk_delta.py, _state_config)."""
    if not v.is_cuda:
        return False, False
    programs = len(tabs.lengths) * v.shape[2] * -(-v.shape[3] // 64)
    sms = sm_count(v.device)
    return programs < sms, 2 * programs < sms // 2


def _state_pass(k, w, u, gcum, initial_state, tabs, state_v_first, output_final_state, slicing):
    """The chunk-to-chunk pass: (the states at chunk starts, v_new, the final state); slicing: _slicing(tabs, v)."""
    return _ops["chunk_delta_state"](k, w, u, gcum, initial_state, tabs.segments, tabs.chunks, state_v_first,
                                     output_final_state, *slicing)


class ChunkDeltaFunction(torch.autograd.Function):
    """q, k [B, T, H, K], v [B, T, HV, V], beta and g (or None) [B, T, HV], all contiguous, q/k/v 16-bit; tabs:
    fla_aot.ops.chunk._tables(..., split=False)."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, initial_state, scale, state_v_first, output_final_state, tabs):
        Ai, gcum = _ops["chunk_delta_solve"](k, beta, g, tabs.chunks)
        w, u = _ops["chunk_delta_wu"](k, v, beta, gcum, Ai, tabs.chunks)
        states, v_new, ht = _state_pass(k, w, u, gcum, initial_state, tabs, state_v_first, output_final_state,
                                        _slicing(tabs, v))
        (o,) = _ops["chunk_delta_fwd_o"](q, k, v_new, gcum, states, tabs.chunks, scale)
        ctx.save_for_backward(q, k, v, g, beta, initial_state, Ai, gcum)
        ctx.args = (scale, state_v_first, tabs)
        ctx.set_materialize_grads(False)
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, beta, initial_state, Ai, gcum = ctx.saved_tensors
        scale, state_v_first, tabs = ctx.args
        do = torch.zeros_like(v) if do is None else do.to(v.dtype).contiguous()
        dht = None if dht is None else dht.float().contiguous()
        w, u = _ops["chunk_delta_wu"](k, v, beta, gcum, Ai, tabs.chunks)
        slicing = _slicing(tabs, v)  # both state passes slice V alike
        # the reversed state pass needs w but not the states: the forward's rerun goes beside it (both are chains of
        # dependent chunks that leave most of each SM idle)
        with Concurrent(q.device) as side:
            states, v_new, _ = side(_state_pass, k, w, u, gcum, initial_state, tabs, state_v_first, False, slicing)
            (dv_local,) = _ops["chunk_delta_bwd_dv_local"](q, k, gcum, do, tabs.chunks, scale)
            dstates, dv_new, dh0 = _ops["chunk_delta_bwd_state"](q, k, w, gcum, do, dv_local, dht, tabs.segments,
                                                                 tabs.chunks, scale, state_v_first,
                                                                 initial_state is not None, *slicing)
        dq, dk_state, dw, dG = _ops["chunk_delta_bwd_dqkw"](q, k, v_new, gcum, do, dv_new, states, dstates,
                                                            tabs.chunks, scale)
        dk, dv, dbeta, dg = _ops["chunk_delta_bwd_wy"](k, v, beta, gcum, Ai, dw, dv_new, dk_state, dG, tabs.chunks)
        B, T, H, K = q.shape
        group = v.shape[2] // H
        if group > 1:  # value heads sharing a query/key head (torch sums 16-bit tensors in float32)
            dq, dk = dq.view(B, T, H, group, K).sum(3), dk.view(B, T, H, group, K).sum(3)
        return (dq, dk, dv, None if g is None else dg.to(g.dtype), dbeta.to(beta.dtype),
                dh0 if initial_state is not None else None, None, None, None, None)


def _l2norm(x):
    xf = x.float()
    return (xf * torch.rsqrt((xf * xf).sum(-1, keepdim=True) + 1e-6)).to(x.dtype)


def _check(op, q, k, v, g, beta, initial_state, state_v_first, N, gated):
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise ValueError(f"{op}: q must be a tensor [B, T, H, K]")
    B, T, H, K = q.shape
    if not isinstance(k, torch.Tensor) or tuple(k.shape) != (B, T, H, K):
        raise ValueError(f"{op}: k must have the shape of q, {[B, T, H, K]}, got "
                         f"{list(k.shape) if isinstance(k, torch.Tensor) else type(k).__name__}")
    if not isinstance(v, torch.Tensor) or v.dim() != 4 or tuple(v.shape[:2]) != (B, T) or v.shape[2] % H:
        raise ValueError(f"{op}: v must have shape [B, T, HV, V] = [{B}, {T}, HV, V] with HV a multiple of H={H}, got "
                         f"{list(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__}")
    HV, V = v.shape[2], v.shape[3]
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dtype not in _FLOAT:
            raise TypeError(f"{op}: {name} must be float16, bfloat16 or float32, got {x.dtype}")
        if x.dtype != q.dtype:
            raise TypeError(f"{op}: q, k and v must have one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
        if x.device != q.device:
            raise ValueError(f"{op}: q, k, v must be on one device, got {q.device} and {x.device}")
    if q.is_cuda and K > _MAX_HEAD_DIM:
        raise ValueError(f"{op}: head dim K={K} is larger than the compiled kernels take ({_MAX_HEAD_DIM})")
    if q.is_cuda and q.dtype not in _KERNEL_DTYPES:
        raise TypeError(f"{op}: on CUDA q, k, v must be float16 or bfloat16 (the WY products run on the tensor "
                        f"cores), got {q.dtype}; cast them, or run on the CPU reference")
    for name, x, required in (("g", g, gated), ("beta", beta, True)):
        if x is None:
            if required:
                raise ValueError(f"{op}: {name} [B, T, HV] = {[B, T, HV]} is required")
            continue
        if not isinstance(x, torch.Tensor) or tuple(x.shape) != (B, T, HV):
            raise ValueError(f"{op}: {name} must have shape [B, T, HV] = {[B, T, HV]}, got "
                             f"{list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if x.dtype not in _FLOAT:
            raise TypeError(f"{op}: {name} must be a float tensor, got {x.dtype}")
        if x.device != q.device:
            raise ValueError(f"{op}: {name} must be on {q.device}, got {x.device}")
    if initial_state is not None:
        want = (N, HV, V, K) if state_v_first else (N, HV, K, V)
        if not isinstance(initial_state, torch.Tensor) or tuple(initial_state.shape) != want:
            raise ValueError(f"{op}: initial_state must have shape {list(want)} ([N, HV, "
                             f"{'V, K' if state_v_first else 'K, V'}], N = {'number of sequences' if N != B else 'batch'})"
                             f", got {list(initial_state.shape) if isinstance(initial_state, torch.Tensor) else type(initial_state).__name__}")
        if not initial_state.is_floating_point():
            raise TypeError(f"{op}: initial_state must be a float tensor, got {initial_state.dtype}")
        if initial_state.device != q.device:
            raise ValueError(f"{op}: initial_state must be on {q.device}, got {initial_state.device}")


def chunk_delta(op, q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm, beta_sigmoid,
                allow_neg_eigval, state_v_first, cu_seqlens, cu_seqlens_cpu, gated):
    """The delta rules in chunks (g None: the plain delta rule). Returns (o, final_state or None)."""
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise ValueError(f"{op}: q must be a tensor [B, T, H, K]")
    B, T, H, K = q.shape
    cu_host = None
    if cu_seqlens is not None:
        if B != 1:
            raise ValueError(f"{op}: with cu_seqlens the batch size must be 1 (sequences concatenated along T), "
                             f"got B={B}")
        cu_seqlens, cu_host = check_cu_seqlens(op, cu_seqlens, T, cu_seqlens_cpu)
        N = cu_seqlens.numel() - 1
    else:
        N = B
    _check(op, q, k, v, g, beta, initial_state, state_v_first, N, gated)
    if scale is None:
        scale = K ** -0.5
    if initial_state is not None and initial_state.dtype != torch.float32:
        initial_state = initial_state.float()
    if not q.is_cuda:
        return fused_recurrent_reference(q, k, v, g=g, beta=beta, scale=scale, initial_state=initial_state,
                                         output_final_state=output_final_state, use_qk_l2norm=use_qk_l2norm,
                                         beta_sigmoid=beta_sigmoid, allow_neg_eigval=allow_neg_eigval,
                                         state_v_first=state_v_first, cu_seqlens=cu_seqlens, delta_rule=True)
    if cu_seqlens is not None:
        if cu_host is None:
            raise ValueError(f"{op}: while a CUDA graph is captured, pass cu_seqlens_cpu (the kernels' chunk tables "
                             f"are built from the host copy)")
        bounds = [int(b) for b in cu_host.tolist()]
        lengths = tuple(e - b for b, e in zip(bounds[:-1], bounds[1:]))
    else:
        lengths = (T,) * B
    tabs = _tables(lengths, v.shape[2], q.device, split=False)
    if use_qk_l2norm:
        q, k = _l2norm(q), _l2norm(k)
    if beta_sigmoid:
        beta = torch.sigmoid(beta)
    if allow_neg_eigval:
        beta = beta * 2
    q, k, v, beta = q.contiguous(), k.contiguous(), v.contiguous(), beta.contiguous()
    g = None if g is None else g.contiguous()
    initial_state = None if initial_state is None else initial_state.contiguous()
    o, ht = ChunkDeltaFunction.apply(q, k, v, g, beta, initial_state, float(scale), bool(state_v_first),
                                     bool(output_final_state), tabs)
    return o, (ht if output_final_state else None)


def chunk_delta_rule(q, k, v, beta, scale=None, initial_state=None, output_final_state=False,
                     use_qk_l2norm_in_kernel=False, cu_seqlens=None, cu_seqlens_cpu=None, **kwargs):
    """Delta rule in chunks: S_t = S_{t-1} + beta_t k_t^T (v_t - k_t S_{t-1}), o_t = scale * q_t S_t; beta
    [B, T, HV]. Returns (o, final_state)."""
    op = "chunk_delta_rule"
    if kwargs:
        check_kwargs(op, kwargs)
    return chunk_delta(op, q, k, v, None, beta, scale, initial_state, output_final_state, use_qk_l2norm_in_kernel,
                       False, False, False, cu_seqlens, cu_seqlens_cpu, False)


def chunk_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                           use_qk_l2norm_in_kernel=False, use_beta_sigmoid_in_kernel=False, allow_neg_eigval=False,
                           state_v_first=False, cu_seqlens=None, cu_seqlens_cpu=None, chunk_indices=None,
                           cp_context=None, **kwargs):
    """Gated delta rule in chunks: S' = exp(g_t) S_{t-1}; S_t = S' + beta_t k_t^T (v_t - k_t S'); g, beta
    [B, T, HV] (grouped value heads: v [B, T, HV, V], HV a multiple of H). use_beta_sigmoid_in_kernel applies
    sigmoid to beta, allow_neg_eigval doubles it; use_gate_in_kernel=True (with A_log [HV] and optional dt_bias [HV],
    through **kwargs as in fla) takes g as the raw gate: the decay is -exp(A_log) * softplus(g + dt_bias). chunk_indices (fla's precomputed chunk list) is not needed:
    the chunk tables come from cu_seqlens. Returns (o, final_state)."""
    op = "chunk_gated_delta_rule"
    if kwargs.pop("use_gate_in_kernel", False):  # fla's options taken through **kwargs
        g = gated_delta_gate(op, g, kwargs.pop("A_log", None), kwargs.pop("dt_bias", None))
    else:
        kwargs.pop("A_log", None), kwargs.pop("dt_bias", None)
    if kwargs:
        check_kwargs(op, kwargs)
    if cp_context is not None:
        raise NotImplementedError(f"{op}: context parallelism (cp_context) is not supported")
    return chunk_delta(op, q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm_in_kernel,
                       use_beta_sigmoid_in_kernel, allow_neg_eigval, state_v_first, cu_seqlens, cu_seqlens_cpu, True)
