"""What the four Hugging Face models share: the block, the decoder, the causal-LM head and generation.

Module and parameter names follow fla-core 0.6.0's models (flash-linear-attention's `fla.models`):
`model.embeddings`, `model.layers.<i>.{attn_norm, attn, mlp_norm, mlp}`, `model.norm`, `lm_head`. The
cache is a `fla_aot.layers.Cache`; `generate` feeds only the newest token once it holds states.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import transformers
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from fla_aot.layers.modules import GatedMLP, RMSNorm
from fla_aot.layers.utils import Cache

_TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5

# config fields of fla's that select code fla_aot does not have: (field, value that is supported)
_UNSUPPORTED = (
    ("attn", None, "hybrid softmax-attention layers (`attn=...`)"),
    ("attnres_block_size", None, "attention residuals (`attnres_block_size`)"),
    ("fuse_linear_cross_entropy", False, "the fused linear cross-entropy loss"),
    ("use_l2warp", False, "l2warp"),
)


def check_config(config: PretrainedConfig, model: str):
    for field, supported, what in _UNSUPPORTED:
        if getattr(config, field, supported) != supported:
            raise NotImplementedError(f"{model}: {what} is not supported by fla_aot.models "
                                      f"({field}={getattr(config, field)!r}; supported: {supported!r})")
    if getattr(config, "hidden_act", "swish") != "swish":
        raise NotImplementedError(f"{model}: hidden_act={config.hidden_act!r} is not supported by fla_aot.models "
                                  f"(only 'swish', fla's default)")


class Block(nn.Module):
    """Pre-norm block: x + attn(attn_norm(x)), then + mlp(mlp_norm(.)), with fla's module names."""

    def __init__(self, config: PretrainedConfig, layer_idx: int, mixer: nn.Module):
        super().__init__()
        self.layer_idx = layer_idx
        self.attn_norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.attn = mixer
        self.mlp_norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.mlp = GatedMLP(hidden_size=config.hidden_size, hidden_ratio=config.hidden_ratio,
                            intermediate_size=config.intermediate_size, hidden_act=config.hidden_act,
                            fuse_swiglu=config.fuse_swiglu)

    def forward(self, hidden_states, attention_mask=None, past_key_values=None, use_cache=False, **kwargs):
        residual = hidden_states
        hidden_states, _, past_key_values = self.attn(self.attn_norm(hidden_states), attention_mask=attention_mask,
                                                      past_key_values=past_key_values, use_cache=use_cache,
                                                      **kwargs)
        hidden_states, residual = self.mlp_norm(hidden_states, residual, True)
        return residual + self.mlp(hidden_states), past_key_values


class PreTrainedLinearModel(PreTrainedModel):
    """Weight init (fla's: normal(initializer_range) for Linear/Conv1d/Embedding, zero biases) and the
    Hugging Face flags of a stateful (recurrent) model."""

    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = False
    _is_stateful = True
    _supports_cache_class = True

    def _init_weights(self, module: nn.Module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv1d)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif hasattr(module, "reset_parameters"):
            module.reset_parameters()
        if hasattr(module, "reset_gate_parameters") and not any(
                getattr(p, "_is_hf_initialized", False) for p in (module.A_log, module.dt_bias)) and (
                module.A_log.device.type != "meta"):
            module.reset_gate_parameters()


class LinearModelBase:
    """The decoder: embeddings -> blocks -> norm. Subclasses set `make_mixer(config, layer_idx)`."""

    def _build(self, config):
        check_config(config, type(self).__name__)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([Block(config, i, self.make_mixer(config, i))
                                     for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, eps=config.norm_eps)

    def get_input_embeddings(self):
        return self.embeddings

    def set_input_embeddings(self, value):
        self.embeddings = value

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, past_key_values=None,
                use_cache=None, output_attentions=None, output_hidden_states=None, return_dict=None, **kwargs):
        config = self.config
        output_hidden_states = (output_hidden_states if output_hidden_states is not None
                                else getattr(config, "output_hidden_states", False))
        use_cache = use_cache if use_cache is not None else (config.use_cache and not self.training)
        return_dict = return_dict if return_dict is not None else getattr(config, "return_dict", True)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        hidden_states = self.embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        if use_cache and past_key_values is None:
            past_key_values = Cache()
        elif past_key_values is not None and not isinstance(past_key_values, Cache):
            raise TypeError(f"past_key_values must be a fla_aot.layers.Cache, got {type(past_key_values).__name__}")
        layer_kwargs = {key: kwargs[key] for key in ("cu_seqlens", "cu_seqlens_cpu") if key in kwargs}
        all_hidden_states = () if output_hidden_states else None
        for layer in self.layers:
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            hidden_states, past_key_values = layer(hidden_states, attention_mask=attention_mask,
                                                   past_key_values=past_key_values, use_cache=use_cache,
                                                   **layer_kwargs)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)
        if not return_dict:
            return tuple(x for x in (hidden_states, past_key_values, all_hidden_states) if x is not None)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, past_key_values=past_key_values,
                                       hidden_states=all_hidden_states, attentions=None)


