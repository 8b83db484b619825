"""Exact attention without a GPU: the reference (fla_aot.reference.attention_reference) against naive softmax
attention written with loops in float64, its Philox against the published Philox-4x32-10 test vectors, the public
functions' CPU paths and layouts, every input-validation error, and the ops' manifest rules and fake tensors."""
import tests.test_interpreter  # noqa: F401  (before triton_src: sets TRITON_INTERPRET without a GPU, so the
# interpreter tests collected after this file still get interpreted kernels)

import math

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import fla_aot.ops as ops
from fla_aot._manifest_rules import check_args, output_shapes, pick_variant, schema
from fla_aot.reference import attention_reference
from fla_aot.reference.attention import dropout_keep, philox4x32
from tests.fused_recurrent_cases import rel_err
from triton_src import flash_attn as flash_attn_src


def naive_attention(q, k, v, scale, causal, q2=None, k2=None, dist=None, keep=None, p=0.0):
    """One softmax per (batch, head, query) with Python loops: o, lse [B, H, TQ], total attention [B, H, TK]."""
    B, TQ, H, D = q.shape
    TK, HK = k.shape[1], k.shape[2]
    o = torch.zeros(B, TQ, H, D, dtype=torch.float64)
    lse = torch.full((B, H, TQ), float("-inf"), dtype=torch.float64)
    tot = torch.zeros(B, H, TK, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            hk = h // (H // HK)
            for i in range(TQ):
                js = [j for j in range(TK) if not causal or j <= i + TK - TQ]
                if not js:
                    continue
                scores = []
                for j in js:
                    near = q2 is None or abs(i + TK - TQ - j) < dist
                    qq, kk = (q, k) if near else (q2, k2)
                    scores.append(scale * float(qq[b, i, h] @ kk[b, j, hk]))
                m = max(scores)
                w = [math.exp(s - m) for s in scores]
                z = sum(w)
                lse[b, h, i] = m + math.log(z)
                for j, wj in zip(js, w):
                    pj = wj / z
                    tot[b, h, j] += pj
                    if keep is not None:
                        pj = pj * float(keep[b][h, i, j]) / (1 - p)
                    o[b, i, h] += pj * v[b, j, hk]
    return o, lse, tot


SHAPES = {
    # name: (B, TQ, TK, H, HK, D, causal)
    "square": (2, 9, 9, 2, 2, 8, False),
    "square_causal": (2, 9, 9, 2, 2, 8, True),
    "gqa_longer_k_causal": (1, 5, 12, 4, 2, 6, True),
    "mqa_longer_q_causal": (1, 12, 5, 3, 1, 6, True),  # the first 7 queries see no key
    "longer_q": (1, 12, 5, 2, 1, 4, False),
}


@pytest.mark.parametrize("name", list(SHAPES))
def test_reference_against_naive_attention(name):
    B, TQ, TK, H, HK, D, causal = SHAPES[name]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, T, h, D, generator=g, dtype=torch.float64) for T, h in ((TQ, H), (TK, HK), (TK, HK)))
    o, lse, tot = attention_reference(q, k, v, 0.4, causal, return_total_attention=True)
    ref_o, ref_lse, ref_tot = naive_attention(q, k, v, 0.4, causal)
    assert rel_err(o, ref_o) < 1e-12
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    assert (lse - ref_lse).nan_to_num(0., 0., 0.).abs().max() < 1e-12
    assert rel_err(tot, ref_tot) < 1e-12


@pytest.mark.parametrize("causal", [False, True])
def test_reference_piecewise_against_naive(causal):
    g = torch.Generator().manual_seed(1)
    B, TQ, TK, H, HK, D, dist = 1, 7, 11, 2, 1, 5, 3
    q1, q2 = (torch.randn(B, TQ, H, D, generator=g, dtype=torch.float64) for _ in range(2))
    k1, k2, v = (torch.randn(B, TK, HK, D, generator=g, dtype=torch.float64) for _ in range(3))
    o, lse, _ = attention_reference(q1, k1, v, 0.5, causal, q2=q2, k2=k2, dist_threshold=dist)
    ref_o, ref_lse, _ = naive_attention(q1, k1, v, 0.5, causal, q2, k2, dist)
    assert rel_err(o, ref_o) < 1e-12
    assert (lse - ref_lse).abs().max() < 1e-12


