"""Exact softmax attention: FlashAttention's interface (flash_attn_func, flash_attn_qkvpacked_func,
flash_attn_kvpacked_func, flash_attn_varlen_func; layout [B, T, H, D]) and FlagAttention's (flash_attention,
piecewise_attention; layout [B, H, T, D]), served from the kernels of triton_src/flash_attn.py.

The forward saves q, k, v, o and the natural-log lse [B, H, TQ]; the backward runs delta = rowsum(o * do), then
dk/dv (per key tile, summed over the query heads of a group) and dq (per query tile): no atomics, deterministic.
causal is aligned to the bottom right when TQ != TK (key j visible to query i iff j <= i + TK - TQ). Head dims that
are not a power of two (>= 16) are zero-padded to the next one (scores and outputs are unchanged). Dropout takes a
fresh (key, offset) int64 pair from torch's generator of the device (or `generator=`) and regenerates the same
Philox mask in the backward; the pair lives in a device tensor, so CUDA-graph capture works. CPU tensors run the
reference (fla_aot.reference.attention_reference), which defines the semantics.
"""
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor

from fla_aot._registry import OPS
from fla_aot.ops.utils import check_cu_seqlens
from fla_aot.reference.attention import attention_reference

_KERNEL_DTYPES = (torch.float16, torch.bfloat16)
_CPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_D_BUCKETS = (16, 32, 64, 128, 256)  # triton_src/flash_attn.py D_BUCKETS
_NAMES = ("flash_attn_fwd", "flash_attn_bwd_preprocess", "flash_attn_bwd_dkdv", "flash_attn_bwd_dq",
          "flash_attn_total_attention", "piecewise_attn_fwd", "piecewise_attn_bwd_dkdv", "piecewise_attn_bwd_dq")


def _missing(name):
    def run(*args):
        raise NotImplementedError(f"fla_aot: the kernels of {name} are not in this build's manifest; rebuild with "
                                  f"`pip install --no-build-isolation --no-deps -e .`")
    return run


# the manifest ops these ops run, by name (tests swap them for Triton launches)
_ops = {name: OPS.get(name) or _missing(name) for name in _NAMES}


# ---- validation and input preparation ----------------------------------------------------------------------------

def _describe(x):
    return list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__


def _check_tensors(op, names, tensors):
    first = tensors[0]
    for name, x in zip(names, tensors):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a tensor, got {type(x).__name__}")
        if x.device != first.device:
            raise ValueError(f"{op}: {names[0]} and {name} must be on one device, got {first.device} and {x.device}")
        if x.dtype != first.dtype:
            raise TypeError(f"{op}: {', '.join(names)} must have one dtype, got {first.dtype} and {x.dtype} ({name})")
    if first.device.type == "cuda":
        if first.dtype not in _KERNEL_DTYPES:
            raise TypeError(f"{op}: on CUDA the inputs must be float16 or bfloat16 (the products run on the tensor "
                            f"cores), got {first.dtype}; cast them, or run on the CPU reference")
    elif first.device.type == "cpu":
        if first.dtype not in _CPU_DTYPES:
            raise TypeError(f"{op}: the inputs must be floating point, got {first.dtype}")
    else:
        raise ValueError(f"{op}: expected CUDA (or CPU) tensors, got {first.device}")


def _check_shapes(op, q, k, v, packed):
    """q [B, TQ, H, D], k and v [B, TK, HK, D] (packed: [TQ, H, D] and [TK, HK, D])."""
    dims = 3 if packed else 4
    what = "[T, H, D] (varlen: sequences packed along T)" if packed else "[B, T, H, D]"
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != dims:
            raise ValueError(f"{op}: {name} must be {what}, got shape {list(x.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"{op}: k and v must have one shape, got {list(k.shape)} and {list(v.shape)}")
    if not packed and k.shape[0] != q.shape[0]:
        raise ValueError(f"{op}: q and k must have one batch size, got {q.shape[0]} and {k.shape[0]}")
    H, D = q.shape[-2], q.shape[-1]
    HK = k.shape[-2]
    if k.shape[-1] != D:
        raise ValueError(f"{op}: q, k and v must have one head dim, got {D} and {k.shape[-1]}")
    if D < 1 or D > _D_BUCKETS[-1]:
        raise ValueError(f"{op}: head dim {D} is not supported (1 to {_D_BUCKETS[-1]})")
    if HK < 1 or H % HK:
        raise ValueError(f"{op}: the number of query heads ({H}) must be a multiple of the number of key/value heads "
                         f"({HK}) (MQA/GQA)")


def _check_dropout(op, dropout_p):
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"{op}: dropout_p must be in [0, 1), got {dropout_p}")


