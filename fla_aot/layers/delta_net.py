"""DeltaNet on fla_aot's delta-rule ops; fla's constructor and parameter names."""
from __future__ import annotations

import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

import fla_aot.ops as ops
from fla_aot.layers.mixer import TokenMixer, check_mode, heads, projection_dims
from fla_aot.layers.modules import FusedRMSNormGated, RMSNorm, ShortConvolution, activation


def delta_rule_op(step, q, name, **rule):
    """The chunk or the fused_recurrent op for this step (Step.recurrent, with the layer's rule); a float32 input
    on CUDA always takes the recurrent form (the compiled chunk delta rules take fp16/bf16 only; both compute
    the same recurrence)."""
    if step.recurrent(**rule) or (q.is_cuda and q.dtype == torch.float32):
        return getattr(ops, 'fused_recurrent_' + name)
    return getattr(ops, 'chunk_' + name)


class DeltaNet(TokenMixer):
    """DeltaNet: S_t = S_{t-1} + beta_t k_t^T (v_t - k_t S_{t-1}) with SiLU short convolutions and
    L2-normalised q, k. Long inputs run `chunk_delta_rule`, decoding and short ones `fused_recurrent_delta_rule`."""

    def __init__(self, mode: str = 'chunk', d_model: int = None, hidden_size: int = 1024, expand_k: float = 1.0,
                 expand_v: float = 1.0, num_heads: int = 4, use_beta: bool = True, use_gate: bool = False,
                 use_short_conv: bool = True, conv_size: int = 4, conv_bias: bool = False,
                 allow_neg_eigval: bool = False, layer_idx: int = None, qk_activation: str = 'silu',
                 qk_norm: str = 'l2', norm_eps: float = 1e-5, **kwargs):
        super().__init__()
        check_mode("DeltaNet", mode, ('chunk', 'fused_recurrent'))
        if qk_activation not in ('silu', 'relu', 'elu', 'identity'):
            raise NotImplementedError(f"DeltaNet: qk_activation={qk_activation!r} is not supported")
        if qk_norm not in ('l2', 'sum'):
            raise NotImplementedError(f"DeltaNet: qk_norm={qk_norm!r} is not supported")
        self.mode, self.qk_activation, self.qk_norm = mode, qk_activation, qk_norm
        if d_model is not None:
            hidden_size = d_model
        self.hidden_size, self.expand_k, self.expand_v, self.num_heads = hidden_size, expand_k, expand_v, num_heads
        self.use_gate, self.use_short_conv = use_gate, use_short_conv
        self.conv_size, self.conv_bias = conv_size, conv_bias
        self.allow_neg_eigval = allow_neg_eigval
        self.key_dim, self.value_dim = projection_dims(hidden_size, expand_k, expand_v, num_heads)
        self.head_k_dim, self.head_v_dim = self.key_dim // num_heads, self.value_dim // num_heads
        self.layer_idx = layer_idx

        self.q_proj = nn.Linear(hidden_size, self.key_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, self.key_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, self.value_dim, bias=False)
        self.use_beta = use_beta
        if use_beta:
            self.b_proj = nn.Linear(hidden_size, num_heads, bias=False)
        if use_short_conv:
            qk_act = 'silu' if qk_activation == 'silu' else None
            self.q_conv1d = ShortConvolution(self.key_dim, conv_size, bias=conv_bias, activation=qk_act)
            self.k_conv1d = ShortConvolution(self.key_dim, conv_size, bias=conv_bias, activation=qk_act)
            self.v_conv1d = ShortConvolution(self.value_dim, conv_size, bias=conv_bias, activation='silu')
        else:
            warnings.warn("DeltaNet without short convolutions (use_short_conv=False) loses accuracy")
        if use_gate:
            self.g_proj = nn.Linear(hidden_size, self.value_dim, bias=False)
            self.o_norm = FusedRMSNormGated(self.head_v_dim, eps=norm_eps)
        else:
            self.o_norm = RMSNorm(self.head_v_dim, eps=norm_eps)
        self.o_proj = nn.Linear(self.value_dim, hidden_size, bias=False)

    def mix(self, step):
        x = step.hidden_states
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.use_short_conv:
            q, k, v = step.conv((q, k, v))
        else:
            if self.qk_activation == 'silu':
                q, k = F.silu(q), F.silu(k)
            v = F.silu(v)
        q, k, v = heads(q, self.head_k_dim), heads(k, self.head_k_dim), heads(v, self.head_v_dim)
        if self.qk_activation in ('relu', 'elu'):
            fn = activation('relu' if self.qk_activation == 'relu' else 'elu_p1', 'qk_activation')
            q, k = fn(q), fn(k)
        if self.qk_norm == 'sum':
            q = (q.float() / q.float().sum(-1, keepdim=True)).to(q.dtype)
            k = (k.float() / k.float().sum(-1, keepdim=True)).to(k.dtype)
        beta = self.b_proj(x).sigmoid() if self.use_beta else torch.ones_like(q[..., 0])
        if self.allow_neg_eigval:
            beta = beta * 2.0

        op = delta_rule_op(step, q, 'delta_rule')
        o, state = op(q, k, v, beta=beta, initial_state=step.recurrent_state, output_final_state=step.use_cache,
                      use_qk_l2norm_in_kernel=self.qk_norm == 'l2', **step.varlen)
        if self.use_gate:
            o = self.o_norm(o, heads(self.g_proj(x), self.head_v_dim))
        else:
            o = self.o_norm(o)
        return self.o_proj(o.flatten(-2)), state
