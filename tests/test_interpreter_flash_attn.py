"""The attention kernels (triton_src/flash_attn.py) run on the CPU (TRITON_INTERPRET=1), driven by
fla_aot/ops/flash_attn.py, against the float64 reference: output, lse, total attention and every gradient.

The manifest ops are replaced by interpreter launches bound exactly as the C++ dispatcher binds them
(tests/test_interpreter.launch). The kernels are built for float16/bfloat16 only; here their specs also admit
float32, so that the interpreter's exact float32 products check the algebra tightly. Dropout is checked against the
reference applying the same Philox mask (the reference implements Philox itself).
"""
from tests.test_interpreter import _manifest_entry, launch, pytestmark  # noqa: F401  (sets TRITON_INTERPRET)

import dataclasses  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import fla_aot.ops.flash_attn as flash_attn  # noqa: E402
from fla_aot.reference import attention_reference  # noqa: E402
from fla_aot.reference.attention import dropout_keep  # noqa: E402
from tests.fused_recurrent_cases import rel_err  # noqa: E402
from triton_src import flash_attn as flash_attn_src  # noqa: E402


def _with_float32(spec):
    args = [dataclasses.replace(a, dtypes=a.dtypes + ["float32"])
            if getattr(a, "dtypes", None) == flash_attn_src.ATTN_DTYPES else a for a in spec.args]
    return dataclasses.replace(spec, args=args)


@pytest.fixture
def interpreted(monkeypatch):
    assert set(flash_attn._ops) == {spec.name for spec in flash_attn_src.SPECS}
    for spec in map(_with_float32, flash_attn_src.SPECS):
        entry = _manifest_entry(spec)

        def run(*args, spec=spec, entry=entry):
            outs, _ = launch(args, spec, entry)
            return tuple(outs)
        monkeypatch.setitem(flash_attn._ops, spec.name, run)


def _seed(dropout_p):
    return torch.tensor([0x1234_5678_9ABC, 77], dtype=torch.int64) if dropout_p else None


def _leaves(*xs):
    return [x.clone().requires_grad_() for x in xs], [x.double().clone().requires_grad_() for x in xs]


def _check_lse(lse, ref):
    finite = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(lse), finite), "rows without visible keys must have lse = -inf"
    assert bool((lse[~finite] == float("-inf")).all())
    assert (lse[finite] - ref[finite]).abs().max() < 1e-5


CASES = {
    # name: (B, TQ, TK, H, HK, D, causal, dropout_p)
    "plain": (2, 70, 70, 2, 2, 16, False, 0.0),
    "causal_gqa_longer_k": (1, 40, 100, 4, 2, 32, True, 0.0),
    "causal_longer_q_empty_rows": (1, 100, 40, 2, 1, 16, True, 0.0),
    "padded_head_dim_20": (1, 37, 50, 2, 2, 20, True, 0.0),
    "mqa_not_causal_tq_ne_tk": (2, 33, 140, 3, 1, 16, False, 0.0),
    "dropout_causal_gqa": (2, 50, 66, 2, 1, 16, True, 0.3),
    "dropout_plain": (1, 64, 64, 1, 1, 16, False, 0.5),
}


@pytest.mark.parametrize("case", list(CASES))
def test_flash_attn_forward_and_backward(interpreted, case):
    B, TQ, TK, H, HK, D, causal, p = CASES[case]
    torch.manual_seed(0)
    q, k, v = torch.randn(B, TQ, H, D), torch.randn(B, TK, HK, D), torch.randn(B, TK, HK, D)
    do = torch.randn(B, TQ, H, D)
    scale = 0.3
    (lq, lk, lv), (rq, rk, rv) = _leaves(q, k, v)
    o, lse = flash_attn._run_kernels(lq, lk, lv, scale, causal, p, _seed(p))
    o.backward(do)
    ref_o, ref_lse, _ = attention_reference(rq, rk, rv, scale, causal, p, _seed(p))
    ref_o.backward(do.double())
    assert o.shape == q.shape and lse.shape == (B, H, TQ)
    assert torch.isfinite(o).all(), "an element of o was not written"
    assert rel_err(o, ref_o) < 1e-5, rel_err(o, ref_o)
    _check_lse(lse, ref_lse)
    for name, x, ref in (("q", lq, rq), ("k", lk, rk), ("v", lv, rv)):
        assert x.grad is not None and torch.isfinite(x.grad).all(), name
        assert rel_err(x.grad, ref.grad) < 1e-5, (name, rel_err(x.grad, ref.grad))


