"""Exit criteria: confidence features of a layer's prediction, and the score an exit policy thresholds."""
from __future__ import annotations

import torch

from .plan import ExitPolicy


def features(logits: torch.Tensor, layer_fraction: float) -> dict[str, torch.Tensor]:
    """top-1 probability, top-1 minus top-2 gap, and the fraction of the model's depth reached; [batch] each."""
    top2 = torch.softmax(logits.float(), dim=-1).topk(2, dim=-1).values
    return {"top1_prob": top2[:, 0], "gap": top2[:, 0] - top2[:, 1],
            "layer_fraction": torch.full_like(top2[:, 0], layer_fraction)}


def exit_score(logits: torch.Tensor, policy: ExitPolicy, layer_fraction: float) -> torch.Tensor:
    f = features(logits, layer_fraction)
    if policy.criterion != "classifier":
        return f[policy.criterion]
    z = sum(w * f[name] for name, w in zip(policy.features, policy.weights)) + policy.bias
    return torch.sigmoid(z)
