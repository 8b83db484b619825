"""The Triton kernel of triton_src/fused_recurrent.py run on the CPU (TRITON_INTERPRET=1) against the reference.

The launcher below binds kernel parameters by name from the spec's manifest entry, exactly as the C++
dispatcher does from manifest.json: tensors/outputs by pointer (a 1-element dummy when absent),
`<tensor>_dtype` codes, shape symbols, floats and bools, the chosen variant's constexprs and its grid. So
these tests check the kernel's math and the spec's binding rules (check_args / pick_variant /
output_shapes) together.
"""
import os

import torch

# The interpreter stands in for the GPU where there is none; a GPU machine runs the compiled kernels
# (tests/test_gpu_*.py) instead. There the variable stays unset: set, it would also make torch.compile's
# own Triton kernels (the GPU tests' fullgraph checks) run interpreted.
HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are imported: @triton.jit then builds interpreted ones

import json  # noqa: E402
import math  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import zlib  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy  # noqa: E402
import pytest  # noqa: E402

from fla_aot._manifest_rules import DTYPES, check_args, output_shapes, pick_variant  # noqa: E402
from fla_aot.ops.fused_recurrent import retention_log_decay  # noqa: E402
from fla_aot.reference import fused_recurrent_reference  # noqa: E402
from tests.fused_recurrent_cases import GROUPED, OPS, TOL, make_inputs, rel_err  # noqa: E402
from tools.kernel_spec import DTYPE_CODES  # noqa: E402
from triton_src.fused_recurrent import SPECS  # noqa: E402

pytestmark = [
    # Triton's interpreter converts 1-element arrays with int() (its own code, numpy >= 1.25 warns)
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning"),
    # Without a GPU, a numpy the interpreter cannot use fails loudly (test_numpy_is_supported_by_the_interpreter).
    pytest.mark.skipif(HAS_GPU, reason="the GPU tests run the compiled kernels here"),
]

ROOT = Path(__file__).resolve().parent.parent
SPEC = SPECS[0]
ARCH = "sm_90"
CODE_OF = {DTYPES[name]: code for name, code in DTYPE_CODES.items()}


def _manifest_entry(spec):
    """spec.manifest_entry() plus the variants, as tools/compile_kernels.py builds it."""
    entry = spec.manifest_entry()
    entry["variants"] = {ARCH: spec.variants()}
    return entry


ENTRY = _manifest_entry(SPEC)
BWD_SPEC = SPECS[1]
BWD_ENTRY = _manifest_entry(BWD_SPEC)
ARG_NAMES = [a["name"] for a in ENTRY["args"]]
DEFAULTS = {a["name"]: (None if a["kind"] == "tensor" else False) for a in ENTRY["args"]}


def schema_args(kw):
    """Keyword arguments named like the schema (= the reference's names) -> the positional schema tuple."""
    unknown = set(kw) - set(ARG_NAMES)
    assert not unknown, unknown
    d = dict(DEFAULTS, **kw)
    if d["scale"] is False:
        d["scale"] = kw["q"].shape[-1] ** -0.5
    return tuple(d[n] for n in ARG_NAMES)


