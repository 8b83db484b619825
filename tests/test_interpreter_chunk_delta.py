"""The delta-rule chunk kernels (triton_src/chunk_delta.py) run on the CPU (TRITON_INTERPRET=1), driven by
fla_aot/ops/chunk_delta.py, against the float64 reference: output, final state and every gradient.

The manifest ops are replaced by interpreter launches bound exactly as the C++ dispatcher binds them
(tests/test_interpreter.launch). The kernels are built for float16/bfloat16 only; here their specs also admit
float32, so that the interpreter's exact float32 products check the algebra tightly.
"""
from tests.test_interpreter import _manifest_entry, launch, pytestmark  # noqa: F401  (sets TRITON_INTERPRET)

import dataclasses  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import fla_aot.ops.chunk_delta as chunk_delta  # noqa: E402
from fla_aot.ops.chunk import _Tables  # noqa: E402
from fla_aot.reference import fused_recurrent_reference  # noqa: E402
from tests import chunk_delta_kernel_refs as kernel_refs  # noqa: E402
from tests.fused_recurrent_cases import rel_err  # noqa: E402
from triton_src import chunk_delta as chunk_delta_src  # noqa: E402


def _with_float32(spec):
    args = [dataclasses.replace(a, dtypes=a.dtypes + ["float32"])
            if getattr(a, "dtypes", None) == chunk_delta_src.DELTA_DTYPES else a for a in spec.args]
    return dataclasses.replace(spec, args=args)


@pytest.fixture
def interpreted(monkeypatch):
    assert set(chunk_delta._ops) == {spec.name for spec in chunk_delta_src.SPECS}
    for spec in map(_with_float32, chunk_delta_src.SPECS):
        entry = _manifest_entry(spec)

        def run(*args, spec=spec, entry=entry):
            outs, _ = launch(args, spec, entry)
            return tuple(outs)
        monkeypatch.setitem(chunk_delta._ops, spec.name, run)


CASES = {
    # name: (B, lengths or None, H, HV, K, V, gate, initial state, state_v_first, state-pass V slices 64/32/16)
    "gated_grouped": (2, None, 2, 4, 16, 32, "strong", True, False, 64),
    "gated_weak_v_first_narrowest": (1, None, 1, 1, 32, 20, "weak", True, True, 16),
    "plain_varlen": (1, (0, 70, 5, 130), 1, 2, 20, 16, None, True, False, 64),
    "plain_no_h0_narrow": (1, None, 1, 1, 16, 40, None, False, False, 32),
    "plain_varlen_v_first_narrowest": (1, (0, 70, 5, 130), 1, 2, 20, 16, None, True, True, 16),
    "gated_grouped_v_first_narrow": (1, (0, 70, 0, 130), 2, 4, 32, 40, "strong", True, True, 32),
}


def case_inputs(monkeypatch, case, dtype=torch.float32):
    """CASES[case] as random inputs: ((q, k, v, g, beta, h0), (do, dht), lengths, tabs), q/k/v in dtype, with the
    state passes' V slicing set as the case names it."""
    B, lengths, H, HV, K, V, gate, with_h0, v_first, slices = CASES[case]
    monkeypatch.setattr(chunk_delta, "_slicing", lambda tabs, v: (slices < 64, slices < 32))
    T = 150 if lengths is None else sum(lengths)
    N = B if lengths is None else len(lengths)
    torch.manual_seed(0)
    q = torch.randn(B, T, H, K).to(dtype)
    k = F.normalize(torch.randn(B, T, H, K), dim=-1).to(dtype)
    v = torch.randn(B, T, HV, V).to(dtype)
    beta = torch.sigmoid(torch.randn(B, T, HV))
    g = {"strong": F.logsigmoid(torch.randn(B, T, HV) + 1.0), "weak": -0.05 * torch.rand(B, T, HV),
         None: None}[gate]
    state_shape = (N, HV, V, K) if v_first else (N, HV, K, V)
    h0 = torch.randn(state_shape) if with_h0 else None
    do, dht = torch.randn(B, T, HV, V), torch.randn(state_shape)
    lengths = lengths or (T,) * B
    return (q, k, v, g, beta, h0), (do, dht), lengths, _Tables(lengths, 1 << 30, "cpu")


@pytest.mark.parametrize("case", list(CASES))
def test_chunk_delta_forward_and_backward(interpreted, monkeypatch, case):
    B, _, H, HV, K, V, gate, with_h0, v_first, slices = CASES[case]
    (q, k, v, g, beta, h0), (do, dht), lengths, tabs = case_inputs(monkeypatch, case)
    cu = None if len(lengths) == B else torch.tensor((0,) + lengths).cumsum(0)

    leaves = [x.clone().requires_grad_() if x is not None else None for x in (q, k, v, g, beta, h0)]
    o, ht = chunk_delta.ChunkDeltaFunction.apply(*leaves, K ** -0.5, v_first, True, tabs)
    assert torch.isfinite(o).all() and torch.isfinite(ht).all()
    ((o * do).sum() + (ht * dht).sum()).backward()

    ref_leaves = [x.double().clone().requires_grad_() if x is not None else None for x in (q, k, v, g, beta, h0)]
    rq, rk, rv, rg, rbeta, rh0 = ref_leaves
    ref_o, ref_ht = fused_recurrent_reference(rq, rk, rv, g=rg, beta=rbeta, initial_state=rh0,
                                              output_final_state=True, state_v_first=v_first, cu_seqlens=cu,
                                              delta_rule=True)
    ((ref_o * do.double()).sum() + (ref_ht * dht.double()).sum()).backward()
    assert rel_err(o, ref_o) < 1e-5, rel_err(o, ref_o)
    assert rel_err(ht, ref_ht) < 1e-5, rel_err(ht, ref_ht)
    for name, x, ref in zip("q k v g beta h0".split(), leaves, ref_leaves):
        if x is None:
            continue
        assert x.grad is not None and torch.isfinite(x.grad).all(), name
        assert rel_err(x.grad, ref.grad) < 1e-4, (name, rel_err(x.grad, ref.grad))


@pytest.mark.parametrize("case", ["gated_grouped", "plain_varlen", "gated_grouped_v_first_narrow"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_backward_kernels_match_their_transcriptions(interpreted, monkeypatch, case, dtype):
    """The float64 transcriptions that the GPU tests hold the compiled backward kernels to
    (tests/chunk_delta_kernel_refs.py) agree with the kernels run by the interpreter."""
    K, v_first = CASES[case][4], CASES[case][8]
    inputs, (do, dht), _, tabs = case_inputs(monkeypatch, case, dtype)
    leaves = [x.requires_grad_() if x is not None else None for x in inputs]

    def run():
        o, ht = chunk_delta.ChunkDeltaFunction.apply(*leaves, K ** -0.5, v_first, True, tabs)
        ((o.float() * do).sum() + (ht * dht).sum()).backward()
    errs = kernel_refs.compare(kernel_refs.record_backward(run))
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    assert set(errs) == set(kernel_refs.CHECKED)
    assert all(e < tol for per_kernel in errs.values() for e in per_kernel.values()), errs
