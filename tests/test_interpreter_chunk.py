"""The chunk kernels (triton_src/chunk.py, chunk_gla.py) run on the CPU (TRITON_INTERPRET=1), driven by
fla_aot/ops/chunk.py.

The manifest ops the chunk ops call are replaced by interpreter launches bound exactly as the C++
dispatcher binds them (tests/test_interpreter.launch), so the kernels, the Python glue (segment tables, the
segmented scan, the gate gradient) and the specs are checked together against the float64 reference, forward
and backward, with segments forced small so that the parallel-scan path runs on tiny inputs.
"""
from tests.test_interpreter import _manifest_entry, launch, pytestmark  # noqa: F401  (sets TRITON_INTERPRET)

import pytest  # noqa: E402
import torch  # noqa: E402

import fla_aot.ops.chunk as chunk  # noqa: E402
from fla_aot.reference import fused_recurrent_reference  # noqa: E402
from tests.chunk_cases import G_GRAD_TOL, GRAD_TOL, TOL, gla_gate_by_chunk, gla_intra_paths  # noqa: E402
from tests.fused_recurrent_cases import rel_err  # noqa: E402
from triton_src import chunk as chunk_src, chunk_gla as chunk_gla_src  # noqa: E402

SPECS = chunk_src.SPECS + chunk_gla_src.SPECS


@pytest.fixture
def interpreted(monkeypatch):
    assert set(chunk._ops) == {spec.name for spec in SPECS}
    for spec in SPECS:
        entry = _manifest_entry(spec)

        def run(*args, spec=spec, entry=entry):
            outs, _ = launch(args, spec, entry)
            return tuple(outs)
        monkeypatch.setitem(chunk._ops, spec.name, run)


def _run(q, k, v, g, g_gamma, h0, lengths, seg_chunks, state_v_first=False, gla=False):
    """Forward through the kernels; returns outputs and the leaves to take gradients of."""
    tabs = chunk._Tables(lengths, seg_chunks, q.device)
    leaves = [x.clone().requires_grad_() if x is not None else None for x in (q, k, v, g, h0)]
    o, ht = chunk._ChunkFunction.apply(leaves[0], leaves[1], leaves[2], leaves[3], g_gamma, leaves[4],
                                       q.shape[-1] ** -0.5, state_v_first, True, tabs, gla)
    return o, ht, leaves


def _reference(q, k, v, g, g_gamma, h0, lengths, state_v_first, do, dht, gla=False):
    cu = None
    if len(lengths) != q.shape[0]:
        cu = torch.tensor([0] + list(lengths)).cumsum(0)
    leaves = [x.double().clone().requires_grad_() if x is not None else None for x in (q, k, v, g, h0)]
    o, ht = fused_recurrent_reference(leaves[0], leaves[1], leaves[2], g=None if gla else leaves[3],
                                      gk=leaves[3] if gla else None,
                                      g_gamma=None if g_gamma is None else g_gamma.double(),
                                      initial_state=leaves[4], output_final_state=True, state_v_first=state_v_first,
                                      cu_seqlens=cu)
    ((o * do.double()).sum() + (ht * dht.double()).sum()).backward()
    return o, ht, leaves


CASES = {
    # name: (B, lengths or None, K, V, gates, initial state, state_v_first, seg_chunks)
    "one_segment": (2, None, 16, 32, "g", True, False, 100),
    "segments": (2, None, 16, 32, "g", True, False, 1),
    "gamma_segments_v_first": (1, None, 8, 20, "g+gamma", True, True, 1),
    "no_gate_head_dims": (1, None, 60, 40, None, False, False, 2),
    "varlen_segments": (1, (0, 70, 5, 130), 16, 16, "g", True, False, 1),
    "varlen_one_segment": (1, (0, 70, 5, 130), 16, 16, "gamma", True, False, 100),
    # GLA's per-key gate: strong enough that exp(G_i - G_j) spans ~e^-60 within a chunk
    "gla_one_segment": (2, None, 16, 32, "gk", True, False, 100),
    "gla_segments_v_first": (1, None, 20, 16, "gk", True, True, 1),
    "gla_varlen": (1, (0, 70, 5, 130), 16, 16, "gk", True, False, 1),
    "gla_keys_in_slices": (1, None, 40, 24, "gk", False, False, 100),  # K over two slices, the second partial
    # a gate 20x stronger: most factors of the pairing tree underflow, none may overflow
    "gla_strong_gate": (1, None, 16, 16, "gk_strong", True, False, 100),
    # a weak gate: every chunk's products through one reference row
    "gla_weak_gate": (1, None, 16, 16, "gk_weak", True, False, 100),
    # chunk by chunk one reference row, one per 16-row block, the tree (gla_intra_paths counts each)
    "gla_each_path": (1, None, 16, 16, "gk_paths", True, False, 100),
}
GLA_GATES = ("gk", "gk_strong", "gk_weak", "gk_paths")


