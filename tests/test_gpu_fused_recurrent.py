"""fused_recurrent ops on the GPU against the float64 reference (skipped without CUDA)."""
import pytest
import torch

import fla_aot.ops as ops
from fla_aot.reference import fused_recurrent_reference
from tests.fused_recurrent_cases import GROUPED, OPS, TOL, capture_graph, make_inputs, reference_kwargs, rel_err

pytestmark = pytest.mark.gpu
DEV = "cuda"


def poison_allocator(*shapes):
    """Leaves NaN-filled blocks of these sizes in torch's caching allocator, so the op's outputs (allocated
    next, same sizes) start as NaN: any element the kernel fails to write stays NaN."""
    blocks = [torch.full(s, float("nan"), device=DEV) for s in shapes]
    del blocks


def run_and_check(op, kw, output_final_state=True, **flags):
    fn = OPS[op][0]
    q, v = kw["q"], kw["v"]
    B, T, HV, V = v.shape
    N = B if "cu_seqlens" not in kw else len(kw["cu_seqlens"]) - 1
    o_elems = B * T * HV * V * v.element_size() // 4 + 1
    poison_allocator((o_elems,), (N * HV * q.shape[-1] * V,))
    o, ht = fn(**kw, output_final_state=output_final_state, **flags)
    torch.cuda.synchronize()
    ref_o, ref_ht = fused_recurrent_reference(**reference_kwargs(op, dict(kw, **flags)),
                                              output_final_state=output_final_state)
    assert o.shape == v.shape and o.dtype == v.dtype
    assert torch.isfinite(o).all(), "output has NaN: an element was not written"
    assert rel_err(o, ref_o) < TOL[v.dtype], rel_err(o, ref_o)
    if output_final_state:
        assert ht.dtype == torch.float32 and ht.shape == ref_ht.shape
        assert torch.isfinite(ht).all()
        assert rel_err(ht, ref_ht) < 1e-3, rel_err(ht, ref_ht)
    else:
        assert ht is None
    return o, ht


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("K,V", [(8, 16), (60, 100), (128, 128), (256, 256), (100, 60)])
def test_ops_dtypes_head_dims(op, dtype, K, V):
    kw = make_inputs(op, B=2, T=13, H=2, K=K, V=V, dtype=dtype, device=DEV)
    run_and_check(op, kw)


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("T", [1, 67])
@pytest.mark.parametrize("initial_state", [False, True])
@pytest.mark.parametrize("output_final_state", [False, True])
def test_ops_lengths_and_states(op, T, initial_state, output_final_state):
    kw = make_inputs(op, B=3, T=T, H=4, K=64, V=64, device=DEV, initial_state=initial_state)
    run_and_check(op, kw, output_final_state=output_final_state)


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("cu", [[0, 5, 5, 21, 22], [0, 0, 30], [0, 64, 128]])
def test_varlen_with_empty_sequence(op, cu):
    kw = make_inputs(op, B=1, T=cu[-1], H=2, K=32, V=48, device=DEV, cu_seqlens=cu)
    _, ht = run_and_check(op, kw)
    # an empty sequence passes its initial state through unchanged
    for n in range(len(cu) - 1):
        if cu[n] == cu[n + 1]:
            torch.testing.assert_close(ht[n], kw["initial_state"][n])


@pytest.mark.parametrize("op", [o for o in OPS if o not in GROUPED])
def test_reverse(op):
    run_and_check(op, make_inputs(op, T=20, device=DEV), reverse=True)


@pytest.mark.parametrize("op", ["simple_gla", "retention", "gla", "gated_delta_rule"])
def test_state_v_first(op):
    run_and_check(op, make_inputs(op, T=11, K=32, V=64, device=DEV, state_v_first=True))


