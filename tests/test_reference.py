"""The CPU reference (fla_aot.reference.fused_recurrent_reference) against independent statements of the math.

(a) naive scalar loops over (sequence, value head, t, i, j), written here from API.md's recurrences;
(b) closed parallel forms (causal masks, cumulative gates) where they exist, plus exact identities;
(c) the public ops on CPU tensors return exactly what the reference returns.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import fla_aot.ops as ops
from fla_aot.ops.fused_recurrent import retention_log_decay
from fla_aot.reference import fused_recurrent_reference
from tests.fused_recurrent_cases import GROUPED, OPS, TOL, make_inputs, rel_err

F64 = torch.float64


# ---------------------------------------------------------------------------------------------------------
# (a) naive scalar recurrence: plain Python floats, one (sequence, value head) at a time
# ---------------------------------------------------------------------------------------------------------
def naive_recurrence(q, k, v, g=None, g_gamma=None, gk=None, gv=None, beta=None, scale=None, initial_state=None,
                     output_final_state=False, reverse=False, use_qk_l2norm=False, beta_sigmoid=False,
                     allow_neg_eigval=False, state_v_first=False, cu_seqlens=None, delta_rule=False):
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    scale = K ** -0.5 if scale is None else scale
    Q, Kt, Vt = q.tolist(), k.tolist(), v.tolist()
    G = None if g is None else g.tolist()
    GG = None if g_gamma is None else g_gamma.tolist()
    GK = None if gk is None else gk.tolist()
    GV = None if gv is None else gv.tolist()
    BE = None if beta is None else beta.tolist()
    H0 = None if initial_state is None else initial_state.tolist()
    if cu_seqlens is None:
        seqs = [(b, 0, T) for b in range(B)]
    else:
        cu = cu_seqlens.tolist()
        seqs = [(0, cu[n], cu[n + 1]) for n in range(len(cu) - 1)]

    def l2(x):
        nrm = math.sqrt(sum(a * a for a in x) + 1e-6)
        return [a / nrm for a in x]

    o = [[[[0.0] * V for _ in range(HV)] for _ in range(T)] for _ in range(B)]
    finals = []
    for n, (b, bos, eos) in enumerate(seqs):
        per_head = []
        for hv in range(HV):
            h = hv // (HV // H)
            S = [[0.0] * V for _ in range(K)]
            if H0 is not None:
                for i in range(K):
                    for j in range(V):
                        S[i][j] = H0[n][hv][j][i] if state_v_first else H0[n][hv][i][j]
            ts = range(eos - 1, bos - 1, -1) if reverse else range(bos, eos)
            for t in ts:
                qt, kt, vt = Q[b][t][h], Kt[b][t][h], list(Vt[b][t][hv])
                if use_qk_l2norm:
                    qt, kt = l2(qt), l2(kt)
                for i in range(K):
                    for j in range(V):
                        d = 1.0
                        if G is not None:
                            d *= math.exp(G[b][t][hv])
                        if GG is not None:
                            d *= math.exp(GG[hv])
                        if GK is not None:
                            d *= math.exp(GK[b][t][hv][i])
                        if GV is not None:
                            d *= math.exp(GV[b][t][hv][j])
                        S[i][j] *= d
                if delta_rule:
                    bt = 1.0 if BE is None else BE[b][t][hv]
                    if BE is not None and beta_sigmoid:
                        bt = 1.0 / (1.0 + math.exp(-bt))
                    if allow_neg_eigval:
                        bt *= 2.0
                    vt = [bt * (vt[j] - sum(kt[i] * S[i][j] for i in range(K))) for j in range(V)]
                for i in range(K):
                    for j in range(V):
                        S[i][j] += kt[i] * vt[j]
                for j in range(V):
                    o[b][t][hv][j] = scale * sum(qt[i] * S[i][j] for i in range(K))
            if state_v_first:
                S = [[S[i][j] for i in range(K)] for j in range(V)]
            per_head.append(S)
        finals.append(per_head)
    o = torch.tensor(o, dtype=F64)
    if not output_final_state:
        return o, None
    shape = (0, HV, V, K) if state_v_first else (0, HV, K, V)
    return o, (torch.tensor(finals, dtype=F64) if finals else torch.zeros(shape, dtype=F64))


def random_inputs(seed, B=2, T=6, H=2, HV=None, K=4, V=3, tensors=(), cu_seqlens=None, state_v_first=False):
    """float64 inputs with reference argument names; `tensors` picks the optional ones."""
    gen = torch.Generator().manual_seed(seed)
    HV = HV or H
    N = B if cu_seqlens is None else len(cu_seqlens) - 1

    def randn(*s):
        return torch.randn(*s, generator=gen, dtype=F64)

    def rand(*s):
        return torch.rand(*s, generator=gen, dtype=F64)

    kw = dict(q=randn(B, T, H, K), k=randn(B, T, H, K), v=randn(B, T, HV, V))
    if "g" in tensors:
        kw["g"] = -0.7 * rand(B, T, HV)
    if "g_gamma" in tensors:
        kw["g_gamma"] = -0.7 * rand(HV)
    if "gk" in tensors:
        kw["gk"] = F.logsigmoid(randn(B, T, HV, K) + 1)
    if "gv" in tensors:
        kw["gv"] = F.logsigmoid(randn(B, T, HV, V) + 1)
    if "beta" in tensors:
        kw["beta"] = rand(B, T, HV)
    if "beta_logits" in tensors:
        kw["beta"] = 2 * randn(B, T, HV)
    if "initial_state" in tensors:
        kw["initial_state"] = randn(N, HV, V, K) if state_v_first else randn(N, HV, K, V)
    if state_v_first:
        kw["state_v_first"] = True
    if cu_seqlens is not None:
        kw["cu_seqlens"] = torch.tensor(cu_seqlens, dtype=torch.int64)
    return kw


# (id, shape/tensor options for random_inputs, flags for the call)
NAIVE_CASES = [
    ("linear", dict(), dict()),
    ("linear_h0_scale", dict(tensors=("initial_state",)), dict(scale=0.37)),
    ("linear_reverse", dict(tensors=("initial_state",)), dict(reverse=True)),
    ("simple_gla_g", dict(tensors=("g", "initial_state")), dict()),
    ("simple_gla_g_gamma", dict(tensors=("g_gamma",)), dict()),
    ("simple_gla_g_and_g_gamma", dict(tensors=("g", "g_gamma", "initial_state")), dict()),
    ("simple_gla_reverse", dict(tensors=("g", "g_gamma", "initial_state")), dict(reverse=True)),
    ("simple_gla_state_v_first", dict(tensors=("g", "initial_state"), state_v_first=True, K=3, V=5), dict()),
    ("gla_gk", dict(tensors=("gk", "initial_state")), dict()),
    ("gla_gv", dict(tensors=("gv",)), dict()),
    ("gla_gk_gv", dict(tensors=("gk", "gv", "initial_state")), dict()),
    ("gla_reverse_state_v_first", dict(tensors=("gk", "gv", "initial_state"), state_v_first=True), dict(reverse=True)),
    ("delta_rule_beta", dict(tensors=("beta", "initial_state")), dict(delta_rule=True)),
    ("delta_rule_no_beta", dict(tensors=("initial_state",)), dict(delta_rule=True)),
    ("delta_rule_l2norm", dict(tensors=("beta",)), dict(delta_rule=True, use_qk_l2norm=True)),
    ("delta_rule_grouped", dict(tensors=("beta", "initial_state"), H=2, HV=4), dict(delta_rule=True)),
    ("gated_delta_rule", dict(tensors=("g", "beta", "initial_state")), dict(delta_rule=True)),
    ("gated_delta_rule_gk_gv", dict(tensors=("g", "gk", "gv", "beta", "initial_state")), dict(delta_rule=True)),
    ("gated_delta_rule_grouped_l2norm", dict(tensors=("g", "beta", "initial_state"), H=1, HV=2),
     dict(delta_rule=True, use_qk_l2norm=True)),
    ("gated_delta_rule_beta_sigmoid", dict(tensors=("g", "beta_logits")), dict(delta_rule=True, beta_sigmoid=True)),
    ("gated_delta_rule_neg_eigval", dict(tensors=("g", "beta", "initial_state")),
     dict(delta_rule=True, allow_neg_eigval=True)),
    ("gated_delta_rule_sigmoid_neg_eigval_svf", dict(tensors=("g", "beta_logits", "initial_state"),
                                                     state_v_first=True, H=2, HV=4),
     dict(delta_rule=True, beta_sigmoid=True, allow_neg_eigval=True)),
    ("varlen_linear", dict(B=1, T=7, tensors=("initial_state",), cu_seqlens=[0, 2, 2, 6, 7]), dict()),
    ("varlen_simple_gla_reverse", dict(B=1, T=7, tensors=("g", "g_gamma", "initial_state"),
                                       cu_seqlens=[0, 0, 4, 7]), dict(reverse=True)),
    ("varlen_gla", dict(B=1, T=7, tensors=("gk", "gv"), cu_seqlens=[0, 3, 7, 7]), dict()),
    ("varlen_gated_delta_rule", dict(B=1, T=7, H=1, HV=2, tensors=("g", "beta", "initial_state"),
                                     cu_seqlens=[0, 5, 5, 7]), dict(delta_rule=True, use_qk_l2norm=True)),
]


@pytest.mark.parametrize("case", NAIVE_CASES, ids=[c[0] for c in NAIVE_CASES])
def test_reference_matches_naive_loops(case):
    _, shape, flags = case
    kw = dict(random_inputs(seed=len(case[0]), **shape), **flags)
    o, ht = fused_recurrent_reference(**kw, output_final_state=True)
    want_o, want_ht = naive_recurrence(**kw, output_final_state=True)
    assert o.dtype == F64 and o.shape == kw["v"].shape
    assert ht.dtype == F64 and ht.shape == want_ht.shape
    torch.testing.assert_close(o, want_o, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ht, want_ht, rtol=1e-10, atol=1e-12)
    # without output_final_state: the same output, no state
    o2, ht2 = fused_recurrent_reference(**kw)
    assert ht2 is None
    torch.testing.assert_close(o2, o, rtol=0, atol=0)


def test_reference_varlen_empty_sequence_passes_state_through():
    kw = random_inputs(seed=3, B=1, T=5, tensors=("g", "initial_state"), cu_seqlens=[0, 2, 2, 5])
    _, ht = fused_recurrent_reference(**kw, output_final_state=True)
    torch.testing.assert_close(ht[1], kw["initial_state"][1], rtol=0, atol=0)
    assert not torch.allclose(ht[0], kw["initial_state"][0])


def test_reference_float32_inputs_accumulate_in_float32():
    kw = random_inputs(seed=4, tensors=("g", "initial_state"))
    kw32 = {n: (x.float() if isinstance(x, torch.Tensor) and x.is_floating_point() else x) for n, x in kw.items()}
    o, ht = fused_recurrent_reference(**kw32, output_final_state=True)
    assert o.dtype == torch.float32 and ht.dtype == torch.float32
    want_o, want_ht = naive_recurrence(**kw32, output_final_state=True)
    torch.testing.assert_close(o.double(), want_o, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ht.double(), want_ht, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# (b) closed parallel forms and exact identities
# ---------------------------------------------------------------------------------------------------------
def causal(T):
    return torch.tril(torch.ones(T, T, dtype=torch.bool))


def test_linear_attention_parallel_form():
    kw = random_inputs(seed=11, B=2, T=9, H=3, K=5, V=4, tensors=("initial_state",))
    q, k, v, h0 = kw["q"], kw["k"], kw["v"], kw["initial_state"]
    scale = 0.3
    o, ht = fused_recurrent_reference(**kw, scale=scale, output_final_state=True)
    A = torch.einsum("bthk,bshk->bhts", q, k) * scale
    A = A.masked_fill(~causal(q.shape[1]), 0)
    want = torch.einsum("bhts,bshv->bthv", A, v) + scale * torch.einsum("bthk,bhkv->bthv", q, h0)
    torch.testing.assert_close(o, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ht, h0 + torch.einsum("bthk,bthv->bhkv", k, v), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("with_g_gamma", [False, True])
def test_simple_gla_parallel_form(with_g_gamma):
    tensors = ("g", "initial_state") + (("g_gamma",) if with_g_gamma else ())
    kw = random_inputs(seed=12, B=2, T=10, H=2, K=4, V=6, tensors=tensors)
    q, k, v, g, h0 = kw["q"], kw["k"], kw["v"], kw["g"], kw["initial_state"]
    T = q.shape[1]
    scale = q.shape[-1] ** -0.5
    o, ht = fused_recurrent_reference(**kw, output_final_state=True)
    gate = g + (kw["g_gamma"] if with_g_gamma else 0)   # [B, T, H]
    G = gate.cumsum(1)                                    # G_t = sum_{s<=t} g_s
    decay = torch.exp(G[:, :, None, :] - G[:, None, :, :])  # [B, t, s, H] = exp(G_t - G_s)
    A = torch.einsum("bthk,bshk->bths", q, k) * decay.permute(0, 1, 3, 2)
    A = A.masked_fill(~causal(T)[None, :, None, :], 0)
    want = scale * (torch.einsum("bths,bshv->bthv", A, v)
                    + torch.exp(G)[..., None] * torch.einsum("bthk,bhkv->bthv", q, h0))
    torch.testing.assert_close(o, want, rtol=1e-10, atol=1e-10)
    GT = G[:, -1]  # [B, H]
    want_ht = (torch.exp(GT)[..., None, None] * h0
               + torch.einsum("bthk,bthv,bth->bhkv", k, v, torch.exp(GT[:, None] - G)))
    torch.testing.assert_close(ht, want_ht, rtol=1e-10, atol=1e-10)


def test_gla_parallel_form():
    kw = random_inputs(seed=13, B=1, T=8, H=2, K=3, V=4, tensors=("gk", "gv"))
    q, k, v, gk, gv = kw["q"], kw["k"], kw["v"], kw["gk"], kw["gv"]
    o, _ = fused_recurrent_reference(**kw)
    Gk, Gv = gk.cumsum(1), gv.cumsum(1)
    dk = torch.exp(Gk[:, :, None] - Gk[:, None, :])   # [B, t, s, H, K]
    dv = torch.exp(Gv[:, :, None] - Gv[:, None, :])   # [B, t, s, H, V]
    mask = causal(q.shape[1]).double()
    want = torch.einsum("bthk,bshk,btshk,btshv,bshv,ts->bthv", q, k, dk, dv, v, mask) * q.shape[-1] ** -0.5
    torch.testing.assert_close(o, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("tensors,flags", [
    (("initial_state",), {}),
    (("g", "g_gamma", "initial_state"), {}),
    (("gk", "gv", "initial_state"), {}),
    (("g", "beta", "initial_state"), dict(delta_rule=True)),
], ids=["linear", "simple_gla", "gla", "gated_delta_rule"])
def test_reverse_is_the_forward_of_the_time_flipped_sequence(tensors, flags):
    kw = dict(random_inputs(seed=14, T=7, tensors=tensors), **flags)
    o, ht = fused_recurrent_reference(**kw, reverse=True, output_final_state=True)
    flipped = {n: (x.flip(1) if n in ("q", "k", "v", "g", "gk", "gv", "beta") else x) for n, x in kw.items()}
    fo, fht = fused_recurrent_reference(**flipped, output_final_state=True)
    torch.testing.assert_close(o, fo.flip(1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ht, fht, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("state_v_first", [False, True])
def test_varlen_equals_independent_sequences(state_v_first):
    cu = [0, 3, 3, 8, 9]
    kw = dict(random_inputs(seed=15, B=1, T=9, H=1, HV=2, tensors=("g", "beta", "initial_state"), cu_seqlens=cu,
                            state_v_first=state_v_first), delta_rule=True)
    o, ht = fused_recurrent_reference(**kw, output_final_state=True)
    for n in range(len(cu) - 1):
        bos, eos = cu[n], cu[n + 1]
        one = {name: (x[:, bos:eos] if name in ("q", "k", "v", "g", "beta") else x) for name, x in kw.items()
               if name != "cu_seqlens"}
        one["initial_state"] = kw["initial_state"][n:n + 1]
        on, hn = fused_recurrent_reference(**one, output_final_state=True)
        torch.testing.assert_close(o[:, bos:eos], on, rtol=0, atol=0)
        torch.testing.assert_close(ht[n:n + 1], hn, rtol=0, atol=0)


@pytest.mark.parametrize("gated", [False, True])
def test_delta_rule_stores_v_at_unit_key(gated):
    """beta = 1 and |k| = 1: after the update k_t S_t = v_t exactly, so with q = k and scale = 1, o = v."""
    kw = random_inputs(seed=16, T=6, tensors=("initial_state",) + (("g",) if gated else ()))
    kw["k"] = F.normalize(kw["k"], dim=-1)
    kw["q"] = kw["k"].clone()
    o, _ = fused_recurrent_reference(**kw, scale=1.0, delta_rule=True)
    torch.testing.assert_close(o, kw["v"], rtol=1e-12, atol=1e-12)


def test_grouped_heads_share_q_k():
    """HV = 2H: value heads 2h and 2h+1 read q/k head h, i.e. the same as repeating q, k along heads."""
    kw = dict(random_inputs(seed=17, H=2, HV=4, tensors=("g", "beta", "initial_state")), delta_rule=True)
    o, ht = fused_recurrent_reference(**kw, output_final_state=True)
    rep = dict(kw, q=kw["q"].repeat_interleave(2, dim=2), k=kw["k"].repeat_interleave(2, dim=2))
    o2, ht2 = fused_recurrent_reference(**rep, output_final_state=True)
    torch.testing.assert_close(o, o2, rtol=0, atol=0)
    torch.testing.assert_close(ht, ht2, rtol=0, atol=0)


def test_state_v_first_is_the_transposed_layout():
    kw = random_inputs(seed=18, K=3, V=5, tensors=("gk", "gv", "initial_state"))
    o, ht = fused_recurrent_reference(**kw, output_final_state=True)
    svf = dict(kw, initial_state=kw["initial_state"].transpose(-1, -2).contiguous(), state_v_first=True)
    o2, ht2 = fused_recurrent_reference(**svf, output_final_state=True)
    assert ht2.shape == (2, 2, 5, 3)
    torch.testing.assert_close(o2, o, rtol=0, atol=0)
    torch.testing.assert_close(ht2, ht.transpose(-1, -2), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------
# (c) the public ops on CPU tensors
# ---------------------------------------------------------------------------------------------------------
PUBLIC_TO_REFERENCE = {"use_qk_l2norm_in_kernel": "use_qk_l2norm", "use_beta_sigmoid_in_kernel": "beta_sigmoid"}


def same_call_for_reference(op, kw):
    """The public op's arguments as fused_recurrent_reference arguments, same tensors, same dtypes."""
    out = {PUBLIC_TO_REFERENCE.get(n, n): x for n, x in kw.items()}
    if op == "retention":
        out["g_gamma"] = retention_log_decay(kw["q"].shape[2], "cpu")
    out["delta_rule"] = op in GROUPED
    return out


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("output_final_state", [False, True])
def test_public_ops_on_cpu_return_the_reference(op, dtype, output_final_state):
    kw = make_inputs(op, B=2, T=5, H=2, HV=4 if op in GROUPED else None, K=8, V=6, dtype=dtype,
                     generator=torch.Generator().manual_seed(5))
    o, ht = OPS[op][0](**kw, output_final_state=output_final_state)
    ref_o, ref_ht = fused_recurrent_reference(**same_call_for_reference(op, kw), output_final_state=True)
    assert o.shape == kw["v"].shape and o.device.type == "cpu"
    torch.testing.assert_close(o, ref_o, rtol=0, atol=0, check_dtype=False)
    if output_final_state:
        assert ht.dtype == torch.float32 and ht.shape == (2, kw["v"].shape[2], 8, 6)
        torch.testing.assert_close(ht, ref_ht, rtol=0, atol=0)
    else:
        assert ht is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_output_has_the_dtype_of_v(dtype):
    """o is in v's dtype on every path (API.md; the manifest's Output("o", dtype_of="v") on CUDA)."""
    kw = make_inputs("gla", B=1, T=3, K=4, V=4, dtype=dtype, generator=torch.Generator().manual_seed(4))
    o, _ = fused_recurrent_reference(**kw)
    assert o.dtype == dtype, f"reference returned {o.dtype} for {dtype} inputs"
    o, ht = ops.fused_recurrent_gla(**kw, output_final_state=True)
    assert o.dtype == dtype and ht.dtype == torch.float32


