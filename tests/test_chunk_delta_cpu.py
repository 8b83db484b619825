"""chunk_delta_rule / chunk_gated_delta_rule without a GPU: the CPU path (the reference recurrence, differentiable
by autograd) and every input-validation error."""
import pytest
import torch
import torch.nn.functional as F

import fla_aot.ops as ops
from fla_aot.reference import fused_recurrent_reference


def inputs(B=1, T=9, H=2, HV=4, K=8, V=6, gated=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    kw = dict(q=torch.randn(B, T, H, K, generator=gen), k=F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1),
              v=torch.randn(B, T, HV, V, generator=gen), beta=torch.rand(B, T, HV, generator=gen))
    if gated:
        kw["g"] = -torch.rand(B, T, HV, generator=gen)
    return kw


def op_of(kw):
    return ops.chunk_gated_delta_rule if "g" in kw else ops.chunk_delta_rule


@pytest.mark.parametrize("gated", [False, True])
def test_cpu_path_is_the_recurrence(gated):
    kw = inputs(gated=gated)
    h0 = torch.randn(1, 4, 8, 6)
    o, ht = op_of(kw)(**kw, initial_state=h0, output_final_state=True, use_qk_l2norm_in_kernel=True)
    ref_o, ref_ht = fused_recurrent_reference(kw["q"], kw["k"], kw["v"], g=kw.get("g"), beta=kw["beta"],
                                              initial_state=h0, output_final_state=True, use_qk_l2norm=True,
                                              delta_rule=True)
    torch.testing.assert_close(o, ref_o)
    torch.testing.assert_close(ht, ref_ht)
    # and one step by hand: S_1 = exp(g) S_0 + beta k^T (v - k exp(g) S_0), o = scale q S_1 (l2-normalised q, k)
    q, k = F.normalize(kw["q"][0, 0, 0], dim=-1, eps=1e-3), F.normalize(kw["k"][0, 0, 0], dim=-1, eps=1e-3)
    S = h0[0, 0] * (kw["g"][0, 0, 0].exp() if gated else 1)
    S = S + kw["beta"][0, 0, 0] * torch.outer(k, kw["v"][0, 0, 0] - k @ S)
    torch.testing.assert_close(o[0, 0, 0], 8 ** -0.5 * q @ S, rtol=1e-4, atol=1e-5)


def test_cpu_backward_runs_through_the_reference():
    kw = {n: x.requires_grad_() for n, x in inputs().items()}
    o, _ = ops.chunk_gated_delta_rule(**kw)
    o.sum().backward()
    assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in kw.values())


@pytest.mark.parametrize("which,bad,error", [
    ("k", lambda x: x[..., :-1], ValueError),
    ("v", lambda x: x[:, :, :3], ValueError),       # HV=3 is not a multiple of H=2
    ("v", lambda x: x[:, :-1], ValueError),
    ("beta", lambda x: x[..., :1], ValueError),
    ("g", lambda x: x[..., None], ValueError),
    ("q", lambda x: x.to(torch.int32), TypeError),
    ("v", lambda x: x.double(), TypeError),
    ("beta", lambda x: x.to(torch.int64), TypeError),
])
def test_bad_inputs_are_clear_errors(which, bad, error):
    kw = inputs()
    with pytest.raises(error, match=which if which != "v" or error is TypeError else "v must have shape"):
        ops.chunk_gated_delta_rule(**{**kw, which: bad(kw[which])})


def test_missing_gate_and_beta():
    kw = inputs()
    with pytest.raises(ValueError, match="g"):
        ops.chunk_gated_delta_rule(**{**kw, "g": None})
    with pytest.raises(ValueError, match="beta"):
        ops.chunk_delta_rule(kw["q"], kw["k"], kw["v"], None)


def test_initial_state_of_the_wrong_shape():
    kw = inputs()
    with pytest.raises(ValueError, match="initial_state"):
        ops.chunk_gated_delta_rule(**kw, initial_state=torch.zeros(1, 2, 8, 6))  # HV=4 value heads
    with pytest.raises(ValueError, match="initial_state"):
        ops.chunk_gated_delta_rule(**kw, initial_state=torch.zeros(1, 4, 8, 6), state_v_first=True)


def test_varlen_rules():
    kw = inputs(B=2)
    with pytest.raises(ValueError, match="batch size must be 1"):
        ops.chunk_gated_delta_rule(**kw, cu_seqlens=torch.tensor([0, 9]))
    kw = inputs(T=9)
    with pytest.raises(ValueError, match="non-decreasing"):
        ops.chunk_gated_delta_rule(**kw, cu_seqlens=torch.tensor([0, 5, 3, 9]))
    with pytest.raises(ValueError, match="end at T"):
        ops.chunk_gated_delta_rule(**kw, cu_seqlens=torch.tensor([0, 5, 8]))


def test_unsupported_options():
    kw = inputs()
    with pytest.raises(NotImplementedError, match="cp_context"):
        ops.chunk_gated_delta_rule(**kw, cp_context=object())
    with pytest.raises(TypeError, match="unexpected argument"):
        ops.chunk_gated_delta_rule(**kw, chunk_size=32)
