"""Exact attention on the GPU (skipped without CUDA): every option of flash_attn_func / qkvpacked / varlen and of
FlagAttention's flash_attention / piecewise_attention against the float32 reference on the same inputs, forward and
every gradient, outputs poisoned with NaN before each call (the caching allocator hands the poisoned blocks back),
T not a multiple of the tiles, TQ != TK (bottom-right causal), GQA, varlen with an empty sequence, dropout (the
reference applies the same Philox mask), FlagAttention's accuracy rule, CUDA graphs and torch.compile."""
import pytest
import torch

import fla_aot.ops as ops
from fla_aot.reference import attention_reference
from fla_aot.reference.attention import dropout_keep
from tests.fused_recurrent_cases import capture_graph, rel_err

pytestmark = pytest.mark.gpu
DEV = "cuda"
TOL = {torch.float16: 2e-3, torch.bfloat16: 1.2e-2}
GRAD_TOL = {torch.float16: 5e-3, torch.bfloat16: 2.5e-2}


def _poison():
    # fill freed blocks with NaN so that an output element the kernels do not write shows up
    junk = torch.full((64 << 20,), float("nan"), device=DEV)
    del junk


def _rand(*shape, dtype, gen):
    return torch.randn(*shape, device=DEV, generator=gen).to(dtype)


def _reference(q, k, v, do, **kw):
    leaves = [x.detach().float().requires_grad_() for x in (q, k, v)]
    o, lse, _ = attention_reference(*leaves, **kw)
    o.backward(do.float())
    return o, lse, [x.grad for x in leaves]


def _check(got, want, tol, what):
    assert torch.isfinite(got).all(), f"{what}: non-finite (unwritten) elements"
    if want.abs().max() < 1e-6:  # exactly zero in exact math (dq with a single key): only rounding noise may remain
        assert got.abs().max() < 1e-3, f"{what}: expected zeros, max |got| {got.abs().max():.2e}"
        return
    err = rel_err(got, want)
    assert err < tol, f"{what}: relative error {err:.2e} >= {tol:.0e}"


