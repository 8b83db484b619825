"""chunk ops (chunk_simple_gla, chunk_retention, chunk_linear_attn) on the GPU against the float64
reference, forward and backward (skipped without CUDA).

Lengths are chosen around the chunk size 64 (1, 63, 64, 65, 200) and long (4096, B=1, H=2) so that the
kernels' sequence-splitting path runs; varlen batches hold empty sequences.
"""
import pytest
import torch

import fla_aot.ops as ops
import fla_aot.ops.chunk as chunk
from tests.chunk_cases import (G_GRAD_TOL, GRAD_TOL, OPS, TOL, flat_states, gla_gate_by_chunk, gla_intra_paths,
                               make_inputs, reference, rel_err, to_f64)
from triton_src import chunk_gla as chunk_gla_src
from tests.fused_recurrent_cases import (assert_same_results, capture_graph, check_two_streams_match_one,
                                        fixed_cotangent_grads)

pytestmark = pytest.mark.gpu
DEV = "cuda"
STATE_TOL = TOL


def poison(*blocks):
    """Leaves NaN-filled blocks of these (numel, dtype) in torch's caching allocator, so that the op's outputs
    (allocated next, same byte sizes) start as NaN: any element a kernel fails to write stays NaN. Filled in
    the outputs' own dtype, so that every 16-bit element is a NaN too (a float32 NaN is half zeros)."""
    held = [torch.full((n,), float("nan"), dtype=dt, device=DEV) for n, dt in blocks]
    del held


def state_blocks(op, kw):
    """(numel, float32) of each final-state tensor the call returns."""
    B, T, H, K = kw["q"].shape
    V = kw["v"].shape[-1]
    N = B if "cu_seqlens" not in kw else len(kw["cu_seqlens"]) - 1
    blocks = [(N * H * K * V, torch.float32)]
    if op == "linear_attn" and kw.get("normalize", True):
        blocks.append((N * H * K, torch.float32))
    return blocks


def run_and_check(op, kw, output_final_state=True):
    v = kw["v"]
    poison((v.numel(), v.dtype), *state_blocks(op, kw))
    o, ht = OPS[op](**kw, output_final_state=output_final_state)
    torch.cuda.synchronize()
    ref_o, ref_ht = reference(op, dict(kw, output_final_state=output_final_state))
    assert o.shape == v.shape and o.dtype == v.dtype and o.device == v.device
    assert torch.isfinite(o).all(), "output has NaN: an element was not written"
    assert rel_err(o, ref_o) < TOL[v.dtype], rel_err(o, ref_o)
    if not output_final_state:
        assert ht is None
        return o, ht
    assert isinstance(ht, tuple) == isinstance(ref_ht, tuple), type(ht)
    for got, want in zip(flat_states(ht), flat_states(ref_ht), strict=True):
        assert got.dtype == torch.float32 and got.shape == want.shape, (got.dtype, got.shape, want.shape)
        assert torch.isfinite(got).all(), "final state has NaN: an element was not written"
        assert rel_err(got, want) < STATE_TOL[v.dtype], rel_err(got, want)
    return o, ht


# ---------------------------------------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("K,V", [(8, 16), (60, 100), (100, 60), (128, 128), (256, 256)])
def test_dtypes_head_dims(op, dtype, K, V):
    run_and_check(op, make_inputs(op, B=2, T=100, H=2, K=K, V=V, dtype=dtype, device=DEV))


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("T", [1, 63, 64, 65, 200])
@pytest.mark.parametrize("initial_state", [False, True])
@pytest.mark.parametrize("output_final_state", [False, True])
def test_lengths_and_states(op, T, initial_state, output_final_state):
    kw = make_inputs(op, B=3, T=T, H=4, K=64, V=64, device=DEV, initial_state=initial_state)
    run_and_check(op, kw, output_final_state=output_final_state)


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("cu", [[0, 0, 70, 70, 200], [0, 64, 128], [0, 1, 65, 66, 130, 200], [0, 0, 200]])
@pytest.mark.parametrize("with_cpu_copy", [False, True])
def test_varlen_with_empty_sequences(op, cu, with_cpu_copy):
    kw = make_inputs(op, B=1, T=cu[-1], H=2, K=32, V=48, device=DEV, cu_seqlens=cu, cu_seqlens_cpu=with_cpu_copy)
    _, ht = run_and_check(op, kw)
    # an empty sequence passes its initial state (and z_init) through unchanged
    for n in range(len(cu) - 1):
        if cu[n] == cu[n + 1]:
            for got, h0 in zip(flat_states(ht), flat_states(kw["initial_state"]), strict=True):
                torch.testing.assert_close(got[n], h0[n])