def _check_unsupported(op, window_size, softcap, alibi_slopes, return_attn_probs):
    if tuple(window_size) != (-1, -1):
        raise NotImplementedError(f"{op}: sliding-window attention (window_size={tuple(window_size)}) is not "
                                  f"supported; use window_size=(-1, -1)")
    if softcap:
        raise NotImplementedError(f"{op}: softcap={softcap} is not supported")
    if alibi_slopes is not None:
        raise NotImplementedError(f"{op}: alibi_slopes are not supported")
    if return_attn_probs:
        raise NotImplementedError(f"{op}: return_attn_probs=True (FlashAttention's test-only dropout-mask matrix) is "
                                  f"not supported; FlagAttention's flash_attention(..., return_log_normalizer=True) "
                                  f"gives the log-sum-exp")


def _bucket(D):
    return next(b for b in _D_BUCKETS if b >= D)


def _prep(x, BD):
    """Zero-pads the head dim to its bucket; contiguous and 16-byte aligned (the kernels are compiled for that)."""
    if x.shape[-1] != BD:
        x = F.pad(x, (0, BD - x.shape[-1]))
    if not x.is_contiguous():
        x = x.contiguous()
    elif _misaligned(x):
        x = x.clone()
    return x


def _misaligned(x):
    if torch.compiler.is_compiling() or isinstance(x, FakeTensor):
        return False  # traced or fake: no data to look at; the dispatcher still checks at run time
    return x.data_ptr() % 16 != 0


def _seed(device, generator):
    """(Philox key, counter offset) as an int64 tensor on `device`, drawn from torch's generator."""
    if generator is not None:
        return torch.randint(0, 2 ** 62, (2,), dtype=torch.int64, device=generator.device,
                             generator=generator).to(device)
    return torch.randint(0, 2 ** 62, (2,), dtype=torch.int64, device=device)


def _placeholder(n, device):
    # its length binds the kernels' grid symbol for the longest sequence (the contents are never read)
    return torch.empty(n, dtype=torch.int32, device=device)


# ---- autograd ------------------------------------------------------------------------------------------------------

class FlashAttnFunction(torch.autograd.Function):
    """q [B, TQ, H, D], k and v [B, TK, HK, D], D a bucket, all contiguous and aligned, 16-bit CUDA tensors.
    Returns (o, lse [B, H, TQ]); lse is not differentiable."""

    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, dropout_p, seed):
        dropout = dropout_p > 0
        o, lse = _ops["flash_attn_fwd"](q, k, v, cu_q, cu_k, max_q, seed, scale, dropout_p, causal, dropout)
        ctx.save_for_backward(q, k, v, o, lse, cu_q, cu_k, max_q, max_k, seed)
        ctx.args = (scale, causal, dropout_p)
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, o, lse, cu_q, cu_k, max_q, max_k, seed = ctx.saved_tensors
        scale, causal, dropout_p = ctx.args
        dropout = dropout_p > 0
        do = do.to(q.dtype).contiguous()
        (delta,) = _ops["flash_attn_bwd_preprocess"](o, do)
        dk, dv = _ops["flash_attn_bwd_dkdv"](q, k, v, do, lse, delta, cu_q, cu_k, max_k, seed, scale, dropout_p,
                                             causal, dropout)
        (dq,) = _ops["flash_attn_bwd_dq"](q, k, v, do, lse, delta, cu_q, cu_k, max_q, seed, scale, dropout_p,
                                          causal, dropout)
        return dq, dk, dv, None, None, None, None, None, None, None, None


