"""fla_aot.layers on the CPU reference path: fla's parameter names and shapes, prefill-then-decode through
the cache equal to one full forward, left-padded batches equal to each sequence alone, and the short
convolution against torch's conv1d."""
import pytest
import torch
import torch.nn.functional as F

import fla_aot.layers as layers
from fla_aot.layers import Cache

# (layer class, constructor arguments): the same cases the frozen names below were read for
LAYER_CASES = {
    "retnet": ("MultiScaleRetention", dict(hidden_size=64, num_heads=2)),
    "retnet_gqa_conv": ("MultiScaleRetention", dict(hidden_size=64, num_heads=4, num_kv_heads=2, use_short_conv=True)),
    "gla": ("GatedLinearAttention", dict(hidden_size=64, num_heads=2)),
    "gla_gqa_conv_unfused": ("GatedLinearAttention", dict(hidden_size=64, num_heads=4, num_kv_heads=2,
                                                          use_short_conv=True, fuse_norm=False, clamp_min=-2.0)),
    "delta_net": ("DeltaNet", dict(hidden_size=64, num_heads=2)),
    "delta_net_gate": ("DeltaNet", dict(hidden_size=64, num_heads=2, use_gate=True, allow_neg_eigval=True,
                                        conv_bias=True)),
    "gated_deltanet": ("GatedDeltaNet", dict(hidden_size=64, head_dim=16, num_heads=2)),
    "gated_deltanet_gva": ("GatedDeltaNet", dict(hidden_size=64, head_dim=16, num_heads=2, num_v_heads=4,
                                                 expand_v=1.0)),
}

# state_dict names and shapes of fla-core 0.6.0's layers (flash-linear-attention 0.6.0's fla.layers) for
# LAYER_CASES, recorded once from fla's own modules built on the CPU (fla is not needed to run this test)
FLA_LAYER_PARAMS = {'delta_net': {'b_proj.weight': (2, 64),
               'k_conv1d.weight': (64, 1, 4),
               'k_proj.weight': (64, 64),
               'o_norm.weight': (32,),
               'o_proj.weight': (64, 64),
               'q_conv1d.weight': (64, 1, 4),
               'q_proj.weight': (64, 64),
               'v_conv1d.weight': (64, 1, 4),
               'v_proj.weight': (64, 64)},
 'delta_net_gate': {'b_proj.weight': (2, 64),
                    'g_proj.weight': (64, 64),
                    'k_conv1d.bias': (64,),
                    'k_conv1d.weight': (64, 1, 4),
                    'k_proj.weight': (64, 64),
                    'o_norm.weight': (32,),
                    'o_proj.weight': (64, 64),
                    'q_conv1d.bias': (64,),
                    'q_conv1d.weight': (64, 1, 4),
                    'q_proj.weight': (64, 64),
                    'v_conv1d.bias': (64,),
                    'v_conv1d.weight': (64, 1, 4),
                    'v_proj.weight': (64, 64)},
 'gated_deltanet': {'A_log': (2,),
                    'a_proj.weight': (2, 64),
                    'b_proj.weight': (2, 64),
                    'dt_bias': (2,),
                    'g_proj.weight': (64, 64),
                    'k_conv1d.weight': (32, 1, 4),
                    'k_proj.weight': (32, 64),
                    'o_norm.weight': (32,),
                    'o_proj.weight': (64, 64),
                    'q_conv1d.weight': (32, 1, 4),
                    'q_proj.weight': (32, 64),
                    'v_conv1d.weight': (64, 1, 4),
                    'v_proj.weight': (64, 64)},
 'gated_deltanet_gva': {'A_log': (4,),
                        'a_proj.weight': (4, 64),
                        'b_proj.weight': (4, 64),
                        'dt_bias': (4,),
                        'g_proj.weight': (64, 64),
                        'k_conv1d.weight': (32, 1, 4),
                        'k_proj.weight': (32, 64),
                        'o_norm.weight': (16,),
                        'o_proj.weight': (64, 64),
                        'q_conv1d.weight': (32, 1, 4),
                        'q_proj.weight': (32, 64),
                        'v_conv1d.weight': (64, 1, 4),
                        'v_proj.weight': (64, 64)},
 'gla': {'g_norm_swish_gate.weight': (32,),
         'g_proj.weight': (64, 64),
         'gk_proj.0.weight': (16, 64),
         'gk_proj.1.bias': (32,),
         'gk_proj.1.weight': (32, 16),
         'k_proj.weight': (32, 64),
         'o_proj.weight': (64, 64),
         'q_proj.weight': (32, 64),
         'v_proj.weight': (64, 64)},
 'gla_gqa_conv_unfused': {'g_norm.weight': (16,),
                          'g_proj.weight': (64, 64),
                          'gk_proj.0.weight': (16, 64),
                          'gk_proj.1.bias': (16,),
                          'gk_proj.1.weight': (16, 16),
                          'k_conv1d.weight': (16, 1, 4),
                          'k_proj.weight': (16, 64),
                          'o_proj.weight': (64, 64),
                          'q_conv1d.weight': (32, 1, 4),
                          'q_proj.weight': (32, 64),
                          'v_conv1d.weight': (32, 1, 4),
                          'v_proj.weight': (32, 64)},
 'retnet': {'g_norm_swish_gate.weight': (64,),
            'g_proj.weight': (128, 64),
            'k_proj.weight': (64, 64),
            'o_proj.weight': (64, 128),
            'q_proj.weight': (64, 64),
            'v_proj.weight': (128, 64)},
 'retnet_gqa_conv': {'g_norm_swish_gate.weight': (32,),
                     'g_proj.weight': (128, 64),
                     'k_conv1d.weight': (32, 1, 4),
                     'k_proj.weight': (32, 64),
                     'o_proj.weight': (64, 128),
                     'q_conv1d.weight': (64, 1, 4),
                     'q_proj.weight': (64, 64),
                     'v_conv1d.weight': (64, 1, 4),
                     'v_proj.weight': (64, 64)}}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny shapes: one intra-op thread is faster, and immune to a busy machine's thread contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def make(case, seed=0):
    name, kwargs = LAYER_CASES[case]
    torch.manual_seed(seed)
    layer = getattr(layers, name)(layer_idx=0, **kwargs).eval()
    with torch.no_grad():  # fla's defaults leave some weights at 1/0: perturb every parameter
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return layer