def test_varlen_without_initial_state():
    kw = make_inputs("simple_gla", B=1, T=200, H=2, K=64, V=64, device=DEV, cu_seqlens=[0, 0, 70, 70, 200],
                     initial_state=False)
    _, ht = run_and_check("simple_gla", kw)
    assert (ht[0] == 0).all() and (ht[2] == 0).all()  # empty sequences without h0 end in a zero state


@pytest.mark.parametrize("cu", [None, [0, 0, 70, 70, 200]])
def test_simple_gla_state_v_first(cu):
    B = 2 if cu is None else 1
    run_and_check("simple_gla", make_inputs("simple_gla", B=B, T=200, K=32, V=64, device=DEV, cu_seqlens=cu,
                                            state_v_first=True, gates=("g", "g_gamma")))


@pytest.mark.parametrize("gates", [("g",), ("g_gamma",), ("g", "g_gamma")])
@pytest.mark.parametrize("strong", [False, True])
@pytest.mark.parametrize("gate_dtype", [torch.float32, torch.bfloat16])
def test_simple_gla_gates(gates, strong, gate_dtype):
    kw = make_inputs("simple_gla", T=200, K=64, V=64, device=DEV, gates=gates, strong_gates=strong,
                     gate_dtype=gate_dtype)
    run_and_check("simple_gla", kw)


def test_retention_decay_per_head():
    # H = 8 heads: decays from 1 - 2^-5 to 1 - 2^-12, the RetNet schedule
    run_and_check("retention", make_inputs("retention", B=1, T=300, H=8, K=64, V=64, device=DEV))


@pytest.mark.parametrize("z_init", [False, True])
@pytest.mark.parametrize("cu", [None, [0, 0, 70, 70, 200]])
def test_linear_attn_normalize(z_init, cu):
    B = 2 if cu is None else 1
    kw = make_inputs("linear_attn", B=B, T=200, K=64, V=64, device=DEV, cu_seqlens=cu, z_init=z_init)
    run_and_check("linear_attn", kw)
    run_and_check("linear_attn", {**kw, "normalize": False, "initial_state": flat_states(kw["initial_state"])[0]})


def test_linear_attn_normalize_is_the_default():
    kw = make_inputs("linear_attn", T=100, K=64, V=64, dtype=torch.float32, device=DEV)
    kw.pop("normalize")
    _, ht = run_and_check("linear_attn", kw)
    assert isinstance(ht, tuple) and len(ht) == 2


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("cu", [None, [0, 1, 2500, 2500, 4096]])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_long_sequence_split(op, cu, dtype):
    """One long sequence, B*H = 2 programs' worth of work: the path that splits it into segments."""
    kw = make_inputs(op, B=1, T=4096, H=2, K=64, V=64, dtype=dtype, device=DEV, cu_seqlens=cu)
    run_and_check(op, kw)


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("cu", [None, [0, 530, 530, 1000]])
def test_split_with_partial_segments(op, cu):
    """1000 tokens: segments of whole chunks and a last, partial chunk in a partial segment."""
    kw = make_inputs(op, B=1, T=1000, H=2, K=64, V=64, dtype=torch.float32, device=DEV, cu_seqlens=cu)
    run_and_check(op, kw)


@pytest.mark.parametrize("mode", ["rescan", "correct"])
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("cu", [None, [0, 530, 530, 1000]])
def test_split_fixup_modes(monkeypatch, op, cu, mode):
    """Either fix-up of the split passes (SPLIT_FIXUP) for both scans, a second scan or chunk_fixup correcting the
    first scan's states: output and every gradient."""
    monkeypatch.setattr(chunk, "SPLIT_FIXUP", dict.fromkeys(chunk.SPLIT_FIXUP, mode))
    calls, fixup = [], chunk._ops["chunk_fixup"]
    monkeypatch.setitem(chunk._ops, "chunk_fixup", lambda *args: calls.append(1) or fixup(*args))
    check_gradients(op, make_inputs(op, B=1, T=1000, H=2, K=64, V=64, dtype=torch.float32, device=DEV,
                                    cu_seqlens=cu))
    assert bool(calls) == (mode == "correct")


