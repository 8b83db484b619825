"""Chunked (prefill and training) ops of the gated linear-attention family. Same signatures as fla.ops.

chunk_simple_gla, chunk_retention, chunk_linear_attn and chunk_gla are one computation (triton_src/chunk.py): a state
pass over chunks of 64 tokens, split into segments scanned in parallel when the batch alone would not fill
the GPU, with the outputs computed as the pass goes. The backward reruns the pass to get each chunk's state,
runs it in reverse for the state gradients, then takes dq, dk, dv per chunk, and the gate's gradient per chunk from
the same states (the sum over the chunk's later tokens and those after it, taken from the state at its end). GLA's
per-key gate shares the state pass but takes its outputs and gradients per chunk from the states, in kernels of its
own (triton_src/chunk_gla.py). In the backward the rerun of the pass overlaps the reverse one and dv on a second
stream (utils.Concurrent).
CPU tensors run the reference.
"""
from collections import OrderedDict

import torch

from fla_aot._registry import OPS
from fla_aot.ops.fused_recurrent import retention_log_decay
from fla_aot.ops.utils import Concurrent, check_cu_seqlens, check_kwargs
from fla_aot.reference import fused_recurrent_reference

CHUNK = 64
_FLOAT = (torch.float16, torch.bfloat16, torch.float32)
# the manifest ops these ops run, by name (tests and tools/tune_chunk.py swap them for Triton launches)
_ops = {name: OPS[name] for name in ("chunk_scan", "chunk_combine", "chunk_fixup", "chunk_bwd_dqk", "chunk_bwd_dv",
                                     "chunk_gla_scan", "chunk_gk_cumsum", "chunk_gla_intra", "chunk_gla_fwd_o",
                                     "chunk_gla_bwd_inter", "chunk_gla_bwd_intra", "chunk_gla_bwd_dv")}

# Split sequences into segments until (segments x heads) reaches this many per SM: the state pass then
# fills the GPU at batch 1. A segment costs one more read of its keys and values.
SEGMENTS_PER_SM = 1
MIN_SEGMENT_CHUNKS = 8
# A split pass's per-chunk states (without outputs), per scan kernel: "rescan" walks every segment again from its
# starting state; "correct" keeps the zero-start states of the first walk and adds the starting state, decayed, to
# each (chunk_fixup: a read and a write of the states instead of a second walk over k, v and the gates).
# tools/tune_chunk.py --fixup, H200, fwd+bwd ms at B2T8192 / B1T32768: GLA 3.093 / 6.041 rescan, 2.940 / 5.743
# correct; simple GLA (scalar gates, a cheap walk) 1.194 / 2.361 rescan, 1.249 / 2.486 correct.
SPLIT_FIXUP = {"chunk_scan": "rescan", "chunk_gla_scan": "correct"}