def launch(args, spec=SPEC, entry=ENTRY):
    """Runs the kernel on CPU tensors like the dispatcher would; returns the outputs (poisoned with NaN first,
    except those the kernel accumulates into, which start at zero as the dispatcher makes them)."""
    sym = check_args(entry, args, arch=ARCH)
    variant = pick_variant(entry, args, sym, ARCH)
    outs = [torch.zeros(shape, dtype=dtype) if o["zeros"] else torch.full(shape, float("nan"), dtype=dtype)
            for o, (shape, dtype) in zip(entry["outputs"], output_shapes(entry, args, sym))]
    dummy = torch.zeros(1, dtype=torch.float32)
    params = {}
    for p in entry["params"]:
        kind, i = p["kind"], p["index"]
        if kind == "tensor":
            value = dummy if args[i] is None else args[i]
            assert value.is_contiguous()
        elif kind == "output":
            value = outs[i] if outs[i].numel() else dummy
        elif kind == "dtype_code":
            value = 0 if args[i] is None else CODE_OF[args[i].dtype]
        elif kind == "symbol":
            value = sym[i]
        elif kind == "float":
            value = float(args[i])
        elif kind == "bool":
            value = int(bool(args[i]))
        else:
            raise AssertionError(f"unknown parameter kind {kind!r}")
        params[p["name"]] = value
    grid = tuple(math.prod(-(-sym[s] // div) for s, div in dim) for dim in variant["grid"] if dim)
    spec.kernel[grid](**params, **variant["constexprs"])
    return outs, variant


def run_and_check(kw, output_final_state=True):
    """kw: reference-named inputs (any float dtype). Runs the kernel and the float64 reference; compares."""
    kw = dict(kw, output_final_state=output_final_state)
    (o, ht), variant = launch(schema_args(kw))
    ref = {n: (x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x) for n, x in kw.items()}
    ref_o, ref_ht = fused_recurrent_reference(**ref)
    v = kw["v"]
    assert o.shape == v.shape and o.dtype == v.dtype
    assert torch.isfinite(o).all(), "an element of o was not written"
    assert rel_err(o, ref_o) < TOL[v.dtype], rel_err(o, ref_o)
    if output_final_state:
        assert ht.dtype == torch.float32 and ht.shape == ref_ht.shape
        assert torch.isfinite(ht).all(), "an element of final_state was not written"
        assert rel_err(ht, ref_ht) < 1e-4, rel_err(ht, ref_ht)
    else:
        assert ht.numel() == 0
    return o, ht, variant


def inputs(op, **kw):
    """make_inputs (public names) -> reference/schema names, with the retention decay and delta_rule flag."""
    public = make_inputs(op, generator=torch.Generator().manual_seed(zlib.crc32(op.encode())), **kw)
    out = {{"use_qk_l2norm_in_kernel": "use_qk_l2norm", "use_beta_sigmoid_in_kernel": "beta_sigmoid"}.get(n, n): x
           for n, x in public.items()}
    if op == "retention":
        out["g_gamma"] = retention_log_decay(out["q"].shape[2], "cpu")
    out["delta_rule"] = op in GROUPED
    return out


# ----------------------------------------------------------------------------------------------------------
def test_numpy_is_supported_by_the_interpreter():
    major, minor = (int(x) for x in numpy.__version__.split(".")[:2])
    assert (major, minor) < (2, 4), f"Triton's interpreter needs numpy < 2.4, found {numpy.__version__}"


def test_manifest_entry_under_interpreter():
    """spec.manifest_entry() must work whatever triton.jit returns, and equal the real (compiled) build's entry."""
    interp = SPEC.kernel
    saved = interp.__dict__.pop("params", None)  # undo _manifest_entry's stand-in, if it added one
    try:
        entry = SPEC.manifest_entry()
    finally:
        if saved is not None:
            interp.params = saved
    script = ("import json; from triton_src.fused_recurrent import SPECS; "
              "print(json.dumps(SPECS[0].manifest_entry()))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == json.loads(json.dumps(entry))


def test_every_kernel_parameter_is_bound_once():
    constexprs = set().union(*(v["constexprs"] for v in ENTRY["variants"][ARCH]))
    bound = [p["name"] for p in ENTRY["params"]]
    assert len(bound) == len(set(bound))
    assert sorted(bound + sorted(constexprs)) == sorted(SPEC.kernel.arg_names)
    kinds = {p["name"]: p["kind"] for p in ENTRY["params"]}
    assert kinds["q"] == "tensor" and kinds["o"] == "output" and kinds["g_dtype"] == "dtype_code"
    assert kinds["T"] == "symbol" and kinds["scale"] == "float" and kinds["reverse"] == "bool"


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("K,V", [(8, 16), (20, 60), (60, 20)])
def test_ops_dtypes_head_dims(op, dtype, K, V):
    kw = inputs(op, B=2, T=7, H=2, K=K, V=V, dtype=dtype)
    _, _, variant = run_and_check(kw)
    bucket = min(b for b in (16, 32, 64, 128, 256) if b >= K)
    assert variant["constexprs"]["BK"] == bucket
    assert variant["constexprs"]["DELTA_RULE"] == (op in GROUPED)
    assert variant["key"].startswith({torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype])


@pytest.mark.parametrize("op", ["linear_attn", "gla", "gated_delta_rule"])
@pytest.mark.parametrize("initial_state", [False, True])
def test_single_token(op, initial_state):
    kw = inputs(op, B=3, T=1, H=2, K=16, V=16, dtype=torch.float32, initial_state=initial_state)
    run_and_check(kw)


@pytest.mark.parametrize("op", ["simple_gla", "delta_rule"])
def test_without_final_state(op):
    kw = inputs(op, B=2, T=7, H=2, K=16, V=40, dtype=torch.bfloat16)
    o_without, ht, _ = run_and_check(kw, output_final_state=False)
    assert ht.numel() == 0
    (o_with, _), _ = launch(schema_args(dict(kw, output_final_state=True)))
    torch.testing.assert_close(o_without, o_with, rtol=0, atol=0)


@pytest.mark.parametrize("op", ["linear_attn", "gla", "gated_delta_rule"])
@pytest.mark.parametrize("cu", [[0, 3, 3, 7], [0, 0, 5]])
def test_varlen_with_empty_sequence(op, cu):
    kw = inputs(op, B=1, T=cu[-1], H=2, K=8, V=16, dtype=torch.float32, cu_seqlens=cu)
    _, ht, _ = run_and_check(kw)
    for n in range(len(cu) - 1):
        if cu[n] == cu[n + 1]:  # an empty sequence passes its initial state through unchanged
            torch.testing.assert_close(ht[n], kw["initial_state"][n], rtol=0, atol=0)


@pytest.mark.parametrize("op", ["linear_attn", "simple_gla", "retention", "gla"])
def test_reverse(op):
    kw = inputs(op, B=2, T=7, H=2, K=20, V=20, dtype=torch.float32)
    run_and_check(dict(kw, reverse=True))


@pytest.mark.parametrize("op", ["simple_gla", "gla", "gated_delta_rule"])
def test_state_v_first(op):
    kw = inputs(op, B=2, T=7, H=2, K=8, V=40, dtype=torch.float32, state_v_first=True)
    _, ht, variant = run_and_check(kw)
    assert ht.shape == (2, 2, 40, 8) and variant["constexprs"]["STATE_V_FIRST"] is True


@pytest.mark.parametrize("op", GROUPED)
@pytest.mark.parametrize("l2norm", [False, True])
def test_grouped_heads_and_l2norm(op, l2norm):
    kw = inputs(op, B=2, T=7, H=1, HV=2, K=20, V=16, dtype=torch.bfloat16)
    o, _, _ = run_and_check(dict(kw, use_qk_l2norm=l2norm))
    assert o.shape[2] == 2


@pytest.mark.parametrize("sigmoid,neg", [(True, False), (False, True), (True, True)])
def test_beta_sigmoid_and_neg_eigval(sigmoid, neg):
    kw = inputs("gated_delta_rule", B=2, T=7, H=2, K=16, V=16, dtype=torch.float32)
    kw["beta"] = torch.randn(kw["beta"].shape, generator=torch.Generator().manual_seed(1))  # logits
    if not sigmoid:
        kw["beta"] = kw["beta"].sigmoid()
    run_and_check(dict(kw, beta_sigmoid=sigmoid, allow_neg_eigval=neg))


@pytest.mark.parametrize("flags", [{}, dict(allow_neg_eigval=True), dict(beta_sigmoid=True)],
                         ids=["plain", "neg_eigval", "beta_sigmoid"])
def test_delta_rule_without_beta(flags):
    """beta absent (dtype code 0): the reference's beta = 1, whatever the beta flags say."""
    kw = inputs("delta_rule", B=2, T=7, H=2, K=16, V=16, dtype=torch.float32)
    del kw["beta"]
    run_and_check(dict(kw, **flags))


@pytest.mark.parametrize("op", ["simple_gla", "gla", "gated_delta_rule"])
@pytest.mark.parametrize("gate_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_gate_dtypes(op, gate_dtype):
    kw = inputs(op, B=2, T=7, H=2, K=16, V=16, dtype=torch.bfloat16, gate_dtype=gate_dtype, strong_gates=True)
    for name in ("g", "gk", "gv"):
        if name in kw:
            assert kw[name].dtype == gate_dtype
    run_and_check(kw)


def test_dtype_codes_reach_the_kernel():
    """The same gate values as float32 and as bfloat16 (exactly representable) give the same result: the
    run-time dtype code picks the right load."""
    kw = inputs("gla", B=1, T=7, H=2, K=16, V=16, dtype=torch.float32)
    gk16 = kw["gk"].bfloat16()
    (o32, h32), _ = launch(schema_args(dict(kw, gk=gk16.float(), output_final_state=True)))
    (o16, h16), _ = launch(schema_args(dict(kw, gk=gk16, output_final_state=True)))
    torch.testing.assert_close(o16, o32, rtol=0, atol=0)
    torch.testing.assert_close(h16, h32, rtol=0, atol=0)


def test_grid_covers_every_value_block():
    """V = 70: several BV-wide value blocks, the last one partly masked. Every element must be written."""
    kw = inputs("simple_gla", B=1, T=3, H=3, K=8, V=70, dtype=torch.float32)
    _, _, variant = run_and_check(kw)
    BV = variant["constexprs"]["BV"]
    assert 70 % BV != 0 and 70 // BV >= 1
    sym = check_args(ENTRY, schema_args(dict(kw, output_final_state=True)))
    grid = [math.prod(-(-sym[s] // d) for s, d in dim) for dim in variant["grid"] if dim]
    assert grid == [1 * 3, -(-70 // BV)]


@pytest.mark.parametrize("op", ["linear_attn", "simple_gla", "retention", "gla"])
@pytest.mark.parametrize("case", ["plain", "reverse", "varlen", "state_v_first"])
def test_backward_kernel(op, case):
    """fused_recurrent_bwd_kernel's dq, dk, dv and dh0 against float64 autograd of the reference."""
    kw = inputs(op, B=1 if case == "varlen" else 2, T=6, H=2, K=8, V=20, dtype=torch.float32,
                cu_seqlens=[0, 2, 2, 6] if case == "varlen" else None, state_v_first=case == "state_v_first")
    reverse = case == "reverse"
    kw.pop("delta_rule", None)
    gen = torch.Generator().manual_seed(1)
    leaves = {n: kw[n].double().requires_grad_(True) for n in ("q", "k", "v", "initial_state")}
    ref_kw = dict(kw, **leaves)
    o, ht = fused_recurrent_reference(**ref_kw, reverse=reverse, output_final_state=True)
    do = torch.randn(o.shape, generator=gen, dtype=torch.float64)
    dht = torch.randn(ht.shape, generator=gen, dtype=torch.float64)
    torch.autograd.backward((o, ht), (do, dht))
    names = [a["name"] for a in BWD_ENTRY["args"]]
    values = dict({n: None for n in names}, **{n: kw.get(n) for n in ("q", "k", "v", "g", "g_gamma", "gk", "gv",
                                                                    "initial_state", "cu_seqlens")})
    values.update(do=do.float(), dht=dht.float(), scale=kw["q"].shape[-1] ** -0.5, reverse=reverse,
                  state_v_first=case == "state_v_first")
    (dq, dk, dv, dh0), _ = launch(tuple(values[n] for n in names), BWD_SPEC, BWD_ENTRY)
    for name, got in (("q", dq), ("k", dk), ("v", dv), ("initial_state", dh0)):
        assert torch.isfinite(got).all(), name
        assert rel_err(got, leaves[name].grad) < 1e-4, (name, rel_err(got, leaves[name].grad))


def test_decode_experiments_match_the_reference():
    """tools/tune_decode.py: its two candidate decode kernels (persistent with prefetch; two passes over the state)."""
    from tools.tune_decode import check
    check()
