"""GatedDeltaNet on fla_aot's gated delta-rule ops; fla's constructor and parameter names."""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from fla_aot.layers.delta_net import delta_rule_op
from fla_aot.layers.mixer import TokenMixer, check_mode, heads
from fla_aot.layers.modules import FusedRMSNormGated, RMSNorm, ShortConvolution


class GatedDeltaNet(TokenMixer):
    """Gated DeltaNet: S' = exp(g_t) S_{t-1}; S_t = S' + beta_t k_t^T (v_t - k_t S') with
    g = -exp(A_log) * softplus(a_proj(x) + dt_bias), beta = sigmoid(b_proj(x)), L2-normalised q, k and a
    gated RMSNorm on the output; grouped value heads with num_v_heads > num_heads. Long or differentiated
    inputs run `chunk_gated_delta_rule`, decoding and short ones `fused_recurrent_gated_delta_rule`;
    state [N, HV, V, K]."""

    def __init__(self, hidden_size: int = 2048, expand_v: float = 2, head_dim: int = 256, num_heads: int = 6,
                 num_v_heads: int = None, mode: str = 'chunk', use_gate: bool = True, use_short_conv: bool = True,
                 allow_neg_eigval: bool = False, conv_size: int = 4, conv_bias: bool = False, layer_idx: int = None,
                 norm_eps: float = 1e-5, output_gate_activation: str = 'swish', **kwargs):
        super().__init__()
        check_mode("GatedDeltaNet", mode, ('chunk', 'fused_recurrent'))
        self.mode, self.allow_neg_eigval = mode, allow_neg_eigval
        self.hidden_size, self.expand_v = hidden_size, expand_v
        self.use_gate, self.use_short_conv = use_gate, use_short_conv
        self.conv_size, self.conv_bias = conv_size, conv_bias
        self.head_dim, self.num_heads = head_dim, num_heads
        self.num_v_heads = num_v_heads if num_v_heads is not None else num_heads
        self.head_k_dim, self.head_v_dim = head_dim, int(head_dim * expand_v)
        self.key_dim, self.value_dim = int(num_heads * self.head_k_dim), int(self.num_v_heads * self.head_v_dim)
        self.layer_idx = layer_idx
        if not math.isclose(head_dim * expand_v, self.head_v_dim, rel_tol=1e-5):
            raise ValueError(f"expand_v={expand_v} times head_dim={head_dim} must be an integer")
        if self.num_v_heads % num_heads:
            raise NotImplementedError(f"GatedDeltaNet: num_v_heads={self.num_v_heads} must be a multiple of "
                                      f"num_heads={num_heads} (grouped value heads)")
        if output_gate_activation not in ('swish', 'silu', 'sigmoid'):
            raise ValueError(f"output_gate_activation must be 'swish', 'silu', or 'sigmoid', "
                             f"got {output_gate_activation!r}.")

        self.q_proj = nn.Linear(hidden_size, self.key_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, self.key_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, self.value_dim, bias=False)
        self.a_proj = nn.Linear(hidden_size, self.num_v_heads, bias=False)
        self.b_proj = nn.Linear(hidden_size, self.num_v_heads, bias=False)
        self.A_log = nn.Parameter(torch.empty(self.num_v_heads, dtype=torch.float32))
        self.dt_bias = nn.Parameter(torch.empty(self.num_v_heads))
        self.reset_gate_parameters()
        if use_short_conv:
            self.q_conv1d = ShortConvolution(self.key_dim, conv_size, bias=conv_bias, activation='silu')
            self.k_conv1d = ShortConvolution(self.key_dim, conv_size, bias=conv_bias, activation='silu')
            self.v_conv1d = ShortConvolution(self.value_dim, conv_size, bias=conv_bias, activation='silu')
        else:
            warnings.warn("GatedDeltaNet without short convolutions (use_short_conv=False) loses accuracy")
        if use_gate:
            self.g_proj = nn.Linear(hidden_size, self.value_dim, bias=False)
            self.o_norm = FusedRMSNormGated(self.head_v_dim, eps=norm_eps, activation=output_gate_activation)
        else:
            self.o_norm = RMSNorm(self.head_v_dim, eps=norm_eps)
        self.o_proj = nn.Linear(self.value_dim, hidden_size, bias=False)

    @torch.no_grad()
    def reset_gate_parameters(self):
        """fla's initialisation: A ~ U(0, 16); dt log-uniform in [1e-3, 0.1] (floor 1e-4), dt_bias = softplus^-1(dt)."""
        self.A_log.copy_(torch.empty_like(self.A_log, device='cpu').uniform_(0, 16).log())
        dt = torch.exp(torch.rand(self.num_v_heads) * (math.log(0.1) - math.log(0.001)) + math.log(0.001))
        dt = dt.clamp(min=1e-4)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.A_log._no_weight_decay = True
        self.dt_bias._no_weight_decay = True

    def mix(self, step):
        x = step.hidden_states
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.use_short_conv:
            q, k, v = step.conv((q, k, v))
        else:
            q, k, v = F.silu(q), F.silu(k), F.silu(v)
        q, k, v = heads(q, self.head_k_dim), heads(k, self.head_k_dim), heads(v, self.head_v_dim)
        beta = self.b_proj(x)

        op = delta_rule_op(step, q, 'gated_delta_rule', chunk_under_grad=True, eval_only=True)
        # the op turns the raw gate into g = -exp(A_log) * softplus(a_proj(x) + dt_bias)
        o, state = op(q, k, v, g=self.a_proj(x), beta=beta, use_gate_in_kernel=True, A_log=self.A_log,
                      dt_bias=self.dt_bias, initial_state=step.recurrent_state,
                      output_final_state=step.use_cache, use_qk_l2norm_in_kernel=True,
                      use_beta_sigmoid_in_kernel=True, allow_neg_eigval=self.allow_neg_eigval, state_v_first=True,
                      **step.varlen)
        if self.use_gate:
            o = self.o_norm(o, heads(self.g_proj(x), self.head_v_dim))
        else:
            o = self.o_norm(o)
        return self.o_proj(o.flatten(-2)), state
