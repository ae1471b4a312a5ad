"""Build settings: target presets, the shape limits, and the prefill/decode optimisation profiles they imply.

The runtime passes the whole preallocated KV buffer as ``past`` at every step (capacity = prompt + new tokens), so:

- prefill: tokens 1..max_prompt, past 0..max_context;
- decode: tokens 1..max_decode_tokens (more than 1 for speculative verification), past 1..max_context.

``past_plus_tokens`` (the mask's key length) is past + tokens at each of min/opt/max, which keeps every profile point
a consistent shape (TensorRT checks the graph's broadcasts at each point).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from ...contract import PAST_LENGTH

GiB = 1 << 30


@dataclass(frozen=True)
class TargetPreset:
    name: str
    workspace_bytes: int
    optimization_level: int  # TensorRT builder optimisation level 0..5 (3 is TensorRT's default)
    precision: str  # what `dlexport build --model` exports and builds at unless --precision says otherwise
    max_batch: int
    max_prompt: int
    max_context: int
    why: str


PRESETS = {
    "jetson-orin": TargetPreset(
        "jetson-orin", 1 * GiB, 3, "float16", 1, 512, 2048,
        "Orin shares 8-64 GB between CPU and GPU: a small workspace leaves room for weights and KV cache; level 3 "
        "keeps builds on the Orin's CPU to minutes; fp16 runs on its tensor cores"),
    "datacenter": TargetPreset(
        "datacenter", 8 * GiB, 4, "float16", 8, 2048, 4096,
        "plenty of memory and fast CPUs: a larger workspace and level 4 buy faster tactics for a longer build"),
    "rtx": TargetPreset(
        "rtx", 4 * GiB, 3, "float16", 4, 1024, 4096,
        "TensorRT for RTX on consumer GPUs: kernels are compiled just in time on the GPU, the build itself is quick"),
}
DEFAULT_TARGET = {"tensorrt": "datacenter", "tensorrt-rtx": "rtx"}


@dataclass(frozen=True)
class ShapeLimits:
    max_batch: int
    max_prompt: int  # longest prompt processed in one prefill call
    max_context: int  # largest KV buffer: prompt + new tokens
    max_decode_tokens: int = 8  # new tokens per decode call (1, or k+1 for speculative verification)

    def check(self, max_positions: int) -> None:
        if min(self.max_batch, self.max_prompt, self.max_context, self.max_decode_tokens) < 1:
            raise ValueError(f"shape limits must be at least 1: {self}")
        if self.max_prompt > self.max_context:
            raise ValueError(f"--max-prompt {self.max_prompt} exceeds --max-context {self.max_context}: the KV buffer "
                             "holds the prompt, so raise --max-context or lower --max-prompt")
        if self.max_context > max_positions:
            raise ValueError(f"--max-context {self.max_context} exceeds the model's {max_positions} positions: "
                             "lower it")
        if self.max_decode_tokens > self.max_context:
            raise ValueError(f"--max-decode-tokens {self.max_decode_tokens} exceeds --max-context {self.max_context}")

    def points(self, inplace: bool = False) -> dict[str, dict[str, tuple[dict, dict, dict]]]:
        """Symbolic dim sizes at each profile's min, opt and max.

        Portable layers: ``past`` is the whole buffer (up to max_context) and the new tokens come on top of it.
        In-place layers: ``past`` is the filled length, the buffer (``capacity``) is static at max_context (see
        builder.py), and filled + new tokens never exceed it.
        """
        b, p, c, d = self.max_batch, self.max_prompt, self.max_context, self.max_decode_tokens
        opt_prompt = min(128, p)
        if inplace:
            prefill = ({"batch": 1, "tokens": 1, "past": 0}, {"batch": 1, "tokens": opt_prompt, "past": 0},
                       {"batch": b, "tokens": p, "past": c - p})
            decode = ({"batch": 1, "tokens": 1, "past": 1}, {"batch": 1, "tokens": 1, "past": max(1, c // 2)},
                      {"batch": b, "tokens": d, "past": c - d})
        else:
            prefill = ({"batch": 1, "tokens": 1, "past": 0},
                       {"batch": 1, "tokens": opt_prompt, "past": max(opt_prompt, c // 4)},
                       {"batch": b, "tokens": p, "past": c})
            decode = ({"batch": 1, "tokens": 1, "past": 1},
                      {"batch": 1, "tokens": 1, "past": max(1, c // 2)},
                      {"batch": b, "tokens": d, "past": c})
        for point in prefill + decode:
            point["past_plus_tokens"] = point["past"] + point["tokens"]
            point["capacity"] = c
        return {"prefill": prefill, "decode": decode}


PROFILE_NAMES = ("prefill", "decode")


def profiles_for(inputs: list[dict], limits: ShapeLimits) -> list[dict]:
    """engines.json profiles for one subgraph: [{"name", "shapes": {input: {"min", "opt", "max"}}}]."""
    out = []
    inplace = any(spec["name"] == PAST_LENGTH for spec in inputs)
    for name, (lo, opt, hi) in limits.points(inplace).items():
        shapes = {}
        for spec in inputs:
            def at(sizes, dims=spec["shape"]):
                return [sizes[d] if isinstance(d, str) else d for d in dims]

            shapes[spec["name"]] = {"min": at(lo), "opt": at(opt), "max": at(hi)}
        out.append({"name": name, "shapes": shapes})
    return out


def select_profile(profiles: list[dict], shapes: dict[str, tuple]) -> int:
    """Index of the profile a call runs under: decode for a few new tokens on a non-empty cache, else prefill.

    Falls back to any profile that holds the shapes; refuses shapes outside every profile with the limits to raise.
    """
    order = sorted(range(len(profiles)), key=lambda i: profiles[i]["name"] != "decode")

    def fits(i):
        return all(all(lo <= s <= hi for s, lo, hi in zip(shape, profiles[i]["shapes"][n]["min"],
                                                          profiles[i]["shapes"][n]["max"]))
                   for n, shape in shapes.items())

    for i in order:
        if fits(i):
            return i
    limits = {p["name"]: {n: s["max"] for n, s in p["shapes"].items()} for p in profiles}
    raise ValueError(f"input shapes {shapes} lie outside every optimisation profile of this engine (maxima: {limits}); "
                     "rebuild with larger --max-batch / --max-prompt / --max-context / --max-decode-tokens")


@dataclass(frozen=True)
class BuildSettings:
    """Everything that decides an engine's bytes besides the ONNX file and the TensorRT version."""
    flavour: str
    precision: str  # "float32", "float16", "bfloat16"
    target: str
    workspace_bytes: int
    optimization_level: int
    limits: ShapeLimits
    compute_capabilities: tuple[str, ...] = ()  # TensorRT for RTX targets; () = its defaults

    def to_json(self) -> dict:
        d = asdict(self)
        d["compute_capabilities"] = list(self.compute_capabilities)
        return d