def test_reference_dropout_against_naive_with_the_same_mask():
    g = torch.Generator().manual_seed(2)
    B, TQ, TK, H, HK, D, p = 2, 6, 8, 2, 1, 4, 0.4
    q, k, v = (torch.randn(B, T, h, D, generator=g, dtype=torch.float64) for T, h in ((TQ, H), (TK, HK), (TK, HK)))
    seed = torch.tensor([987654321, 3])
    keep = [dropout_keep(seed, b, H, TQ, TK, p) for b in range(B)]
    o, _, _ = attention_reference(q, k, v, 0.5, True, p, seed)
    ref_o, _, _ = naive_attention(q, k, v, 0.5, True, keep=keep, p=p)
    assert rel_err(o, ref_o) < 1e-12
    many = dropout_keep(torch.tensor([5, 0]), 0, 4, 64, 64, p)
    assert abs(many.double().mean().item() - (1 - p)) < 0.02
    assert not torch.equal(dropout_keep(torch.tensor([5, 1]), 0, 4, 64, 64, p), many)  # the offset matters


def test_philox_known_answers():
    # Random123's known-answer vectors for Philox-4x32-10 (counter, key) -> output
    cases = [((0, 0, 0, 0), 0, (0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8)),
             ((0xffffffff,) * 4, 0xffffffffffffffff, (0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd)),
             ((0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344), 0x299f31d0a4093822,
              (0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1))]
    for ctr, key, want in cases:
        assert tuple(int(x) for x in philox4x32(*ctr, key)) == want


# ---- the public functions on CPU tensors --------------------------------------------------------------------------

def _randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def test_flash_attn_func_cpu_matches_reference_and_trains():
    q, k, v = _randn(2, 10, 4, 8, seed=1), _randn(2, 14, 2, 8, seed=2), _randn(2, 14, 2, 8, seed=3)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    o = ops.flash_attn_func(*leaves, softmax_scale=0.3, causal=True)
    ref, _, _ = attention_reference(q.double(), k.double(), v.double(), 0.3, True)
    assert o.dtype == q.dtype and rel_err(o, ref) < 1e-6
    o.sum().backward()
    assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in leaves)


def test_flash_attn_func_cpu_dropout_follows_the_generator():
    q = _randn(1, 16, 2, 8, seed=4)
    a = ops.flash_attn_func(q, q, q, dropout_p=0.5, generator=torch.Generator().manual_seed(7))
    b = ops.flash_attn_func(q, q, q, dropout_p=0.5, generator=torch.Generator().manual_seed(7))
    c = ops.flash_attn_func(q, q, q, dropout_p=0.5, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and rel_err(a, c) > 0.05


def test_packed_forms_match_flash_attn_func():
    qkv = _randn(2, 9, 3, 2, 8, seed=5)
    o = ops.flash_attn_qkvpacked_func(qkv, causal=True)
    want = ops.flash_attn_func(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], causal=True)
    assert rel_err(o, want) < 1e-7
    q, kv = _randn(2, 5, 4, 8, seed=6), _randn(2, 9, 2, 2, 8, seed=7)
    assert rel_err(ops.flash_attn_kvpacked_func(q, kv, causal=True),
                   ops.flash_attn_func(q, kv[:, :, 0], kv[:, :, 1], causal=True)) < 1e-7


def test_varlen_cpu_matches_per_sequence_calls():
    lq, lk = [3, 0, 7], [5, 2, 7]
    q, k, v = _randn(sum(lq), 4, 8, seed=8), _randn(sum(lk), 2, 8, seed=9), _randn(sum(lk), 2, 8, seed=10)
    cu_q = torch.tensor([0] + lq).cumsum(0).int()
    cu_k = torch.tensor([0] + lk).cumsum(0).int()
    o = ops.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lq), max(lk), causal=True)
    pieces = []
    for n in range(3):
        sq, sk = slice(int(cu_q[n]), int(cu_q[n + 1])), slice(int(cu_k[n]), int(cu_k[n + 1]))
        if lq[n]:
            pieces.append(ops.flash_attn_func(q[None, sq], k[None, sk], v[None, sk], causal=True)[0])
    assert rel_err(o, torch.cat(pieces)) < 1e-7


def test_flag_attention_cpu_layout_and_extras():
    q, k, v = _randn(2, 4, 6, 8, seed=11), _randn(2, 2, 9, 8, seed=12), _randn(2, 2, 9, 8, seed=13)
    o, lse, tot = ops.flash_attention(q, k, v, causal=True, sm_scale=0.4, return_log_normalizer=True,
                                      return_total_attention=True)
    ref_o, ref_lse, ref_tot = naive_attention(*(x.transpose(1, 2).double() for x in (q, k, v)), 0.4, True)
    assert o.shape == q.shape and rel_err(o, ref_o.transpose(1, 2)) < 1e-6
    assert lse.shape == (2, 4, 6) and rel_err(lse, ref_lse) < 1e-6
    assert tot.shape == (2, 4, 9) and rel_err(tot, ref_tot) < 1e-6
    assert isinstance(ops.flash_attention(q, k, v), torch.Tensor)
    o2, lse2 = ops.flash_attention(q, k, v, return_log_normalizer=True)
    assert lse2.shape == (2, 4, 6)