class PiecewiseAttnFunction(torch.autograd.Function):
    """q1, q2 [B, TQ, H, D], k1, k2, v [B, TK, HK, D] (prepared like FlashAttnFunction's). Returns (o, lse)."""

    @staticmethod
    def forward(ctx, q1, k1, q2, k2, v, scale, dist_threshold, causal):
        o, lse = _ops["piecewise_attn_fwd"](q1, k1, q2, k2, v, scale, dist_threshold, causal)
        ctx.save_for_backward(q1, k1, q2, k2, v, o, lse)
        ctx.args = (scale, dist_threshold, causal)
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q1, k1, q2, k2, v, o, lse = ctx.saved_tensors
        scale, dist_threshold, causal = ctx.args
        do = do.to(q1.dtype).contiguous()
        (delta,) = _ops["flash_attn_bwd_preprocess"](o, do)
        dk1, dk2, dv = _ops["piecewise_attn_bwd_dkdv"](q1, k1, q2, k2, v, do, lse, delta, scale, dist_threshold,
                                                       causal)
        dq1, dq2 = _ops["piecewise_attn_bwd_dq"](q1, k1, q2, k2, v, do, lse, delta, scale, dist_threshold, causal)
        return dq1, dk1, dq2, dk2, dv, None, None, None


# ---- the shared paths ----------------------------------------------------------------------------------------------

def _reference_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _attention(q, k, v, scale, causal, dropout_p, generator, cu_q=None, cu_k=None, max_q=None, max_k=None):
    """q [B, TQ, H, D] (varlen: [TQ, H, D] with cu_q / cu_k int32 and the host ints max_q / max_k).
    Returns (o like q, lse [B, H, TQ] (varlen: [H, TQ]))."""
    D = q.shape[-1]
    scale = D ** -0.5 if scale is None else float(scale)
    dropout_p = float(dropout_p)
    seed = _seed(q.device, generator) if dropout_p > 0 else None
    if not q.is_cuda:
        ct = _reference_dtype(q)
        o, lse, _ = attention_reference(q.to(ct), k.to(ct), v.to(ct), scale, causal, dropout_p, seed, cu_q, cu_k)
        return o.to(q.dtype), lse.float()
    return _run_kernels(q, k, v, scale, causal, dropout_p, seed, cu_q, cu_k, max_q, max_k)


def _run_kernels(q, k, v, scale, causal, dropout_p, seed, cu_q=None, cu_k=None, max_q=None, max_k=None):
    """The kernel path of _attention (validated inputs; scale a float; seed None without dropout)."""
    D = q.shape[-1]
    varlen = cu_q is not None
    BD = _bucket(D)
    if varlen:
        q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
        max_q_t, max_k_t = _placeholder(max_q, q.device), _placeholder(max_k, q.device)
    else:
        max_q_t = max_k_t = None
    qp, kp, vp = (_prep(x, BD) for x in (q, k, v))
    o, lse = FlashAttnFunction.apply(qp, kp, vp, cu_q, cu_k, max_q_t, max_k_t, scale, bool(causal), dropout_p, seed)
    if BD != D:
        o = o[..., :D]
    if varlen:
        o, lse = o.squeeze(0), lse.squeeze(0)
    return o, lse


def _check_varlen(op, cu, T, max_seqlen, name):
    """cu_seqlens as int32 on the device, after the checks (start 0, end T, non-decreasing, every length at most
    max_seqlen; the value checks read a host copy, skipped while a CUDA graph is captured)."""
    if isinstance(max_seqlen, torch.Tensor):
        max_seqlen = int(max_seqlen)
    if not isinstance(max_seqlen, int) or max_seqlen < 0:
        raise ValueError(f"{op}: max_seqlen_{name} must be a non-negative int, got {max_seqlen!r}")
    cu64, host = check_cu_seqlens(op, cu, T)
    if host is not None:
        longest = int((host[1:] - host[:-1]).max()) if host.numel() > 1 else 0
        if longest > max_seqlen:
            raise ValueError(f"{op}: max_seqlen_{name}={max_seqlen} is shorter than the longest sequence in "
                             f"cu_seqlens_{name} ({longest})")
    return (cu if cu.dtype == torch.int32 else cu64.int()), max_seqlen


# ---- FlashAttention's interface ------------------------------------------------------------------------------------

