"""The building blocks around the recurrent ops, in plain PyTorch (no Triton on the path).

Each has the constructor arguments and parameter names of the fla module of the same name, so that
a state_dict moves between them: ShortConvolution (a causal depthwise conv1d), RMSNorm,
FusedRMSNormGated (RMSNorm times an activated gate), GatedMLP (SwiGLU) and RotaryEmbedding (no
parameters). Norms and activations compute in float32 and return the input's dtype.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def _elu_p1(x):
    return F.elu(x) + 1.0


_ACTIVATIONS = {
    "swish": F.silu,
    "silu": F.silu,
    "sigmoid": torch.sigmoid,
    "relu": F.relu,
    "identity": lambda x: x,
    "elu_p1": _elu_p1,
}


def activation(name: str | None, what: str):
    """The activation called `name` (fla's ACT2FN spelling), or NotImplementedError naming the choices."""
    if name is None:
        return None
    if name not in _ACTIVATIONS:
        raise NotImplementedError(f"{what}={name!r} is not supported by fla_aot.layers; supported: "
                                  f"{sorted(_ACTIVATIONS)} (or None)")
    return _ACTIVATIONS[name]


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight + bias over the last axis, in float32."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()
    if bias is not None:
        y = y + bias.float()
    return y


class RMSNorm(nn.Module):
    """fla's RMSNorm: `forward(x, residual=None, prenorm=False)`; with a residual it normalises
    x + residual and, with prenorm=True, also returns that sum (the next residual)."""

    def __init__(self, hidden_size: int, elementwise_affine: bool = True, bias: bool = False, eps: float = 1e-5,
                 device=None, dtype=None):
        super().__init__()
        self.hidden_size, self.elementwise_affine, self.eps = hidden_size, elementwise_affine, eps
        self.register_parameter("weight", None)
        self.register_parameter("bias", None)
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
            if bias:
                self.bias = nn.Parameter(torch.zeros(hidden_size, device=device, dtype=dtype))

    def reset_parameters(self):
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x, residual=None, prenorm=False, residual_in_fp32=False):
        if residual is not None:
            total = x.float() + residual.float()
            x = total.to(torch.float32 if residual_in_fp32 else x.dtype)
        y = rms_norm(x, self.weight, self.bias, self.eps).to(x.dtype if not residual_in_fp32 else residual.dtype)
        return (y, x) if prenorm else y

    def extra_repr(self):
        return f"{self.hidden_size}, eps={self.eps}"


class FusedRMSNormGated(nn.Module):
    """fla's FusedRMSNormGated: `forward(x, g)` = RMSNorm(x) * act(g), act in {swish, silu, sigmoid}."""

    def __init__(self, hidden_size: int, elementwise_affine: bool = True, eps: float = 1e-5,
                 activation: str = "swish", device=None, dtype=None):
        super().__init__()
        if activation not in ("swish", "silu", "sigmoid"):
            raise ValueError(f"Unsupported activation: {activation}")
        self.hidden_size, self.elementwise_affine, self.eps, self.activation = (
            hidden_size, elementwise_affine, eps, activation)
        self.register_parameter("bias", None)
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)

    def reset_parameters(self):
        if self.weight is not None:
            nn.init.ones_(self.weight)

    def forward(self, x, g, residual=None, prenorm=False, residual_in_fp32=False):
        if residual is not None:
            raise NotImplementedError("FusedRMSNormGated: residual is not supported by fla_aot.layers")
        gf = g.float()
        gate = torch.sigmoid(gf) if self.activation == "sigmoid" else F.silu(gf)
        return (rms_norm(x, self.weight, None, self.eps) * gate).to(x.dtype)

    def extra_repr(self):
        return f"{self.hidden_size}, eps={self.eps}, activation={self.activation}"


