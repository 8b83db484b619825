"""Exact softmax attention, written out in PyTorch: the specification of fla_aot's attention kernels.

Per sequence and head, with TQ queries and TK keys, scores s_ij = scale * q_i . k_j (piecewise attention: q1_i . k1_j
when |i + TK - TQ - j| < dist_threshold, else q2_i . k2_j). A key is visible unless `causal` masks it:
j > i + TK - TQ (aligned to the bottom right, as FlashAttention 2.1+ and FlagAttention do). Then

    lse_i = log sum_{j visible} exp(s_ij)          (-inf for a row that sees no key; its output is 0)
    p_ij  = exp(s_ij - lse_i)
    o_i   = sum_j p_ij z_ij v_j,  z_ij = keep_ij / (1 - dropout_p)  (z = 1 without dropout)

keep_ij comes from Philox-4x32-10 (the generator Triton's tl.philox implements) with the key `seed[0]` and the
counters (j, i, sequence * H + head, seed[1]): a key is kept when the top 24 bits of the first output word are at
least dropout_p * 2^24. `attention_reference` differentiates through autograd; total attention is p summed over
the queries (before dropout).
"""
import torch

_M32 = 0xFFFFFFFF
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85


def _mul32(a, b):
    """(high, low) 32-bit words of a * b for a, b < 2^32 held in int64 (split so nothing overflows)."""
    b0, b1 = b & 0xFFFF, b >> 16
    lo_part, hi_part = a * b0, a * b1  # each < 2^48
    hi = ((lo_part >> 16) + hi_part) >> 16
    lo = (lo_part + ((hi_part & 0xFFFF) << 16)) & _M32
    return hi, lo


def philox4x32(c0, c1, c2, c3, seed, rounds=10):
    """Philox-4x32 on int64 tensors holding 32-bit words; seed: a Python int (its low and high words are the key).
    Returns the four output words."""
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    c = [torch.as_tensor(x, dtype=torch.int64) & _M32 for x in (c0, c1, c2, c3)]
    c0, c1, c2, c3 = torch.broadcast_tensors(*c)
    for _ in range(rounds):
        hi_b, lo_b = _mul32(c2, torch.full_like(c2, _ROUND_B))
        hi_a, lo_a = _mul32(c0, torch.full_like(c0, _ROUND_A))
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _M32, (k1 + _KEY_B) & _M32
    return c0, c1, c2, c3


def dropout_keep(seed, seq, H, TQ, TK, dropout_p):
    """The kept entries [H, TQ, TK] (bool) of sequence `seq`; seed: int64 tensor (key, counter offset)."""
    key, offset = (int(x) for x in seed.tolist())
    heads = torch.arange(H, dtype=torch.int64)[:, None, None] + seq * H
    i = torch.arange(TQ, dtype=torch.int64)[None, :, None]
    j = torch.arange(TK, dtype=torch.int64)[None, None, :]
    r, _, _, _ = philox4x32(j, i, heads, torch.tensor(offset & _M32), key)
    threshold = torch.tensor(dropout_p, dtype=torch.float32) * 16777216.0
    return (r >> 8).to(torch.float32) >= threshold


def _one_sequence(q, k, v, scale, causal, dropout_p, seed, seq, q2=None, k2=None, dist_threshold=None):
    """q [TQ, H, D], k and v [TK, HK, D] -> o [TQ, H, D], lse [H, TQ], p [H, TQ, TK] (before dropout)."""
    TQ, H, _ = q.shape
    TK, HK, _ = k.shape
    group = H // HK
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = torch.einsum("ihd,jhd->hij", q, k) * scale
    i = torch.arange(TQ, device=q.device)[:, None]
    j = torch.arange(TK, device=q.device)[None, :]
    if q2 is not None:
        s2 = torch.einsum("ihd,jhd->hij", q2, k2.repeat_interleave(group, 1)) * scale
        s = torch.where((i + TK - TQ - j).abs() < dist_threshold, s, s2)
    visible = (j <= i + TK - TQ) if causal else torch.ones(TQ, TK, dtype=torch.bool, device=q.device)
    any_visible = visible.any(1)  # [TQ]
    s = s.masked_fill(~visible, float("-inf"))
    s = torch.where(any_visible[:, None], s, torch.zeros((), dtype=s.dtype))  # keeps empty rows finite
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse[..., None]) * any_visible[:, None]
    lse = torch.where(any_visible, lse, torch.full((), float("-inf"), dtype=lse.dtype))
    pz = p
    if dropout_p > 0:
        pz = p * dropout_keep(seed, seq, H, TQ, TK, dropout_p).to(p.device, p.dtype) / (1 - dropout_p)
    o = torch.einsum("hij,jhd->ihd", pz, v)
    return o, lse, p


def attention_reference(q, k, v, scale=None, causal=False, dropout_p=0.0, seed=None, cu_seqlens_q=None,
                        cu_seqlens_k=None, q2=None, k2=None, dist_threshold=None, return_total_attention=False):
    """Exact attention. q [B, TQ, H, D], k and v [B, TK, HK, D] (H a multiple of HK); with cu_seqlens_q /
    cu_seqlens_k [N + 1] the sequences are packed: q [TQ_total, H, D], k and v [TK_total, HK, D].
    q2, k2 (like q, k) and dist_threshold: piecewise scores. seed: int64 tensor [2] when dropout_p > 0.

    Returns (o like q, lse [B, H, TQ] (varlen: [H, TQ_total]), total attention [B, H, TK] or None)."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if dropout_p > 0 and seed is None:
        raise ValueError("attention_reference: dropout needs a seed tensor (key, offset)")
    if cu_seqlens_q is not None:
        bq, bk = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        pieces = [(slice(bq[n], bq[n + 1]), slice(bk[n], bk[n + 1])) for n in range(len(bq) - 1)]
        outs = [_one_sequence(q[sq], k[sk], v[sk], scale, causal, dropout_p, seed, n,
                              None if q2 is None else q2[sq], None if k2 is None else k2[sk], dist_threshold)
                for n, (sq, sk) in enumerate(pieces)]
        o = torch.cat([x[0] for x in outs], 0)
        lse = torch.cat([x[1] for x in outs], 1)
        tot = torch.cat([x[2].sum(1) for x in outs], 1) if return_total_attention else None
        return o, lse, tot
    outs = [_one_sequence(q[b], k[b], v[b], scale, causal, dropout_p, seed, b,
                          None if q2 is None else q2[b], None if k2 is None else k2[b], dist_threshold)
            for b in range(q.shape[0])]
    if not outs:
        return (torch.zeros_like(q), q.new_zeros(0, q.shape[2], q.shape[1]),
                q.new_zeros(0, q.shape[2], k.shape[1]) if return_total_attention else None)
    o = torch.stack([x[0] for x in outs])
    lse = torch.stack([x[1] for x in outs])
    tot = torch.stack([x[2].sum(1) for x in outs]) if return_total_attention else None
    return o, lse, tot
