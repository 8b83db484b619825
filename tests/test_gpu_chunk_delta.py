"""chunk_delta_rule and chunk_gated_delta_rule on the GPU against the float64 reference: the output, the final
state and every gradient (q, k, v, g, beta, initial_state, with a cotangent on the final state too), outputs
poisoned with NaN before the call (skipped without CUDA).

fla-core 0.6.0 refuses this backward on Hopper with Triton 3.4 to 3.7.0 (a Triton miscompile); these kernels are
compiled by the build and checked here on the GPU they run on.
"""
import pytest
import torch
import torch.nn.functional as F

import fla_aot.ops as ops
import fla_aot.ops.chunk_delta as chunk_delta
from fla_aot.reference import fused_recurrent_reference
from tests import chunk_delta_kernel_refs as kernel_refs
from tests.fused_recurrent_cases import (assert_same_results, capture_graph, check_two_streams_match_one,
                                        fixed_cotangent_grads, rel_err)

pytestmark = pytest.mark.gpu
DEV = "cuda"
# bf16 inputs: outputs land near 5e-3, gradients near 1e-2 (fla's own tests allow about the same)
TOL = {torch.float16: 5e-3, torch.bfloat16: 2e-2}
GRAD_TOL = {torch.float16: 1e-2, torch.bfloat16: 3e-2}


def make_inputs(B=2, T=100, H=2, HV=None, K=32, V=48, dtype=torch.bfloat16, gate="weak", lengths=None,
                initial_state=True, state_v_first=False, seed=0):
    HV = HV or H
    gen = torch.Generator(device=DEV).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=DEV)

    N = B if lengths is None else len(lengths)
    kw = dict(q=randn(B, T, H, K).to(dtype), k=F.normalize(randn(B, T, H, K), dim=-1).to(dtype),
              v=randn(B, T, HV, V).to(dtype), beta=torch.rand(B, T, HV, generator=gen, device=DEV).to(dtype))
    if gate is not None:
        # strong gates forget within a few steps; weak ones keep the state for hundreds
        kw["g"] = F.logsigmoid(randn(B, T, HV) + (0. if gate == "strong" else 4.))
    if initial_state:
        kw["initial_state"] = randn(N, HV, *((V, K) if state_v_first else (K, V)))
    if lengths is not None:
        kw["cu_seqlens"] = torch.tensor((0,) + tuple(lengths), device=DEV).cumsum(0)
    if state_v_first:
        kw["state_v_first"] = True
    return kw


def reference(kw, flags):
    ref = {n: (x.detach().double().requires_grad_() if isinstance(x, torch.Tensor) and x.is_floating_point() else x)
           for n, x in kw.items()}
    o, ht = fused_recurrent_reference(
        ref["q"], ref["k"], ref["v"], g=ref.get("g"), beta=ref["beta"], initial_state=ref.get("initial_state"),
        output_final_state=True, use_qk_l2norm=flags.get("use_qk_l2norm_in_kernel", False),
        beta_sigmoid=flags.get("use_beta_sigmoid_in_kernel", False),
        allow_neg_eigval=flags.get("allow_neg_eigval", False), state_v_first=kw.get("state_v_first", False),
        cu_seqlens=kw.get("cu_seqlens"), delta_rule=True)
    return o, ht, ref


def check(kw, grads=True, **flags):
    """Runs the op (gated when kw has g) and compares everything with the float64 reference."""
    op = ops.chunk_gated_delta_rule if "g" in kw else ops.chunk_delta_rule
    kw = {n: (x.detach().requires_grad_(grads) if isinstance(x, torch.Tensor) and x.is_floating_point() else x)
          for n, x in kw.items()}
    v = kw["v"]
    N = len(kw["cu_seqlens"]) - 1 if "cu_seqlens" in kw else v.shape[0]
    HV, V, K = v.shape[2], v.shape[3], kw["q"].shape[3]
    held = [torch.full((v.numel(),), float("nan"), dtype=v.dtype, device=DEV),
            torch.full((N * HV * K * V,), float("nan"), device=DEV)]
    del held  # the op's outputs reuse these NaN-filled blocks: an element left unwritten stays NaN
    o, ht = op(**kw, output_final_state=True, **flags)
    ref_o, ref_ht, ref = reference(kw, flags)
    dtype = v.dtype
    assert o.shape == v.shape and o.dtype == dtype and ht.dtype == torch.float32
    assert torch.isfinite(o).all() and torch.isfinite(ht).all(), "an output element was not written"
    errs = {"o": rel_err(o, ref_o), "ht": rel_err(ht, ref_ht)}
    if grads:
        do, dht = torch.randn_like(o), torch.randn_like(ht)
        torch.autograd.backward((o, ht), (do, dht))
        torch.autograd.backward((ref_o, ref_ht), (do.double(), dht.double()))
        for name, x in kw.items():
            if isinstance(x, torch.Tensor) and x.requires_grad:
                assert x.grad is not None and x.grad.shape == x.shape and x.grad.dtype == x.dtype, name
                assert torch.isfinite(x.grad).all(), f"d{name} has NaN"
                errs["d" + name] = rel_err(x.grad, ref[name].grad)
    print(errs)
    assert errs.pop("o") < TOL[dtype] and errs.pop("ht") < TOL[dtype], errs
    assert all(e < GRAD_TOL[dtype] for e in errs.values()), errs
    return errs