def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False, *, generator=None):
    """Exact attention. q: [B, TQ, H, D], k and v: [B, TK, HK, D] (H a multiple of HK: MQA/GQA), float16 or
    bfloat16 on CUDA, D <= 256. softmax_scale defaults to D ** -0.5; causal is aligned to the bottom right when
    TQ != TK. dropout_p: dropout on the attention weights, its mask drawn from `generator` (default: the device's
    generator). `deterministic` is accepted (the backward is always deterministic). Returns o [B, TQ, H, D]."""
    op = "flash_attn_func"
    _check_unsupported(op, window_size, softcap, alibi_slopes, return_attn_probs)
    _check_tensors(op, ("q", "k", "v"), (q, k, v))
    _check_shapes(op, q, k, v, packed=False)
    _check_dropout(op, dropout_p)
    return _attention(q, k, v, softmax_scale, causal, dropout_p, generator)[0]


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                              softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False, *,
                              generator=None):
    """flash_attn_func on qkv: [B, T, 3, H, D]. Returns o [B, T, H, D]."""
    op = "flash_attn_qkvpacked_func"
    if not isinstance(qkv, torch.Tensor) or qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"{op}: qkv must be a tensor [B, T, 3, H, D], got {_describe(qkv)}")
    q, k, v = qkv.unbind(2)
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs, generator=generator)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                             softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False, *,
                             generator=None):
    """flash_attn_func on q: [B, TQ, H, D] and kv: [B, TK, 2, HK, D]. Returns o [B, TQ, H, D]."""
    op = "flash_attn_kvpacked_func"
    if not isinstance(kv, torch.Tensor) or kv.dim() != 5 or kv.shape[2] != 2:
        raise ValueError(f"{op}: kv must be a tensor [B, T, 2, HK, D], got {_describe(kv)}")
    k, v = kv.unbind(2)
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs, generator=generator)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None, *, generator=None):
    """Exact attention over packed sequences. q: [TQ_total, H, D], k and v: [TK_total, HK, D]; cu_seqlens_q,
    cu_seqlens_k: [N + 1] (int32; 0 first, the totals last, non-decreasing: empty sequences allowed); max_seqlen_q,
    max_seqlen_k: ints at least the longest sequence. Sequence n attends queries cu_seqlens_q[n]:cu_seqlens_q[n+1]
    to keys cu_seqlens_k[n]:cu_seqlens_k[n+1] (causal: bottom right per sequence). Returns o [TQ_total, H, D]."""
    op = "flash_attn_varlen_func"
    _check_unsupported(op, window_size, softcap, alibi_slopes, return_attn_probs)
    if block_table is not None:
        raise NotImplementedError(f"{op}: paged key/value caches (block_table) are not supported")
    _check_tensors(op, ("q", "k", "v"), (q, k, v))
    _check_shapes(op, q, k, v, packed=True)
    _check_dropout(op, dropout_p)
    cu_q, max_q = _check_varlen(op, cu_seqlens_q, q.shape[0], max_seqlen_q, "q")
    cu_k, max_k = _check_varlen(op, cu_seqlens_k, k.shape[0], max_seqlen_k, "k")
    if cu_q.shape != cu_k.shape:
        raise ValueError(f"{op}: cu_seqlens_q and cu_seqlens_k must list the same number of sequences, got "
                         f"{cu_q.numel() - 1} and {cu_k.numel() - 1}")
    if cu_q.device != q.device or cu_k.device != q.device:
        raise ValueError(f"{op}: cu_seqlens_q and cu_seqlens_k must be on {q.device}")
    return _attention(q, k, v, softmax_scale, causal, dropout_p, generator, cu_q, cu_k, max_q, max_k)[0]


# ---- FlagAttention's interface -------------------------------------------------------------------------------------

def _heads_second(op, names, tensors):
    """[B, H, T, D] inputs (FlagAttention's layout) -> [B, T, H, D] views."""
    for name, x in zip(names, tensors):
        if isinstance(x, torch.Tensor) and x.dim() != 4:
            raise ValueError(f"{op}: {name} must be [B, H, T, D], got shape {list(x.shape)}")
    return [x.transpose(1, 2) for x in tensors]


def _run_flag_kernels(q, k, v, scale, causal, return_total_attention):
    """q [B, TQ, H, D], k, v [B, TK, HK, D] -> (o, lse, total attention or None)."""
    D = q.shape[-1]
    BD = _bucket(D)
    qp, kp, vp = (_prep(x, BD) for x in (q, k, v))
    o, lse = FlashAttnFunction.apply(qp, kp, vp, None, None, None, None, scale, bool(causal), 0.0, None)
    o = o[..., :D] if BD != D else o
    tot = None
    if return_total_attention:
        (tot,) = _ops["flash_attn_total_attention"](qp.detach(), kp.detach(), lse, scale, bool(causal))
    return o, lse, tot