@pytest.mark.parametrize("case", sorted(LAYER_CASES))
def test_parameter_names_and_shapes_match_fla(case):
    got = {k: tuple(v.shape) for k, v in make(case).state_dict().items()}
    assert got == FLA_LAYER_PARAMS[case]


@pytest.mark.parametrize("case", sorted(LAYER_CASES))
def test_prefill_then_decode_equals_full_forward(case):
    layer = make(case)
    x = torch.randn(2, 11, 64)
    with torch.no_grad():
        full, _, _ = layer(x)
        cache = Cache()
        outs = []
        for start, end in ((0, 4), (4, 8), (8, 9), (9, 10), (10, 11)):  # two prefill chunks, then decoding
            o, _, cache = layer(x[:, start:end], past_key_values=cache, use_cache=True)
            outs.append(o)
    assert cache.get_seq_length(0) == 11
    assert rel(torch.cat(outs, 1), full) < 1e-5


# the op fla's layer of the same name runs for (T, autograd on): the recurrent form up to 64 tokens, RetNet and
# Gated DeltaNet the chunk form whenever autograd is on (decoding aside)
FORM_CASES = {"retnet": "retention", "gla": "gla", "delta_net": "delta_rule", "gated_deltanet": "gated_delta_rule"}
CHUNK_UNDER_GRAD = {"retnet", "gated_deltanet"}


def _spy_forms(monkeypatch):
    import fla_aot.ops as ops

    called = []
    for name in FORM_CASES.values():
        for form in ("chunk", "fused_recurrent"):
            op = getattr(ops, f"{form}_{name}")
            monkeypatch.setattr(ops, f"{form}_{name}",
                                lambda *a, _op=op, _form=form, **kw: called.append(_form) or _op(*a, **kw))
    return called