@pytest.mark.parametrize("gate_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("K,V", [(16, 32), (60, 100), (128, 128), (128, 256)])
@pytest.mark.parametrize("cu", [None, [0, 0, 70, 70, 200]])
def test_gla_16bit_gates(gate_dtype, K, V, cu):
    """GLA's per-key gate in 16 bits (chunk_gk_cumsum sums it per chunk in float32): output, final state and every
    gradient, the gate's in the gate's dtype."""
    kw = make_inputs("gla", B=2 if cu is None else 1, T=200, H=2, K=K, V=V, gate_dtype=gate_dtype, device=DEV,
                     cu_seqlens=cu)
    run_and_check("gla", kw)  # outputs poisoned first
    check_gradients("gla", kw)


def test_long_sequence_strong_gates_and_state_v_first():
    kw = make_inputs("simple_gla", B=1, T=4096, H=2, K=128, V=128, device=DEV, strong_gates=True,
                     gates=("g", "g_gamma"), state_v_first=True)
    run_and_check("simple_gla", kw)


def test_non_contiguous_inputs():
    kw = make_inputs("simple_gla", T=100, K=32, V=32, device=DEV)
    q = torch.cat([kw["q"], kw["q"]], dim=-1)[..., :32]
    assert not q.is_contiguous()
    o1, h1 = OPS["simple_gla"](**{**kw, "q": q}, output_final_state=True)
    o2, h2 = OPS["simple_gla"](**{**kw, "q": q.contiguous()}, output_final_state=True)
    torch.testing.assert_close(o1, o2, rtol=0, atol=0)
    torch.testing.assert_close(h1, h2, rtol=0, atol=0)


def test_chunk_matches_fused_recurrent_on_cuda():
    """Two kernels, one recurrence: chunk_simple_gla and fused_recurrent_simple_gla agree."""
    kw = make_inputs("simple_gla", T=200, K=64, V=64, dtype=torch.float32, device=DEV, gates=("g", "g_gamma"))
    o1, h1 = ops.chunk_simple_gla(**kw, output_final_state=True)
    o2, h2 = ops.fused_recurrent_simple_gla(**kw, output_final_state=True)
    assert rel_err(o1, o2) < TOL[torch.float32] and rel_err(h1, h2) < TOL[torch.float32]


# ---------------------------------------------------------------------------------------------------------
# CUDA graphs and torch.compile
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [dict(B=2, T=200, H=4, K=128, V=128), dict(B=1, T=4096, H=2, K=64, V=64)],
                         ids=["batch", "split"])
def test_cuda_graph_capture_and_replay(shape):
    fn = OPS["simple_gla"]
    shape = dict(shape, device=DEV, gates=("g", "g_gamma"))
    static = make_inputs("simple_gla", **shape)
    graph, (o_static, ht_static) = capture_graph(lambda: fn(**static, output_final_state=True))
    for _ in range(3):
        fresh = make_inputs("simple_gla", **shape)
        for name, x in fresh.items():
            static[name].copy_(x)
        graph.replay()
        o, ht = fn(**fresh, output_final_state=True)
        torch.testing.assert_close(o_static, o, rtol=0, atol=0)
        torch.testing.assert_close(ht_static, ht, rtol=0, atol=0)


def test_torch_compile_fullgraph_simple_gla():
    kw = make_inputs("simple_gla", T=100, K=64, V=64, device=DEV)

    def step(q, k, v, g, initial_state):
        o, ht = OPS["simple_gla"](q, k, v, g=g, initial_state=initial_state, output_final_state=True)
        return o * 2, ht

    compiled = torch.compile(step, fullgraph=True)
    args = [kw[n] for n in ("q", "k", "v", "g", "initial_state")]
    got, want = compiled(*args), step(*args)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)