def _run_piecewise_kernels(q1, k1, q2, k2, v, scale, dist_threshold, causal):
    """q1, q2 [B, TQ, H, D], k1, k2, v [B, TK, HK, D] -> o [B, TQ, H, D]."""
    D = q1.shape[-1]
    BD = _bucket(D)
    prepped = [_prep(x, BD) for x in (q1, k1, q2, k2, v)]
    o, _ = PiecewiseAttnFunction.apply(*prepped, scale, float(dist_threshold), bool(causal))
    return o[..., :D] if BD != D else o


def flash_attention(q, k, v, causal=False, sm_scale=None, return_log_normalizer=False, return_total_attention=False):
    """FlagAttention's exact attention. q: [B, H, TQ, D], k and v: [B, HK, TK, D] (H a multiple of HK).
    Returns o [B, H, TQ, D]; with return_log_normalizer and/or return_total_attention, a tuple (o, then
    log_normalizer [B, H, TQ] = the natural-log log-sum-exp of each row of scaled scores, then total_attention
    [B, H, TK] = the attention weights summed over the queries), both float32 and not differentiable."""
    op = "flash_attention"
    _check_tensors(op, ("q", "k", "v"), (q, k, v))
    qt, kt, vt = _heads_second(op, ("q", "k", "v"), (q, k, v))
    _check_shapes(op, qt, kt, vt, packed=False)
    D = q.shape[-1]
    scale = D ** -0.5 if sm_scale is None else float(sm_scale)
    if not q.is_cuda:
        ct = _reference_dtype(q)
        o, lse, tot = attention_reference(qt.to(ct), kt.to(ct), vt.to(ct), scale, causal,
                                          return_total_attention=return_total_attention)
        o, lse, tot = o.to(q.dtype), lse.float().detach(), None if tot is None else tot.float().detach()
    else:
        o, lse, tot = _run_flag_kernels(qt, kt, vt, scale, causal, return_total_attention)
    o = o.transpose(1, 2).contiguous()
    if not return_log_normalizer and not return_total_attention:
        return o
    outs = [o]
    if return_log_normalizer:
        outs.append(lse)
    if return_total_attention:
        outs.append(tot)
    return tuple(outs)


def piecewise_attention(q1, k1, q2, k2, v, dist_threshold, softmax_scale=None, causal=False):
    """FlagAttention's piecewise attention. q1, q2: [B, H, TQ, D]; k1, k2, v: [B, HK, TK, D]. The score of query i
    and key j is q1_i . k1_j when |i + TK - TQ - j| < dist_threshold, else q2_i . k2_j (times softmax_scale,
    default D ** -0.5); i and j are aligned at the bottom right as in the causal mask. Returns o [B, H, TQ, D]."""
    op = "piecewise_attention"
    names = ("q1", "k1", "q2", "k2", "v")
    _check_tensors(op, names, (q1, k1, q2, k2, v))
    q1t, k1t, q2t, k2t, vt = _heads_second(op, names, (q1, k1, q2, k2, v))
    _check_shapes(op, q1t, k1t, vt, packed=False)
    if q2t.shape != q1t.shape or k2t.shape != k1t.shape:
        raise ValueError(f"{op}: q2 must have the shape of q1 and k2 that of k1, got {list(q2.shape)}, "
                         f"{list(k2.shape)} against {list(q1.shape)}, {list(k1.shape)}")
    if isinstance(dist_threshold, bool) or not isinstance(dist_threshold, int) or not 0 <= dist_threshold < 2 ** 24:
        raise ValueError(f"{op}: dist_threshold must be an int in [0, 2^24), got {dist_threshold!r}")
    D = q1.shape[-1]
    scale = D ** -0.5 if softmax_scale is None else float(softmax_scale)
    if not q1.is_cuda:
        ct = _reference_dtype(q1)
        o, _, _ = attention_reference(q1t.to(ct), k1t.to(ct), vt.to(ct), scale, causal, q2=q2t.to(ct),
                                      k2=k2t.to(ct), dist_threshold=dist_threshold)
        return o.to(q1.dtype).transpose(1, 2).contiguous()
    return _run_piecewise_kernels(q1t, k1t, q2t, k2t, vt, scale, dist_threshold, causal).transpose(1, 2).contiguous()


__all__ = ["flash_attn_func", "flash_attn_qkvpacked_func", "flash_attn_kvpacked_func", "flash_attn_varlen_func",
           "flash_attention", "piecewise_attention"]
