"""What a layer and a head check cost, for predicted speedups: measured (profile.json) or estimated from weights.

profile.json belongs to `dlexport profile`; it is read defensively here (decode entries, per-engine median ms) and
anything unexpected falls back to the estimate, with the reason kept in ``Costs.source``. The estimate counts
multiply-accumulates per decode token: a layer's weights versus the head's vocabulary projection.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

_LAYER = re.compile(r"^layer_\d+$")


@dataclass(frozen=True)
class Costs:
    layer: float  # one decoder layer, one decode token
    head: float  # one head call (an exit check, or the final projection)
    unit: str  # "ms" (profiled) or "layer" (estimated; layer == 1)
    source: str

    @property
    def head_in_layers(self) -> float:
        return self.head / self.layer

    def step(self, layers: float, head_calls: float = 1.0) -> float:
        return layers * self.layer + head_calls * self.head

    def speedup(self, num_layers: int, layers: float, head_calls: float = 1.0) -> float:
        """Predicted decode speedup over the full model (embedding ignored: it is a lookup)."""
        return self.step(num_layers) / self.step(layers, head_calls)

    def to_json(self) -> dict:
        return {"layer": self.layer, "head": self.head, "unit": self.unit, "head_in_layers": round(self.head_in_layers, 3),
                "source": self.source}


def estimated(stack) -> Costs:
    layer = sum(p.numel() for p in stack.layer_modules[0].parameters())
    head = stack.lm_weight().numel()
    return Costs(1.0, head / layer, "layer", f"weights: {head:,} head vs {layer:,} per layer")


def _from_profile(path: Path, num_layers: int) -> Costs:
    data = json.loads(path.read_text())
    entries = [e for e in data.get("entries", []) if isinstance(e, dict) and e.get("phase") == "decode"]
    if not entries:
        raise ValueError("no decode entries")
    contexts = sorted({e.get("context") for e in entries if isinstance(e.get("context"), (int, float))})
    context = min(contexts, key=lambda c: abs(c - 256)) if contexts else None  # a typical prompt + reply
    ms = {}
    for e in entries:
        if e.get("context") == context and isinstance(e.get("median_ms"), (int, float)):
            ms[str(e.get("engine"))] = float(e["median_ms"])
    layers = [v for k, v in ms.items() if _LAYER.match(k)]
    if "head" not in ms or not layers:
        raise ValueError("no head or layer entries")
    return Costs(sum(layers) / len(layers), ms["head"], "ms",
                 f"{path} (decode, context {context}, median of {len(layers)}/{num_layers} layers)")


def costs_for(folder, stack, profile: Path | None = None) -> tuple[Costs, str]:
    """(costs, note): from ``profile`` or ``folder/profile.json`` when readable, else estimated from weights."""
    path = Path(profile) if profile else Path(folder) / "profile.json"
    if not path.exists():
        return estimated(stack), "no profile.json: costs estimated from weights"
    try:
        return _from_profile(path, stack.num_layers), ""
    except (ValueError, OSError, TypeError, AttributeError) as e:
        return estimated(stack), f"{path} unreadable as a cost table ({e}): costs estimated from weights"
