"""The Python half of the compiled backward, on the CPU: gate gradients from dq, dk, dv (_gate_grads)
against autograd of the float64 reference, for every gate, with final-state cotangents, reverse and
varlen. The kernel half (dq, dk, dv, dh0) is checked in tests/test_interpreter.py and on the GPU."""
import pytest
import torch

from fla_aot.ops.fused_recurrent import _gate_grads
from fla_aot.reference import fused_recurrent_reference
from tests.fused_recurrent_cases import make_inputs, rel_err


@pytest.mark.parametrize("op", ["simple_gla", "gla"])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("cu", [None, [0, 3, 3, 11]])
@pytest.mark.parametrize("state_v_first", [False, True])
def test_gate_grads_match_autograd(op, reverse, cu, state_v_first):
    B = 2 if cu is None else 1
    kw = make_inputs(op, B=B, T=11, H=2, K=8, V=12, dtype=torch.float64, gate_dtype=torch.float64,
                     cu_seqlens=cu, state_v_first=state_v_first, generator=torch.Generator().manual_seed(0))
    kw["initial_state"] = kw["initial_state"].double()
    gates = [n for n in ("g", "gk", "gv") if n in kw]
    leaves = {n: kw[n].requires_grad_(True) for n in ["q", "k", "v"] + gates}
    o, ht = fused_recurrent_reference(**kw, reverse=reverse, output_final_state=True)
    do, dht = torch.randn_like(o), torch.randn_like(ht)
    torch.autograd.backward((o, ht), (do, dht))
    bounds = None if cu is None else cu
    dg, dgk, dgv = _gate_grads(kw["q"].detach(), kw["k"].detach(), kw["v"].detach(), o.detach(), do,
                               leaves["q"].grad, leaves["k"].grad, leaves["v"].grad, ht.detach(), dht,
                               kw.get("g"), kw.get("gk"), kw.get("gv"), reverse, state_v_first, bounds)
    for name, got in (("g", dg), ("gk", dgk), ("gv", dgv)):
        if name in kw:
            assert rel_err(got, leaves[name].grad) < 1e-10, (name, rel_err(got, leaves[name].grad))
        else:
            assert got is None