@pytest.mark.parametrize("gate", [None, "weak", "strong"])
@pytest.mark.parametrize("T", [1, 63, 64, 65, 200])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lengths_around_the_chunk(gate, T, dtype):
    check(make_inputs(T=T, dtype=dtype, gate=gate))


@pytest.mark.parametrize("K,V", [(8, 8), (16, 100), (60, 60), (100, 16), (128, 128), (256, 64), (64, 256)])
def test_head_dims(K, V):
    check(make_inputs(B=1, T=130, K=K, V=V, gate="weak"))


@pytest.mark.parametrize("gate", [None, "strong"])
def test_varlen_with_an_empty_sequence(gate):
    check(make_inputs(B=1, T=260, lengths=(70, 0, 1, 189), gate=gate, HV=4))


def test_grouped_value_heads_state_v_first_no_initial_state():
    check(make_inputs(B=2, T=90, H=2, HV=6, initial_state=False, state_v_first=True))


@pytest.mark.parametrize("flags", [dict(use_qk_l2norm_in_kernel=True),
                                   dict(use_beta_sigmoid_in_kernel=True, allow_neg_eigval=True)])
def test_in_kernel_options(flags):
    kw = make_inputs(T=100)
    kw["beta"] = (kw["beta"].float() * 4 - 2).to(kw["beta"].dtype) if "use_beta_sigmoid_in_kernel" in flags \
        else kw["beta"]
    check(kw, **flags)


def test_long_sequence():
    check(make_inputs(B=1, T=2048, H=2, K=64, V=64, gate="weak"))


# the inputs of the transcription checks (also tools/check_delta_forms.py's): small varlen batches with an empty
# sequence, given K, V and dtype; and one sequence of the benchmark's size
TRANSCRIPTION_INPUTS = dict(B=1, T=200, H=2, HV=4, gate="strong", lengths=(70, 0, 130))
AT_SCALE_INPUTS = dict(B=1, T=2048, H=16, K=128, V=128, gate="strong")


def transcription_errors(kw):
    """{kernel: {output: relative error}}: the reversed state pass, chunk_delta_bwd_dqkw and chunk_delta_bwd_wy,
    each on the arguments it got in one backward of kw, against its float64 transcription
    (tests/chunk_delta_kernel_refs.py)."""
    errs = kernel_refs.compare(kernel_refs.record_backward(lambda: _fwd_bwd(kw)))
    assert set(errs) == set(kernel_refs.CHECKED)
    return errs


