"""The key/value cache of one request: a preallocated buffer per executed layer, written in place.

Slot ``s`` of every buffer holds position ``s`` of the (left-padded) sequence. Each layer keeps its own length,
because early exit leaves deeper layers behind until their pending positions are filled. Rolling back (speculative
decoding) only moves a length. Layers a plan skips get no buffer at all.
"""
from __future__ import annotations

import torch

from ..exporter.architectures.base import attention_mask


class KVCache:
    def __init__(self, layers, batch: int, kv_heads: int, capacity: int, head_dim: int, dtype, device):
        shape = (batch, kv_heads, capacity, head_dim)
        self.key = {i: torch.zeros(shape, dtype=dtype, device=device) for i in layers}
        self.value = {i: torch.zeros(shape, dtype=dtype, device=device) for i in layers}
        self.length = {i: 0 for i in layers}
        self.capacity, self.dtype, self.device = capacity, dtype, device
        self.valid = torch.zeros(batch, capacity, dtype=torch.bool, device=device)  # False for left padding
        self._masks: dict[tuple, torch.Tensor] = {}
        self._filled: dict[tuple, torch.Tensor] = {}
        self._lengths: dict[int, tuple[torch.Tensor, int]] = {}
        self._batch = batch

    def write(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> None:
        start, n = self.length[layer], key.shape[2]
        self.key[layer][:, :, start:start + n].copy_(key)
        self.value[layer][:, :, start:start + n].copy_(value)
        self.length[layer] = start + n

    def rollback(self, layer: int, length: int) -> None:
        self.length[layer] = min(self.length[layer], length)

    def new_step(self) -> None:
        """Masks depend on (length, new tokens, window) and on which slots are valid: rebuilt at most once per step."""
        self._masks.clear()
        self._filled.clear()

    def mask(self, length: int, tokens: int, window: int | None = None) -> torch.Tensor:
        """Additive mask [batch, 1, tokens, capacity + tokens] for ``tokens`` new positions after ``length`` cached.

        Past slots count when written and not padding; new tokens see each other causally; a sliding-window layer
        (``window``) sees only the last ``window`` positions. Every query also sees itself, so a padding row never
        has all keys masked (its softmax stays finite and its values unused). Slots are positions of the
        left-padded sequence, so slot distances are position distances, as in Hugging Face's masks.
        """
        key = (length, tokens, window)
        if key not in self._masks:
            c, dev = self.capacity, self.device
            new = torch.arange(length, length + tokens, device=dev)
            key_slots = torch.cat([torch.arange(c, device=dev), new])
            written = self.valid & (torch.arange(c, device=dev) < length)
            key_ok = torch.cat([written, self.valid[:, length:length + tokens]], 1)
            self._masks[key] = attention_mask(key_slots, key_ok, new, window, self.dtype)
        return self._masks[key]

    def filled_mask(self, length: int, tokens: int, window: int | None = None) -> torch.Tensor:
        """The in-place layers' mask [batch, 1, tokens, length + tokens]: the same rules over the filled slots only."""
        key = (length, tokens, window)
        if key not in self._filled:
            slots = torch.arange(length + tokens, device=self.device)  # the filled slots, then the new tokens'
            self._filled[key] = attention_mask(slots, self.valid[:, :length + tokens], slots[length:], window,
                                               self.dtype)
        return self._filled[key]

    def write_index(self, layer: int) -> torch.Tensor:
        """``past_length`` for an in-place layer: [batch] int64, one tensor per layer for the whole request, set to
        the layer's length in place (the engine keeps it bound at the same address, so nothing is rebound)."""
        t, value = self._lengths.get(layer, (None, None))
        if t is None:
            t = torch.empty((self._batch,), dtype=torch.int64, device=self.device)
        if value != self.length[layer]:
            t.fill_(self.length[layer])
        self._lengths[layer] = (t, self.length[layer])
        return t