class CausalLMBase:
    """The causal LM: `model` + `lm_head`, fla's loss (next-token cross-entropy) and generation."""

    _tied_weights_keys = {"lm_head.weight": "model.embeddings.weight"} if _TRANSFORMERS_5 else ["lm_head.weight"]

    def _build(self, config, model_class):
        self.model = model_class(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the model makes its own fla_aot.layers.Cache

    def get_input_embeddings(self):
        return self.model.embeddings

    def set_input_embeddings(self, value):
        self.model.embeddings = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def get_decoder(self):
        return self.model

    def set_decoder(self, decoder):
        self.model = decoder

    def prepare_inputs_for_generation(self, input_ids=None, past_key_values=None, attention_mask=None,
                                      inputs_embeds=None, use_cache=True, logits_to_keep=None, **kwargs):
        # a recurrent cache holds everything before the newest token: feed only what it has not seen
        seen = 0 if past_key_values is None or len(past_key_values) == 0 else past_key_values.get_seq_length()
        inputs = {}
        if inputs_embeds is not None and seen == 0:
            inputs["inputs_embeds"] = inputs_embeds
        else:
            if seen:
                input_ids = input_ids[:, seen:] if input_ids.shape[1] > seen else input_ids[:, -1:]
            inputs["input_ids"] = input_ids.contiguous()
        inputs.update(past_key_values=past_key_values, attention_mask=attention_mask, use_cache=use_cache)
        if logits_to_keep is not None:
            inputs["logits_to_keep"] = logits_to_keep
        return inputs

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, past_key_values=None, labels=None,
                use_cache=None, output_attentions=None, output_hidden_states=None, return_dict=None,
                logits_to_keep: int | torch.Tensor | None = 0, **kwargs):
        return_dict = return_dict if return_dict is not None else getattr(self.config, "return_dict", True)
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                             past_key_values=past_key_values, use_cache=use_cache,
                             output_hidden_states=output_hidden_states, return_dict=True, **kwargs)
        hidden_states = outputs.last_hidden_state
        if labels is None and logits_to_keep:
            hidden_states = (hidden_states[:, -logits_to_keep:] if isinstance(logits_to_keep, int)
                             else hidden_states[:, logits_to_keep])
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            labels = labels.to(logits.device)
            shifted = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
            loss = nn.functional.cross_entropy(logits.float().flatten(0, 1), shifted.flatten(), ignore_index=-100)
        if not return_dict:
            out = (logits, outputs.past_key_values) + ((outputs.hidden_states,) if outputs.hidden_states else ())
            return (loss,) + out if loss is not None else out
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=outputs.past_key_values,
                                      hidden_states=outputs.hidden_states, attentions=None)


def register(config_class, model_class, causal_lm_class):
    """Register with the Auto classes under fla's model_type. exist_ok=True: importing fla (which
    registers the same model_type) and fla_aot in one process works; the last import wins."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
    AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    AutoModel.register(config_class, model_class, exist_ok=True)
    AutoModelForCausalLM.register(config_class, causal_lm_class, exist_ok=True)



def init_config(config: PretrainedConfig, arguments: dict):
    """Store a config's constructor arguments (its `locals()`) as attributes, then run PretrainedConfig's
    __init__ with the token ids, tie_word_embeddings and the remaining **kwargs."""
    arguments = {k: v for k, v in arguments.items() if k not in ("self", "__class__")}
    kwargs = arguments.pop("kwargs", {})
    special = {k: arguments.pop(k) for k in ("pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings")}
    for key, value in arguments.items():
        setattr(config, key, value)
    PretrainedConfig.__init__(config, **special, **kwargs)
