"""The built extension without a GPU: import, op schema, fake (meta) implementation, import without Triton,
and every input-validation error of the CPU path, each with the message that names the problem."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import fla_aot.ops as ops
from fla_aot._manifest_rules import check_args, pick_variant, schema
from fla_aot._registry import MANIFEST
from tests.fused_recurrent_cases import GROUPED, OPS, make_inputs, rel_err

ROOT = Path(__file__).resolve().parent.parent
ENTRY = MANIFEST["ops"]["fused_recurrent_fwd"]
ARG_NAMES = [a["name"] for a in ENTRY["args"]]
FLOAT_DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def schema_args(**kw):
    """Positional arguments of torch.ops.fla_aot.fused_recurrent_fwd from keyword ones (defaults: absent/False)."""
    d = {a["name"]: (None if a["kind"] == "tensor" else False) for a in ENTRY["args"]}
    d["scale"] = 1.0
    d.update(kw)
    assert set(d) == set(ARG_NAMES), set(d) ^ set(ARG_NAMES)
    return tuple(d[n] for n in ARG_NAMES)


# ---------------------------------------------------------------------------------------------------------
# the extension and its ops
# ---------------------------------------------------------------------------------------------------------
def test_extension_imports_and_registers_every_manifest_op():
    from fla_aot import _C  # noqa: F401
    assert MANIFEST["ops"], "the manifest has no ops"
    for name in MANIFEST["ops"]:
        packet = getattr(torch.ops.fla_aot, name)
        qualname = f"fla_aot::{name}"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "CUDA"), "no CUDA kernel registered"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "Meta"), "no fake/meta kernel registered"
        assert not torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "CPU")  # CPU goes to the reference
        assert packet.default is not None


def test_schema_matches_the_manifest():
    for name, entry in MANIFEST["ops"].items():
        op_schema = getattr(torch.ops.fla_aot, name).default._schema
        assert str(op_schema) == f"fla_aot::{schema(entry)}"
        assert [a.name for a in op_schema.arguments] == [a["name"] for a in entry["args"]]
        assert len(op_schema.returns) == len(entry["outputs"])


def test_schema_of_fused_recurrent_fwd():
    s = str(torch.ops.fla_aot.fused_recurrent_fwd.default._schema)
    assert s.startswith("fla_aot::fused_recurrent_fwd(Tensor q, Tensor k, Tensor v, Tensor? g, Tensor? g_gamma, ")
    assert "Tensor? cu_seqlens, float scale, bool output_final_state" in s
    assert s.endswith("-> (Tensor, Tensor)")


def test_torch_op_on_cpu_tensors_is_refused_not_crashed():
    q = torch.randn(1, 3, 2, 8)
    with pytest.raises(NotImplementedError, match="CPU"):
        torch.ops.fla_aot.fused_recurrent_fwd(*schema_args(q=q, k=q, v=q))


# ---------------------------------------------------------------------------------------------------------
# fake tensors (what torch.compile and CUDA-graph capture see)
# ---------------------------------------------------------------------------------------------------------
def fake_call(B=2, T=5, H=2, HV=4, K=16, V=32, dtype=torch.bfloat16, cu_seqlens=None, state_v_first=False,
              output_final_state=True, initial_state=True, delta_rule=True):
    with FakeTensorMode():
        dev = "cuda"
        q = torch.empty(B, T, H, K, dtype=dtype, device=dev)
        k = torch.empty(B, T, H, K, dtype=dtype, device=dev)
        v = torch.empty(B, T, HV, V, dtype=dtype, device=dev)
        N = B if cu_seqlens is None else len(cu_seqlens) - 1
        h0 = None
        if initial_state:
            h0 = torch.empty((N, HV, V, K) if state_v_first else (N, HV, K, V), dtype=torch.float32, device=dev)
        cu = None if cu_seqlens is None else torch.tensor(cu_seqlens, dtype=torch.int64, device=dev)
        o, ht = torch.ops.fla_aot.fused_recurrent_fwd(*schema_args(
            q=q, k=k, v=v, g=torch.empty(B, T, HV, dtype=torch.float32, device=dev),
            beta=torch.empty(B, T, HV, dtype=dtype, device=dev), initial_state=h0, cu_seqlens=cu,
            output_final_state=output_final_state, state_v_first=state_v_first, delta_rule=delta_rule))
    return o, ht


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("state_v_first", [False, True])
@pytest.mark.parametrize("output_final_state", [False, True])
def test_fake_outputs(dtype, state_v_first, output_final_state):
    o, ht = fake_call(B=3, T=5, H=2, HV=4, K=24, V=40, dtype=dtype, state_v_first=state_v_first,
                      output_final_state=output_final_state)
    assert o.shape == (3, 5, 4, 40) and o.dtype == dtype and o.device.type == "cuda"
    assert ht.dtype == torch.float32 and ht.device.type == "cuda"
    if output_final_state:
        assert ht.shape == ((3, 4, 40, 24) if state_v_first else (3, 4, 24, 40))
    else:
        assert ht.numel() == 0


@pytest.mark.parametrize("cu", [[0, 5], [0, 2, 2, 7], [0, 0, 0, 1, 7]])
def test_fake_outputs_varlen_n_from_cu_seqlens(cu):
    o, ht = fake_call(B=1, T=7, H=1, HV=2, K=8, V=8, cu_seqlens=cu, initial_state=False)
    assert o.shape == (1, 7, 2, 8)
    assert ht.shape == (len(cu) - 1, 2, 8, 8)


def test_fake_impl_validates_like_the_dispatcher():
    with pytest.raises(TypeError, match="k has dtype torch.float32, expected torch.bfloat16 like q"):
        with FakeTensorMode():
            q = torch.empty(1, 3, 2, 8, dtype=torch.bfloat16, device="cuda")
            torch.ops.fla_aot.fused_recurrent_fwd(*schema_args(q=q, k=q.float(), v=q))
    with pytest.raises(ValueError, match="HV=3 must be a multiple of H=2"):
        fake_call(H=2, HV=3)


def test_meta_tensors_use_the_fake_impl():
    q = torch.empty(2, 4, 2, 8, device="meta")
    v = torch.empty(2, 4, 2, 16, device="meta")
    o, ht = torch.ops.fla_aot.fused_recurrent_fwd(*schema_args(q=q, k=q, v=v, output_final_state=True))
    assert o.device.type == "meta" and o.shape == (2, 4, 2, 16) and ht.shape == (2, 2, 8, 16)


def test_public_op_traces_under_fake_mode():
    """The public op with fake CUDA tensors (as torch.compile traces it) reaches the fake impl, no GPU needed."""
    with FakeTensorMode():
        q = torch.empty(2, 6, 2, 16, dtype=torch.bfloat16, device="cuda")
        v = torch.empty(2, 6, 2, 32, dtype=torch.bfloat16, device="cuda")
        gk = torch.empty(2, 6, 2, 16, dtype=torch.float32, device="cuda")
        o, ht = ops.fused_recurrent_gla(q, q, v, gk=gk, output_final_state=True)
        o2, ht2 = ops.fused_recurrent_gla(q, q, v, gk=gk)
    assert o.shape == v.shape and o.dtype == v.dtype and ht.shape == (2, 2, 16, 32)
    assert o2.shape == v.shape and ht2 is None


# ---------------------------------------------------------------------------------------------------------
# no Triton at run time
# ---------------------------------------------------------------------------------------------------------
BLOCK_TRITON = r'''
import sys

import torch  # torch itself probes for Triton at import (importlib.util.find_spec): let it, before blocking

assert "triton" not in sys.modules, "torch imported triton by itself"


class BlockTriton:
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ImportError(f"{name} is blocked: fla_aot must not need Triton at run time")
        return None

sys.meta_path.insert(0, BlockTriton())
import fla_aot.ops
q = torch.randn(1, 3, 2, 8)
o, ht = fla_aot.ops.fused_recurrent_gated_delta_rule(q, q, torch.randn(1, 3, 2, 8), output_final_state=True)
assert o.shape == (1, 3, 2, 8) and ht.shape == (1, 2, 8, 8)
assert hasattr(torch.ops.fla_aot, "fused_recurrent_fwd")
try:
    import triton  # noqa: F401
except ImportError:
    pass
else:
    raise AssertionError("the import blocker does not work")
bad = sorted(m for m in sys.modules if m == "triton" or m.startswith(("triton.", "triton_src", "tools.")))
assert not bad, bad
print("OK")
'''


def test_import_without_triton():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", BLOCK_TRITON], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-5000:]
    assert res.stdout.strip().endswith("OK")


# ---------------------------------------------------------------------------------------------------------
# input validation on the CPU path (the same rules the C++ dispatcher enforces on CUDA)
# ---------------------------------------------------------------------------------------------------------
def gla_inputs(**kw):
    return make_inputs("gla", **dict(dict(B=1, T=8, H=2, K=8, V=8, dtype=torch.float32), **kw))


def test_device_mismatch_public_op():
    kw = gla_inputs()
    with pytest.raises(ValueError, match="k is on meta, expected cpu like q"):
        ops.fused_recurrent_gla(**{**kw, "k": kw["k"].to("meta")})
    with pytest.raises(ValueError, match="initial_state is on meta, expected cpu"):
        ops.fused_recurrent_gla(**{**kw, "initial_state": kw["initial_state"].to("meta")})


def test_device_mismatch_cuda_vs_cpu():
    with FakeTensorMode():
        q_cuda = torch.empty(1, 4, 2, 8, device="cuda")
    k = torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match=r"k is on cpu, expected cuda(:0)? like q"):
        check_args(ENTRY, schema_args(q=q_cuda, k=k, v=k))


@pytest.mark.parametrize("op", list(OPS))
def test_dtype_mismatch(op):
    kw = make_inputs(op, B=1, T=4, H=2, K=8, V=8, dtype=torch.float32)
    with pytest.raises(TypeError, match="v has dtype torch.bfloat16, expected torch.float32 like q"):
        OPS[op][0](**{**kw, "v": kw["v"].bfloat16()})


@pytest.mark.parametrize("name,dtype,match", [
    ("q", torch.float64, r"q has dtype torch.float64, expected one of \['float16', 'bfloat16', 'float32'\]"),
    ("initial_state", torch.bfloat16, r"initial_state has dtype torch.bfloat16, expected one of \['float32'\]"),
    ("gk", torch.float64, "gk has dtype torch.float64"),
    ("gk", torch.int32, "gk has dtype torch.int32"),
])
def test_unsupported_dtype(name, dtype, match):
    kw = gla_inputs()
    if name == "q":
        kw = {n: (x.to(dtype) if n in ("q", "k", "v") else x) for n, x in kw.items()}
    else:
        kw[name] = kw[name].to(dtype)
    with pytest.raises(TypeError, match=match):
        ops.fused_recurrent_gla(**kw)


@pytest.mark.parametrize("op", list(OPS))
def test_shape_mismatch(op):
    kw = make_inputs(op, B=1, T=4, H=2, K=8, V=8, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"k must have shape \[B=1, T=4, H=2, K=8\], got \[1, 4, 2, 7\]"):
        OPS[op][0](**{**kw, "k": kw["k"][..., :7].contiguous()})


@pytest.mark.parametrize("name,bad_shape,match", [
    ("gk", (1, 8, 2, 7), r"gk must have shape \[B=1, T=8, HV=2, K=8\], got \[1, 8, 2, 7\]"),
    ("gv", (1, 7, 2, 8), r"gv must have shape \[B=1, T=8, HV=2, V=8\], got \[1, 7, 2, 8\]"),
    ("initial_state", (1, 3, 8, 8), r"initial_state must have shape \[N=1, HV=2, K=8, V=8\], got \[1, 3, 8, 8\]"),
    ("initial_state", (1, 2, 8, 9), r"initial_state must have shape \[N=1, HV=2, K=8, V=8\], got \[1, 2, 8, 9\]"),
    ("v", (1, 8, 2), r"v must have 4 dims \[B=1, T=8, HV, V\], got shape \[1, 8, 2\]"),
    ("gk", (1, 8, 2, 8, 1), r"gk must have 4 dims \[B=1, T=8, HV=2, K=8\], got shape \[1, 8, 2, 8, 1\]"),
])
def test_shape_and_ndim_mismatch(name, bad_shape, match):
    kw = gla_inputs()
    kw[name] = torch.zeros(bad_shape)
    with pytest.raises(ValueError, match=match):
        ops.fused_recurrent_gla(**kw)


def test_q_ndim_mismatch():
    kw = gla_inputs()
    with pytest.raises(ValueError, match=r"q must .*\[B, T, H, K\]"):
        ops.fused_recurrent_gla(**{**kw, "q": kw["q"][0]})
    with pytest.raises(ValueError, match=r"q must .*\[B, T, H, K\]"):
        ops.fused_recurrent_retention(kw["q"][0], kw["k"], kw["v"])


def test_state_v_first_layout_is_checked():
    kw = gla_inputs(K=8, V=16)
    with pytest.raises(ValueError, match=r"initial_state must have shape \[N=1, HV=2, V=16, K=8\]"):
        ops.fused_recurrent_gla(**kw, state_v_first=True)  # a [N, HV, K, V] state with state_v_first
    o, ht = ops.fused_recurrent_gla(**{**kw, "initial_state": kw["initial_state"].transpose(-1, -2).contiguous()},
                                    state_v_first=True, output_final_state=True)
    assert ht.shape == (1, 2, 16, 8)


def test_required_tensor_missing_or_not_a_tensor():
    kw = gla_inputs()
    with pytest.raises(ValueError, match="v is required"):
        ops.fused_recurrent_gla(**{**kw, "v": None})
    with pytest.raises(TypeError, match="k must be a tensor, got list"):
        ops.fused_recurrent_gla(**{**kw, "k": kw["k"].tolist()})


@pytest.mark.parametrize("op", GROUPED)
def test_hv_not_a_multiple_of_h(op):
    kw = make_inputs(op, B=1, T=4, H=2, HV=3, K=8, V=8, dtype=torch.float32)
    with pytest.raises(ValueError, match="HV=3 must be a multiple of H=2"):
        OPS[op][0](**kw)


def test_grouped_value_heads_need_matching_gates():
    kw = make_inputs("gated_delta_rule", B=1, T=4, H=2, HV=4, K=8, V=8, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"g must have shape \[B=1, T=4, HV=4\], got \[1, 4, 2\]"):
        ops.fused_recurrent_gated_delta_rule(**{**kw, "g": kw["g"][:, :, :2].contiguous()})


def test_head_dim_not_compiled():
    q = torch.randn(1, 4, 2, 300)
    v = torch.randn(1, 4, 2, 16)
    args = schema_args(q=q, k=q, v=v, delta_rule=True)
    check_args(ENTRY, args)  # valid arguments: only no compiled kernel serves them
    with pytest.raises(NotImplementedError, match=r"no compiled kernel variant for sm_90 matches .*K=300") as e:
        check_args(ENTRY, args, arch="sm_90")
    msg = str(e.value)
    assert "Compiled variants:" in msg
    for variant in ENTRY["variants"]["sm_90"]:
        assert variant["key"] in msg


@pytest.mark.parametrize("dtype,K,delta_rule,bucket", [
    (torch.float32, 16, False, "BK16"), (torch.float16, 17, True, "BK32"), (torch.bfloat16, 256, False, "BK256"),
    (torch.float32, 1, True, "BK16"),
])
def test_compiled_variant_is_found(dtype, K, delta_rule, bucket):
    q = torch.randn(1, 4, 2, K, dtype=dtype)
    v = torch.randn(1, 4, 2, 8, dtype=dtype)
    args = schema_args(q=q, k=q, v=v, delta_rule=delta_rule)
    sym = check_args(ENTRY, args, arch="sm_90")
    key = pick_variant(ENTRY, args, sym, "sm_90")["key"]
    dtype_tag = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    assert dtype_tag in key and bucket in key and f"DELTA_RULE{int(delta_rule)}" in key, key


def _aligned_guards(variant):
    """The guards of a variant compiled with divisibility hints (an aligned guard that expects alignment)."""
    return [g for g in variant["guards"] if g["kind"] == "aligned" and g.get("expect", True)]


@pytest.mark.skipif(not any(_aligned_guards(v) for v in ENTRY["variants"].get("sm_90", [])),
                    reason="the spec compiles no aligned variants")
def test_aligned_variant_only_for_aligned_inputs():
    """The variant compiled with 16-divisibility hints must only serve inputs that satisfy them."""
    def picked(q, v):
        args = schema_args(q=q, k=q.clone(), v=v, initial_state=torch.zeros(1, 2, q.shape[-1], v.shape[-1]),
                           output_final_state=True)
        return pick_variant(ENTRY, args, check_args(ENTRY, args), "sm_90")

    q = torch.randn(1, 4, 2, 32)
    assert _aligned_guards(picked(q, torch.randn(1, 4, 2, 64)))
    assert not _aligned_guards(picked(q, torch.randn(1, 4, 2, 20)))           # V not a multiple of 16
    assert not _aligned_guards(picked(torch.randn(1, 4, 2, 24), torch.randn(1, 4, 2, 64)))  # K not either
    buf = torch.randn(1 + 4 * 2 * 32)
    q_off = buf[1:].view(1, 4, 2, 32)                                         # data pointer 4 bytes off
    assert q_off.data_ptr() % 16 != 0
    assert not _aligned_guards(picked(q_off, torch.randn(1, 4, 2, 64)))


def test_arch_not_compiled():
    q = torch.randn(1, 4, 2, 16)
    with pytest.raises(NotImplementedError, match=r"built without kernels for sm_75; compiled: \[.*'sm_90'.*\]"):
        check_args(ENTRY, schema_args(q=q, k=q, v=q), arch="sm_75")


def test_unsorted_cu_seqlens():
    kw = gla_inputs(initial_state=False)
    with pytest.raises(ValueError, match=r"cu_seqlens must be non-decreasing, got \[0, 6, 4, 8\]"):
        ops.fused_recurrent_gla(**kw, cu_seqlens=torch.tensor([0, 6, 4, 8]))


@pytest.mark.parametrize("cu", [[1, 4, 8], [0, 4, 7], [0, 4, 9]])
def test_cu_seqlens_must_start_at_0_and_end_at_T(cu):
    kw = gla_inputs(initial_state=False)
    with pytest.raises(ValueError, match=r"cu_seqlens must start at 0 and end at T=8"):
        ops.fused_recurrent_gla(**kw, cu_seqlens=torch.tensor(cu))


def test_cu_seqlens_wrong_dtype_and_rank():
    kw = gla_inputs(initial_state=False)
    with pytest.raises(TypeError, match="cu_seqlens must be int64"):
        ops.fused_recurrent_gla(**kw, cu_seqlens=torch.tensor([0.0, 4.0, 8.0]))
    with pytest.raises(ValueError, match="cu_seqlens must be a 1-D tensor"):
        ops.fused_recurrent_gla(**kw, cu_seqlens=torch.tensor([[0, 4, 8]]))
    # int32 is accepted and means the same
    o32, _ = ops.fused_recurrent_gla(**kw, cu_seqlens=torch.tensor([0, 4, 8], dtype=torch.int32))
    o64, _ = ops.fused_recurrent_gla(**kw, cu_seqlens=torch.tensor([0, 4, 8]))
    torch.testing.assert_close(o32, o64, rtol=0, atol=0)


def test_cu_seqlens_needs_batch_one():
    kw = gla_inputs(B=2, initial_state=False)
    with pytest.raises(ValueError, match="with cu_seqlens the batch size B must be 1.*got B=2"):
        ops.fused_recurrent_gla(**kw, cu_seqlens=torch.tensor([0, 4, 8]))


def test_varlen_initial_state_must_have_one_state_per_sequence():
    kw = gla_inputs(initial_state=False)
    # N is bound by whichever comes first; either way the message names the two sizes
    with pytest.raises(ValueError, match=r"initial_state must have shape \[N=2, HV=2, K=8, V=8\], got \[1, 2, 8, 8\]"
                                         r"|cu_seqlens must have shape \[N\+1=2\], got \[3\]"):
        ops.fused_recurrent_gla(**kw, initial_state=torch.zeros(1, 2, 8, 8), cu_seqlens=torch.tensor([0, 4, 8]))


@pytest.mark.parametrize("N", [3, 1])
def test_initial_state_must_have_one_state_per_batch_entry(N):
    """Without cu_seqlens, N is B: a state batch of another size is an error, not states silently dropped
    (nor, on CUDA, a grid of N * HV programs reading past q and writing past o)."""
    kw = gla_inputs(B=2 if N == 1 else 1)
    B = kw["q"].shape[0]
    kw["initial_state"] = torch.zeros(N, 2, 8, 8)
    with pytest.raises(ValueError, match=rf"N={N}.*B={B}|B={B}.*N={N}|initial_state must have shape \[N={B}"):
        ops.fused_recurrent_gla(**kw, output_final_state=True)


@pytest.mark.parametrize("op", list(OPS))
def test_unexpected_kwarg(op):
    kw = make_inputs(op, B=1, T=4, H=2, K=8, V=8, dtype=torch.float32)
    with pytest.raises(TypeError, match="unexpected argument"):
        OPS[op][0](**kw, not_an_option=1)


def test_head_first():
    kw = gla_inputs()
    with pytest.raises(TypeError, match=r"head_first=True.*\[B, T, H, K\] inputs only"):
        ops.fused_recurrent_gla(**kw, head_first=True)
    o, _ = ops.fused_recurrent_gla(**kw, head_first=False)  # fla's default: accepted
    assert o.shape == kw["v"].shape


def test_linear_attn_normalize_not_supported():
    kw = make_inputs("linear_attn", B=1, T=4, H=2, K=8, V=8, dtype=torch.float32)
    with pytest.raises(NotImplementedError, match="normalize=True"):
        ops.fused_recurrent_linear_attn(**kw, normalize=True)


def _gdn_inputs(B, T):
    """Inputs both gated delta rules take (the recurrent form's gk/gv left out)."""
    kw = make_inputs("gated_delta_rule", B=B, T=T, H=2, K=8, V=8, dtype=torch.float32)
    return {name: kw[name] for name in ("q", "k", "v", "g", "beta", "initial_state")}


@pytest.mark.parametrize("op", ["fused_recurrent_gated_delta_rule", "chunk_gated_delta_rule"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_gate_in_kernel_is_fla_gdn_gate(op, with_bias):
    """use_gate_in_kernel: the decay -exp(A_log) * softplus(g + dt_bias) from the raw g, as fla computes it; the
    gradients reach g, A_log and dt_bias."""
    kw = _gdn_inputs(B=2, T=5)
    raw = torch.randn_like(kw.pop("g"), requires_grad=True)
    A_log = torch.randn(2, requires_grad=True)
    dt_bias = torch.randn(2, requires_grad=True) if with_bias else None
    o, _ = getattr(ops, op)(**kw, g=raw, use_gate_in_kernel=True, A_log=A_log, dt_bias=dt_bias)
    x = raw.detach() + (dt_bias.detach() if with_bias else 0.)
    g = (-A_log.detach().exp() * torch.log1p(x.exp())).requires_grad_()  # softplus written out
    want, _ = getattr(ops, op)(**kw, g=g)
    assert rel_err(o, want) < 1e-6
    do = torch.randn_like(o)
    leaves = [raw, A_log] + ([dt_bias] if with_bias else [])
    grads = torch.autograd.grad(o, leaves, do)
    (dg,) = torch.autograd.grad(want, g, do)
    sig = torch.sigmoid(x)
    assert rel_err(grads[0], dg * -A_log.detach().exp() * sig) < 1e-5
    assert rel_err(grads[1], (dg * g.detach()).sum((0, 1))) < 1e-5
    if with_bias:
        assert rel_err(grads[2], grads[0].sum((0, 1))) < 1e-5


@pytest.mark.parametrize("op", ["fused_recurrent_gated_delta_rule", "chunk_gated_delta_rule"])
def test_gate_in_kernel_arguments(op):
    kw = _gdn_inputs(B=1, T=4)
    with pytest.raises(ValueError, match="needs A_log"):
        getattr(ops, op)(**kw, use_gate_in_kernel=True)
    with pytest.raises(ValueError, match="A_log must be a float tensor"):
        getattr(ops, op)(**kw, use_gate_in_kernel=True, A_log=torch.zeros(3))
    with pytest.raises(ValueError, match="dt_bias must be a float tensor"):
        getattr(ops, op)(**kw, use_gate_in_kernel=True, A_log=torch.zeros(2), dt_bias=torch.zeros(2, 2))
    # without use_gate_in_kernel fla ignores A_log and dt_bias: g is already the log-space decay
    o, _ = getattr(ops, op)(**kw, A_log=torch.randn(2), dt_bias=torch.randn(2))
    assert torch.equal(o, getattr(ops, op)(**kw)[0])


@pytest.mark.parametrize("op", list(OPS))
def test_cpu_path_is_differentiable(op):
    """CPU tensors run the reference, which autograd differentiates (the GPU tests compare against it)."""
    kw = make_inputs(op, B=1, T=4, H=2, K=8, V=8, dtype=torch.float32)
    kw["q"].requires_grad_(True)
    kw["initial_state"].requires_grad_(True)
    o, ht = OPS[op][0](**kw, output_final_state=True)
    (o.sum() + ht.sum()).backward()
    assert torch.isfinite(kw["q"].grad).all() and kw["q"].grad.abs().sum() > 0
    assert torch.isfinite(kw["initial_state"].grad).all()


def test_no_grad_needs_no_backward():
    kw = gla_inputs()
    kw["q"].requires_grad_(True)
    with torch.no_grad():
        o, _ = ops.fused_recurrent_gla(**kw)
    assert not o.requires_grad
    o, _ = ops.fused_recurrent_gla(**{n: (x.detach() if isinstance(x, torch.Tensor) else x) for n, x in kw.items()})
    assert not o.requires_grad
