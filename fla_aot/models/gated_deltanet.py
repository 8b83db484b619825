"""Gated DeltaNet: GatedDeltaNetConfig / GatedDeltaNetModel / GatedDeltaNetForCausalLM, checkpoint-compatible
with fla's `fla.models.gated_deltanet`."""
from __future__ import annotations

from transformers import GenerationMixin, PretrainedConfig

from fla_aot.layers.gated_deltanet import GatedDeltaNet
from fla_aot.models.utils import CausalLMBase, LinearModelBase, PreTrainedLinearModel, init_config


class GatedDeltaNetConfig(PretrainedConfig):
    model_type = 'gated_deltanet'
    keys_to_ignore_at_inference = ['past_key_values']

    def __init__(
        self,
        attn_mode: str = 'chunk',
        hidden_size: int = 2048,
        expand_v: float = 2.0,
        use_gate: bool = True,
        use_short_conv: bool = True,
        allow_neg_eigval: bool = False,
        conv_size: int = 4,
        head_dim: int = 256,
        num_heads: int = 6,
        num_v_heads: int | None = None,
        max_position_embeddings: int = 2048,
        hidden_ratio: int | None = 4,
        intermediate_size: int | None = None,
        hidden_act: str = 'swish',
        num_hidden_layers: int = 21,
        norm_eps: float = 1e-06,
        attn: dict | list | None = None,
        use_cache: bool = True,
        pad_token_id: int | None = None,
        bos_token_id: int = 1,
        eos_token_id: int = 2,
        tie_word_embeddings: bool = False,
        initializer_range: float = 0.02,
        fuse_norm: bool = True,
        fuse_swiglu: bool = True,
        fuse_cross_entropy: bool = True,
        fuse_linear_cross_entropy: bool = False,
        use_l2warp: bool = False,
        vocab_size: int = 32000,
        attnres_block_size: int | None = None,
        output_gate_activation: str = 'swish',
        **kwargs,
    ):
        if output_gate_activation not in ("swish", "silu", "sigmoid"):
            raise ValueError(f"output_gate_activation must be 'swish', 'silu', or 'sigmoid', "
                             f"got {output_gate_activation!r}.")
        init_config(self, locals())


class GatedDeltaNetPreTrainedModel(PreTrainedLinearModel):
    config_class = GatedDeltaNetConfig
    _no_split_modules = ['Block']


class GatedDeltaNetModel(LinearModelBase, GatedDeltaNetPreTrainedModel):

    def __init__(self, config: GatedDeltaNetConfig):
        super().__init__(config)
        self._build(config)
        self.post_init()

    @staticmethod
    def make_mixer(config, layer_idx):
        return GatedDeltaNet(
            hidden_size=config.hidden_size, expand_v=config.expand_v, head_dim=config.head_dim,
            num_heads=config.num_heads, num_v_heads=config.num_v_heads, mode=config.attn_mode,
            use_gate=config.use_gate, use_short_conv=config.use_short_conv,
            allow_neg_eigval=config.allow_neg_eigval, conv_size=config.conv_size, layer_idx=layer_idx,
            norm_eps=config.norm_eps, output_gate_activation=config.output_gate_activation)


class GatedDeltaNetForCausalLM(CausalLMBase, GatedDeltaNetPreTrainedModel, GenerationMixin):

    def __init__(self, config: GatedDeltaNetConfig):
        super().__init__(config)
        self._build(config, GatedDeltaNetModel)
        self.post_init()