def test_torch_compile_fullgraph_linear_attn_normalize():
    kw = make_inputs("linear_attn", T=100, K=64, V=64, dtype=torch.float32, device=DEV)
    kv0, z0 = kw["initial_state"]

    def step(q, k, v, kv0, z0):
        return OPS["linear_attn"](q, k, v, initial_state=(kv0, z0), output_final_state=True, normalize=True)

    compiled = torch.compile(step, fullgraph=True)
    args = (kw["q"], kw["k"], kw["v"], kv0, z0)
    (o1, (h1, z1)), (o2, (h2, z2)) = compiled(*args), step(*args)
    # the normalisation is plain torch code that inductor may fuse: equal up to float32 rounding
    torch.testing.assert_close(o1, o2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h1, h2, rtol=0, atol=0)
    torch.testing.assert_close(z1, z2, rtol=1e-6, atol=1e-6)


def _fwd_bwd(op, kw):
    """Output, final state and every input gradient of one forward + backward (fixed cotangents)."""
    leaves = {n: x.detach().clone().requires_grad_(True) for n, x in _leaves(kw).items()}
    o, ht = OPS[op](**_with_leaves(kw, leaves), output_final_state=True)
    outs = (o, *flat_states(ht))
    return [x.detach() for x in outs], fixed_cotangent_grads(outs, leaves)


@pytest.mark.parametrize("op", ["gla", "simple_gla"])
@pytest.mark.parametrize("shape", [dict(B=2, T=300, H=4, K=128, V=128), dict(B=1, T=4096, H=2, K=64, V=64)],
                         ids=["batch", "split"])
def test_two_streams_match_one(monkeypatch, op, shape):
    """The kernels that overlap on two streams (utils.Concurrent) give what they give in order, also when the
    caller runs on a stream of its own."""
    kw = make_inputs(op, **shape, device=DEV)
    # simple GLA sums dg with atomics: the order may differ
    check_two_streams_match_one(monkeypatch, lambda: _fwd_bwd(op, kw), grad_rel_tol=1e-6)


def test_cuda_graph_capture_of_the_backward():
    """Forward and backward captured in one CUDA graph (the two-stream fork and join recorded in it) and replayed
    on fresh inputs give what eager calls give."""
    op = "gla"
    shape = dict(B=2, T=200, H=2, K=64, V=64, device=DEV)
    static = make_inputs(op, **shape)
    graph, captured = capture_graph(lambda: _fwd_bwd(op, static))
    for seed in range(1, 3):
        fresh = make_inputs(op, **shape, generator=torch.Generator(device=DEV).manual_seed(seed))
        for name, x in fresh.items():
            static[name].copy_(x)
        graph.replay()
        assert_same_results(captured, _fwd_bwd(op, fresh), grad_rel_tol=0)


# ---------------------------------------------------------------------------------------------------------
# backward
# ---------------------------------------------------------------------------------------------------------
def _leaves(kw):
    """The differentiable inputs of a call, by name: q, k, v, g, initial_state (or its (kv, z) parts)."""
    out = {n: kw[n] for n in ("q", "k", "v", "g") if n in kw}
    h0 = kw.get("initial_state")
    if isinstance(h0, tuple):
        out["initial_state.kv"], out["initial_state.z"] = h0
    elif h0 is not None:
        out["initial_state"] = h0
    return out


def _with_leaves(kw, leaves):
    kw = dict(kw, **{n: x for n, x in leaves.items() if "." not in n})
    if "initial_state.kv" in leaves:
        kw["initial_state"] = (leaves["initial_state.kv"], leaves["initial_state.z"])
    return kw


