"""What the four token mixers share: padding, short convolutions, the cache and the op choice."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from fla_aot.layers.utils import keep_rows, layer_cache, repad, unpad, unpad_data

SHORT_INPUT = 64  # fla's layers run inputs of up to this many tokens through the fused_recurrent form


class Step:
    """One forward's bookkeeping: the (possibly unpadded) input, varlen bounds and the layer's cache."""

    def __init__(self, mixer, hidden_states, attention_mask, past_key_values, use_cache, kwargs):
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError("attention_mask must be a 0/1 matrix [batch_size, seq_len] (0 = padding); "
                             "[batch_size, seq_len, seq_len] masks are not allowed")
        self.mixer, self.past_key_values, self.use_cache = mixer, past_key_values, bool(use_cache)
        self.batch_size, self.q_len = hidden_states.shape[:2]
        self.attention_mask = attention_mask
        self.last_state = layer_cache(mixer, past_key_values)
        self.cu_seqlens = kwargs.get("cu_seqlens")
        self.cu_seqlens_cpu = kwargs.get("cu_seqlens_cpu")
        self.indices = None
        self.keep = None  # decoding with a mask: rows whose new token is padding keep their state
        if self.cu_seqlens is None and attention_mask is not None:
            if self.q_len == 1:
                self.keep = attention_mask[:, -1].bool()
            else:
                self.indices, self.cu_seqlens, self.cu_seqlens_cpu = unpad_data(attention_mask, self.q_len)
                hidden_states = unpad(hidden_states, self.indices)
        if self.cu_seqlens is not None and self.cu_seqlens_cpu is None:
            self.cu_seqlens_cpu = self.cu_seqlens.cpu()
        self.hidden_states = hidden_states
        self.decoding = self.q_len == 1

    def recurrent(self, chunk_under_grad: bool = False, eval_only: bool = False) -> bool:
        """Whether this forward runs the fused_recurrent form, chosen as fla's layer of the same name chooses:
        decoding and inputs up to SHORT_INPUT tokens run it (faster there than the chunk form), longer ones the
        layer's mode. chunk_under_grad: with autograd on, fla's RetNet and Gated DeltaNet take the chunk form at
        any length (decoding aside); eval_only: Gated DeltaNet takes the short-input rule in eval mode only."""
        if self.decoding:
            return True
        if chunk_under_grad and torch.is_grad_enabled():
            return False
        if self.q_len <= SHORT_INPUT and not (eval_only and self.mixer.training):
            return True
        return self.mixer.mode == 'fused_recurrent'

    @property
    def varlen(self) -> dict:
        """The varlen arguments of the ops (empty without cu_seqlens)."""
        if self.cu_seqlens is None:
            return {}
        return {"cu_seqlens": self.cu_seqlens, "cu_seqlens_cpu": self.cu_seqlens_cpu}

    @property
    def recurrent_state(self):
        return None if self.last_state is None else self.last_state["recurrent_state"]

    def conv(self, x, names=("q_conv1d", "k_conv1d", "v_conv1d")):
        """Run the short convolutions over the projections `x` (one per name); keeps their new states."""
        old = (None,) * len(names)
        if self.last_state is not None and self.last_state["conv_state"] is not None:
            old = self.last_state["conv_state"]
        outs, states = [], []
        for name, xi, cache in zip(names, x, old):
            y, state = getattr(self.mixer, name)(xi, cache=cache, output_final_state=self.use_cache,
                                                 cu_seqlens=self.cu_seqlens, cu_seqlens_cpu=self.cu_seqlens_cpu)
            outs.append(y)
            states.append(keep_rows(self.keep, state, cache))
        self.conv_state = tuple(states)
        return outs

    def positions(self, device):
        """Each token's position in its own sequence (padding not counted), [B, T] or [1, tokens]."""
        offset = 0 if self.past_key_values is None else self.past_key_values.get_seq_length(self.mixer.layer_idx)
        mask = self.attention_mask
        if mask is not None and self.cu_seqlens is not None and self.indices is None:
            mask = None  # explicit cu_seqlens: positions restart in every sequence
        if mask is None:
            if self.cu_seqlens is None:
                return (offset + torch.arange(self.q_len, device=device)).unsqueeze(0)
            bounds = self.cu_seqlens_cpu.tolist()
            pos = torch.cat([torch.arange(e - b) for b, e in zip(bounds[:-1], bounds[1:])]) + offset
            return pos.to(device).unsqueeze(0)
        pos = mask.long().cumsum(-1) - 1
        if mask.shape[-1] == self.q_len and offset:
            pos = pos + offset  # the mask covers only the new tokens: continue after the cached ones
        pos = pos[:, -self.q_len:].clamp_min(0)
        if self.indices is not None:
            pos = pos.reshape(-1).index_select(0, self.indices).unsqueeze(0)
        return pos.to(device)

    def finish(self, o, recurrent_state):
        """Store the new states in the cache and bring the output [.., D] back to [B, T, D]."""
        if self.past_key_values is not None:
            recurrent_state = keep_rows(self.keep, recurrent_state, self.recurrent_state)
            self.past_key_values.update(recurrent_state=recurrent_state,
                                        conv_state=getattr(self, "conv_state", None),
                                        layer_idx=self.mixer.layer_idx, offset=self.q_len)
        if self.indices is not None:
            o = repad(o, self.indices, self.batch_size, self.q_len)
        elif self.keep is not None:
            o = o * self.keep.view(-1, 1, 1).to(o.dtype)
        return o


class TokenMixer(nn.Module):
    """Base of the layers: forward(hidden_states, attention_mask, past_key_values, use_cache, ...) ->
    (o, None, past_key_values), like fla's layers."""

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                past_key_values=None, use_cache: bool | None = False, output_attentions: bool | None = False,
                **kwargs):
        step = Step(self, hidden_states, attention_mask, past_key_values, use_cache, kwargs)
        o, recurrent_state = self.mix(step)
        return step.finish(o, recurrent_state), None, past_key_values


def heads(x: torch.Tensor, dim: int, groups: int = 1) -> torch.Tensor:
    """[..., (h d)] -> [..., h * groups, d], each head repeated `groups` times in a row (fla's GQA)."""
    x = x.unflatten(-1, (-1, dim))
    return x if groups == 1 else x.repeat_interleave(groups, dim=-2)


def kv_groups(num_heads: int, num_kv_heads: int | None):
    """fla's GQA: (num_kv_heads, query heads per key/value head); num_kv_heads defaults to num_heads."""
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    if num_heads % num_kv_heads:
        raise ValueError("num_heads must be divisible by num_kv_heads")
    return num_kv_heads, num_heads // num_kv_heads


def projection_dims(hidden_size: int, expand_k: float, expand_v: float, num_heads: int):
    """fla's projection widths (key_dim, value_dim) = hidden_size * (expand_k, expand_v), whole numbers divisible by
    num_heads."""
    key_dim, value_dim = hidden_size * expand_k, hidden_size * expand_v
    dims = round(key_dim), round(value_dim)
    if not (math.isclose(key_dim, dims[0]) and math.isclose(value_dim, dims[1])):
        raise ValueError("hidden_size * expand_k and hidden_size * expand_v must be integers")
    if dims[0] % num_heads or dims[1] % num_heads:
        raise ValueError(f"key and value dims must be divisible by num_heads={num_heads}")
    return dims


def check_mode(layer: str, mode: str, allowed):
    if mode not in allowed:
        raise NotImplementedError(f"{layer}: mode={mode!r} is not supported by fla_aot.layers (choose from "
                                  f"{list(allowed)})")
