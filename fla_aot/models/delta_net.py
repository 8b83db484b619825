"""DeltaNet: DeltaNetConfig / DeltaNetModel / DeltaNetForCausalLM, checkpoint-compatible with fla's
`fla.models.delta_net`."""
from __future__ import annotations

from transformers import GenerationMixin, PretrainedConfig

from fla_aot.layers.delta_net import DeltaNet
from fla_aot.models.utils import CausalLMBase, LinearModelBase, PreTrainedLinearModel, init_config


class DeltaNetConfig(PretrainedConfig):
    model_type = 'delta_net'
    keys_to_ignore_at_inference = ['past_key_values']

    def __init__(
        self,
        attn_mode: str = 'chunk',
        hidden_size: int = 2048,
        expand_k: float = 1.0,
        expand_v: float = 1.0,
        use_gate: bool = False,
        use_short_conv: bool = True,
        allow_neg_eigval: bool = False,
        conv_size: int = 4,
        use_beta: bool = True,
        use_output_norm: bool = True,
        num_heads: int = 16,
        qk_norm: str = 'l2',
        qk_activation: str = 'silu',
        max_position_embeddings: int = 2048,
        hidden_ratio: int | None = 4,
        intermediate_size: int | None = None,
        hidden_act: str = 'swish',
        num_hidden_layers: int = 24,
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
        **kwargs,
    ):
        init_config(self, locals())


class DeltaNetPreTrainedModel(PreTrainedLinearModel):
    config_class = DeltaNetConfig
    _no_split_modules = ['Block']


class DeltaNetModel(LinearModelBase, DeltaNetPreTrainedModel):

    def __init__(self, config: DeltaNetConfig):
        super().__init__(config)
        self._build(config)
        self.post_init()

    @staticmethod
    def make_mixer(config, layer_idx):
        return DeltaNet(
            mode=config.attn_mode, hidden_size=config.hidden_size, expand_k=config.expand_k,
            expand_v=config.expand_v, num_heads=config.num_heads, use_gate=config.use_gate,
            use_beta=config.use_beta, use_short_conv=config.use_short_conv,
            allow_neg_eigval=config.allow_neg_eigval, use_output_norm=config.use_output_norm,
            conv_size=config.conv_size, qk_norm=config.qk_norm, qk_activation=config.qk_activation,
            norm_eps=config.norm_eps, layer_idx=layer_idx)


class DeltaNetForCausalLM(CausalLMBase, DeltaNetPreTrainedModel, GenerationMixin):

    def __init__(self, config: DeltaNetConfig):
        super().__init__(config)
        self._build(config, DeltaNetModel)
        self.post_init()