def test_piecewise_attention_cpu():
    xs = [_randn(1, 2, 7, 8, seed=s) for s in range(14, 19)]
    o = ops.piecewise_attention(*xs, dist_threshold=3, softmax_scale=0.3, causal=True)
    q1, k1, q2, k2, v = (x.transpose(1, 2).double() for x in xs)
    ref, _, _ = naive_attention(q1, k1, v, 0.3, True, q2, k2, 3)
    assert rel_err(o, ref.transpose(1, 2)) < 1e-6


# ---- input validation ----------------------------------------------------------------------------------------------

def _qkv(B=1, T=4, H=2, D=8, dtype=torch.float32):
    return _randn(B, T, H, D, dtype=dtype), _randn(B, T, H, D, seed=1, dtype=dtype), _randn(B, T, H, D, seed=2,
                                                                                           dtype=dtype)


@pytest.mark.parametrize("make,err,match", [
    (lambda q, k, v: (q[0], k, v), ValueError, r"q must be \[B, T, H, D\]"),
    (lambda q, k, v: (q, k, v[..., :4]), ValueError, "k and v must have one shape"),
    (lambda q, k, v: (q, k.half(), v), TypeError, "one dtype"),
    (lambda q, k, v: (q.int(), k.int(), v.int()), TypeError, "floating point"),
    (lambda q, k, v: (q, k[:1, :, :, :4], v[:1, :, :, :4]), ValueError, "one head dim"),
    (lambda q, k, v: (_randn(1, 4, 3, 8), k, v), ValueError, "multiple of the number of key/value heads"),
    (lambda q, k, v: (_randn(1, 4, 2, 300), _randn(1, 4, 2, 300), _randn(1, 4, 2, 300)), ValueError, "head dim 300"),
    (lambda q, k, v: (q, torch.cat([k, k]), torch.cat([v, v])), ValueError, "one batch size"),
    (lambda q, k, v: ("q", k, v), TypeError, "must be a tensor"),
    (lambda q, k, v: (q.to("meta"), k.to("meta"), v.to("meta")), ValueError, "expected CUDA"),
])
def test_flash_attn_func_rejects(make, err, match):
    with pytest.raises(err, match=match):
        ops.flash_attn_func(*make(*_qkv()))


@pytest.mark.parametrize("kw,err,match", [
    (dict(dropout_p=1.0), ValueError, "dropout_p"),
    (dict(dropout_p=-0.1), ValueError, "dropout_p"),
    (dict(window_size=(4, 0)), NotImplementedError, "window"),
    (dict(softcap=30.0), NotImplementedError, "softcap"),
    (dict(alibi_slopes=torch.ones(2)), NotImplementedError, "alibi"),
    (dict(return_attn_probs=True), NotImplementedError, "return_attn_probs"),
])
def test_flash_attn_func_rejects_options(kw, err, match):
    with pytest.raises(err, match=match):
        ops.flash_attn_func(*_qkv(), **kw)


def test_packed_and_varlen_rejects():
    with pytest.raises(ValueError, match=r"qkv must be a tensor \[B, T, 3, H, D\]"):
        ops.flash_attn_qkvpacked_func(_randn(1, 4, 2, 2, 8))
    with pytest.raises(ValueError, match="kv must be"):
        ops.flash_attn_kvpacked_func(_randn(1, 4, 2, 8), _randn(1, 4, 3, 2, 8))
    q = _randn(6, 2, 8)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    with pytest.raises(ValueError, match="end at T=6"):
        ops.flash_attn_varlen_func(q, q, q, torch.tensor([0, 2, 5], dtype=torch.int32), cu, 4, 4)
    with pytest.raises(ValueError, match="non-decreasing"):
        ops.flash_attn_varlen_func(q, q, q, torch.tensor([0, 4, 2, 6], dtype=torch.int32),
                                   torch.tensor([0, 4, 2, 6], dtype=torch.int32), 4, 4)
    with pytest.raises(ValueError, match="max_seqlen_q=3 is shorter"):
        ops.flash_attn_varlen_func(q, q, q, cu, cu, 3, 4)
    with pytest.raises(ValueError, match="same number of sequences"):
        ops.flash_attn_varlen_func(q, q, q, cu, torch.tensor([0, 6], dtype=torch.int32), 4, 6)
    with pytest.raises(TypeError, match="int64"):
        ops.flash_attn_varlen_func(q, q, q, cu.float(), cu, 4, 4)
    with pytest.raises(ValueError, match=r"\[T, H, D\]"):
        ops.flash_attn_varlen_func(q[None], q[None], q[None], cu, cu, 4, 4)
    with pytest.raises(NotImplementedError, match="block_table"):
        ops.flash_attn_varlen_func(q, q, q, cu, cu, 4, 4, block_table=torch.zeros(1))


