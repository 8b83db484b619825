"""fla_aot.layers: fla's token-mixing layers on fla_aot's compiled ops, in plain PyTorch around them.

Same constructor arguments and parameter names as fla-core 0.6.0's layers (flash-linear-attention's
`fla.layers`), so a state_dict moves between them unchanged. Each forward picks the `chunk_*` or the
`fused_recurrent_*` op as fla's layer does (decoding and inputs up to 64 tokens: the recurrent form; see
`Step.recurrent` in mixer.py); `past_key_values` is a `fla_aot.layers.Cache`.
"""
from fla_aot.layers.delta_net import DeltaNet
from fla_aot.layers.gated_deltanet import GatedDeltaNet
from fla_aot.layers.gla import GatedLinearAttention
from fla_aot.layers.modules import FusedRMSNormGated, GatedMLP, RMSNorm, RotaryEmbedding, ShortConvolution
from fla_aot.layers.multiscale_retention import MultiScaleRetention
from fla_aot.layers.utils import Cache

__all__ = [
    "Cache",
    "DeltaNet",
    "FusedRMSNormGated",
    "GatedDeltaNet",
    "GatedLinearAttention",
    "GatedMLP",
    "MultiScaleRetention",
    "RMSNorm",
    "RotaryEmbedding",
    "ShortConvolution",
]
