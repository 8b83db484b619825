"""Random inputs for the fused_recurrent ops, shared by the interpreter and GPU tests."""
import torch
import torch.nn.functional as F

import fla_aot.ops as ops
import fla_aot.ops.utils as op_utils

# name -> (public function, which inputs it takes)
OPS = {
    "linear_attn": (ops.fused_recurrent_linear_attn, ()),
    "simple_gla": (ops.fused_recurrent_simple_gla, ("g", "g_gamma")),
    "retention": (ops.fused_recurrent_retention, ()),
    "gla": (ops.fused_recurrent_gla, ("gk", "gv")),
    "delta_rule": (ops.fused_recurrent_delta_rule, ("beta",)),
    "gated_delta_rule": (ops.fused_recurrent_gated_delta_rule, ("g", "beta", "gk", "gv")),
}
GROUPED = ("delta_rule", "gated_delta_rule")


def make_inputs(op, B=2, T=9, H=2, HV=None, K=16, V=32, dtype=torch.bfloat16, gate_dtype=torch.float32,
                device="cpu", cu_seqlens=None, initial_state=True, state_v_first=False, strong_gates=False,
                generator=None):
    """Fresh random inputs (never zeros) as keyword arguments of the public op."""
    HV = HV or H
    N = B if cu_seqlens is None else len(cu_seqlens) - 1
    r = dict(generator=generator, device=device)

    def randn(*shape, dt=dtype):
        return torch.randn(*shape, dtype=torch.float32, **r).to(dt)

    kw = dict(q=randn(B, T, H, K), k=randn(B, T, H, K), v=randn(B, T, HV, V))
    takes = OPS[op][1]
    lo = 4.0 if strong_gates else 0.1  # strong gates forget fast, weak ones barely decay
    if "g" in takes:
        kw["g"] = (-lo * torch.rand(B, T, HV, **r)).to(gate_dtype)
    if "g_gamma" in takes:
        kw["g_gamma"] = -lo * torch.rand(HV, **r)
    if "gk" in takes:
        kw["gk"] = F.logsigmoid(randn(B, T, HV, K, dt=torch.float32) + (0 if strong_gates else 3)).to(gate_dtype)
    if "gv" in takes and op == "gla":
        kw["gv"] = F.logsigmoid(randn(B, T, HV, V, dt=torch.float32) + 3).to(gate_dtype)
    if "beta" in takes:
        kw["beta"] = torch.rand(B, T, HV, **r).to(dtype)
    if op in GROUPED:
        # keep the delta rule's state bounded: unit-norm keys
        kw["k"] = F.normalize(kw["k"].float(), dim=-1).to(dtype)
    if initial_state:
        shape = (N, HV, V, K) if state_v_first else (N, HV, K, V)
        kw["initial_state"] = torch.randn(*shape, dtype=torch.float32, **r)
    if state_v_first:
        kw["state_v_first"] = True
    if cu_seqlens is not None:
        kw["cu_seqlens"] = torch.tensor(cu_seqlens, dtype=torch.int64, device=device)
    return kw


def reference_kwargs(op, kw):
    """The same call for fla_aot.reference.fused_recurrent_reference, in float64 on the CPU."""
    from fla_aot.ops.fused_recurrent import retention_log_decay
    out = {}
    for name, x in kw.items():
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu()
            if x.is_floating_point():
                x = x.double()
        out[name] = x
    if op == "retention":
        out["g_gamma"] = retention_log_decay(kw["q"].shape[2], "cpu").double()
    if "use_qk_l2norm_in_kernel" in out:
        out["use_qk_l2norm"] = out.pop("use_qk_l2norm_in_kernel")
    if "use_beta_sigmoid_in_kernel" in out:
        out["beta_sigmoid"] = out.pop("use_beta_sigmoid_in_kernel")
    out["delta_rule"] = op in GROUPED
    return out


def rel_err(x, ref):
    x, ref = x.double().cpu(), ref.double().cpu()
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def capture_graph(fn):
    """fn() captured in a CUDA graph after two warm-up calls on a side stream (as torch's docs do it): returns the
    graph and what the captured call returned, tensors that each replay rewrites."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def fixed_cotangent_grads(outs, leaves):
    """The gradients of leaves (tensors by name) for cotangents that are a fixed function of the outputs: no random
    numbers, so that a CUDA graph can capture the call."""
    cots = [torch.sin(7 * x.detach().float() + 0.3).to(x.dtype) for x in outs]
    return dict(zip(leaves, torch.autograd.grad(outs, list(leaves.values()), cots)))


def assert_same_results(got, want, grad_rel_tol):
    """got, want: (outputs, gradients by name) of two runs of one call. The outputs are equal bit for bit; each
    gradient is finite and within grad_rel_tol of its twin (0: bit for bit; a tolerance where atomics sum in any
    order)."""
    (outs, grads), (want_outs, want_grads) = got, want
    for a, b in zip(outs, want_outs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert grads.keys() == want_grads.keys(), (list(grads), list(want_grads))
    for name, b in want_grads.items():
        assert torch.isfinite(grads[name]).all(), f"d{name} has NaN"
        if grad_rel_tol == 0:
            torch.testing.assert_close(grads[name], b, rtol=0, atol=0)
        else:
            assert rel_err(grads[name], b) < grad_rel_tol, name


def check_two_streams_match_one(monkeypatch, run, grad_rel_tol):
    """run() -> (outputs, gradients by name) with the ops' two-stream overlap (fla_aot.ops.utils.CONCURRENT) off,
    then on, from the current stream and from a stream of the caller's own: the same results each time
    (assert_same_results). A missing wait would read states not yet written."""
    monkeypatch.setattr(op_utils, "CONCURRENT", False)
    want = run()
    monkeypatch.setattr(op_utils, "CONCURRENT", True)
    user = torch.cuda.Stream()
    user.wait_stream(torch.cuda.current_stream())
    for stream in (torch.cuda.current_stream(), user):
        with torch.cuda.stream(stream):
            got = run()
        torch.cuda.current_stream().wait_stream(stream)
        assert_same_results(got, want, grad_rel_tol)


TOL = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 1.5e-2}
