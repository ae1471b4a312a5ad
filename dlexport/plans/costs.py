"""What a layer and a head check cost, for predicted speedups: measured (profile.json) or estimated from weights.

profile.json is written and read by ``dlexport.tools.costs.CostTable``; when it is missing or unusable the costs
fall back to the estimate, with the reason kept in ``Costs.source``. The estimate counts
multiply-accumulates per decode token: a layer's weights versus the head's vocabulary projection.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError


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


def _from_profile(path: Path, num_layers: int, context: int = 256) -> Costs:
    """Mean decode cost of the profiled layers and of the head, at ``context`` (a typical prompt + reply)."""
    from ..tools.costs import CostTable

    table = CostTable.load(path)
    layers = [e["engine"] for e in table.entries if e["phase"] == "decode" and e["engine"].startswith("layer_")]
    layers = list(dict.fromkeys(layers))
    if not layers:
        raise InputError("no decode entries for layer engines")
    layer_ms = sum(table.cost(name, "decode", context) for name in layers) / len(layers)
    return Costs(layer_ms, table.cost("head", "decode", context), "ms",
                 f"{path} (decode, context {context}, mean of {len(layers)}/{num_layers} layers)")


def costs_for(folder, stack, profile: Path | None = None) -> tuple[Costs, str]:
    """(costs, note): from ``profile`` or ``folder/profile.json`` when readable, else estimated from weights."""
    path = Path(profile) if profile else Path(folder) / "profile.json"
    if not path.exists():
        return estimated(stack), "no profile.json: costs estimated from weights"
    try:
        return _from_profile(path, stack.num_layers), ""
    except (ValueError, OSError, KeyError) as e:
        return estimated(stack), f"{path} unreadable as a cost table ({e}): costs estimated from weights"