class ShortConvolution(nn.Conv1d):
    """fla's ShortConvolution: a causal depthwise conv1d over [B, T, D] with an optional SiLU, whose
    state (`cache`, [N, D, W]) is the last W = kernel_size inputs of each sequence."""

    def __init__(self, hidden_size: int, kernel_size: int, bias: bool = False, activation: str | None = "silu",
                 backend: str | None = None, device=None, dtype=None, **kwargs):
        super().__init__(hidden_size, hidden_size, kernel_size, padding=kernel_size - 1, groups=hidden_size,
                         bias=bias, device=device, dtype=dtype)
        if activation is not None and activation not in ("silu", "swish"):
            raise NotImplementedError(f"ShortConvolution: activation {activation!r} is not supported")
        self.hidden_size, self.activation = hidden_size, activation

    def _conv(self, x: torch.Tensor, cache: torch.Tensor | None):
        """One batch of equal-length sequences: x [B, T, D], cache [B, D, W] or None -> (y, new state)."""
        B, T, D = x.shape
        W = self.kernel_size[0]
        xt = x.transpose(1, 2)
        prefix = x.new_zeros(B, D, W - 1) if cache is None else cache[..., 1:].to(x.dtype)
        xe = torch.cat([prefix, xt], dim=-1)  # [B, D, W - 1 + T]
        if T == 1:  # decoding: one dot product per channel
            y = (xe.float() * self.weight.squeeze(1).float()).sum(-1, keepdim=True)
            if self.bias is not None:
                y = y + self.bias.float()[:, None]
        else:
            y = F.conv1d(xe, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype),
                         groups=D).float()
        if self.activation is not None:
            y = F.silu(y)
        return y.to(x.dtype).transpose(1, 2).contiguous(), xe[..., -W:]

    def forward(self, x: torch.Tensor, residual=None, mask=None, cache: torch.Tensor | None = None,
                output_final_state: bool = False, cu_seqlens: torch.LongTensor | None = None, cu_seqlens_cpu=None,
                **kwargs):
        """x [B, T, D] (B = 1 with cu_seqlens [N+1]); returns (y [B, T, D], final state [N, D, W] or None)."""
        if residual is not None:
            raise NotImplementedError("ShortConvolution: residual is not supported by fla_aot.layers")
        if mask is not None:
            x = x * mask.unsqueeze(-1).to(x.dtype)
        if cu_seqlens is None:
            y, state = self._conv(x, cache)
        else:
            y, state = self._conv_varlen(x, cache, cu_seqlens)
        return y, (state.contiguous() if output_final_state else None)

    def _conv_varlen(self, x: torch.Tensor, cache: torch.Tensor | None, cu_seqlens: torch.Tensor):
        """Sequences packed along T (x [1, T, D], cu_seqlens [N+1]), each convolved alone in one batched pass: tap j
        of token t reads x[t - (W-1) + j] while that is inside t's sequence, else the sequence's cached inputs (or
        zeros). Returns (y [1, T, D], state [N, D, W]: each sequence's last W inputs, the cache's for those before
        its start)."""
        T, D, W = x.shape[1], self.hidden_size, self.kernel_size[0]
        cu = cu_seqlens.to(x.device, torch.long)
        N = cu.numel() - 1
        xs = x[0]
        past = x.new_zeros(N, D, W) if cache is None else cache.to(x.dtype)

        def taps(seq, bos, src):
            """x at positions src [..] of sequences seq [..] that start at bos [..]: [.., D]."""
            inside = (src >= bos).unsqueeze(-1)
            mine = xs[src.clamp(0, max(T - 1, 0))] if T else xs.new_zeros(*src.shape, D)
            cached = past[seq, :, (src - bos + W).clamp(0, W - 1)]
            return torch.where(inside, mine, cached)

        t = torch.arange(T, device=x.device)
        seq = torch.searchsorted(cu[1:], t, right=True)  # the sequence of each token
        bos = cu[seq]
        w = self.weight[:, 0].float()  # [D, W]
        y = sum(taps(seq, bos, t - (W - 1) + j).float() * w[:, j] for j in range(W))
        if self.bias is not None:
            y = y + self.bias.float()
        if self.activation is not None:
            y = F.silu(y)
        n = torch.arange(N, device=x.device)
        last = cu[1:, None] - W + torch.arange(W, device=x.device)  # [N, W]: each sequence's last W positions
        state = taps(n[:, None].expand(N, W), cu[:-1, None], last).transpose(1, 2)  # [N, D, W]
        return y.to(x.dtype).unsqueeze(0), state


class GatedMLP(nn.Module):
    """fla's GatedMLP with SwiGLU: down_proj(silu(gate_proj(x)) * up_proj(x))."""

    def __init__(self, hidden_size: int, hidden_ratio: int | None = None, intermediate_size: int | None = None,
                 hidden_act: str = "swish", fuse_swiglu: bool = True, powglu_power: float = 3.0):
        super().__init__()
        if hidden_act != "swish":
            raise NotImplementedError(f"GatedMLP: hidden_act={hidden_act!r} is not supported by fla_aot "
                                      f"(only 'swish')")
        hidden_ratio = 4 if hidden_ratio is None else hidden_ratio
        if intermediate_size is None:
            intermediate_size = int(hidden_size * hidden_ratio * 2 / 3)
            intermediate_size = 256 * ((intermediate_size + 255) // 256)
        self.hidden_size, self.hidden_ratio, self.intermediate_size = hidden_size, hidden_ratio, intermediate_size
        self.hidden_act, self.fuse_swiglu = hidden_act, fuse_swiglu
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x, **kwargs):
        gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj((F.silu(gate.float()) * up.float()).to(x.dtype))


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (GPT-NeoX halves, fla's default); no parameters or saved buffers.
    `forward(q, k, positions)` with positions [B, T] or [T] (int), q and k [B, T, H, D]."""

    def __init__(self, dim: int, base: float = 10000.0, scale_base=None, interleaved: bool = False,
                 pos_idx_in_fp32: bool = True, device=None):
        super().__init__()
        if dim % 2:
            raise ValueError(f"Rotary dimension must be even, got {dim}")
        if scale_base is not None or interleaved:
            raise NotImplementedError("RotaryEmbedding: scale_base (XPos) and interleaved are not supported")
        self.dim, self.base = dim, float(base)
        self._inv_freq = {}

    def inv_freq(self, device):
        key = str(device)
        if key not in self._inv_freq:
            exponent = torch.arange(0, self.dim, 2, dtype=torch.float32) / self.dim
            self._inv_freq[key] = (1.0 / self.base ** exponent).to(device)
        return self._inv_freq[key]

    def forward(self, q, k, positions):
        angle = positions.float().unsqueeze(-1) * self.inv_freq(q.device)  # [..., T, D/2]
        if angle.dim() == 2:
            angle = angle.unsqueeze(0)
        cos, sin = angle.cos().unsqueeze(-2), angle.sin().unsqueeze(-2)  # [B, T, 1, D/2]

        def rotate(x):
            x1, x2 = x.float().chunk(2, dim=-1)
            return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)

        return rotate(q), rotate(k)