@pytest.mark.parametrize("op", list(OPS))
def test_public_ops_on_cpu_match_the_float64_naive_loops(op):
    kw = make_inputs(op, B=1, T=6, H=1, HV=2 if op in GROUPED else None, K=4, V=3, dtype=torch.float32,
                     cu_seqlens=[0, 2, 2, 6], generator=torch.Generator().manual_seed(6))
    o, ht = OPS[op][0](**kw, output_final_state=True)
    ref = {n: (x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x)
           for n, x in same_call_for_reference(op, kw).items()}
    want_o, want_ht = naive_recurrence(**ref, output_final_state=True)
    assert rel_err(o, want_o) < TOL[torch.float32]
    assert rel_err(ht, want_ht) < TOL[torch.float32]


def test_public_op_flags_reach_the_reference():
    """reverse, state_v_first, l2norm, beta sigmoid and neg eigval change the result as the reference says."""
    kw = make_inputs("gated_delta_rule", B=1, T=5, H=1, HV=2, K=4, V=3, dtype=torch.float32, state_v_first=True,
                     generator=torch.Generator().manual_seed(7))
    kw["beta"] = torch.randn(kw["beta"].shape, generator=torch.Generator().manual_seed(8))
    flags = dict(use_qk_l2norm_in_kernel=True, use_beta_sigmoid_in_kernel=True, allow_neg_eigval=True)
    o, ht = ops.fused_recurrent_gated_delta_rule(**kw, **flags, output_final_state=True)
    ref = same_call_for_reference("gated_delta_rule", dict(kw, **flags))
    ref_o, ref_ht = fused_recurrent_reference(**ref, output_final_state=True)
    torch.testing.assert_close(o, ref_o, rtol=0, atol=0)
    torch.testing.assert_close(ht, ref_ht, rtol=0, atol=0)
    plain_o, _ = ops.fused_recurrent_gated_delta_rule(**kw)
    assert not torch.allclose(plain_o, o)

    kw = make_inputs("gla", B=2, T=5, K=4, V=3, dtype=torch.float32, generator=torch.Generator().manual_seed(9))
    o, ht = ops.fused_recurrent_gla(**kw, reverse=True, output_final_state=True)
    ref_o, ref_ht = fused_recurrent_reference(**kw, reverse=True, output_final_state=True)
    torch.testing.assert_close(o, ref_o, rtol=0, atol=0)
    torch.testing.assert_close(ht, ref_ht, rtol=0, atol=0)