def settings_for(flavour: str, precision: str, target: str | None = None, *, workspace_gib: float | None = None,
                 optimization_level: int | None = None, max_batch: int | None = None, max_prompt: int | None = None,
                 max_context: int | None = None, max_decode_tokens: int = 8, max_positions: int,
                 compute_capabilities: tuple[str, ...] = ()) -> BuildSettings:
    """A preset's values, overridden by what was given explicitly, checked against the model's context."""
    target = target or DEFAULT_TARGET[flavour]
    if target not in PRESETS:
        raise ValueError(f"unknown --target {target!r}; choose one of {', '.join(PRESETS)}")
    if target == "jetson-orin" and flavour == "tensorrt-rtx":
        raise ValueError("TensorRT for RTX does not run on Jetson (compute capability 8.7): build on the Orin with "
                         "standard TensorRT (`--backend tensorrt`, JetPack 6 ships TensorRT 10)")
    preset = PRESETS[target]
    level = preset.optimization_level if optimization_level is None else optimization_level
    if not 0 <= level <= 5:
        raise ValueError(f"--opt-level {level} is outside TensorRT's 0..5")
    # A preset's defaults give way to the model's context and to explicit limits; explicit limits are only checked.
    context = max_context or min(preset.max_context, max_positions)
    limits = ShapeLimits(max_batch or preset.max_batch, max_prompt or min(preset.max_prompt, context), context,
                         max_decode_tokens)
    limits.check(max_positions)
    workspace = preset.workspace_bytes if workspace_gib is None else int(workspace_gib * GiB)
    return BuildSettings(flavour, precision, target, workspace, level, limits, tuple(compute_capabilities))