@pytest.mark.parametrize("case", sorted(FORM_CASES))
def test_form_is_chosen_as_fla_chooses(case, monkeypatch):
    layer = make(case)
    called = _spy_forms(monkeypatch)
    for T, grad, want in ((1, False, "fused_recurrent"), (64, False, "fused_recurrent"), (65, False, "chunk"),
                          (1, True, "fused_recurrent"), (10, True, "chunk" if case in CHUNK_UNDER_GRAD
                                                          else "fused_recurrent"), (80, True, "chunk")):
        called.clear()
        with torch.set_grad_enabled(grad):
            layer(torch.randn(1, T, 64))
        assert called == [want], (T, grad)
    layer.mode = "fused_recurrent"
    called.clear()
    with torch.no_grad():
        layer(torch.randn(1, 80, 64))
    assert called == ["fused_recurrent"]


@pytest.mark.parametrize("case", sorted(FORM_CASES))
def test_chunk_and_recurrent_forms_agree(case):
    """Past 64 tokens the chunk form runs; the layer with mode='fused_recurrent' gives the same output and
    final state."""
    layer = make(case)
    x = torch.randn(2, 90, 64)
    with torch.no_grad():
        chunk, _, cache_c = layer(x, past_key_values=Cache(), use_cache=True)
        layer.mode = "fused_recurrent"
        recurrent, _, cache_r = layer(x, past_key_values=Cache(), use_cache=True)
    assert rel(chunk, recurrent) < 1e-5
    assert rel(cache_c[0]["recurrent_state"], cache_r[0]["recurrent_state"]) < 1e-5


@pytest.mark.parametrize("case", sorted(LAYER_CASES))
def test_left_padding_equals_each_sequence_alone(case):
    layer = make(case)
    lengths, T = (9, 5, 1), 9
    xs = [torch.randn(1, n, 64) for n in lengths]
    x = torch.zeros(len(lengths), T, 64)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, (xi, n) in enumerate(zip(xs, lengths)):
        x[i, T - n:], mask[i, T - n:] = xi[0], 1
    x_next = torch.randn(len(lengths), 1, 64)
    with torch.no_grad():
        cache = Cache()
        o, _, cache = layer(x, attention_mask=mask, past_key_values=cache, use_cache=True)
        mask = torch.cat([mask, torch.ones(len(lengths), 1, dtype=torch.long)], 1)
        o_next, _, cache = layer(x_next, attention_mask=mask, past_key_values=cache, use_cache=True)
        for i, (xi, n) in enumerate(zip(xs, lengths)):
            alone_cache = Cache()
            alone, _, alone_cache = layer(xi, past_key_values=alone_cache, use_cache=True)
            alone_next, _, _ = layer(x_next[i:i + 1], past_key_values=alone_cache, use_cache=True)
            assert rel(o[i, T - n:], alone[0]) < 1e-5
            assert rel(o_next[i], alone_next[0]) < 1e-5
        assert torch.count_nonzero(o[1, :T - 5]) == 0 and torch.count_nonzero(o[2, :T - 1]) == 0


@pytest.mark.parametrize("case", ["retnet", "gla", "gated_deltanet"])
def test_padding_token_while_decoding_keeps_the_state(case):
    layer = make(case)
    x, x_pad, x_next = torch.randn(2, 6, 64), torch.randn(2, 1, 64), torch.randn(2, 1, 64)
    with torch.no_grad():
        cache = Cache()
        layer(x, past_key_values=cache, use_cache=True)
        mask = torch.ones(2, 7, dtype=torch.long)
        mask[1, -1] = 0  # row 1's new token is padding: its state must not move
        o_pad, _, _ = layer(x_pad, attention_mask=mask, past_key_values=cache, use_cache=True)
        o, _, _ = layer(x_next, attention_mask=torch.cat([mask, mask[:, :1]], 1), past_key_values=cache,
                        use_cache=True)
        alone = Cache()
        layer(x[1:], past_key_values=alone, use_cache=True)
        want, _, _ = layer(x_next[1:], past_key_values=alone, use_cache=True)
    assert torch.count_nonzero(o_pad[1]) == 0 and torch.count_nonzero(o_pad[0]) > 0
    assert rel(o[1], want[0]) < 1e-5


