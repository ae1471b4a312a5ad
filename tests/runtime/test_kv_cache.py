"""The cache's mask is what makes one preallocated buffer serve every step: check it slot by slot."""
from __future__ import annotations

import torch

from dlexport.runtime.kv_cache import KVCache


def _cache():
    cache = KVCache([0, 2], batch=2, kv_heads=1, capacity=6, head_dim=2, dtype=torch.float32, device="cpu")
    cache.valid[0, :2] = False  # row 0: two left-padding slots
    cache.valid[0, 2:] = True
    cache.valid[1] = True
    return cache


def test_skipped_layers_get_no_buffer():
    cache = _cache()
    assert set(cache.key) == {0, 2} and 1 not in cache.length


def test_prefill_mask_is_causal_and_hides_padding_but_keeps_the_diagonal():
    m = _cache().mask(0, 4)[:, 0] == 0  # allowed positions, [batch, tokens, capacity + tokens]
    assert not m[:, :, :6].any()  # nothing cached yet
    new = m[:, :, 6:]
    assert new[1].tolist() == torch.ones(4, 4, dtype=torch.bool).tril().tolist()
    assert new[0, 0].tolist() == [True, False, False, False]  # a padding query sees only itself
    assert new[0, 3].tolist() == [False, False, True, True]  # padding keys are hidden


def test_decode_mask_sees_written_slots_only():
    cache = _cache()
    cache.write(0, torch.ones(2, 1, 4, 2), torch.ones(2, 1, 4, 2))
    m = cache.mask(cache.length[0], 1)[:, 0, 0] == 0
    assert m[1].tolist() == [True] * 4 + [False, False] + [True]
    assert m[0].tolist() == [False, False, True, True, False, False, True]


def test_write_is_in_place_and_rollback_moves_the_length():
    cache = _cache()
    buffer = cache.key[2]
    cache.write(2, torch.full((2, 1, 3, 2), 7.0), torch.zeros(2, 1, 3, 2))
    cache.rollback(2, 1)
    cache.write(2, torch.full((2, 1, 1, 2), 9.0), torch.zeros(2, 1, 1, 2))
    assert cache.key[2] is buffer and cache.length[2] == 2
    assert cache.key[2][0, 0, :3, 0].tolist() == [7.0, 9.0, 7.0]