def test_delta_rule_without_beta_means_ones():
    kw = make_inputs("delta_rule", T=6, K=8, V=8, dtype=torch.float32, generator=torch.Generator().manual_seed(10))
    o1, h1 = ops.fused_recurrent_delta_rule(**{**kw, "beta": None}, output_final_state=True)
    o2, h2 = ops.fused_recurrent_delta_rule(**{**kw, "beta": torch.ones_like(kw["beta"])}, output_final_state=True)
    torch.testing.assert_close(o1, o2, rtol=0, atol=0)
    torch.testing.assert_close(h1, h2, rtol=0, atol=0)


@pytest.mark.parametrize("state_v_first", [False, True])
def test_retention_is_simple_gla_with_retnet_decay(state_v_first):
    H = 4
    kw = make_inputs("retention", B=2, T=7, H=H, K=8, V=8, dtype=torch.float32, state_v_first=state_v_first,
                     generator=torch.Generator().manual_seed(11))
    o, ht = ops.fused_recurrent_retention(**kw, output_final_state=True)
    g_gamma = torch.tensor([math.log(1 - 2 ** (-5 - h)) for h in range(H)], dtype=torch.float32)
    o2, ht2 = ops.fused_recurrent_simple_gla(**kw, g_gamma=g_gamma, output_final_state=True)
    torch.testing.assert_close(o, o2, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ht, ht2, rtol=1e-6, atol=1e-6)
    # and the decay is really applied: plain linear attention differs
    o3, _ = ops.fused_recurrent_simple_gla(**kw)
    assert rel_err(o3, o) > 1e-3


def test_default_scale_is_inverse_sqrt_k():
    kw = make_inputs("simple_gla", T=4, K=16, V=8, dtype=torch.float32, generator=torch.Generator().manual_seed(12))
    o1, _ = ops.fused_recurrent_simple_gla(**kw)
    o2, _ = ops.fused_recurrent_simple_gla(**kw, scale=0.25)
    torch.testing.assert_close(o1, o2, rtol=0, atol=0)
    o3, _ = ops.fused_recurrent_simple_gla(**kw, scale=0.5)
    torch.testing.assert_close(o3, 2 * o1, rtol=1e-6, atol=1e-6)