def check_gradients(op, kw):
    """Output, final state and every gradient (q, k, v, g, initial_state) against float64 autograd of the
    reference, with random cotangents for o and for the final state (so that a gradient flows into it)."""
    leaves = {n: x.detach().clone().requires_grad_(True) for n, x in _leaves(kw).items()}
    kw = _with_leaves(kw, leaves)
    o, ht = OPS[op](**kw, output_final_state=True)
    states = flat_states(ht)
    do = torch.randn_like(o)
    dstates = [torch.randn_like(s) for s in states]
    torch.autograd.backward((o, *states), (do, *dstates))

    ref_leaves = {n: to_f64(x).requires_grad_(True) for n, x in leaves.items()}
    ref_o, ref_ht = reference(op, dict(_with_leaves(kw, ref_leaves), output_final_state=True))
    ref_states = flat_states(ref_ht)
    torch.autograd.backward((ref_o, *ref_states), (to_f64(do), *map(to_f64, dstates)))

    dtype = kw["v"].dtype
    assert rel_err(o, ref_o) < TOL[dtype], rel_err(o, ref_o)
    for s, ref_s in zip(states, ref_states, strict=True):
        assert rel_err(s, ref_s) < STATE_TOL[dtype], rel_err(s, ref_s)
    for name, leaf in leaves.items():
        got, want = leaf.grad, ref_leaves[name].grad
        assert got is not None, f"no gradient for {name}"
        assert got.dtype == leaf.dtype and got.shape == leaf.shape, (name, got.dtype, got.shape)
        assert torch.isfinite(got).all(), name
        tol = (G_GRAD_TOL if name == "g" else GRAD_TOL)[dtype]
        assert rel_err(got, want) < tol, (name, rel_err(got, want))


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("K,V", [(16, 32), (60, 100), (128, 128)])
def test_gradients(op, dtype, K, V):
    check_gradients(op, make_inputs(op, B=2, T=100, H=2, K=K, V=V, dtype=dtype, device=DEV))


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("T", [1, 64, 65])
def test_gradients_lengths(op, T):
    check_gradients(op, make_inputs(op, B=2, T=T, H=2, K=32, V=32, dtype=torch.float32, device=DEV))


