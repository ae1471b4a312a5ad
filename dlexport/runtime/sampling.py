"""Token choice: greedy, or sampling with temperature, top-k and top-p from a seeded generator."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import checks
from ..errors import InputError


MIN_TEMPERATURE = 1e-6  # below it fp32 logits / temperature overflow to inf


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        """Refuse settings that would silently mean something else (a negative temperature, top_p of 2, NaN)."""
        checks.number(self.temperature, "temperature", 0.0, None, fix="0 is greedy, higher values sample")
        if 0.0 < self.temperature < MIN_TEMPERATURE:
            raise InputError(f"temperature {self.temperature!r} is too small to sample with (logits are divided by "
                             f"it in fp32); use 0 for greedy decoding or at least {MIN_TEMPERATURE}")
        checks.integer(self.top_k, "top_k", 0, None, fix="0 keeps every token")
        checks.number(self.top_p, "top_p", 0.0, 1.0, lo_open=True, fix="1 keeps every token")
        if self.seed is not None:
            checks.integer(self.seed, "seed", 0, 2**64 - 1)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    def generator(self, device) -> torch.Generator | None:
        if self.greedy:
            return None
        g = torch.Generator(device=device)
        g.manual_seed(self.seed if self.seed is not None else torch.seed())
        return g


def probabilities(logits: torch.Tensor, s: Sampling) -> torch.Tensor:
    """The distribution sampling draws from, after temperature, top-k and top-p ([batch, vocab], fp32)."""
    logits = logits.float() / s.temperature
    if s.top_k > 0:
        kth = torch.topk(logits, min(s.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if s.top_p < 1.0:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > s.top_p  # keep the smallest prefix whose mass reaches top_p
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def pick(logits: torch.Tensor, s: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    """[batch, vocab] -> [batch] token ids."""
    if s.greedy:
        return logits.argmax(-1)
    return torch.multinomial(probabilities(logits, s), 1, generator=generator).squeeze(-1)
