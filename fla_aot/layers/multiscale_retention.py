"""MultiScaleRetention (RetNet) on fla_aot's retention ops; fla's constructor and parameter names."""
from __future__ import annotations

import torch.nn as nn

import fla_aot.ops as ops
from fla_aot.layers.mixer import TokenMixer, check_mode, heads, kv_groups, projection_dims
from fla_aot.layers.modules import FusedRMSNormGated, RMSNorm, RotaryEmbedding, ShortConvolution, activation


class MultiScaleRetention(TokenMixer):
    """Retention: S_t = gamma_h S_{t-1} + k_t^T v_t with gamma_h = 1 - 2^(-5-h), rotary q/k, a gated
    RMSNorm on the output. Long or differentiated inputs run `chunk_retention`, decoding and short inputs
    `fused_recurrent_retention`."""

    def __init__(self, mode: str = 'chunk', hidden_size: int = 1024, expand_k: float = 1.0, expand_v: float = 2.0,
                 num_heads: int = 8, num_kv_heads: int | None = None, feature_map: str | None = None,
                 use_short_conv: bool = False, conv_size: int = 4, conv_bias: bool = False,
                 use_output_gate: bool = True, gate_fn: str = 'swish', elementwise_affine: bool | None = True,
                 norm_eps: float = 1e-5, fuse_norm: bool = True, layer_idx: int = None, **kwargs):
        super().__init__()
        check_mode("MultiScaleRetention", mode, ('chunk', 'fused_chunk', 'parallel', 'fused_recurrent'))
        self.mode, self.hidden_size, self.expand_k, self.expand_v = mode, hidden_size, expand_k, expand_v
        self.num_heads = num_heads
        self.num_kv_heads, self.num_kv_groups = kv_groups(num_heads, num_kv_heads)
        self.feature_map_fn = activation(feature_map, "feature_map")
        self.use_short_conv, self.conv_size, self.conv_bias = use_short_conv, conv_size, conv_bias
        self.use_output_gate = use_output_gate
        self.key_dim, self.value_dim = projection_dims(hidden_size, expand_k, expand_v, num_heads)
        self.key_dim_per_group = self.key_dim // self.num_kv_groups
        self.value_dim_per_group = self.value_dim // self.num_kv_groups
        self.layer_idx = layer_idx
        self.head_k_dim, self.head_v_dim = self.key_dim // num_heads, self.value_dim // num_heads

        self.q_proj = nn.Linear(hidden_size, self.key_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, self.key_dim_per_group, bias=False)
        self.v_proj = nn.Linear(hidden_size, self.value_dim_per_group, bias=False)
        if use_output_gate:
            self.g_proj = nn.Linear(hidden_size, self.value_dim, bias=False)
        if use_short_conv:
            self.q_conv1d = ShortConvolution(self.key_dim, conv_size, bias=conv_bias, activation='silu')
            self.k_conv1d = ShortConvolution(self.key_dim_per_group, conv_size, bias=conv_bias, activation='silu')
            self.v_conv1d = ShortConvolution(self.value_dim_per_group, conv_size, bias=conv_bias, activation='silu')
        self.o_proj = nn.Linear(self.value_dim, hidden_size, bias=False)
        if gate_fn == 'swish' and fuse_norm and use_output_gate:
            self.g_norm_swish_gate = FusedRMSNormGated(self.head_v_dim, elementwise_affine, norm_eps)
            self.fuse_norm_and_gate = True
        else:
            self.fuse_norm_and_gate = False
            self.g_norm = RMSNorm(self.head_v_dim, elementwise_affine, eps=norm_eps)
            self.gate_fn = activation(gate_fn, "gate_fn")
        if self.head_k_dim > 256:
            raise ValueError("head_k_dim must be at most 256")
        self.rotary = RotaryEmbedding(dim=self.head_k_dim)

    def mix(self, step):
        x = step.hidden_states
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.use_short_conv:
            q, k, v = step.conv((q, k, v))
        q, k = heads(q, self.head_k_dim), heads(k, self.head_k_dim)
        if self.feature_map_fn is not None:
            q, k = self.feature_map_fn(q), self.feature_map_fn(k)
        q, k = self.rotary(q, k, step.positions(q.device))
        if self.num_kv_groups > 1:
            k = k.repeat_interleave(self.num_kv_groups, dim=-2)
        v = heads(v, self.head_v_dim, self.num_kv_groups)

        op = ops.fused_recurrent_retention if step.recurrent(chunk_under_grad=True) else ops.chunk_retention
        o, state = op(q, k, v, initial_state=step.recurrent_state, output_final_state=step.use_cache, **step.varlen)
        if self.use_output_gate:
            g = self.g_proj(x)
            if self.fuse_norm_and_gate:
                o = self.g_norm_swish_gate(o, heads(g, self.head_v_dim)).flatten(-2)
            else:
                o = self.g_norm(o).flatten(-2) * self.gate_fn(g)
        else:
            o = self.g_norm(o).flatten(-2)
        return self.o_proj(o), state