@pytest.mark.parametrize("op", ["simple_gla", "gla", "gated_delta_rule"])
@pytest.mark.parametrize("strong", [False, True])
@pytest.mark.parametrize("gate_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gates(op, strong, gate_dtype):
    run_and_check(op, make_inputs(op, T=40, device=DEV, strong_gates=strong, gate_dtype=gate_dtype))


@pytest.mark.parametrize("op", GROUPED)
@pytest.mark.parametrize("l2norm", [False, True])
def test_delta_rule_grouped_heads_and_l2norm(op, l2norm):
    kw = make_inputs(op, B=2, T=17, H=2, HV=6, K=128, V=64, device=DEV)
    run_and_check(op, kw, use_qk_l2norm_in_kernel=l2norm)


def test_gated_delta_rule_beta_flags():
    kw = make_inputs("gated_delta_rule", T=12, device=DEV)
    kw["beta"] = torch.randn_like(kw["beta"])  # logits
    run_and_check("gated_delta_rule", kw, use_beta_sigmoid_in_kernel=True, allow_neg_eigval=True)


def test_delta_rule_without_beta_means_ones():
    kw = make_inputs("delta_rule", T=12, device=DEV)
    o1, _ = ops.fused_recurrent_delta_rule(**{**kw, "beta": None})
    o2, _ = ops.fused_recurrent_delta_rule(**{**kw, "beta": torch.ones_like(kw["beta"])})
    torch.testing.assert_close(o1, o2, rtol=0, atol=0)


def test_non_contiguous_inputs():
    kw = make_inputs("gla", T=10, K=32, V=32, device=DEV)
    q = torch.cat([kw["q"], kw["q"]], dim=-1)[..., :32]
    assert not q.is_contiguous()
    o1, _ = ops.fused_recurrent_gla(**{**kw, "q": q})
    o2, _ = ops.fused_recurrent_gla(**{**kw, "q": q.contiguous()})
    torch.testing.assert_close(o1, o2, rtol=0, atol=0)


def test_cuda_graph_capture_and_replay():
    op = "gated_delta_rule"
    kw = make_inputs(op, B=4, T=1, H=4, K=128, V=128, device=DEV)
    static = {k: (x.clone() if isinstance(x, torch.Tensor) else x) for k, x in kw.items()}
    fn = ops.fused_recurrent_gated_delta_rule
    graph, (o_static, ht_static) = capture_graph(lambda: fn(**static, output_final_state=True))
    for _ in range(3):
        fresh = make_inputs(op, B=4, T=1, H=4, K=128, V=128, device=DEV)
        for k, x in fresh.items():
            static[k].copy_(x)
        graph.replay()
        o, ht = fn(**fresh, output_final_state=True)
        torch.testing.assert_close(o_static, o, rtol=0, atol=0)
        torch.testing.assert_close(ht_static, ht, rtol=0, atol=0)


def test_torch_compile_fullgraph():
    kw = make_inputs("gated_delta_rule", T=5, device=DEV)

    def step(q, k, v, g, beta, initial_state):
        o, ht = ops.fused_recurrent_gated_delta_rule(q, k, v, g=g, beta=beta, initial_state=initial_state,
                                                     output_final_state=True, use_qk_l2norm_in_kernel=True)
        return o * 2, ht

    compiled = torch.compile(step, fullgraph=True)
    args = [kw[n] for n in ("q", "k", "v", "g", "beta", "initial_state")]
    got, want = compiled(*args), step(*args)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)


@pytest.mark.parametrize("op, dtype", [("gated_delta_rule", torch.bfloat16), ("delta_rule", torch.float32)])
def test_delta_rule_backward_not_served_raises_clearly(op, dtype):
    # the delta rules train through the chunk form: not with GLA-style gates gk/gv, nor in float32
    kw = make_inputs(op, T=4, device=DEV, dtype=dtype)
    assert op == "delta_rule" or "gk" in kw
    kw["q"].requires_grad_(True)
    o, _ = OPS[op][0](**kw)
    with pytest.raises(NotImplementedError, match="backward"):
        o.sum().backward()


GRAD_INPUTS = ("q", "k", "v", "g", "gk", "gv", "beta", "initial_state")


def check_gradients(op, kw, **flags):
    """Output, final state and every gradient (q, k, v, gates, initial_state) against float64 autograd of
    the reference, with random cotangents for both outputs (so dht flows into the final state)."""
    kw = {n: (x.detach().requires_grad_(n in GRAD_INPUTS) if isinstance(x, torch.Tensor) and n in GRAD_INPUTS else x)
          for n, x in kw.items()}
    o, ht = OPS[op][0](**kw, output_final_state=True, **flags)
    do, dht = torch.randn_like(o), torch.randn_like(ht)
    torch.autograd.backward((o, ht), (do, dht))
    ref_kw = reference_kwargs(op, dict(kw, **flags))
    leaves = {n: x.requires_grad_(True) for n, x in ref_kw.items() if n in GRAD_INPUTS and x is not None}
    ref_o, ref_ht = fused_recurrent_reference(**ref_kw, output_final_state=True)
    torch.autograd.backward((ref_o, ref_ht), (do.double().cpu(), dht.double().cpu()))
    tol = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}[kw["v"].dtype]
    assert rel_err(o, ref_o) < TOL[o.dtype]
    for name, leaf in leaves.items():
        got = kw[name].grad
        assert got is not None and got.dtype == kw[name].dtype and got.shape == kw[name].shape, name
        assert torch.isfinite(got).all(), name
        assert rel_err(got, leaf.grad) < tol, (name, rel_err(got, leaf.grad))