@pytest.mark.parametrize("K,V", [(8, 8), (16, 100), (32, 48), (60, 60), (128, 128), (256, 64)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("slices", [64, 32, 16])
def test_backward_kernels_match_their_transcriptions(monkeypatch, K, V, dtype, slices):
    """Each backward kernel against its transcription under each V slicing of the state passes: names the kernel
    and output that a miscompile breaks."""
    monkeypatch.setattr(chunk_delta, "_slicing", lambda tabs, v: (slices < 64, slices < 32))
    errs = transcription_errors(make_inputs(K=K, V=V, dtype=dtype, **TRANSCRIPTION_INPUTS))
    # the same roundings as the kernels: what is left is float32 summation order and a rare flipped rounding
    assert all(e < 1e-3 for per_kernel in errs.values() for e in per_kernel.values()), errs


def test_backward_kernels_match_their_transcriptions_at_scale():
    """As above on one sequence of the benchmark's size (T=2048, 16 heads, K=V=128) with the op's own slicing: with
    16-bit dv_new and chunk_delta_bwd_dqkw software-pipelined (num_stages=2), dw came out 5e-2 from its
    transcription here on the H200 and right at every small shape above."""
    errs = transcription_errors(make_inputs(**AT_SCALE_INPUTS))
    assert all(e < 1e-3 for per_kernel in errs.values() for e in per_kernel.values()), errs


@pytest.mark.parametrize("slices", [64, 32, 16])
def test_state_pass_slicings(monkeypatch, slices):
    """Each V slicing of the state passes (chosen from the batch and SM count: _slicing), on one small batch."""
    monkeypatch.setattr(chunk_delta, "_slicing", lambda tabs, v: (slices < 64, slices < 32))
    check(make_inputs(B=1, T=330, H=2, HV=4, K=128, V=128, lengths=(70, 0, 260), gate="strong",
                      state_v_first=True))


def _fwd_bwd(kw, backward=True):
    """(o, ht) and, with backward, every input's gradient by name (fixed cotangents)."""
    if not backward:
        return ops.chunk_gated_delta_rule(**kw, output_final_state=True), {}
    leaves = {n: x.detach().clone().requires_grad_(True) for n, x in kw.items()
              if isinstance(x, torch.Tensor) and x.is_floating_point()}
    o, ht = ops.chunk_gated_delta_rule(**dict(kw, **leaves), output_final_state=True)
    return (o.detach(), ht.detach()), fixed_cotangent_grads((o, ht), leaves)


def test_two_streams_match_one(monkeypatch):
    """The backward's rerun of the state pass overlaps the output's share of dv_new and the reversed pass on a
    second stream (utils.Concurrent): the same results as in order, also when the caller runs on a stream of its
    own."""
    kw = make_inputs(B=2, T=300, H=2, HV=4, K=128, V=128, gate="strong")
    # the gate's terms are summed with atomics: the order may differ
    check_two_streams_match_one(monkeypatch, lambda: _fwd_bwd(kw), grad_rel_tol=1e-6)


def test_no_grad_forward_matches():
    kw = make_inputs(T=150)
    with torch.no_grad():
        o, ht = ops.chunk_gated_delta_rule(**kw, output_final_state=True)
    o2, _ = ops.chunk_gated_delta_rule(**{n: x for n, x in kw.items()}, output_final_state=True)
    torch.testing.assert_close(o, o2, rtol=0, atol=0)


def test_float32_is_a_clear_error():
    kw = make_inputs(T=10)
    kw = {n: (x.float() if n in "qkv" else x) for n, x in kw.items()}
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        ops.chunk_gated_delta_rule(**kw)


def test_head_dim_over_256_is_a_clear_error():
    kw = make_inputs(T=10, K=320, initial_state=False)
    with pytest.raises((ValueError, TypeError, RuntimeError), match="K"):
        ops.chunk_gated_delta_rule(**kw)


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward_backward"])
def test_cuda_graph_capture_and_replay(backward):
    """Replays of the captured call (with backward, the two-stream fork and join recorded in the graph) give what
    eager calls on the same fresh inputs give."""
    static = make_inputs(B=2, T=130, seed=1)
    graph, captured = capture_graph(lambda: _fwd_bwd(static, backward))
    for seed in range(2, 4):
        fresh = make_inputs(B=2, T=130, seed=seed)
        for name, x in fresh.items():
            static[name].copy_(x)
        graph.replay()
        # the gate's terms are summed with atomics: the order may differ
        assert_same_results(captured, _fwd_bwd(fresh, backward), grad_rel_tol=1e-6)


def test_torch_compile_fullgraph():
    kw = make_inputs(T=100, K=64, V=64)

    def step(q, k, v, g, beta, initial_state):
        o, ht = ops.chunk_gated_delta_rule(q, k, v, g, beta, initial_state=initial_state, output_final_state=True)
        return o * 2, ht

    compiled = torch.compile(step, fullgraph=True)
    args = [kw[n] for n in ("q", "k", "v", "g", "beta", "initial_state")]
    got, want = compiled(*args), step(*args)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)


@pytest.mark.parametrize("op", ["chunk_gated_delta_rule", "fused_recurrent_gated_delta_rule"])
def test_gate_in_kernel(op):
    """use_gate_in_kernel=True on CUDA: the same output as the gate -exp(A_log) * softplus(g + dt_bias) passed in,
    and float64-reference gradients for A_log and dt_bias."""
    kw = make_inputs(B=2, T=100, H=2, HV=4)
    raw = torch.randn_like(kw.pop("g"))
    A_log = torch.randn(4, device=DEV, dtype=torch.float64).requires_grad_()
    dt_bias = torch.randn(4, device=DEV, dtype=torch.float64).requires_grad_()
    A32, b32 = A_log.float().detach().requires_grad_(), dt_bias.float().detach().requires_grad_()
    o, _ = getattr(ops, op)(**kw, g=raw, use_gate_in_kernel=True, A_log=A32, dt_bias=b32)
    g = -A_log.exp() * F.softplus(raw.double() + dt_bias)
    ref_o, _ = fused_recurrent_reference(kw["q"].double(), kw["k"].double(), kw["v"].double(), g=g,
                                         beta=kw["beta"].double(), initial_state=kw["initial_state"].double(),
                                         delta_rule=True)
    assert rel_err(o, ref_o) < TOL[torch.bfloat16]
    do = torch.randn_like(o)
    dA, db = torch.autograd.grad(o, (A32, b32), do)
    ref_dA, ref_db = torch.autograd.grad(ref_o, (A_log, dt_bias), do.double())
    assert rel_err(dA, ref_dA) < GRAD_TOL[torch.bfloat16] and rel_err(db, ref_db) < GRAD_TOL[torch.bfloat16]
