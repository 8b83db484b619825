"""The chunk ops on CPU tensors (no GPU needed): their CPU path is the float64-checked reference, so these
tests check the ops' own logic against independent statements of the math:

- chunk_linear_attn's normalisation (z_t = z_init + cumsum of k, per sequence) against a naive per-token
  loop, with the tuple (kv, z) initial and final states and empty sequences;
- chunk_retention is chunk_simple_gla with RetNet's decay; the chunk ops equal the fused_recurrent ops;
- the backward on the CPU against float64 autograd of closed forms;
- every input-validation error.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import fla_aot.ops as ops
from fla_aot.ops.fused_recurrent import retention_log_decay
from tests.chunk_cases import OPS, flat_states, make_inputs, rel_err
from tools.gla_gate_grad_rounding import BF16, FORMS, SPAN, exact, replay

F64 = torch.float64


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------------------
# chunk_linear_attn: fla's normalisation against a naive per-token loop
# ---------------------------------------------------------------------------------------------------------
def naive_linear_attn(q, k, v, scale=None, initial_state=None, normalize=True, cu_seqlens=None):
    """Token by token, per sequence: S += k_t^T v_t; z += k_t; o_t = scale q_t S / (scale q_t . z + 1e-10)
    (without normalize: o_t = scale q_t S). Returns o and the final (S [N, H, K, V], z [N, 1, H, K])."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    kv0, z0 = initial_state if isinstance(initial_state, tuple) else (initial_state, None)
    seqs = [(b, 0, T) for b in range(B)] if cu_seqlens is None else \
        [(0, s, e) for s, e in zip(cu_seqlens.tolist()[:-1], cu_seqlens.tolist()[1:])]
    o = [[None] * T for _ in range(B)]
    finals_S, finals_z = [], []
    for n, (b, bos, eos) in enumerate(seqs):
        S = torch.zeros(H, K, V, dtype=F64) if kv0 is None else kv0[n]
        z = torch.zeros(H, K, dtype=F64) if z0 is None else z0[n, 0]
        for t in range(bos, eos):
            S = S + k[b, t, :, :, None] * v[b, t, :, None, :]
            z = z + k[b, t]
            num = scale * torch.einsum("hk,hkv->hv", q[b, t], S)
            o[b][t] = num / (scale * (q[b, t] * z).sum(-1, keepdim=True) + 1e-10) if normalize else num
        finals_S.append(S)
        finals_z.append(z)
    o = torch.stack([torch.stack(row) for row in o])
    return o, (torch.stack(finals_S), torch.stack(finals_z)[:, None])


def f64(x):
    if isinstance(x, tuple):
        return tuple(f64(y) for y in x)
    return x.detach().double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x


LINEAR_CASES = [
    # id, make_inputs options, call flags
    ("tuple_state", dict(B=2, T=9), dict()),
    ("plain_state", dict(B=2, T=9, z_init=False), dict()),
    ("no_state", dict(B=2, T=9, initial_state=False), dict()),
    ("scale", dict(B=2, T=9), dict(scale=0.3)),
    ("T1", dict(B=3, T=1), dict()),
    ("varlen_empty", dict(B=1, T=10, cu_seqlens=[0, 3, 3, 9, 10]), dict()),
    ("varlen_empty_first_last", dict(B=1, T=10, cu_seqlens=[0, 0, 10, 10]), dict()),
    ("varlen_no_state", dict(B=1, T=10, cu_seqlens=[0, 4, 4, 10], initial_state=False), dict()),
    ("no_normalize", dict(B=2, T=9, normalize=False), dict()),
    ("no_normalize_varlen", dict(B=1, T=10, cu_seqlens=[0, 0, 6, 10], normalize=False), dict()),
]


