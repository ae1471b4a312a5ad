"""A PyTorch reference for skip plans and exit policies, independent of the runtime's caching.

Every step recomputes the whole sequence through the Hugging Face modules (no KV cache at all), running only the
plan's layers, each under the causal mask of its kind (with its sliding window, if any); after each exit layer it
scores the last position with the same criterion the runtime uses. Because the runtime's early exit keeps its caches
exact (see runtime.py), both must emit the same tokens. Slow by design: it exists to be obviously right.
"""
from __future__ import annotations

import torch

from ..exporter.architectures import architecture_for, sequence_mask
from .exits import exit_score
from .plan import Plan


@torch.no_grad()
def reference_generate(model, prompts: list[list[int]], max_new_tokens: int, plan: Plan | None = None,
                       pad_id: int = 0) -> tuple[list[list[int]], list[int | None]]:
    """Greedy tokens per prompt, and the exit layer of each step (None: ran the whole plan)."""
    arch = architecture_for(model)
    n = arch.numbers
    layers = plan.layers if plan else tuple(range(n.num_layers))
    policy = plan.exit if plan else None
    embed, head = arch.embed_module(), arch.head_module()
    wrappers = {i: arch.layer_module(i) for i in layers}
    dtype = next(model.parameters()).dtype
    width = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts])
    valid = torch.tensor([[False] * (width - len(p)) + [True] * len(p) for p in prompts])
    empty = torch.zeros(len(prompts), n.num_kv_heads, 0, n.head_dim, dtype=dtype)
    exits = []
    for step in range(max_new_tokens):
        positions = (valid.cumsum(1) - 1).clamp(min=0)
        hidden, rotary = arch.split_embed(embed(ids, positions))
        masks = {w: sequence_mask(valid, valid.shape[1], w, dtype) for w in set(n.layer_windows)}
        token, exit_layer = None, None
        for k, i in enumerate(layers):
            hidden = wrappers[i].step(hidden, masks[wrappers[i].window], rotary, empty, empty)[0]
            if policy and step > 0 and i in policy.layers and k + 1 >= policy.min_depth and k + 1 < len(layers):
                logits = head(hidden[:, -1:])[:, -1]
                if bool((exit_score(logits, policy, (i + 1) / n.num_layers) >= policy.threshold).all()):
                    token, exit_layer = logits.argmax(-1), i
                    break
        if token is None:
            token = head(hidden[:, -1:])[:, -1].argmax(-1)
        exits.append(exit_layer)
        ids = torch.cat([ids, token[:, None]], dim=1)
        valid = torch.cat([valid, torch.ones(len(prompts), 1, dtype=torch.bool)], dim=1)
    return ids[:, width:].tolist(), exits