@pytest.mark.parametrize("case", list(CASES))
def test_chunk_forward_and_backward(interpreted, case):
    B, lengths, K, V, gates, with_h0, v_first, seg_chunks = CASES[case]
    T = 150 if lengths is None else sum(lengths)
    N = B if lengths is None else len(lengths)
    torch.manual_seed(0)
    H = 2
    gla = gates in GLA_GATES
    q, k = torch.randn(B, T, H, K), torch.randn(B, T, H, K)
    v = torch.randn(B, T, H, V)
    if gates == "gk_paths":
        g = gla_gate_by_chunk(B, T, H, K, ("chunk", "block", "tree"), chunk_gla_src._span("float32"))
        taken = gla_intra_paths(g, chunk_gla_src._span("float32"))
        assert all(taken.values()), taken
    elif gla:
        shift = 3.0 if gates == "gk_weak" else -1.0
        g = torch.nn.functional.logsigmoid(torch.randn(B, T, H, K) + shift) * (20 if gates == "gk_strong" else 1)
    else:
        g = -0.3 * torch.rand(B, T, H) if gates in ("g", "g+gamma") else None
    g_gamma = -0.2 * torch.rand(H) if gates in ("gamma", "g+gamma") else None
    h0 = torch.randn(N, H, *((V, K) if v_first else (K, V))) if with_h0 else None
    lengths = lengths or (T,) * B
    do, dht = torch.randn(B, T, H, V), torch.randn(N, H, *((V, K) if v_first else (K, V)))

    o, ht, leaves = _run(q, k, v, g, g_gamma, h0, lengths, seg_chunks, v_first, gla)
    assert torch.isfinite(o).all() and torch.isfinite(ht).all()
    ref_o, ref_ht, ref_leaves = _reference(q, k, v, g, g_gamma, h0, lengths, v_first, do, dht, gla)
    assert rel_err(o, ref_o) < 1e-5, rel_err(o, ref_o)
    assert rel_err(ht, ref_ht) < 1e-5, rel_err(ht, ref_ht)

    ((o * do).sum() + (ht * dht).sum()).backward()
    for name, x, ref in zip("q k v g h0".split(), leaves, ref_leaves):
        if x is None:
            continue
        assert x.grad is not None and torch.isfinite(x.grad).all(), name
        # the gate's gradient is a sum of q.dq - k.dk terms that nearly cancel under the strong gate
        # (1.6e-4 there, dq and dk 1e-7)
        tol = 1e-3 if name == "g" and gates == "gk_strong" else 1e-4
        assert rel_err(x.grad, ref.grad) < tol, (name, rel_err(x.grad, ref.grad))


_INTRA = ("chunk_gla_intra", "chunk_gla_bwd_intra")


def _override_configs(monkeypatch, names, **config):
    """GLA's kernels `names` with `config` over their frozen launch configs, before the `interpreted` fixture binds
    the specs."""
    for spec in chunk_gla_src.SPECS:
        if spec.name in names:
            monkeypatch.setattr(spec, "launch_config", lambda base=spec.launch_config, **axes:
                                dict(base(**axes), **config))
            assert all(v["constexprs"][n] == x for v in spec.variants() for n, x in config.items())


@pytest.mark.parametrize("case", ["gla_keys_in_slices", "gla_varlen"])
def test_gla_small_key_slices(monkeypatch, case, request):
    """GLA's intra kernels with 16-wide slices of K: the slices (a loop in the forward, programs of their own in
    the backward) together give the same results."""
    _override_configs(monkeypatch, _INTRA, BK=16)
    request.getfixturevalue("interpreted")
    test_chunk_forward_and_backward(None, case)


def test_replay_takes_the_kernels_span():
    from tools.gla_gate_grad_rounding import SPAN
    assert SPAN == chunk_gla_src._span("bfloat16")


