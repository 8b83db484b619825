"""fla_aot.models on the CPU reference path: fla's parameter names, cached decoding equal to the full
forward, generate (greedy, sampling, left-padded batches), save/load and the Auto classes."""

import pytest
import torch

pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM  # noqa: E402

import fla_aot.models as models  # noqa: E402

# (config class, causal-LM class, config arguments): the tiny configs the frozen names below were read for
TINY = dict(hidden_size=64, num_hidden_layers=2, num_heads=2, vocab_size=128)
MODEL_CASES = {
    "gla": ("GLAConfig", "GLAForCausalLM", TINY),
    "retnet": ("RetNetConfig", "RetNetForCausalLM", TINY),
    "delta_net": ("DeltaNetConfig", "DeltaNetForCausalLM", TINY),
    "gated_deltanet": ("GatedDeltaNetConfig", "GatedDeltaNetForCausalLM", dict(TINY, head_dim=16)),
}

# state_dict names and shapes of fla's models (flash-linear-attention 0.6.0's fla.models) for MODEL_CASES,
# recorded once from fla's own classes built on the CPU; layer 1 has layer 0's names (checked when recorded)
FLA_MODEL_PARAMS = {'delta_net': {'lm_head.weight': (128, 64),
               'model.embeddings.weight': (128, 64),
               'model.layers.0.attn.b_proj.weight': (2, 64),
               'model.layers.0.attn.k_conv1d.weight': (64, 1, 4),
               'model.layers.0.attn.k_proj.weight': (64, 64),
               'model.layers.0.attn.o_norm.weight': (32,),
               'model.layers.0.attn.o_proj.weight': (64, 64),
               'model.layers.0.attn.q_conv1d.weight': (64, 1, 4),
               'model.layers.0.attn.q_proj.weight': (64, 64),
               'model.layers.0.attn.v_conv1d.weight': (64, 1, 4),
               'model.layers.0.attn.v_proj.weight': (64, 64),
               'model.layers.0.attn_norm.weight': (64,),
               'model.layers.0.mlp.down_proj.weight': (64, 256),
               'model.layers.0.mlp.gate_proj.weight': (256, 64),
               'model.layers.0.mlp.up_proj.weight': (256, 64),
               'model.layers.0.mlp_norm.weight': (64,),
               'model.norm.weight': (64,)},
 'gated_deltanet': {'lm_head.weight': (128, 64),
                    'model.embeddings.weight': (128, 64),
                    'model.layers.0.attn.A_log': (2,),
                    'model.layers.0.attn.a_proj.weight': (2, 64),
                    'model.layers.0.attn.b_proj.weight': (2, 64),
                    'model.layers.0.attn.dt_bias': (2,),
                    'model.layers.0.attn.g_proj.weight': (64, 64),
                    'model.layers.0.attn.k_conv1d.weight': (32, 1, 4),
                    'model.layers.0.attn.k_proj.weight': (32, 64),
                    'model.layers.0.attn.o_norm.weight': (32,),
                    'model.layers.0.attn.o_proj.weight': (64, 64),
                    'model.layers.0.attn.q_conv1d.weight': (32, 1, 4),
                    'model.layers.0.attn.q_proj.weight': (32, 64),
                    'model.layers.0.attn.v_conv1d.weight': (64, 1, 4),
                    'model.layers.0.attn.v_proj.weight': (64, 64),
                    'model.layers.0.attn_norm.weight': (64,),
                    'model.layers.0.mlp.down_proj.weight': (64, 256),
                    'model.layers.0.mlp.gate_proj.weight': (256, 64),
                    'model.layers.0.mlp.up_proj.weight': (256, 64),
                    'model.layers.0.mlp_norm.weight': (64,),
                    'model.norm.weight': (64,)},
 'gla': {'lm_head.weight': (128, 64),
         'model.embeddings.weight': (128, 64),
         'model.layers.0.attn.g_norm_swish_gate.weight': (32,),
         'model.layers.0.attn.g_proj.weight': (64, 64),
         'model.layers.0.attn.gk_proj.0.weight': (16, 64),
         'model.layers.0.attn.gk_proj.1.bias': (32,),
         'model.layers.0.attn.gk_proj.1.weight': (32, 16),
         'model.layers.0.attn.k_proj.weight': (32, 64),
         'model.layers.0.attn.o_proj.weight': (64, 64),
         'model.layers.0.attn.q_proj.weight': (32, 64),
         'model.layers.0.attn.v_proj.weight': (64, 64),
         'model.layers.0.attn_norm.weight': (64,),
         'model.layers.0.mlp.down_proj.weight': (64, 256),
         'model.layers.0.mlp.gate_proj.weight': (256, 64),
         'model.layers.0.mlp.up_proj.weight': (256, 64),
         'model.layers.0.mlp_norm.weight': (64,),
         'model.norm.weight': (64,)},
 'retnet': {'lm_head.weight': (128, 64),
            'model.embeddings.weight': (128, 64),
            'model.layers.0.attn.g_norm_swish_gate.weight': (64,),
            'model.layers.0.attn.g_proj.weight': (128, 64),
            'model.layers.0.attn.k_proj.weight': (64, 64),
            'model.layers.0.attn.o_proj.weight': (64, 128),
            'model.layers.0.attn.q_proj.weight': (64, 64),
            'model.layers.0.attn.v_proj.weight': (128, 64),
            'model.layers.0.attn_norm.weight': (64,),
            'model.layers.0.mlp.down_proj.weight': (64, 256),
            'model.layers.0.mlp.gate_proj.weight': (256, 64),
            'model.layers.0.mlp.up_proj.weight': (256, 64),
            'model.layers.0.mlp_norm.weight': (64,),
            'model.norm.weight': (64,)}}

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny shapes: one intra-op thread is faster, and immune to a busy machine's thread contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


