"""The per-sequence depth oracle: for each prompt, the fewest layers (a ladder rung) whose greedy reply equals the
full model's. It is an upper bound on what any per-sequence depth controller could save.
"""
from __future__ import annotations

import torch

from .stack import Stack


def greedy_tokens(stack: Stack, prompts: torch.Tensor, layers, new_tokens: int) -> torch.Tensor:
    """Greedy continuation [batch, new_tokens] of equal-length ``prompts`` through ``layers``, with a KV cache."""
    n = stack.arch.numbers
    b, t = prompts.shape
    cache = {i: (prompts.new_zeros(b, n.num_kv_heads, 0, n.head_dim, dtype=torch.float32),) * 2 for i in layers}
    out, ids, start = [], prompts, 0
    with torch.inference_mode():
        for _ in range(new_tokens):
            tokens = ids.shape[1]
            pos = torch.arange(start, start + tokens).expand(b, tokens)
            hidden, extras = stack.arch.split_embed(stack.embed_module(ids, pos))
            for i in layers:
                pk, pv = cache[i]
                layer = stack.layer_modules[i]
                mask = stack.mask(tokens, layer.window, start).expand(b, 1, tokens, start + tokens)
                hidden, k, v = layer.step(hidden, mask, extras, pk, pv)
                cache[i] = (torch.cat([pk, k], 2), torch.cat([pv, v], 2))
            ids = stack.logits(hidden[:, -1:]).argmax(-1)
            out.append(ids)
            start += tokens
    return torch.cat(out, 1)


def per_sequence_oracle(stack: Stack, prompts: torch.Tensor, ladder, new_tokens: int = 24,
                        patience: int = 3) -> dict:
    """Fewest layers per prompt whose ``new_tokens`` greedy tokens equal the full model's.

    Rungs are tried from the deepest down; the scan stops after ``patience`` rungs in a row that match no prompt
    (deeper rungs already found each prompt's answer; shallower ones are ever less likely to match).
    """
    n = stack.num_layers
    full = greedy_tokens(stack, prompts, range(n), new_tokens)
    need = torch.full((prompts.shape[0],), n)
    misses = 0
    for rung in sorted(ladder, key=len, reverse=True):
        if len(rung) == n:
            continue
        match = (greedy_tokens(stack, prompts, rung, new_tokens) == full).all(1)
        need = torch.where(match, torch.minimum(need, torch.tensor(len(rung))), need)
        misses = 0 if bool(match.any()) else misses + 1
        if misses >= patience:
            break
    return {"prompts": int(prompts.shape[0]), "prompt_tokens": int(prompts.shape[1]), "new_tokens": new_tokens,
            "layers_needed": need.tolist(), "mean_layers": float(need.float().mean()),
            "mean_fraction": float(need.float().mean() / n)}
