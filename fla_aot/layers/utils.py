"""Recurrent-state cache and padding helpers of the token-mixing layers (plain PyTorch)."""
from __future__ import annotations

import torch


class Cache:
    """Per-layer recurrent states for decoding, the counterpart of fla's `fla.models.Cache`.

    `cache[layer_idx]` is a dict with `recurrent_state` (the op's final state, float32, [N, H, K, V] or
    [N, H, V, K]) and `conv_state` (a tuple of the short convolutions' states, each [N, D, W] holding the
    last W inputs, or None). Every layer counts the tokens it has seen (`get_seq_length(layer_idx)`).
    """

    is_compileable = False

    def __init__(self, seen_tokens: int = 0):
        self.states: list[dict] = []
        self._seen: list[int] = []
        self._initial_seen = int(seen_tokens)

    def __getitem__(self, layer_idx: int) -> dict:
        if layer_idx >= len(self.states):
            raise KeyError(f"the cache holds {len(self.states)} layers, layer {layer_idx} was asked for")
        return self.states[layer_idx]

    def __iter__(self):
        return iter(self.states)

    def __len__(self) -> int:
        return len(self.states)

    def update(self, recurrent_state=None, conv_state=None, layer_idx: int = 0, offset: int = 1, **kwargs) -> dict:
        while len(self.states) <= layer_idx:
            self.states.append({"recurrent_state": None, "conv_state": None})
            self._seen.append(self._initial_seen)
        state = self.states[layer_idx]
        if recurrent_state is not None:
            state["recurrent_state"] = recurrent_state
        if conv_state is not None:
            state["conv_state"] = conv_state
        self._seen[layer_idx] += offset
        return state

    def get_seq_length(self, layer_idx: int | None = 0, *args, **kwargs) -> int:
        layer_idx = layer_idx or 0
        return self._seen[layer_idx] if layer_idx < len(self._seen) else self._initial_seen

    def get_max_length(self, *args, **kwargs) -> int:
        return -1

    def get_max_cache_shape(self, *args, **kwargs) -> int:
        return -1

    def _map(self, fn):
        for state in self.states:
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    state[key] = fn(value)
                elif isinstance(value, (tuple, list)):
                    state[key] = type(value)(fn(x) if isinstance(x, torch.Tensor) else x for x in value)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda x: x.index_select(0, beam_idx.to(x.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda x: x.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda x: x[indices])

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("a recurrent state cannot be cropped back to an earlier length")

    def reset(self) -> None:
        self.states, self._seen = [], []


def layer_cache(module, past_key_values):
    """The cache dict of `module`'s layer, or None (no cache, or this layer has not run yet)."""
    if past_key_values is None:
        return None
    if module.layer_idx is None:
        raise ValueError(f"{type(module).__name__} needs `layer_idx` when `past_key_values` is given")
    return past_key_values[module.layer_idx] if len(past_key_values) > module.layer_idx else None


_UNPAD_MEMO: list = [None, None]  # (mask, q_len) of the last call and its result: one mask serves every layer


def unpad_data(attention_mask: torch.Tensor, q_len: int):
    """From a 0/1 mask [B, L] (1 = token), for the last q_len columns: the flat indices of the tokens,
    cu_seqlens (int64, on the mask's device) and its host copy."""
    key = _UNPAD_MEMO[0]
    if key is not None and key[0] is attention_mask and key[1] == q_len:
        return _UNPAD_MEMO[1]
    mask = attention_mask[:, -q_len:].bool()
    lens = mask.sum(-1)
    indices = torch.nonzero(mask.flatten(), as_tuple=False).flatten()
    cu = torch.zeros(lens.numel() + 1, dtype=torch.int64, device=mask.device)
    cu[1:] = lens.cumsum(0)
    result = (indices, cu, cu.cpu())
    _UNPAD_MEMO[0], _UNPAD_MEMO[1] = (attention_mask, q_len), result
    return result


def unpad(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """[B, T, ...] -> [1, tokens, ...]: the tokens at `indices` of the flattened (B T) axis."""
    return x.reshape(-1, *x.shape[2:]).index_select(0, indices).unsqueeze(0)


def repad(x: torch.Tensor, indices: torch.Tensor, batch_size: int, q_len: int) -> torch.Tensor:
    """[1, tokens, ...] -> [B, T, ...] with zeros at the padded positions (inverse of `unpad`)."""
    out = x.new_zeros(batch_size * q_len, *x.shape[2:])
    out.index_copy_(0, indices, x.squeeze(0))
    return out.view(batch_size, q_len, *x.shape[2:])


def keep_rows(keep, new, old):
    """Where keep[n] is False (a padding token in a decoding step), row n of a state stays `old`."""
    if keep is None or new is None:
        return new
    if old is None:
        old = torch.zeros_like(new)
    return torch.where(keep.view(-1, *([1] * (new.dim() - 1))), new, old.to(new.dtype))