def test_flag_attention_rejects():
    x = _randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match=r"\[B, H, T, D\]"):
        ops.flash_attention(x[0], x, x)
    with pytest.raises(ValueError, match="dist_threshold"):
        ops.piecewise_attention(x, x, x, x, x, dist_threshold=1.5)
    with pytest.raises(ValueError, match="q2 must have the shape of q1"):
        ops.piecewise_attention(x, x, x[:, :, :3], x, x, dist_threshold=2)


# ---- the ops' manifest rules and fake tensors ------------------------------------------------------------------------

ENTRIES = {}
for _spec in flash_attn_src.SPECS:
    ENTRIES[_spec.name] = dict(_spec.manifest_entry(), variants={"sm_90": _spec.variants()})


def test_schemas():
    assert schema(ENTRIES["flash_attn_fwd"]) == (
        "flash_attn_fwd(Tensor q, Tensor k, Tensor v, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, "
        "Tensor? max_seqlen_q, Tensor? seed, float sm_scale, float dropout_p, bool causal, bool dropout) "
        "-> (Tensor, Tensor)")
    assert schema(ENTRIES["flash_attn_bwd_dq"]).endswith("-> Tensor")
    assert set(ENTRIES) == {"flash_attn_fwd", "flash_attn_bwd_preprocess", "flash_attn_bwd_dkdv", "flash_attn_bwd_dq",
                            "flash_attn_total_attention", "piecewise_attn_fwd", "piecewise_attn_bwd_dkdv",
                            "piecewise_attn_bwd_dq"}


def _meta(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, dtype=dtype, device="meta")


def test_manifest_rules_bind_shapes_and_pick_variants():
    e = ENTRIES["flash_attn_fwd"]
    q, k = _meta(2, 100, 8, 64), _meta(2, 300, 2, 64)
    args = (q, k, k, None, None, None, None, 0.125, 0.0, True, False)
    sym = check_args(e, args)
    assert output_shapes(e, args, sym) == [((2, 100, 8, 64), torch.bfloat16), ((2, 8, 100), torch.float32)]
    v = pick_variant(e, args, sym, "sm_90")
    assert v["constexprs"]["BD"] == 64 and v["constexprs"]["CAUSAL"] and not v["constexprs"]["DROPOUT"]
    assert v["grid"][0] == [[e["symbols"].index("N"), 1], [e["symbols"].index("H"), 1],
                            [e["symbols"].index("MQ"), v["constexprs"]["BLOCK_M"]]]
    # varlen: N from cu_seqlens, MQ from the placeholder's length
    qv, kv = _meta(1, 50, 8, 64), _meta(1, 70, 2, 64)
    cu = torch.empty(4, dtype=torch.int32, device="meta")
    sym = check_args(e, (qv, kv, kv, cu, cu, torch.empty(33, dtype=torch.int32, device="meta"), None, 1., 0., False,
                         False))
    assert sym[e["symbols"].index("N")] == 3 and sym[e["symbols"].index("MQ")] == 33
    with pytest.raises(ValueError, match="H=8 must be a multiple of HK=3"):
        check_args(e, (q, _meta(2, 300, 3, 64), _meta(2, 300, 3, 64), None, None, None, None, 1., 0., False, False))
    with pytest.raises(TypeError, match="float32"):
        check_args(e, (q.float(), k.float(), k.float(), None, None, None, None, 1., 0., False, False))
    # the kernels read D = BD without masks: a head dim of 80 matches no variant (a loud error, not reads past the
    # rows), and the public functions zero-pad it to the 128 bucket
    q80 = _meta(2, 100, 8, 80)
    args80 = (q80, q80, q80, None, None, None, None, 1., 0., False, False)
    with pytest.raises(NotImplementedError, match="no compiled kernel variant.*D=80"):
        pick_variant(e, args80, check_args(e, args80), "sm_90")
    assert ops.flash_attn._prep(torch.zeros(1, 3, 2, 80), 128).shape == (1, 3, 2, 128)


def test_fake_tensors_through_the_public_functions():
    if "flash_attn_fwd" not in ops.flash_attn.OPS:
        pytest.skip("this build's manifest has no attention kernels")
    with FakeTensorMode():
        q = torch.empty(2, 100, 8, 80, dtype=torch.bfloat16, device="cuda")
        k = torch.empty(2, 130, 2, 80, dtype=torch.bfloat16, device="cuda")
        o = ops.flash_attn_func(q, k, k, causal=True)
        assert o.shape == q.shape and o.dtype == q.dtype
        o, lse, tot = ops.flash_attention(q.transpose(1, 2), k.transpose(1, 2), k.transpose(1, 2),
                                          return_log_normalizer=True, return_total_attention=True)
        assert o.shape == (2, 8, 100, 80) and lse.shape == (2, 8, 100) and tot.shape == (2, 8, 130)