@pytest.mark.parametrize("op", ["linear_attn", "simple_gla", "retention", "gla"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("K,V", [(16, 32), (60, 100), (128, 128)])
def test_linear_family_gradients(op, dtype, K, V):
    check_gradients(op, make_inputs(op, B=2, T=37, H=2, K=K, V=V, dtype=dtype, device=DEV))


@pytest.mark.parametrize("op", ["simple_gla", "gla"])
@pytest.mark.parametrize("strong", [False, True])
def test_linear_family_gradients_gates_reverse_varlen(op, strong):
    kw = make_inputs(op, B=1, T=40, H=2, K=32, V=64, dtype=torch.float32, device=DEV, cu_seqlens=[0, 7, 7, 40],
                     strong_gates=strong)
    check_gradients(op, kw)
    check_gradients(op, kw, reverse=True)


@pytest.mark.parametrize("op", ["simple_gla", "gla"])
def test_linear_family_gradients_state_v_first(op):
    check_gradients(op, make_inputs(op, T=9, K=32, V=64, dtype=torch.float32, device=DEV, state_v_first=True))


@pytest.mark.parametrize("op", GROUPED)
@pytest.mark.parametrize("T", [1, 9, 70])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_delta_rule_gradients_through_the_chunk_form(op, T, dtype):
    kw = make_inputs(op, T=T, H=2, HV=4, K=32, V=48, dtype=dtype, device=DEV)
    kw.pop("gk", None)
    kw.pop("gv", None)
    check_gradients(op, kw)
    check_gradients(op, kw, use_qk_l2norm_in_kernel=True)


def test_delta_rule_gradients_varlen_state_v_first():
    kw = make_inputs("gated_delta_rule", B=1, T=80, K=16, V=16, device=DEV, cu_seqlens=[0, 7, 7, 80],
                     state_v_first=True)
    kw.pop("gk", None)
    kw.pop("gv", None)
    check_gradients("gated_delta_rule", kw)


class TestCudaValidation:
    """The C++ dispatcher's errors (the CPU tests check the same rules in Python)."""

    def test_dtype_mismatch(self):
        kw = make_inputs("gla", device=DEV)
        with pytest.raises(TypeError, match="k has dtype"):
            ops.fused_recurrent_gla(**{**kw, "k": kw["k"].half()})

    def test_shape_mismatch(self):
        kw = make_inputs("gla", device=DEV)
        with pytest.raises(ValueError, match="gk must have shape"):
            ops.fused_recurrent_gla(**{**kw, "gk": kw["gk"][..., :-1]})

    def test_wrong_device(self):
        kw = make_inputs("gla", device=DEV)
        with pytest.raises(ValueError, match="initial_state is on cpu"):
            ops.fused_recurrent_gla(**{**kw, "initial_state": kw["initial_state"].cpu()})

    def test_head_dim_not_compiled(self):
        kw = make_inputs("delta_rule", K=300, V=16, device=DEV)
        with pytest.raises(NotImplementedError, match="K=300.*Compiled variants"):
            ops.fused_recurrent_delta_rule(**kw)

    def test_varlen_needs_batch_one(self):
        kw = make_inputs("gla", B=2, T=8, device=DEV, initial_state=False)
        with pytest.raises(ValueError, match="batch size B must be 1"):
            ops.fused_recurrent_gla(**kw, cu_seqlens=torch.tensor([0, 4, 8], device=DEV))

    def test_one_state_per_batch_entry(self):
        kw = make_inputs("gla", B=1, device=DEV)
        with pytest.raises(ValueError, match="initial_state has N=3, but without cu_seqlens N must equal B=1"):
            ops.fused_recurrent_gla(**{**kw, "initial_state": torch.zeros(3, 2, 16, 32, device=DEV)})

    def test_unsorted_cu_seqlens(self):
        kw = make_inputs("gla", B=1, T=8, device=DEV, initial_state=False)
        with pytest.raises(ValueError, match="non-decreasing"):
            ops.fused_recurrent_gla(**kw, cu_seqlens=torch.tensor([0, 6, 4, 8], device=DEV))

    def test_cu_seqlens_not_ending_at_T(self):
        kw = make_inputs("gla", B=1, T=8, device=DEV, initial_state=False)
        with pytest.raises(ValueError, match="end at T=8"):
            ops.fused_recurrent_gla(**kw, cu_seqlens=torch.tensor([0, 4, 7], device=DEV))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_second_gpu():
    kw = make_inputs("gated_delta_rule", device="cuda:1")
    with torch.cuda.device(1):
        o, ht = ops.fused_recurrent_gated_delta_rule(**kw, output_final_state=True)
    assert o.device == torch.device("cuda:1")
    ref_o, _ = fused_recurrent_reference(**reference_kwargs("gated_delta_rule", kw), output_final_state=True)
    assert rel_err(o, ref_o) < TOL[o.dtype]


def test_unaligned_inputs_use_the_unaligned_variant():
    # a contiguous view one element into its storage: not 16-byte aligned, K and V multiples of 16
    kw = make_inputs("gated_delta_rule", T=6, K=64, V=64, device=DEV)
    q = kw["q"]
    shifted = torch.empty(q.numel() + 1, dtype=q.dtype, device=DEV)[1:].view(q.shape)
    shifted.copy_(q)
    assert shifted.data_ptr() % 16 != 0
    run_and_check("gated_delta_rule", {**kw, "q": shifted})