CASES = {
    # name: (B, TQ, TK, H, HK, D, causal)
    "d64": (2, 256, 256, 4, 4, 64, False),
    "d64_causal_odd_t": (2, 333, 333, 4, 4, 64, True),
    "d128_causal_tq_lt_tk": (1, 200, 517, 4, 2, 128, True),
    "d128_causal_tq_gt_tk": (1, 517, 200, 4, 1, 128, True),
    "d16_gqa": (2, 130, 190, 8, 2, 16, False),
    "d32_causal": (2, 100, 100, 2, 2, 32, True),
    "d80_padded": (1, 150, 150, 2, 2, 80, True),
    "d96_padded": (1, 150, 170, 2, 1, 96, False),
    "d256_causal": (1, 140, 140, 2, 2, 256, True),
    "d256": (1, 140, 300, 2, 1, 256, False),
    "one_token": (3, 1, 1, 2, 2, 64, True),
}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", list(CASES))
def test_flash_attn_func(case, dtype):
    B, TQ, TK, H, HK, D, causal = CASES[case]
    gen = torch.Generator(device=DEV).manual_seed(0)
    q, k, v = _rand(B, TQ, H, D, dtype=dtype, gen=gen), _rand(B, TK, HK, D, dtype=dtype, gen=gen), \
        _rand(B, TK, HK, D, dtype=dtype, gen=gen)
    do = _rand(B, TQ, H, D, dtype=dtype, gen=gen)
    scale = 0.7 / D ** 0.5
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    _poison()
    o = ops.flash_attn_func(*leaves, softmax_scale=scale, causal=causal)
    _poison()
    o.backward(do)
    ref_o, _, ref_grads = _reference(q, k, v, do, scale=scale, causal=causal)
    assert o.shape == q.shape and o.dtype == dtype
    _check(o, ref_o, TOL[dtype], "o")
    for name, x, g in zip("qkv", leaves, ref_grads):
        _check(x.grad, g, GRAD_TOL[dtype], f"d{name}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("D", [64, 128])
def test_flagattention_accuracy_rule(dtype, causal, D):
    """The kernel's max abs error against float32 math is at most twice that of the same PyTorch math done in
    the kernel's precision (FlagAttention's rule), forward and gradients."""
    B, T, H = 2, 777, 4
    gen = torch.Generator(device=DEV).manual_seed(1)
    q, k, v, do = (_rand(B, T, H, D, dtype=dtype, gen=gen) for _ in range(4))
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    o = ops.flash_attn_func(*leaves, causal=causal)
    o.backward(do)
    ref_o, _, ref_grads = _reference(q, k, v, do, causal=causal)
    low = [x.clone().requires_grad_() for x in (q, k, v)]
    low_o, _, _ = attention_reference(*low, causal=causal)  # the same math in fp16/bf16
    low_o.backward(do)
    for name, got, lo, ref in [("o", o, low_o, ref_o)] + [(f"d{n}", x.grad, y.grad, g)
                                                           for n, x, y, g in zip("qkv", leaves, low, ref_grads)]:
        err = (got.float() - ref).abs().max().item()
        bound = (lo.float() - ref).abs().max().item()
        assert err <= 2 * bound + 1e-6, f"{name}: kernel max error {err:.3e} > 2 x {bound:.3e}"


def test_qkvpacked_and_kvpacked():
    gen = torch.Generator(device=DEV).manual_seed(2)
    qkv = _rand(2, 300, 3, 4, 64, dtype=torch.bfloat16, gen=gen).requires_grad_()
    do = _rand(2, 300, 4, 64, dtype=torch.bfloat16, gen=gen)
    o = ops.flash_attn_qkvpacked_func(qkv, causal=True)
    o.backward(do)
    q, k, v = qkv.detach().unbind(2)
    ref_o, _, ref_grads = _reference(q, k, v, do, causal=True)
    _check(o, ref_o, TOL[torch.bfloat16], "o")
    _check(qkv.grad, torch.stack(ref_grads, 2), GRAD_TOL[torch.bfloat16], "dqkv")
    kv = torch.stack([k, v], 2)
    _check(ops.flash_attn_kvpacked_func(q, kv, causal=True), ref_o, TOL[torch.bfloat16], "kvpacked o")


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_varlen_with_an_empty_sequence(causal, dropout_p):
    lq, lk = [130, 0, 257, 1, 64], [100, 33, 257, 5, 0]
    H, HK, D, dtype = 4, 2, 64, torch.float16
    gen = torch.Generator(device=DEV).manual_seed(3)
    q, k, v = _rand(sum(lq), H, D, dtype=dtype, gen=gen), _rand(sum(lk), HK, D, dtype=dtype, gen=gen), \
        _rand(sum(lk), HK, D, dtype=dtype, gen=gen)
    do = _rand(sum(lq), H, D, dtype=dtype, gen=gen)
    cu_q = torch.tensor([0] + lq, device=DEV).cumsum(0).int()
    cu_k = torch.tensor([0] + lk, device=DEV).cumsum(0).int()
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    state = torch.cuda.get_rng_state()
    _poison()
    o = ops.flash_attn_varlen_func(*leaves, cu_q, cu_k, max(lq), max(lk), dropout_p=dropout_p, causal=causal)
    o.backward(do)
    seed = None
    if dropout_p:  # the (key, offset) pair the op drew: replay the generator
        torch.cuda.set_rng_state(state)
        seed = torch.randint(0, 2 ** 62, (2,), dtype=torch.int64, device=DEV).cpu()
    ref_o, _, ref_grads = _reference(q.cpu(), k.cpu(), v.cpu(), do.cpu(), causal=causal, dropout_p=dropout_p,
                                     seed=seed, cu_seqlens_q=cu_q.cpu(), cu_seqlens_k=cu_k.cpu())
    _check(o, ref_o, TOL[dtype], "o")
    for name, x, g in zip("qkv", leaves, ref_grads):
        _check(x.grad, g, GRAD_TOL[dtype], f"d{name}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal,TQ,TK,HK", [(False, 256, 256, 4), (True, 300, 300, 2), (True, 190, 320, 1)])
def test_dropout_matches_the_reference_with_the_same_mask(dtype, causal, TQ, TK, HK):
    _dropout_case(dtype, causal, TQ, TK, HK, D=64)


@pytest.mark.parametrize("D", [16, 32, 128, 256])
def test_dropout_at_every_head_dim_bucket(D):
    _dropout_case(torch.bfloat16, True, 190, 320, 2, D)


def _dropout_case(dtype, causal, TQ, TK, HK, D):
    B, H, p = 2, 4, 0.3
    gen = torch.Generator(device=DEV).manual_seed(4)
    q, k, v = _rand(B, TQ, H, D, dtype=dtype, gen=gen), _rand(B, TK, HK, D, dtype=dtype, gen=gen), \
        _rand(B, TK, HK, D, dtype=dtype, gen=gen)
    do = _rand(B, TQ, H, D, dtype=dtype, gen=gen)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    drop_gen = torch.Generator(device=DEV).manual_seed(1234)
    o = ops.flash_attn_func(*leaves, dropout_p=p, causal=causal, generator=drop_gen)
    o.backward(do)  # the backward regenerates the mask: its gradients match only if the masks agree
    seed = torch.randint(0, 2 ** 62, (2,), dtype=torch.int64, device=DEV,
                         generator=torch.Generator(device=DEV).manual_seed(1234)).cpu()
    ref_o, _, ref_grads = _reference(q.cpu(), k.cpu(), v.cpu(), do.cpu(), causal=causal, dropout_p=p, seed=seed)
    _check(o, ref_o, TOL[dtype], "o")
    for name, x, g in zip("qkv", leaves, ref_grads):
        _check(x.grad, g, GRAD_TOL[dtype], f"d{name}")
    keep = dropout_keep(seed, 0, H, TQ, TK, p)
    assert abs(keep.float().mean().item() - (1 - p)) < 0.01
    # same generator state: the same result; the next call draws a fresh mask
    again = ops.flash_attn_func(q, k, v, dropout_p=p, causal=causal,
                                generator=torch.Generator(device=DEV).manual_seed(1234))
    torch.testing.assert_close(again, o.detach(), rtol=0, atol=0)
    assert rel_err(ops.flash_attn_func(q, k, v, dropout_p=p, causal=causal, generator=drop_gen), o) > 0.05


@pytest.mark.parametrize("causal", [False, True])
def test_flag_attention_log_normalizer_and_total_attention(causal):
    B, H, HK, TQ, TK, D, dtype = 2, 4, 2, 300, 520, 64, torch.bfloat16
    gen = torch.Generator(device=DEV).manual_seed(5)
    q, k, v = _rand(B, H, TQ, D, dtype=dtype, gen=gen), _rand(B, HK, TK, D, dtype=dtype, gen=gen), \
        _rand(B, HK, TK, D, dtype=dtype, gen=gen)
    do = _rand(B, H, TQ, D, dtype=dtype, gen=gen)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    _poison()
    o, lse, tot = ops.flash_attention(*leaves, causal=causal, sm_scale=0.1, return_log_normalizer=True,
                                      return_total_attention=True)
    o.backward(do)
    ref = [x.detach().float().transpose(1, 2).requires_grad_() for x in (q, k, v)]
    ref_o, ref_lse, ref_tot = attention_reference(*ref, scale=0.1, causal=causal, return_total_attention=True)
    ref_o.backward(do.float().transpose(1, 2))
    assert o.shape == (B, H, TQ, D) and lse.shape == (B, H, TQ) and tot.shape == (B, H, TK)
    _check(o, ref_o.transpose(1, 2), TOL[dtype], "o")
    assert (lse - ref_lse).abs().max() < 2e-2
    _check(tot, ref_tot, TOL[dtype], "total attention")
    for name, x, r in zip("qkv", leaves, ref):
        _check(x.grad, r.grad.transpose(1, 2), GRAD_TOL[dtype], f"d{name}")


@pytest.mark.parametrize("causal,TQ,TK,D", [(False, 300, 300, 64), (True, 300, 300, 128), (True, 200, 333, 32)])
def test_piecewise_attention(causal, TQ, TK, D):
    B, H, dtype, dist = 2, 2, torch.float16, 100
    gen = torch.Generator(device=DEV).manual_seed(6)
    xs = [_rand(B, H, T, D, dtype=dtype, gen=gen) for T in (TQ, TK, TQ, TK, TK)]
    do = _rand(B, H, TQ, D, dtype=dtype, gen=gen)
    leaves = [x.clone().requires_grad_() for x in xs]
    _poison()
    o = ops.piecewise_attention(*leaves, dist_threshold=dist, causal=causal)
    o.backward(do)
    ref = [x.float().transpose(1, 2).requires_grad_() for x in xs]
    ref_o, _, _ = attention_reference(ref[0], ref[1], ref[4], causal=causal, q2=ref[2], k2=ref[3],
                                      dist_threshold=dist)
    ref_o.backward(do.float().transpose(1, 2))
    _check(o, ref_o.transpose(1, 2), TOL[dtype], "o")
    for name, x, r in zip(("q1", "k1", "q2", "k2", "v"), leaves, ref):
        _check(x.grad, r.grad.transpose(1, 2), GRAD_TOL[dtype], f"d{name}")


def test_validation_on_cuda():
    q = torch.randn(1, 8, 2, 64, device=DEV)
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        ops.flash_attn_func(q, q, q)
    with pytest.raises(ValueError, match="one device"):
        ops.flash_attn_func(q.half(), q.half().cpu(), q.half())
    big = torch.randn(1, 8, 2, 320, device=DEV, dtype=torch.float16)
    with pytest.raises(ValueError, match="head dim 320"):
        ops.flash_attn_func(big, big, big)


def test_misaligned_and_strided_inputs():
    gen = torch.Generator(device=DEV).manual_seed(7)
    flat = _rand(1 + 2 * 100 * 2 * 64, dtype=torch.float16, gen=gen)
    q = flat[1:].view(2, 100, 2, 64)  # contiguous, 2 bytes off alignment
    k = _rand(2, 2, 100, 64, dtype=torch.float16, gen=gen).transpose(1, 2)  # strided
    o = ops.flash_attn_func(q, k, k, causal=True)
    ref, _, _ = attention_reference(q.float(), k.float(), k.float(), causal=True)
    _check(o, ref, TOL[torch.float16], "o")


def test_cuda_graph_capture_and_replay():
    gen = torch.Generator(device=DEV).manual_seed(8)
    q, k, v = (_rand(2, 200, 4, 64, dtype=torch.bfloat16, gen=gen) for _ in range(3))

    def fn():
        return ops.flash_attn_func(q, k, v, causal=True), ops.flash_attn_func(q, k, v, dropout_p=0.1)
    graph, (o_static, od_static) = capture_graph(fn)
    for seed in range(2):
        for x in (q, k, v):
            x.copy_(torch.randn(x.shape, device=DEV, generator=gen).to(x.dtype))
        graph.replay()
        torch.testing.assert_close(o_static, ops.flash_attn_func(q, k, v, causal=True), rtol=0, atol=0)
        first = od_static.clone()
        graph.replay()  # each replay draws a fresh dropout mask
        assert torch.isfinite(od_static).all() and rel_err(od_static, first) > 0.01


def test_torch_compile_fullgraph():
    gen = torch.Generator(device=DEV).manual_seed(9)
    q, k, v = (_rand(2, 150, 4, 64, dtype=torch.float16, gen=gen).requires_grad_() for _ in range(3))

    def step(q, k, v):
        return ops.flash_attn_func(q, k, v, causal=True) * 2

    compiled = torch.compile(step, fullgraph=True)
    got, want = compiled(q, k, v), step(q, k, v)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    g1 = torch.autograd.grad(got.sum(), (q, k, v))
    g2 = torch.autograd.grad(want.sum(), (q, k, v))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