@pytest.mark.parametrize("strong", [False, True])
@pytest.mark.parametrize("cu", [None, [0, 0, 70, 70, 200]])
@pytest.mark.parametrize("state_v_first", [False, True])
def test_gla_gradients_gates_varlen(strong, cu, state_v_first):
    # strong per-key gates: exp(G_i - G_j) spans far past float32 inside a chunk, so only the sub-chunk
    # factoring keeps the intra-chunk products finite and exact
    kw = make_inputs("gla", B=2 if cu is None else 1, T=200, H=2, K=32, V=64, dtype=torch.float32, device=DEV,
                     cu_seqlens=cu, strong_gates=strong, state_v_first=state_v_first)
    check_gradients("gla", kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("paths,cu", [(("chunk", "block", "tree"), None), (("tree", "chunk", "block"), [0, 0, 70, 300]),
                                      (("block",), None)])
def test_gla_intra_paths(dtype, paths, cu):
    """chunk_gla's intra-chunk products take one reference row for a chunk, one for each 16-row block, or the
    pairing tree, by how far the gate sums stray (SPAN, per dtype): gates that send each chunk of a sequence down
    a chosen path, each path counted from the gates and taken, and the output and every gradient right."""
    span = chunk_gla_src._span(str(dtype).removeprefix("torch."))
    B = 2 if cu is None else 1
    kw = make_inputs("gla", B=B, T=300, H=2, K=64, V=64, dtype=dtype, device=DEV, cu_seqlens=cu)
    kw["g"] = gla_gate_by_chunk(B, 300, 2, 64, paths, span, device=DEV)
    taken = gla_intra_paths(kw["g"], span, cu)
    assert all(taken[p] > 0 for p in paths), taken
    check_gradients("gla", kw)


@pytest.mark.parametrize("gates", [("g",), ("g_gamma",), ("g", "g_gamma")])
@pytest.mark.parametrize("strong", [False, True])
@pytest.mark.parametrize("cu", [None, [0, 0, 70, 70, 200]])
def test_simple_gla_gradients_gates_varlen(gates, strong, cu):
    B = 2 if cu is None else 1
    kw = make_inputs("simple_gla", B=B, T=200, H=2, K=32, V=64, dtype=torch.float32, device=DEV, cu_seqlens=cu,
                     gates=gates, strong_gates=strong)
    check_gradients("simple_gla", kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_simple_gla_gradients_state_v_first(dtype):
    kw = make_inputs("simple_gla", T=100, K=32, V=64, dtype=dtype, device=DEV, state_v_first=True,
                     gates=("g", "g_gamma"))
    check_gradients("simple_gla", kw)


def test_simple_gla_gradients_without_initial_state():
    check_gradients("simple_gla", make_inputs("simple_gla", T=100, K=64, V=64, dtype=torch.float32, device=DEV,
                                              initial_state=False))


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("cu", [None, [0, 0, 70, 70, 200]])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_attn_gradients(normalize, cu, dtype):
    B = 2 if cu is None else 1
    kw = make_inputs("linear_attn", B=B, T=200, H=2, K=32, V=64, dtype=dtype, device=DEV, cu_seqlens=cu,
                     normalize=normalize)
    check_gradients("linear_attn", kw)


@pytest.mark.parametrize("op", ["simple_gla", "linear_attn", "gla"])
@pytest.mark.parametrize("cu", [None, [0, 1, 2500, 2500, 4096]])
def test_gradients_long_sequence_split(op, cu):
    kw = make_inputs(op, B=1, T=4096, H=2, K=32, V=32, dtype=torch.float32, device=DEV, cu_seqlens=cu)
    check_gradients(op, kw)


@pytest.mark.parametrize("op", ["simple_gla", "gla"])
def test_gate_gradient_long_sequence_16bit(op):
    """The gate's gradient over 4096 bfloat16 tokens within G_GRAD_TOL: each token's sum over the rest of the
    sequence is taken per chunk from the states, where a suffix sum over the sequence lost two digits by T = 8192."""
    kw = make_inputs(op, B=1, T=4096, H=4, K=64, V=64, dtype=torch.bfloat16, device=DEV)
    check_gradients(op, kw)


def test_backward_of_o_alone_and_of_the_state_alone():
    """A loss on o alone (no cotangent for the final state) and on the final state alone."""
    kw = make_inputs("simple_gla", T=100, K=32, V=32, dtype=torch.float32, device=DEV)
    for use_o in (True, False):
        leaves = {n: x.detach().clone().requires_grad_(True) for n, x in _leaves(kw).items()}
        o, ht = OPS["simple_gla"](**_with_leaves(kw, leaves), output_final_state=True)
        (o.sum() if use_o else ht.sum()).backward()
        ref_leaves = {n: to_f64(x).requires_grad_(True) for n, x in leaves.items()}
        ref_o, ref_ht = reference("simple_gla", dict(_with_leaves(kw, ref_leaves), output_final_state=True))
        (ref_o.sum() if use_o else ref_ht.sum()).backward()
        for name, leaf in leaves.items():
            want = ref_leaves[name].grad
            if want is None:  # q does not reach the final state: no gradient, or a zero one
                assert leaf.grad is None or not leaf.grad.any(), (use_o, name)
                continue
            tol = (G_GRAD_TOL if name == "g" else GRAD_TOL)[torch.float32]
            assert rel_err(leaf.grad, want) < tol, (use_o, name)


class TestCudaValidation:
    """Errors on CUDA tensors (the CPU tests check the same rules on the reference path)."""

    @pytest.mark.parametrize("op", list(OPS))
    def test_dtype_mismatch(self, op):
        kw = make_inputs(op, device=DEV)
        with pytest.raises(TypeError):
            OPS[op](**{**kw, "k": kw["k"].half()})

    @pytest.mark.parametrize("op", list(OPS))
    def test_shape_mismatch(self, op):
        kw = make_inputs(op, device=DEV)
        with pytest.raises(ValueError):
            OPS[op](**{**kw, "k": kw["k"][..., :-1]})

    @pytest.mark.parametrize("op", list(OPS))
    def test_unsorted_cu_seqlens(self, op):
        kw = make_inputs(op, B=1, T=130, device=DEV, initial_state=False)
        with pytest.raises(ValueError, match="non-decreasing"):
            OPS[op](**kw, cu_seqlens=torch.tensor([0, 100, 64, 130], device=DEV))

    @pytest.mark.parametrize("op", list(OPS))
    def test_cu_seqlens_not_ending_at_T(self, op):
        kw = make_inputs(op, B=1, T=130, device=DEV, initial_state=False)
        with pytest.raises(ValueError, match="end at T=130"):
            OPS[op](**kw, cu_seqlens=torch.tensor([0, 64, 129], device=DEV))

    def test_initial_state_on_cpu(self):
        kw = make_inputs("simple_gla", device=DEV)
        with pytest.raises(ValueError, match="initial_state"):
            OPS["simple_gla"](**{**kw, "initial_state": kw["initial_state"].cpu()})
