"""The key/value cache of one request: a preallocated buffer per executed layer, written in place.

Slot ``s`` of every buffer holds position ``s`` of the (left-padded) sequence. Each layer keeps its own length,
because early exit leaves deeper layers behind until their pending positions are filled. Rolling back (speculative
decoding) only moves a length. Layers a plan skips get no buffer at all.
"""
from __future__ import annotations

import torch


class KVCache:
    def __init__(self, layers, batch: int, kv_heads: int, capacity: int, head_dim: int, dtype, device):
        shape = (batch, kv_heads, capacity, head_dim)
        self.key = {i: torch.zeros(shape, dtype=dtype, device=device) for i in layers}
        self.value = {i: torch.zeros(shape, dtype=dtype, device=device) for i in layers}
        self.length = {i: 0 for i in layers}
        self.capacity, self.dtype, self.device = capacity, dtype, device
        self.valid = torch.zeros(batch, capacity, dtype=torch.bool, device=device)  # False for left padding
        self._min = torch.finfo(dtype).min
        self._masks: dict[tuple[int, int], torch.Tensor] = {}
        self._filled: dict[tuple[int, int], torch.Tensor] = {}
        self._lengths: dict[int, torch.Tensor] = {}
        self._batch = batch

    def write(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> None:
        start, n = self.length[layer], key.shape[2]
        self.key[layer][:, :, start:start + n].copy_(key)
        self.value[layer][:, :, start:start + n].copy_(value)
        self.length[layer] = start + n

    def rollback(self, layer: int, length: int) -> None:
        self.length[layer] = min(self.length[layer], length)

    def new_step(self) -> None:
        """Masks depend on (length, new tokens) and on which slots are valid: rebuilt at most once per step."""
        self._masks.clear()
        self._filled.clear()

    def mask(self, length: int, tokens: int) -> torch.Tensor:
        """Additive mask [batch, 1, tokens, capacity + tokens] for ``tokens`` new positions after ``length`` cached.

        Past slots count when written and not padding; new tokens see each other causally. Every query also sees
        itself, so a padding row never has all keys masked (its softmax stays finite and its values unused).
        """
        key = (length, tokens)
        if key not in self._masks:
            c, dev = self.capacity, self.device
            past_ok = self.valid & (torch.arange(c, device=dev) < length)
            new_valid = self.valid[:, length:length + tokens]
            causal = torch.ones(tokens, tokens, dtype=torch.bool, device=dev).tril()
            new_ok = (causal & new_valid[:, None, :]) | torch.eye(tokens, dtype=torch.bool, device=dev)
            allowed = torch.cat([past_ok[:, None, :].expand(-1, tokens, -1), new_ok], dim=-1)
            mask = torch.zeros(allowed.shape, dtype=self.dtype, device=dev).masked_fill_(~allowed, self._min)
            self._masks[key] = mask[:, None]
        return self._masks[key]

    def filled_mask(self, length: int, tokens: int) -> torch.Tensor:
        """The in-place layers' mask [batch, 1, tokens, length + tokens]: the same rules over the filled slots only."""
        key = (length, tokens)
        if key not in self._filled:
            full = self.mask(length, tokens)
            self._filled[key] = torch.cat([full[..., :length], full[..., self.capacity:]], dim=-1)
        return self._filled[key]

    def write_index(self, length: int) -> torch.Tensor:
        """``past_length`` for an in-place layer: [batch] int64, made once per length and request."""
        t = self._lengths.get(length)
        if t is None:
            t = self._lengths[length] = torch.full((self._batch,), length, dtype=torch.int64, device=self.device)
        return t