@pytest.mark.parametrize("case", ["gla_one_segment", "gla_weak_gate", "gla_varlen"])
def test_gla_tree_alone(monkeypatch, case, request):
    """GLA's intra kernels with the one-reference products off (SPAN < 0): every pair on the pairing tree."""
    _override_configs(monkeypatch, _INTRA, SPAN=-1.0)
    request.getfixturevalue("interpreted")
    test_chunk_forward_and_backward(None, case)


@pytest.mark.parametrize("tf32,gate_dtype,shift", [(False, torch.float32, -1.0), (True, torch.float32, -1.0),
                                                   (False, torch.float16, -1.0), (False, torch.float32, 5.0)])
def test_gla_half_inputs(monkeypatch, tf32, gate_dtype, shift, request):
    """float16 inputs, the intra kernels' tree products in the inputs' dtype or (TF32) in tf32, and the gate in
    float32 or float16 (chunk_gk_cumsum sums it per chunk in float32), against float64; the gate
    logsigmoid(x + shift): with shift 5 weak enough for float16's one-reference products (SPAN 2)."""
    _override_configs(monkeypatch, _INTRA, TF32=tf32)
    request.getfixturevalue("interpreted")
    torch.manual_seed(0)
    B, T, H, K, V = 1, 150, 2, 32, 16
    q, k, v = (torch.randn(B, T, H, D).half() for D in (K, K, V))
    g = torch.nn.functional.logsigmoid(torch.randn(B, T, H, K) + shift).to(gate_dtype)
    if shift > 0:
        assert gla_intra_paths(g, chunk_gla_src._span("float16"))["chunk"] > 0
    h0, dht = torch.randn(B, H, K, V), torch.randn(B, H, K, V)
    do = torch.randn(B, T, H, V).half()
    o, ht, leaves = _run(q, k, v, g, None, h0, (T,), 100, gla=True)
    ref_o, ref_ht, ref_leaves = _reference(q, k, v, g, None, h0, (T,), False, do, dht, gla=True)
    assert rel_err(o, ref_o) < TOL[torch.float16] and rel_err(ht, ref_ht) < TOL[torch.float16]
    ((o.float() * do.float()).sum() + (ht * dht).sum()).backward()
    for name, x, ref in zip("q k v g h0".split(), leaves, ref_leaves):
        tol = (G_GRAD_TOL if name == "g" else GRAD_TOL)[torch.float16]
        assert torch.isfinite(x.grad).all() and rel_err(x.grad, ref.grad) < tol, (name, rel_err(x.grad, ref.grad))


@pytest.mark.parametrize("mode", ["rescan", "correct"])
@pytest.mark.parametrize("case", [name for name, c in CASES.items() if c[-1] < 5])
def test_split_fixup_modes(monkeypatch, case, mode, request):
    """Split state passes give the same results with either fix-up (SPLIT_FIXUP) for both scans: a second scan,
    or chunk_fixup correcting the first scan's states (the backward's reverse pass too, and the forward of GLA,
    which writes no outputs in its scan)."""
    monkeypatch.setattr(chunk, "SPLIT_FIXUP", dict.fromkeys(chunk.SPLIT_FIXUP, mode))
    calls = []
    request.getfixturevalue("interpreted")
    run = chunk._ops["chunk_fixup"]
    monkeypatch.setitem(chunk._ops, "chunk_fixup", lambda *args: calls.append(1) or run(*args))
    test_chunk_forward_and_backward(None, case)
    assert bool(calls) == (mode == "correct")


def test_tables_split_long_sequences():
    tabs = chunk._Tables((0, 300, 64), 2, "cpu")
    # sequence 0 is empty but keeps a segment (its state passes through); 300 tokens = 5 chunks = 3 segments
    assert tabs.segments.tolist() == [[0, 0, 0, 0], [1, 0, 128, 0], [1, 128, 256, 2], [1, 256, 300, 4],
                                      [2, 300, 364, 5]]
    assert tabs.seg_offsets.tolist() == [0, 1, 4, 5]
    assert tabs.chunks[:, 1:3].tolist() == [[0, 64], [64, 128], [128, 192], [192, 256], [256, 300], [300, 364]]
    assert tabs.chunks[:, 3].tolist() == [1, 1, 2, 2, 3, 4]  # each chunk's segment
    assert not tabs.single and chunk._Tables((0, 300, 64), 5, "cpu").single