_MODELS = {}


def model_for(case):
    """The tiny model of `case`, random weights with a wide init (well-separated greedy choices)."""
    if case not in _MODELS:
        config_name, lm_name, kwargs = MODEL_CASES[case]
        torch.manual_seed(0)
        config = getattr(models, config_name)(initializer_range=0.3, **kwargs)
        _MODELS[case] = getattr(models, lm_name)(config).eval()
    return _MODELS[case]


def generate(model, ids, **kwargs):
    return model.generate(ids, max_new_tokens=4, eos_token_id=None, pad_token_id=0, **kwargs)


CASES = sorted(MODEL_CASES)


@pytest.mark.parametrize("case", CASES)
def test_parameter_names_and_shapes_match_fla(case):
    want = dict(FLA_MODEL_PARAMS[case])
    want.update({k.replace("model.layers.0.", "model.layers.1."): v for k, v in want.items()
                 if k.startswith("model.layers.0.")})
    assert {k: tuple(v.shape) for k, v in model_for(case).state_dict().items()} == want


@pytest.mark.parametrize("case", CASES)
def test_prefill_then_decode_logits_equal_full_forward(case):
    model = model_for(case)
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :6], use_cache=True)
        logits = [out.logits]
        for t in range(6, 10):
            out = model(ids[:, t:t + 1], past_key_values=out.past_key_values, use_cache=True)
            logits.append(out.logits)
    assert rel(torch.cat(logits, 1), full) < 1e-5


@pytest.mark.parametrize("case", CASES)
def test_generate_greedy_and_sampling(case):
    model = model_for(case)
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(2))
    greedy = generate(model, ids, do_sample=False)
    seq = ids
    with torch.no_grad():  # the same greedy choice from full forwards, no cache
        for _ in range(4):
            seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(greedy, seq)
    torch.manual_seed(3)
    sampled = generate(model, ids, do_sample=True, top_k=20)
    torch.manual_seed(3)
    again = generate(model, ids, do_sample=True, top_k=20)
    assert sampled.shape == (2, 11) and torch.equal(sampled[:, :7], ids) and torch.equal(sampled, again)
    assert int(sampled.min()) >= 0 and int(sampled.max()) < 128


@pytest.mark.parametrize("case", CASES)
def test_left_padded_batch_generation_equals_each_alone(case):
    model = model_for(case)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, 128, (1, n), generator=g) for n in (8, 5, 2)]
    batch = torch.zeros(3, 8, dtype=torch.long)
    mask = torch.zeros(3, 8, dtype=torch.long)
    for i, p in enumerate(prompts):
        batch[i, 8 - p.shape[1]:], mask[i, 8 - p.shape[1]:] = p[0], 1
    out = generate(model, batch, attention_mask=mask, do_sample=False)
    for i, p in enumerate(prompts):
        assert torch.equal(out[i, 8:], generate(model, p, do_sample=False)[0, p.shape[1]:])


@pytest.mark.parametrize("case", CASES)
def test_save_pretrained_from_pretrained_round_trip(case, tmp_path):
    model = model_for(case)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model) and loaded.config.model_type == case
    ids = torch.randint(3, 128, (1, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("case", CASES)
def test_auto_classes(case):
    config_name, lm_name, kwargs = MODEL_CASES[case]
    config = AutoConfig.for_model(case, **kwargs)
    assert type(config) is getattr(models, config_name)
    assert type(AutoModel.from_config(config)) is getattr(models, lm_name.replace("ForCausalLM", "Model"))
    assert type(AutoModelForCausalLM.from_config(config)) is getattr(models, lm_name)


def test_loss_is_next_token_cross_entropy():
    model = model_for("gla")
    ids = torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        out = model(ids, labels=ids)
    want = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    assert abs(out.loss.item() - want.item()) < 1e-5 * want.item()


def test_unsupported_configs_raise():
    with pytest.raises(NotImplementedError, match="hybrid"):
        models.GLAForCausalLM(models.GLAConfig(hidden_size=64, num_hidden_layers=2, num_heads=2, vocab_size=128,
                                               attn={"layers": [1], "num_heads": 2}))
    with pytest.raises(NotImplementedError, match="hidden_act"):
        models.RetNetModel(models.RetNetConfig(hidden_size=64, num_hidden_layers=1, num_heads=2, vocab_size=128,
                                               hidden_act="powlu"))