@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("bias", [False, True])
def test_short_convolution_is_a_causal_depthwise_conv(activation, bias):
    torch.manual_seed(0)
    conv = layers.ShortConvolution(8, 4, bias=bias, activation=activation)
    x = torch.randn(2, 10, 8)
    want = F.conv1d(x.transpose(1, 2), conv.weight, conv.bias, padding=3, groups=8)[..., :10].transpose(1, 2)
    want = F.silu(want) if activation else want
    y, state = conv(x, output_final_state=True)
    assert rel(y, want) < 1e-6
    assert torch.equal(state, x[:, -4:].transpose(1, 2))
    # varlen: two sequences concatenated equal each alone, states included
    y_var, state_var = conv(torch.cat([x[:1, :7], x[1:, :3]], 1), output_final_state=True,
                            cu_seqlens=torch.tensor([0, 7, 10]))
    y0, s0 = conv(x[:1, :7], output_final_state=True)
    y1, s1 = conv(x[1:, :3], output_final_state=True)
    assert rel(y_var, torch.cat([y0, y1], 1)) < 1e-6 and torch.equal(state_var, torch.cat([s0, s1]))
    assert torch.count_nonzero(s1[..., 0]) == 0  # a 3-token sequence: the oldest slot is still zero
    # varlen continuing from cached states, with an empty sequence (keeps its state) and a one-token one
    lengths = [5, 0, 1, 2]
    cache = torch.randn(4, 8, 4)
    packed = torch.randn(1, sum(lengths), 8)
    cu = torch.tensor([0] + lengths).cumsum(0)
    y_var, state_var = conv(packed, cache=cache, output_final_state=True, cu_seqlens=cu)
    for n, (b, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        if e == b:
            assert torch.equal(state_var[n], cache[n])
            continue
        y_n, s_n = conv(packed[:, b:e], cache=cache[n:n + 1], output_final_state=True)
        assert rel(y_var[:, b:e], y_n) < 1e-6 and torch.equal(state_var[n:n + 1], s_n)


def test_norms_match_their_formulas():
    torch.manual_seed(0)
    x, g, res = torch.randn(3, 16), torch.randn(3, 16), torch.randn(3, 16)
    norm = layers.RMSNorm(16, eps=1e-6)
    gated = layers.FusedRMSNormGated(16, eps=1e-6, activation="sigmoid")
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        gated.weight.uniform_(0.5, 1.5)
    base = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    assert rel(norm(x), base * norm.weight) < 1e-6
    assert rel(gated(x, g), base * gated.weight * torch.sigmoid(g)) < 1e-6
    y, new_res = norm(x, res, True)
    assert torch.equal(new_res, x + res) and rel(y, norm(x + res)) < 1e-6


def test_unsupported_options_raise():
    with pytest.raises(NotImplementedError, match="feature_map"):
        layers.GatedLinearAttention(hidden_size=64, num_heads=2, feature_map="hedgehog")
    with pytest.raises(NotImplementedError, match="mode"):
        layers.DeltaNet(hidden_size=64, num_heads=2, mode="fused_chunk")
    with pytest.raises(NotImplementedError, match="num_v_heads"):
        layers.GatedDeltaNet(hidden_size=64, head_dim=16, num_heads=4, num_v_heads=2)
    with pytest.raises(NotImplementedError, match="qk_activation"):
        layers.DeltaNet(hidden_size=64, num_heads=2, qk_activation="tanh")
    with pytest.raises(ValueError, match="layer_idx"):
        layers.GatedLinearAttention(hidden_size=64, num_heads=2)(torch.randn(1, 3, 64), past_key_values=Cache())