@pytest.mark.parametrize("case", LINEAR_CASES, ids=[c[0] for c in LINEAR_CASES])
def test_linear_attn_matches_naive_loop(case):
    _, shape, flags = case
    kw = make_inputs("linear_attn", H=2, K=4, V=5, dtype=torch.float32, generator=gen(len(case[0])), **shape)
    o, ht = ops.chunk_linear_attn(**kw, **flags, output_final_state=True)
    ref = {n: f64(x) for n, x in kw.items()}
    want_o, (want_S, want_z) = naive_linear_attn(**ref, **flags)
    assert o.shape == kw["v"].shape and o.dtype == torch.float32
    assert rel_err(o, want_o) < 1e-5, rel_err(o, want_o)
    if kw["normalize"]:
        # fla's final state with normalize: (kv, z at each sequence's last position)
        assert isinstance(ht, tuple) and len(ht) == 2, type(ht)
        S, z = ht
        assert z.shape == want_z.shape, z.shape
        assert rel_err(z, want_z) < 1e-6, rel_err(z, want_z)
    else:
        S = ht
    assert isinstance(S, torch.Tensor) and S.dtype == torch.float32 and S.shape == want_S.shape
    assert rel_err(S, want_S) < 1e-6, rel_err(S, want_S)
    # without output_final_state: the same output and no state
    o2, ht2 = ops.chunk_linear_attn(**kw, **flags)
    assert ht2 is None
    torch.testing.assert_close(o2, o, rtol=0, atol=0)


def test_linear_attn_empty_sequence_keeps_kv_and_z_init():
    kw = make_inputs("linear_attn", B=1, T=8, H=2, K=4, V=4, dtype=torch.float32, cu_seqlens=[0, 0, 8, 8],
                     generator=gen(1))
    _, (S, z) = ops.chunk_linear_attn(**kw, output_final_state=True)
    kv0, z0 = kw["initial_state"]
    for n in (0, 2):
        torch.testing.assert_close(S[n], kv0[n], rtol=0, atol=0)
        torch.testing.assert_close(z[n], z0[n], rtol=0, atol=0)
    # the non-empty one moved on by the sum of its keys
    torch.testing.assert_close(z[1], z0[1] + kw["k"][0].sum(0, keepdim=True), rtol=1e-6, atol=1e-6)


