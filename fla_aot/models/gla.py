"""GLA: GLAConfig / GLAModel / GLAForCausalLM, checkpoint-compatible with fla's `fla.models.gla`."""
from __future__ import annotations

from transformers import GenerationMixin, PretrainedConfig

from fla_aot.layers.gla import GatedLinearAttention
from fla_aot.models.utils import CausalLMBase, LinearModelBase, PreTrainedLinearModel, init_config


class GLAConfig(PretrainedConfig):
    model_type = 'gla'
    keys_to_ignore_at_inference = ['past_key_values']

    def __init__(
        self,
        hidden_size: int = 2048,
        expand_k: float = 0.5,
        expand_v: float = 1.0,
        hidden_ratio: int | None = 4,
        intermediate_size: int | None = None,
        num_hidden_layers: int = 24,
        num_heads: int = 4,
        num_kv_heads: int | None = None,
        feature_map: str | None = None,
        attn_mode: str = 'chunk',
        use_short_conv: bool = False,
        conv_size: int = 4,
        use_output_gate: bool = True,
        clamp_min: float | None = None,
        hidden_act: str = 'swish',
        max_position_embeddings: int = 2048,
        elementwise_affine: bool | None = True,
        norm_eps: float = 1e-06,
        use_gk: bool = True,
        use_gv: bool = False,
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


class GLAPreTrainedModel(PreTrainedLinearModel):
    config_class = GLAConfig
    _no_split_modules = ['Block']


class GLAModel(LinearModelBase, GLAPreTrainedModel):

    def __init__(self, config: GLAConfig):
        super().__init__(config)
        self._build(config)
        self.post_init()

    @staticmethod
    def make_mixer(config, layer_idx):
        return GatedLinearAttention(
            mode=config.attn_mode, hidden_size=config.hidden_size, expand_k=config.expand_k,
            expand_v=config.expand_v, num_heads=config.num_heads, num_kv_heads=config.num_kv_heads,
            feature_map=config.feature_map, use_short_conv=config.use_short_conv, conv_size=config.conv_size,
            use_output_gate=config.use_output_gate, gate_fn=config.hidden_act,
            elementwise_affine=config.elementwise_affine, norm_eps=config.norm_eps, clamp_min=config.clamp_min,
            fuse_norm=config.fuse_norm, layer_idx=layer_idx)


class GLAForCausalLM(CausalLMBase, GLAPreTrainedModel, GenerationMixin):

    def __init__(self, config: GLAConfig):
        super().__init__(config)
        self._build(config, GLAModel)
        self.post_init()