def test_dropout_changes_with_the_seed_and_drops_about_p(interpreted):
    torch.manual_seed(1)
    q, k, v = torch.randn(1, 64, 1, 16), torch.randn(1, 64, 1, 16), torch.randn(1, 64, 1, 16)
    o1, _ = flash_attn._run_kernels(q, k, v, 0.25, False, 0.5, torch.tensor([1, 0]))
    o2, _ = flash_attn._run_kernels(q, k, v, 0.25, False, 0.5, torch.tensor([2, 0]))
    o3, _ = flash_attn._run_kernels(q, k, v, 0.25, False, 0.5, torch.tensor([1, 1]))
    assert rel_err(o1, o2) > 0.1 and rel_err(o1, o3) > 0.1
    keep = dropout_keep(torch.tensor([1, 0]), 0, 1, 64, 64, 0.5)
    assert abs(keep.float().mean().item() - 0.5) < 0.03


@pytest.mark.parametrize("causal,p", [(False, 0.0), (True, 0.0), (True, 0.25)])
def test_flash_attn_varlen_with_empty_sequences(interpreted, causal, p):
    lq, lk = [5, 0, 70, 33, 17], [9, 4, 70, 0, 30]
    cu_q = torch.tensor([0] + lq).cumsum(0).int()
    cu_k = torch.tensor([0] + lk).cumsum(0).int()
    H, HK, D = 4, 2, 16
    torch.manual_seed(2)
    q, k, v = torch.randn(sum(lq), H, D), torch.randn(sum(lk), HK, D), torch.randn(sum(lk), HK, D)
    do = torch.randn_like(q)
    (lq_, lk_, lv_), (rq, rk, rv) = _leaves(q, k, v)
    o, lse = flash_attn._run_kernels(lq_, lk_, lv_, 0.3, causal, p, _seed(p), cu_q, cu_k, max(lq), max(lk))
    o.backward(do)
    ref_o, ref_lse, _ = attention_reference(rq, rk, rv, 0.3, causal, p, _seed(p), cu_q, cu_k)
    ref_o.backward(do.double())
    assert torch.isfinite(o).all()
    assert rel_err(o, ref_o) < 1e-5
    _check_lse(lse, ref_lse)
    for name, x, ref in (("q", lq_, rq), ("k", lk_, rk), ("v", lv_, rv)):
        assert torch.isfinite(x.grad).all(), name
        assert rel_err(x.grad, ref.grad) < 1e-5, (name, rel_err(x.grad, ref.grad))


@pytest.mark.parametrize("causal", [False, True])
def test_flag_attention_log_normalizer_and_total_attention(interpreted, causal):
    B, TQ, TK, H, HK, D = 2, 45, 77, 2, 1, 32
    torch.manual_seed(3)
    q, k, v = torch.randn(B, TQ, H, D), torch.randn(B, TK, HK, D), torch.randn(B, TK, HK, D)
    o, lse, tot = flash_attn._run_flag_kernels(q, k, v, 0.2, causal, True)
    ref_o, ref_lse, ref_tot = attention_reference(q.double(), k.double(), v.double(), 0.2, causal,
                                                  return_total_attention=True)
    assert rel_err(o, ref_o) < 1e-5
    _check_lse(lse, ref_lse)
    assert tot.shape == (B, H, TK) and torch.isfinite(tot).all()
    assert rel_err(tot, ref_tot) < 1e-5, rel_err(tot, ref_tot)


@pytest.mark.parametrize("causal,TQ,TK,D", [(False, 45, 77, 32), (True, 45, 77, 32), (True, 60, 60, 24)])
def test_piecewise_attention_forward_and_backward(interpreted, causal, TQ, TK, D):
    B, H, HK, dist = 2, 2, 1, 20
    torch.manual_seed(4)
    xs = [torch.randn(B, TQ, H, D), torch.randn(B, TK, HK, D), torch.randn(B, TQ, H, D), torch.randn(B, TK, HK, D),
          torch.randn(B, TK, HK, D)]
    do = torch.randn(B, TQ, H, D)
    leaves, refs = _leaves(*xs)
    o = flash_attn._run_piecewise_kernels(*leaves, 0.2, dist, causal)
    o.backward(do)
    ref_o, _, _ = attention_reference(refs[0], refs[1], refs[4], 0.2, causal, q2=refs[2], k2=refs[3],
                                      dist_threshold=dist)
    ref_o.backward(do.double())
    assert torch.isfinite(o).all()
    assert rel_err(o, ref_o) < 1e-5
    for name, x, ref in zip(("q1", "k1", "q2", "k2", "v"), leaves, refs):
        assert torch.isfinite(x.grad).all(), name
        assert rel_err(x.grad, ref.grad) < 1e-5, (name, rel_err(x.grad, ref.grad))