class _Tables:
    """Where the chunks and segments of a batch lie, as the kernels read them (int32 on the device):
    segments [S, 4] = (sequence, first token, end token, first chunk), chunks [C, 4] = (sequence, first token,
    end token, segment), seg_offsets [N + 1] = each sequence's first segment."""

    def __init__(self, lengths, seg_chunks, device):
        segments, chunks, seg_offsets = [], [], [0]
        bos = 0
        for n, length in enumerate(lengths):
            nt = -(-length // CHUNK)
            c0 = len(chunks)
            s0 = len(segments)
            chunks += [(n, bos + i * CHUNK, min(bos + (i + 1) * CHUNK, bos + length), s0 + i // seg_chunks)
                       for i in range(nt)]
            step = seg_chunks * CHUNK
            segments += [(n, bos + s * step, min(bos + (s + 1) * step, bos + length), c0 + s * seg_chunks)
                         for s in range(max(1, -(-nt // seg_chunks)))]
            seg_offsets.append(len(segments))
            bos += length
        as_int32 = dict(dtype=torch.int32, device=device)
        self.segments = torch.tensor(segments, **as_int32).view(-1, 4)
        self.chunks = torch.tensor(chunks, **as_int32).view(-1, 4)
        self.seg_offsets = torch.tensor(seg_offsets, **as_int32)
        self.single = len(segments) == len(lengths)  # one segment per sequence: no combine step
        self.lengths = lengths


_TABLES = OrderedDict()
_SM_COUNT = {}


def sm_count(device):
    if device.index not in _SM_COUNT:
        _SM_COUNT[device.index] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SM_COUNT[device.index]


def _segment_chunks(lengths, H, device):
    nts = [-(-L // CHUNK) for L in lengths]
    target = SEGMENTS_PER_SM * sm_count(device)
    if len(lengths) * H >= target:
        return max(nts + [1])
    return max(MIN_SEGMENT_CHUNKS, -(-sum(nts) * H // target))


def _tables(lengths, H, device, split=True):
    """Tables for this batch, cached (a few recent batch layouts per device). Without split, one segment per
    sequence (the delta rules' state passes: their chunk maps are K x K matrices, not a scalar decay)."""
    key = (lengths, H if split else None, device)
    tabs = _TABLES.get(key)
    if tabs is None:
        tabs = _Tables(lengths, _segment_chunks(lengths, H, device) if split else 1 << 30, device)
        _TABLES[key] = tabs
        if len(_TABLES) > 64:
            _TABLES.popitem(last=False)
    return tabs


def _scan(x, y, q, g, g_gamma, h0, tabs, scale, state_v_first, store_states, output_ht, reverse, gla):
    """The state pass over every chunk: returns (o, per-chunk states, final state). Forward: x = k, y = v, and
    o from q when given. reverse: x = q, y = do and h0 the final state's gradient; then "final" is the
    gradient of the initial state and the stored states are the gradients at each chunk's end."""
    write_o = q is not None
    scan_name = "chunk_gla_scan" if gla else "chunk_scan"
    scan = _ops[scan_name]
    if tabs.single:
        o, states, ht, _, _ = scan(x, y, q, g, g_gamma, h0, tabs.segments, tabs.chunks, scale, state_v_first,
                                   write_o, store_states, output_ht, reverse, False)
        return o, states, ht
    # split: each segment from a zero start, then every segment's starting state from the segments before it
    fixup = not write_o and SPLIT_FIXUP[scan_name] == "correct"
    _, local_states, local, decay, chunk_decay = scan(x, y, None, g, g_gamma, None, tabs.segments, tabs.chunks,
                                                      scale, False, False, store_states and fixup, True, reverse,
                                                      store_states and fixup)
    seg_init, ht = _ops["chunk_combine"](local, decay, h0, tabs.seg_offsets, state_v_first, output_ht, reverse)
    if fixup:
        states = _ops["chunk_fixup"](local_states, chunk_decay, seg_init, tabs.chunks)[0] if store_states else None
        return None, states, ht
    o, states, _, _, _ = scan(x, y, q, g, g_gamma, seg_init, tabs.segments, tabs.chunks, scale, False,
                              write_o, store_states, False, reverse, False)
    return o, states, ht


class _ChunkFunction(torch.autograd.Function):
    """g is a scalar gate [B, T, H] or, with gla, GLA's per-key gate [B, T, H, K]."""

    @staticmethod
    def forward(ctx, q, k, v, g, g_gamma, initial_state, scale, state_v_first, output_final_state, tabs, gla):
        if gla:
            gs, qg = _ops["chunk_gk_cumsum"](g, q, tabs.chunks)  # GLA's kernels read the gate summed per chunk
            _, states, ht = _scan(k, v, None, gs, None, initial_state, tabs, scale, state_v_first, True,
                                  output_final_state, False, True)
            (A,) = _ops["chunk_gla_intra"](q, k, gs, tabs.chunks, scale)
            (o,) = _ops["chunk_gla_fwd_o"](qg, v, states, A, tabs.chunks, scale)
        else:
            gs, A = g, None
            o, _, ht = _scan(k, v, q, g, g_gamma, initial_state, tabs, scale, state_v_first, False,
                             output_final_state, False, False)
        ctx.save_for_backward(q, k, v, g, gs, g_gamma, initial_state, A)
        ctx.args = (scale, state_v_first, tabs, gla)
        ctx.set_materialize_grads(False)
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, gs, g_gamma, initial_state, A = ctx.saved_tensors
        scale, state_v_first, tabs, gla = ctx.args
        do = torch.zeros_like(v) if do is None else do.to(v.dtype).contiguous()
        dht = None if dht is None else dht.float().contiguous()
        # the two passes are independent: the forward's rerun beside the reverse one and then dv (dstates alone)
        with Concurrent(q.device) as side:
            _, states, _ = side(_scan, k, v, None, gs, g_gamma, initial_state, tabs, scale, state_v_first, True,
                                False, False, gla)
            _, dstates, dh0 = _scan(q, do, None, gs, g_gamma, dht, tabs, scale, state_v_first, True,
                                    initial_state is not None, True, gla)
            if gla:
                (dv,) = _ops["chunk_gla_bwd_dv"](k, gs, do, dstates, A, tabs.chunks)
            else:
                (dv,) = _ops["chunk_bwd_dv"](q, k, g, g_gamma, do, dstates, tabs.chunks, scale)
        if gla:
            dq_inter, dk_inter, dA, dg_state = _ops["chunk_gla_bwd_inter"](v, gs, do, states, dstates, tabs.chunks,
                                                                          scale)
            dq, dk, dg = _ops["chunk_gla_bwd_intra"](q, k, gs, dA, dq_inter, dk_inter, dg_state, tabs.chunks)
        else:
            dq, dk, dg = _ops["chunk_bwd_dqk"](q, k, v, g, g_gamma, do, states, dstates, tabs.chunks, scale)
        dg = dg.to(g.dtype) if g is not None and ctx.needs_input_grad[3] else None
        return (dq, dk, dv, dg, None, (dh0 if initial_state is not None else None), None, None, None, None, None)


def _check(op, q, k, v, g, g_gamma, initial_state, state_v_first, N, gla):
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise ValueError(f"{op}: q must be a tensor [B, T, H, K]")
    B, T, H, K = q.shape
    for name, x, shape in (("k", k, (B, T, H, K)), ("v", v, (B, T, H) + tuple(v.shape[3:]))):
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or tuple(x.shape[:len(shape)]) != shape:
            raise ValueError(f"{op}: {name} must have shape {list(shape) if name == 'k' else [B, T, H, 'V']}, "
                             f"got {list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dtype not in _FLOAT:
            raise TypeError(f"{op}: {name} must be float16, bfloat16 or float32, got {x.dtype}")
        if x.dtype != q.dtype:
            raise TypeError(f"{op}: q, k and v must have one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
        if x.device != q.device:
            raise ValueError(f"{op}: q, k, v must be on one device, got {q.device} and {x.device}")
    V = v.shape[3]
    if gla and g is None:
        raise ValueError(f"{op}: g (the per-key gate [B, T, H, K]) is required")
    if g is not None:
        want = (B, T, H, K) if gla else (B, T, H)
        if not isinstance(g, torch.Tensor) or tuple(g.shape) != want:
            raise ValueError(f"{op}: g must have shape [B, T, H{', K' if gla else ''}] = {list(want)}, got "
                             f"{list(g.shape) if isinstance(g, torch.Tensor) else type(g).__name__}")
        if g.dtype not in _FLOAT:
            raise TypeError(f"{op}: g must be a float tensor, got {g.dtype}")
    if g_gamma is not None and (not isinstance(g_gamma, torch.Tensor) or tuple(g_gamma.shape) != (H,)):
        raise ValueError(f"{op}: g_gamma must have shape [H] = [{H}]")
    if initial_state is not None:
        want = (N, H, V, K) if state_v_first else (N, H, K, V)
        if not isinstance(initial_state, torch.Tensor) or tuple(initial_state.shape) != want:
            raise ValueError(f"{op}: initial_state must have shape {list(want)} ([N, H, {'V, K' if state_v_first else 'K, V'}]"
                             f", N = {'number of sequences' if N != B else 'batch'}), got "
                             f"{list(initial_state.shape) if isinstance(initial_state, torch.Tensor) else type(initial_state).__name__}")
        if not initial_state.is_floating_point():
            raise TypeError(f"{op}: initial_state must be a float tensor, got {initial_state.dtype}")
    for name, x in (("g", g), ("g_gamma", g_gamma), ("initial_state", initial_state)):
        if x is not None and x.device != q.device:
            raise ValueError(f"{op}: {name} must be on {q.device}, got {x.device}")


def _chunk(op, q, k, v, g, g_gamma, scale, initial_state, output_final_state, state_v_first, cu_seqlens,
           cu_seqlens_cpu, gla=False):
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
    _check(op, q, k, v, g, g_gamma, initial_state, state_v_first, N, gla)
    if scale is None:
        scale = K ** -0.5
    if g_gamma is not None and g_gamma.dtype != torch.float32:
        g_gamma = g_gamma.float()
    if initial_state is not None and initial_state.dtype != torch.float32:
        initial_state = initial_state.float()
    if not q.is_cuda:
        o, ht = fused_recurrent_reference(q, k, v, g=None if gla else g, gk=g if gla else None, g_gamma=g_gamma,
                                          scale=scale, initial_state=initial_state,
                                          output_final_state=output_final_state, state_v_first=state_v_first,
                                          cu_seqlens=cu_seqlens)
        return o, ht
    if cu_seqlens is not None:
        if cu_host is None:
            raise ValueError(f"{op}: while a CUDA graph is captured, pass cu_seqlens_cpu (the kernels' chunk tables "
                             f"are built from the host copy)")
        bounds = [int(b) for b in cu_host.tolist()]
        lengths = tuple(e - b for b, e in zip(bounds[:-1], bounds[1:]))
    else:
        lengths = (T,) * B
    tabs = _tables(lengths, H, q.device)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    g = None if g is None else g.contiguous()
    initial_state = None if initial_state is None else initial_state.contiguous()
    o, ht = _ChunkFunction.apply(q, k, v, g, g_gamma, initial_state, float(scale), bool(state_v_first),
                                 bool(output_final_state), tabs, gla)
    return o, (ht if output_final_state else None)


def chunk_simple_gla(q, k, v, g=None, g_gamma=None, scale=None, initial_state=None, output_final_state=False,
                     state_v_first=False, cu_seqlens=None, cu_seqlens_cpu=None, **kwargs):
    """Simple GLA in chunks: S_t = exp(g_t) S_{t-1} + k_t^T v_t with a scalar gate g [B, T, H] and/or a per-head
    constant g_gamma [H] (log space), o_t = scale * q_t S_t. Returns (o, final_state)."""
    op = "chunk_simple_gla"
    if kwargs:
        check_kwargs(op, kwargs)
    return _chunk(op, q, k, v, g, g_gamma, scale, initial_state, output_final_state, state_v_first, cu_seqlens,
                  cu_seqlens_cpu)


def chunk_retention(q, k, v, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None, **kwargs):
    """Retention (RetNet) in chunks: simple GLA with g_gamma[h] = log(1 - 2^(-5-h)). Returns (o, final_state)."""
    op = "chunk_retention"
    if kwargs:
        check_kwargs(op, kwargs)
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise ValueError(f"{op}: q must be a tensor [B, T, H, K]")
    return _chunk(op, q, k, v, None, retention_log_decay(q.shape[2], q.device), scale, initial_state,
                  output_final_state, False, cu_seqlens, kwargs.get("cu_seqlens_cpu"))


def chunk_gla(q, k, v, g, scale=None, initial_state=None, output_final_state=False, state_v_first=False,
              cu_seqlens=None, cu_seqlens_cpu=None):
    """Gated linear attention in chunks: S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t with a per-key gate g [B, T, H, K]
    (log space), o_t = scale * q_t S_t. Returns (o, final_state)."""
    return _chunk("chunk_gla", q, k, v, g, None, scale, initial_state, output_final_state, state_v_first, cu_seqlens,
                  cu_seqlens_cpu, gla=True)


def _normalize(o, q, k, scale, z_init, cu_seqlens):
    """fla's normalized linear attention: o_t / (scale q_t . z_t) with z_t = z_init + the keys summed up to t
    (per sequence); also returns z at each sequence's end [N, 1, H, K]."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    kf = k.to(acc)
    if cu_seqlens is None:
        z = kf.cumsum(1)
        if z_init is not None:
            z = z + z_init.to(acc)
        z_last = z[:, -1:] if z.shape[1] else (z_init.to(acc) if z_init is not None else kf.new_zeros(k.shape[0], 1, *k.shape[2:]))
    else:
        bounds = cu_seqlens.tolist()
        parts, lasts = [], []
        for n, (b, e) in enumerate(zip(bounds[:-1], bounds[1:])):
            start = kf.new_zeros(1, 1, *k.shape[2:]) if z_init is None else z_init[n:n + 1].to(acc)
            zs = start + kf[:, b:e].cumsum(1)
            parts.append(zs)
            lasts.append(zs[:, -1:] if e > b else start)
        z = torch.cat(parts, 1)
        z_last = torch.cat(lasts, 0)
    denom = (q.to(acc) * scale * z).sum(-1, keepdim=True) + 1e-10
    return (o.to(acc) / denom).to(o.dtype), z_last.float()


def chunk_linear_attn(q, k, v, scale=None, initial_state=None, output_final_state=False, normalize=True,
                      cu_seqlens=None):
    """Linear attention in chunks, S_t = S_{t-1} + k_t^T v_t, o_t = scale * q_t S_t. With normalize (fla's default)
    o_t is divided by scale * q_t . z_t, z_t the running key sum; the state is then a pair (S, z [N, 1, H, K])
    (initial_state may be one). Returns (o, final_state)."""
    op = "chunk_linear_attn"
    if normalize and isinstance(initial_state, tuple):
        kv_init, z_init = initial_state
    else:
        kv_init, z_init = initial_state, None
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise ValueError(f"{op}: q must be a tensor [B, T, H, K]")
    if scale is None:
        scale = q.shape[-1] ** -0.5
    o, ht = _chunk(op, q, k, v, None, None, scale, kv_init, output_final_state, False, cu_seqlens, None)
    if normalize:
        B, T, H, K = q.shape
        want = (B if cu_seqlens is None else cu_seqlens.numel() - 1, 1, H, K)
        if z_init is not None and (not isinstance(z_init, torch.Tensor) or tuple(z_init.shape) != want):
            raise ValueError(f"{op}: the z part of initial_state must be a tensor [N, 1, H, K] = {list(want)}, got "
                             f"{list(z_init.shape) if isinstance(z_init, torch.Tensor) else type(z_init).__name__}")
        if cu_seqlens is not None and cu_seqlens.dtype == torch.int32:
            cu_seqlens = cu_seqlens.long()
        o, z_last = _normalize(o, q, k, scale, z_init, cu_seqlens)
        return o, ((ht, z_last) if output_final_state else None)
    return o, ht