def test_linear_attn_final_state_continues_the_sequence():
    """Running [0, T1) then [T1, T) from the returned (kv, z) equals one run over [0, T): the z state is a
    usable initial state, as in fla's chunked decoding."""
    kw = make_inputs("linear_attn", B=2, T=12, H=2, K=4, V=6, dtype=torch.float32, generator=gen(2))
    o, (S, z) = ops.chunk_linear_attn(**kw, output_final_state=True)
    part = {n: kw[n][:, :5] for n in ("q", "k", "v")}
    rest = {n: kw[n][:, 5:] for n in ("q", "k", "v")}
    o1, st1 = ops.chunk_linear_attn(**part, initial_state=kw["initial_state"], output_final_state=True)
    o2, (S2, z2) = ops.chunk_linear_attn(**rest, initial_state=st1, output_final_state=True)
    torch.testing.assert_close(torch.cat([o1, o2], 1), o, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(S2, S, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z2, z, rtol=1e-6, atol=1e-6)


def test_linear_attn_normalize_is_the_default_and_differs_from_unnormalized():
    kw = make_inputs("linear_attn", B=1, T=6, H=1, K=4, V=4, dtype=torch.float32, initial_state=False,
                     generator=gen(3))
    kw.pop("normalize")
    o_default, _ = ops.chunk_linear_attn(**kw)
    o_norm, _ = ops.chunk_linear_attn(**kw, normalize=True)
    o_raw, _ = ops.chunk_linear_attn(**kw, normalize=False)
    torch.testing.assert_close(o_default, o_norm, rtol=0, atol=0)
    assert rel_err(o_raw, o_norm) > 1e-2
    # without normalize it is plain linear attention, the recurrent op's result
    o_rec, _ = ops.fused_recurrent_linear_attn(**kw)
    torch.testing.assert_close(o_raw, o_rec)


# ---------------------------------------------------------------------------------------------------------
# retention and simple_gla
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cu", [None, [0, 4, 4, 11]])
def test_retention_is_simple_gla_with_retnet_decay(cu):
    H = 4
    B = 2 if cu is None else 1
    kw = make_inputs("retention", B=B, T=11, H=H, K=8, V=8, dtype=torch.float32, cu_seqlens=cu, generator=gen(4))
    o, ht = ops.chunk_retention(**kw, output_final_state=True)
    o2, ht2 = ops.chunk_simple_gla(**kw, g_gamma=retention_log_decay(H, "cpu"), output_final_state=True)
    torch.testing.assert_close(o, o2, rtol=0, atol=0)
    torch.testing.assert_close(ht, ht2, rtol=0, atol=0)
    # the decay is RetNet's, log(1 - 2^(-5-h)), and really applied
    g_gamma = torch.tensor([math.log(1 - 2 ** (-5 - h)) for h in range(H)])
    o3, _ = ops.chunk_simple_gla(**kw, g_gamma=g_gamma)
    torch.testing.assert_close(o, o3, rtol=1e-6, atol=1e-6)
    o4, _ = ops.chunk_simple_gla(**kw)
    assert rel_err(o4, o) > 1e-3


SIMPLE_GLA_CASES = [
    ("g", dict(gates=("g",)), dict()),
    ("g_gamma", dict(gates=("g_gamma",)), dict()),
    ("g_and_g_gamma", dict(gates=("g", "g_gamma")), dict()),
    ("no_gate", dict(gates=()), dict()),
    ("strong", dict(gates=("g", "g_gamma"), strong_gates=True), dict()),
    ("state_v_first", dict(gates=("g",), state_v_first=True), dict()),
    ("scale", dict(gates=("g",)), dict(scale=0.7)),
    ("no_state", dict(gates=("g",), initial_state=False), dict()),
    ("varlen", dict(B=1, T=12, gates=("g", "g_gamma"), cu_seqlens=[0, 0, 5, 5, 12]), dict()),
    ("varlen_no_cpu_copy", dict(B=1, T=12, gates=("g",), cu_seqlens=[0, 7, 12], cu_seqlens_cpu=False), dict()),
]


@pytest.mark.parametrize("case", SIMPLE_GLA_CASES, ids=[c[0] for c in SIMPLE_GLA_CASES])
def test_simple_gla_equals_the_recurrent_op(case):
    """Same recurrence, same API: every argument reaches the math as fused_recurrent_simple_gla reads it."""
    _, shape, flags = case
    shape = {"B": 2, "T": 12, **shape}
    kw = make_inputs("simple_gla", H=2, K=6, V=5, dtype=torch.float32, generator=gen(len(case[0])), **shape)
    o, ht = ops.chunk_simple_gla(**kw, **flags, output_final_state=True)
    rec = {n: x for n, x in kw.items() if n != "cu_seqlens_cpu"}
    o2, ht2 = ops.fused_recurrent_simple_gla(**rec, **flags, output_final_state=True)
    torch.testing.assert_close(o, o2, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ht, ht2, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_output_dtypes_on_cpu(op, dtype):
    kw = make_inputs(op, B=1, T=5, H=2, K=4, V=4, dtype=dtype, generator=gen(5))
    o, ht = OPS[op](**kw, output_final_state=True)
    assert o.dtype == dtype and o.shape == kw["v"].shape and o.device.type == "cpu"
    S = flat_states(ht)[0]
    assert S.dtype == torch.float32 and S.shape == (1, 2, 4, 4)
    _, none = OPS[op](**kw)
    assert none is None


# ---------------------------------------------------------------------------------------------------------
# backward on the CPU
# ---------------------------------------------------------------------------------------------------------
def simple_gla_parallel(q, k, v, g, g_gamma, scale, h0):
    """The closed form of simple GLA (no recurrence): G_t = sum_{s<=t} (g_s + g_gamma),
    o_t = scale (sum_{s<=t} exp(G_t - G_s) (q_t.k_s) v_s + exp(G_t) q_t h0), h_T likewise."""
    T = q.shape[1]
    G = (g + g_gamma).cumsum(1)                                       # [B, T, H]
    decay = torch.exp(G[:, :, None] - G[:, None])                     # [B, t, s, H]
    causal = torch.tril(torch.ones(T, T, dtype=F64))[None, :, :, None]
    A = torch.einsum("bthk,bshk->btsh", q, k) * decay * causal
    o = scale * (torch.einsum("btsh,bshv->bthv", A, v)
                 + torch.exp(G)[..., None] * torch.einsum("bthk,bhkv->bthv", q, h0))
    GT = G[:, -1]
    ht = (torch.exp(GT)[..., None, None] * h0
          + torch.einsum("bthk,bthv,bth->bhkv", k, v, torch.exp(GT[:, None] - G)))
    return o, ht


def test_simple_gla_backward_on_cpu():
    """Every gradient (q, k, v, g, initial_state), with cotangents for o and the final state, against float64
    autograd of the closed parallel form."""
    kw = make_inputs("simple_gla", B=2, T=9, H=2, K=4, V=3, dtype=torch.float32, gates=("g", "g_gamma"),
                     generator=gen(6))
    names = ("q", "k", "v", "g", "initial_state")
    leaves = {n: kw[n].clone().requires_grad_(True) for n in names}
    o, ht = ops.chunk_simple_gla(**{**kw, **leaves}, output_final_state=True)
    do, dht = torch.randn(o.shape, generator=gen(7)), torch.randn(ht.shape, generator=gen(8))
    torch.autograd.backward((o, ht), (do, dht))
    ref = {n: f64(kw[n]).requires_grad_(True) for n in names}
    scale = kw["q"].shape[-1] ** -0.5
    ref_o, ref_ht = simple_gla_parallel(ref["q"], ref["k"], ref["v"], ref["g"], f64(kw["g_gamma"]), scale,
                                        ref["initial_state"])
    torch.autograd.backward((ref_o, ref_ht), (do.double(), dht.double()))
    assert rel_err(o, ref_o) < 1e-5 and rel_err(ht, ref_ht) < 1e-5
    for n in names:
        assert leaves[n].grad is not None, f"no gradient for {n}"
        assert leaves[n].grad.dtype == leaves[n].dtype and leaves[n].grad.shape == leaves[n].shape, n
        assert rel_err(leaves[n].grad, ref[n].grad) < 1e-5, (n, rel_err(leaves[n].grad, ref[n].grad))


@pytest.mark.parametrize("cu", [None, [0, 0, 4, 9]])
def test_simple_gla_backward_against_finite_differences(cu):
    """A numerical gradcheck (the ops take no float64, so float32 central differences along random
    directions): autograd's <grad, d> equals (L(x + eps d) - L(x - eps d)) / (2 eps) for every input at once."""
    B = 2 if cu is None else 1
    kw = make_inputs("simple_gla", B=B, T=9, H=2, K=4, V=3, dtype=torch.float32, cu_seqlens=cu, generator=gen(13))
    names = ("q", "k", "v", "g", "initial_state")
    x = {n: kw[n].clone().requires_grad_(True) for n in names}
    o, ht = ops.chunk_simple_gla(**{**kw, **x}, output_final_state=True)
    do, dht = torch.randn(o.shape, generator=gen(14)), torch.randn(ht.shape, generator=gen(15))

    def loss(inputs):
        o, ht = ops.chunk_simple_gla(**{**kw, **inputs}, output_final_state=True)
        return (o.double() * do).sum() + (ht.double() * dht).sum()

    grads = torch.autograd.grad(loss(x), [x[n] for n in names])
    eps = 1e-2
    for seed in range(3):
        d = {n: torch.randn(kw[n].shape, generator=gen(100 + seed)) for n in names}
        with torch.no_grad():
            plus = loss({n: kw[n] + eps * d[n] for n in names})
            minus = loss({n: kw[n] - eps * d[n] for n in names})
        numeric = ((plus - minus) / (2 * eps)).item()
        terms = [(gr.double() * d[n].double()).sum().item() for n, gr in zip(names, grads)]
        analytic = sum(terms)
        # relative to the size of the terms, which may cancel in the sum
        assert abs(numeric - analytic) < 1e-3 * sum(map(abs, terms)), (seed, numeric, analytic, terms)


@pytest.mark.parametrize("cu", [None, [0, 0, 4, 9]])
def test_linear_attn_normalize_backward_on_cpu(cu):
    """Gradients through the normalisation and the tuple state (kv, z_init), with cotangents for o, kv and z,
    against float64 autograd of the naive loop."""
    B = 2 if cu is None else 1
    kw = make_inputs("linear_attn", B=B, T=9, H=2, K=4, V=3, dtype=torch.float32, cu_seqlens=cu, generator=gen(9))
    kv0, z0 = kw["initial_state"]
    leaves = {n: x.clone().requires_grad_(True) for n, x in (("q", kw["q"]), ("k", kw["k"]), ("v", kw["v"]),
                                                             ("kv0", kv0), ("z0", z0))}
    call = dict(kw, q=leaves["q"], k=leaves["k"], v=leaves["v"], initial_state=(leaves["kv0"], leaves["z0"]))
    o, (S, z) = ops.chunk_linear_attn(**call, output_final_state=True)
    cot = [torch.randn(x.shape, generator=gen(10 + i)) for i, x in enumerate((o, S, z))]
    torch.autograd.backward((o, S, z), cot)
    ref = {n: f64(x).requires_grad_(True) for n, x in leaves.items()}
    ref_o, (ref_S, ref_z) = naive_linear_attn(ref["q"], ref["k"], ref["v"], initial_state=(ref["kv0"], ref["z0"]),
                                              cu_seqlens=kw.get("cu_seqlens"))
    torch.autograd.backward((ref_o, ref_S, ref_z), [c.double() for c in cot])
    for n in leaves:
        assert leaves[n].grad is not None, f"no gradient for {n}"
        assert rel_err(leaves[n].grad, ref[n].grad) < 1e-4, (n, rel_err(leaves[n].grad, ref[n].grad))


def test_retention_backward_on_cpu():
    kw = make_inputs("retention", B=1, T=6, H=2, K=4, V=4, dtype=torch.float32, generator=gen(11))
    leaves = {n: kw[n].clone().requires_grad_(True) for n in ("q", "k", "v", "initial_state")}
    o, ht = ops.chunk_retention(**{**kw, **leaves}, output_final_state=True)
    (o.sum() + ht.sum()).backward()
    for n, x in leaves.items():
        assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0, n


# ---------------------------------------------------------------------------------------------------------
# validation errors
# ---------------------------------------------------------------------------------------------------------
def small(op, **kw):
    return make_inputs(op, **{"B": 1, "T": 8, "H": 2, "K": 8, "V": 8, "dtype": torch.float32,
                              "generator": gen(12), **kw})


@pytest.mark.parametrize("op", list(OPS))
def test_integer_q_is_a_type_error(op):
    kw = small(op, initial_state=False)
    with pytest.raises(TypeError, match="q"):
        OPS[op](**{**kw, "q": torch.randint(0, 4, kw["q"].shape)})


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("which,bad", [("k", lambda x: x[..., :-1]), ("v", lambda x: x[:, :-1]),
                                       ("k", lambda x: x[:, :, :1])], ids=["k_K", "v_T", "k_H"])
def test_mismatched_shapes(op, which, bad):
    kw = small(op, initial_state=False)
    with pytest.raises(ValueError):
        OPS[op](**{**kw, which: bad(kw[which])})


@pytest.mark.parametrize("op", list(OPS))
def test_initial_state_of_the_wrong_shape(op):
    kw = small(op, initial_state=False)
    h0 = torch.zeros(3, 2, 8, 8)  # N=3 states for B=1
    with pytest.raises(ValueError):
        OPS[op](**kw, initial_state=(h0, torch.zeros(3, 1, 2, 8)) if op == "linear_attn" else h0)


@pytest.mark.parametrize("bad", ["K", "N"])
def test_linear_attn_z_init_of_the_wrong_shape(bad):
    """z_init must be [N, 1, H, K]: a wrong K is a clear ValueError (not torch's broadcasting error), and one
    z for B = 2 sequences must not be broadcast silently over the batch."""
    kw = small("linear_attn", B=2)
    kv0, z0 = kw["initial_state"]
    z_bad = z0[..., :-1] if bad == "K" else z0[:1]
    with pytest.raises(ValueError, match="initial_state|z"):
        ops.chunk_linear_attn(**{**kw, "initial_state": (kv0, z_bad)}, output_final_state=True)


def test_simple_gla_gate_of_the_wrong_shape():
    kw = small("simple_gla", gates=("g", "g_gamma"))
    with pytest.raises(ValueError):
        ops.chunk_simple_gla(**{**kw, "g": kw["g"][:, :-1]})
    with pytest.raises(ValueError):
        ops.chunk_simple_gla(**{**kw, "g_gamma": torch.zeros(3)})


@pytest.mark.parametrize("op", list(OPS))
def test_cu_seqlens_needs_batch_one(op):
    kw = small(op, B=2, initial_state=False)
    with pytest.raises(ValueError, match="batch size.* must be 1"):
        OPS[op](**kw, cu_seqlens=torch.tensor([0, 4, 8]))


@pytest.mark.parametrize("op", list(OPS))
def test_unsorted_cu_seqlens(op):
    kw = small(op, initial_state=False)
    with pytest.raises(ValueError, match="non-decreasing"):
        OPS[op](**kw, cu_seqlens=torch.tensor([0, 6, 4, 8]))


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("cu", [[0, 4, 7], [0, 4, 9], [1, 4, 8]])
def test_cu_seqlens_must_start_at_0_and_end_at_T(op, cu):
    kw = small(op, initial_state=False)
    with pytest.raises(ValueError, match="end at T=8"):
        OPS[op](**kw, cu_seqlens=torch.tensor(cu))


def test_cu_seqlens_cpu_is_checked_too():
    """A host copy that disagrees with T is caught like cu_seqlens itself (it is what the checks read)."""
    kw = small("simple_gla", initial_state=False)
    with pytest.raises(ValueError, match="end at T=8"):
        ops.chunk_simple_gla(**kw, cu_seqlens=torch.tensor([0, 4, 7]), cu_seqlens_cpu=torch.tensor([0, 4, 7]))


@pytest.mark.parametrize("op", list(OPS))
def test_unexpected_kwarg(op):
    kw = small(op)
    with pytest.raises(TypeError, match="unexpected"):
        OPS[op](**kw, not_an_option=1)


@pytest.mark.parametrize("op", ["simple_gla", "retention"])
def test_head_first(op):
    """fla's deprecated head_first: False (its default) is accepted, True is refused."""
    kw = small(op)
    o, _ = OPS[op](**kw, head_first=False)
    assert o.shape == kw["v"].shape
    with pytest.raises(TypeError, match="head_first"):
        OPS[op](**kw, head_first=True)


def test_gla_gate_gradient_per_chunk_is_exact():
    """The per-chunk form of GLA's gate gradient that the backward kernels take (the sum inside the chunk plus
    sum_v h_L dh_L after it), replayed in float64 by tools/gla_gate_grad_rounding.py, equals the recurrence's dg
    (T not a multiple of the chunk); rounding the pairing tree's rows to bfloat16 in the replay shows."""
    gen = torch.Generator().manual_seed(0)
    T, K, V = 150, 16, 24
    q, k = (torch.randn(T, K, generator=gen, dtype=torch.float64) for _ in range(2))
    v, do = (torch.randn(T, V, generator=gen, dtype=torch.float64) for _ in range(2))
    g = F.logsigmoid(torch.randn(T, K, generator=gen, dtype=torch.float64))
    dg, before, later = exact(q, k, v, do, g, K ** -0.5)
    # each form of the intra-chunk pairs (the tree's anchors, one reference row where the gate allows: it does for
    # the first chunk here) is exact unrounded
    G = g[:64].cumsum(0)
    assert (G - G[32]).abs().max() <= SPAN
    for form in [*FORMS, "block"]:  # "block": tools/gla_intra_rounding.py's forward form
        assert rel_err(replay(q, k, v, do, g, K ** -0.5, before, later, None, None, None, form), dg) < 1e-12, form
    assert rel_err(replay(q, k, v, do, g, K ** -0.5, before, later, BF16, None, None), dg) > 1e-4
