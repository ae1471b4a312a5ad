"""``profile.json``: the measured cost of every engine per phase and context, and what a plan is predicted to cost.

Written by ``dlexport profile`` (either tool); read by the plan tools, the runtime's cost estimate and the benchmark.
Shapes behind each entry (batch 1, the runtime's KV convention: a layer gets the whole cache buffer as ``past``):

- ``prefill`` at context C: ``tokens`` = C new tokens, ``past`` = a C-slot buffer. The head always gets 1 token
  (the runtime only projects the last position).
- ``decode`` at context C: 1 new token, ``past`` = a C-slot buffer.

The runtime sizes its buffer to prompt + max_new_tokens, so with portable layers a decode step of such a request
costs the ``decode`` entry at that capacity, whatever the current length. In-place layers (exporter/kv_inplace.py)
attend over the filled slots only: ``decode`` at C is C filled slots + 1 new token, ``prefill`` at C is C new tokens
into an empty buffer, and a decode step costs the entry at its current length.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CorruptFileError, InputError
from ..files import read_json, write_json_atomic

FORMAT, VERSION = "dlexport-profile", 1
PHASES = ("prefill", "decode")


def phase_shape(phase: str, context: int, engine: str, inplace: bool = False) -> dict:
    """The symbolic dimension values an engine is timed with for ``phase`` at ``context`` (see module docstring),
    plus ``past_length`` (the value of an in-place layer's input of that name)."""
    if phase not in PHASES:
        raise InputError(f"unknown phase {phase!r}; choose one of {', '.join(PHASES)}")
    if context < 1:
        raise InputError(f"context {context} must be at least 1 token")
    tokens = context if phase == "prefill" and engine != "head" else 1
    if inplace:
        filled = 0 if phase == "prefill" else context
        return {"batch": 1, "tokens": tokens, "capacity": filled + tokens, "past_plus_tokens": filled + tokens,
                "past_length": filled}
    return {"batch": 1, "tokens": tokens, "past": context, "past_plus_tokens": context + tokens}


@dataclass
class CostTable:
    """Median and p90 latency (ms) per (engine, phase, context), plus where and how they were measured."""

    entries: list[dict]
    meta: dict = field(default_factory=dict)
    skipped: list[dict] = field(default_factory=list)

    # -- files ----------------------------------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {"format": FORMAT, "version": VERSION, **self.meta, "entries": self.entries, "skipped": self.skipped}

    def save(self, path: Path | str) -> None:
        write_json_atomic(Path(path), self.to_json())

    @classmethod
    def load(cls, path: Path | str) -> "CostTable":
        data = read_json(Path(path), "profile")
        if data.get("format") != FORMAT:
            raise CorruptFileError(f"{path} is not a dlexport profile (format {data.get('format')!r}); create one with "
                             "`dlexport profile DIR`")
        if data.get("version") != VERSION:
            raise CorruptFileError(f"{path} has profile version {data.get('version')}, this dlexport reads {VERSION}: "
                             "re-run `dlexport profile`")
        meta = {k: v for k, v in data.items() if k not in ("format", "version", "entries", "skipped")}
        return cls(data["entries"], meta, data.get("skipped", []))

    # -- queries --------------------------------------------------------------------------------------------------
    @property
    def contexts(self) -> list[int]:
        return sorted({e["context"] for e in self.entries})

    def cost(self, engine: str, phase: str, context: int, stat: str = "median_ms") -> float:
        """Cost of one call, linearly interpolated between profiled contexts and clamped outside them.

        Clamping keeps a prediction finite where the profile is short; profile the contexts you ask about for
        numbers you can trust.
        """
        points = sorted((e["context"], e[stat]) for e in self.entries if e["engine"] == engine and e["phase"] == phase)
        if not points:
            raise KeyError(f"the profile has no {phase} entry for engine {engine!r}: re-run `dlexport profile` on "
                           "the folder this engine comes from")
        if context <= points[0][0]:
            return points[0][1]
        for (c0, v0), (c1, v1) in zip(points, points[1:]):
            if context <= c1:
                return v0 + (v1 - v0) * (context - c0) / (c1 - c0)
        return points[-1][1]

    def predict(self, layer_engines, context: int, phase: str = "decode", stat: str = "median_ms") -> dict:
        """Predicted ms of one step of a plan: embedding + its layers + head (engine names, e.g. ``layer_07``)."""
        parts = {"embed": self.cost("embed", phase, context, stat),
                 "layers": sum(self.cost(name, phase, context, stat) for name in layer_engines),
                 "head": self.cost("head", phase, context, stat)}
        return {**parts, "total_ms": sum(parts.values()), "context": context, "phase": phase}

    def predict_plan(self, plan, manifest, context: int, phase: str = "decode", stat: str = "median_ms") -> dict:
        """``predict`` for a ``Plan`` (its layer list; an early-exit plan's cost is its upper bound)."""
        return self.predict([manifest.layer_key(i) for i in plan.layers], context, phase, stat)

    def markdown(self) -> str:
        """One row per engine, one column pair (median / p90 ms) per phase and context."""
        cols = [(p, c) for p in PHASES for c in self.contexts]
        index = {(e["engine"], e["phase"], e["context"]): e for e in self.entries}
        engines = list(dict.fromkeys(e["engine"] for e in self.entries))
        head = "| engine | " + " | ".join(f"{p} {c} median / p90 ms" for p, c in cols) + " |"
        lines = [head, "|" + "---|" * (len(cols) + 1)]
        for name in engines:
            cells = []
            for p, c in cols:
                e = index.get((name, p, c))
                cells.append(f"{e['median_ms']:.3f} / {e['p90_ms']:.3f}" if e else "-")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        return "\n".join(lines)
