"""``dlexport bench``: end-to-end generation of a plan against the full model, Hugging Face ``generate`` and one
monolithic ONNX graph, interleaved in one process so that every speed is a ratio to the full model measured
alongside it (this matters on a shared machine, where absolute numbers drift by tens of percent).

Each run is a named ``RunSpec`` in a dict (``build_runs``): a strategy is one more entry. A runner takes a prompt
(token ids) and a token count and returns a ``Measured`` (the greedy tokens and when each became known).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..engines.threads import use_threads
from ..checks import integer
from ..errors import InputError
from ..manifest import Manifest
from ..runtime import Plan, Runtime
from .costs import CostTable
from .environment import describe_device, versions
from .stats import median, percentile

BASELINES = ("full", "hf", "onnx-mono", "llamacpp")
DEFAULT_BASELINES = ("full", "hf", "onnx-mono")  # llamacpp needs a GGUF


@dataclass
class Measured:
    tokens: list[int]
    stamps: list[float]  # perf_counter() when each new token was known
    start: float
    end: float
    layers_per_token: float

    @property
    def ttft_ms(self) -> float:
        return (self.stamps[0] - self.start) * 1e3

    @property
    def decode_ms(self) -> list[float]:
        return [(b - a) * 1e3 for a, b in zip(self.stamps, self.stamps[1:])]

    @property
    def tokens_per_s(self) -> float:
        return len(self.tokens) / (self.end - self.start)


Runner = Callable[[list[int], int], Measured]


@dataclass
class RunSpec:
    name: str
    kind: str  # "plan", "full", "hf", "onnx-mono" (and later strategies)
    run: Runner
    layers: tuple[int, ...] | None = None  # the stitched layers, for predictions from profile.json
    same_as_full: bool = False  # expected to reproduce the full model's greedy tokens exactly
    info: dict = field(default_factory=dict)  # settings worth recording next to the numbers


def folder_manifest(folder: Path | str) -> Manifest:
    """The export manifest of an export folder, or the one an engine folder's ``engines.json`` carries."""
    folder = Path(folder)
    if (folder / "engines.json").exists():
        from ..files import read_json

        return Manifest(folder, read_json(folder / "engines.json", "engine folder index")["manifest"])
    return Manifest.load(folder)


# -- runners --------------------------------------------------------------------------------------------------------
def stitched_runner(runtime: Runtime, plan: Plan, **strategy) -> Runner:
    def run(prompt, new_tokens):
        tokens, stamps, result = [], [], None
        start = time.perf_counter()
        for event in runtime.stream([prompt], new_tokens, plan, stop_tokens=[], **strategy):
            if event.result is None:
                tokens.append(event.tokens[0])
                stamps.append(time.perf_counter())
            else:
                result = event.result
        return Measured(tokens, stamps, start, time.perf_counter(), result.mean_layers)

    return run


def hf_runner(model, device: str) -> Runner:
    """``generate`` greedily for exactly ``new_tokens``; a logits processor stamps each step (it runs right after
    the forward pass that produced the token's logits)."""
    from transformers import LogitsProcessor, LogitsProcessorList

    model.generation_config.eos_token_id = None  # never stop early: every run produces the same count
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    num_layers = model.config.num_hidden_layers

    class Stamp(LogitsProcessor):
        def __init__(self):
            self.stamps = []

        def __call__(self, input_ids, scores):
            sync()
            self.stamps.append(time.perf_counter())
            return scores

    def run(prompt, new_tokens):
        stamp = Stamp()
        ids = torch.tensor([prompt], device=model.device)
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                                 logits_processor=LogitsProcessorList([stamp]))
        sync()
        end = time.perf_counter()
        return Measured(out[0, len(prompt):].tolist(), stamp.stamps, start, end, num_layers)

    return run


def mono_runner(mono) -> Runner:
    def run(prompt, new_tokens):
        start = time.perf_counter()
        tokens, stamps = mono.generate_timed(prompt, new_tokens)
        return Measured(tokens, stamps, start, time.perf_counter(), mono.num_layers)

    return run


def llamacpp_runner(gguf: Path, threads: int | None, context: int, num_layers: int) -> Runner:
    """llama.cpp in process (xllamacpp's ``Server``): greedy, exactly ``new_tokens`` (EOS ignored), no prompt cache;
    the stream stamps each token as it arrives and carries its id (``n_probs`` 1)."""
    from .llamacpp import open_server

    server = open_server(gguf, threads, context)

    def run(prompt, new_tokens):
        tokens, stamps = [], []

        def on_event(event):
            for choice in event.get("choices", []):
                for token in (choice.get("logprobs") or {}).get("content", []):
                    tokens.append(token["id"])
                    stamps.append(time.perf_counter())

        request = {"prompt": list(prompt), "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True,
                   "stream": True, "n_probs": 1, "cache_prompt": False}
        start = time.perf_counter()
        server.handle_completions(request, on_event)
        return Measured(tokens, stamps, start, time.perf_counter(), num_layers)

    return run


def _load_hf(manifest: Manifest, device: str):
    """The export's source model, checked to be the same weights (fingerprint), in the export's dtype."""
    from ..exporter.sources import load_source
    from ..manifest import model_fingerprint

    loaded = load_source(manifest.data["source"])
    if model_fingerprint(loaded.model) != manifest.fingerprint:
        raise InputError(f"the model {manifest.data['source']!r} loaded for the Hugging Face baseline is not the one "
                         f"exported to {manifest.folder} (fingerprints differ): re-export, or drop the hf and "
                         "onnx-mono baselines")
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[manifest.dtype]
    return loaded.model.to(dtype).to(device).eval()


def build_runs(folder: Path | str, plans: list[Plan], baselines=DEFAULT_BASELINES, *, device: str = "cpu",
               threads: int | None = None, mono_dir: Path | None = None, gguf: Path | None = None,
               context: int = 2048, compare=(), log=print) -> tuple[Runtime, dict[str, RunSpec]]:
    """The named runs: each plan, the full model (always: it is the reference of every ratio), then baselines,
    then the full model of each ``compare`` folder (another export of the same model, e.g. fp32 next to int4)."""
    unknown = sorted(set(baselines) - set(BASELINES))
    if unknown:
        raise InputError(f"unknown baseline(s) {unknown}; choose from {', '.join(BASELINES)}")
    if ("llamacpp" in baselines) != (gguf is not None):
        raise InputError("the llamacpp baseline and --gguf PATH go together: give both or neither")
    runtime = Runtime.load(folder, device=device, threads=threads)
    manifest = runtime.manifest
    runs: dict[str, RunSpec] = {}
    for i, plan in enumerate(plans):
        plan.check_model(manifest)
        name = plan.name or f"plan-{len(plan.layers)}of{manifest.num_layers}"
        if name in runs or name in BASELINES:
            name = f"{name}-{i}"
        runs[name] = RunSpec(name, "plan", stitched_runner(runtime, plan), tuple(plan.layers),
                             info={"layers": list(plan.layers), "early_exit": plan.exit is not None})
        whole = tuple(plan.layers) == tuple(range(manifest.num_layers))
        if plan.draft:  # self-speculative decoding reproduces the plan's own greedy tokens
            runs[f"{name}-speculative"] = RunSpec(f"{name}-speculative", "speculative",
                                                  stitched_runner(runtime, plan, strategy="speculative"),
                                                  same_as_full=whole and manifest.dtype == "float32",
                                                  info={"draft": list(plan.draft.layers), "k": plan.draft.k,
                                                        "adaptive": plan.draft.adaptive})
        if plan.ladder:
            runs[f"{name}-per-sequence"] = RunSpec(f"{name}-per-sequence", "per-sequence",
                                                   stitched_runner(runtime, plan, strategy="per-sequence"),
                                                   info={"ladder": [list(r) for r in plan.ladder],
                                                         "controller": "prompt"})
    full = Plan.full(manifest)
    exact = manifest.dtype == "float32"  # in fp16/bf16 a near-tie may legitimately flip a greedy token
    runs["full"] = RunSpec("full", "full", stitched_runner(runtime, full), tuple(full.layers), same_as_full=True)
    if "hf" in baselines:
        model = _load_hf(manifest, device)
        runs["hf"] = RunSpec("hf", "hf", hf_runner(model, device), same_as_full=exact,
                             info={"attention": model.config._attn_implementation, "dtype": str(model.dtype)})
    if "onnx-mono" in baselines:
        from .monolithic import MonolithicModel, ensure_monolithic

        def fresh_model():
            return _load_hf(manifest, "cpu")

        where = ensure_monolithic(manifest, fresh_model, mono_dir, log=log)
        runs["onnx-mono"] = RunSpec("onnx-mono", "onnx-mono",
                                    mono_runner(MonolithicModel(where, manifest, device=device, threads=threads)),
                                    same_as_full=exact, info={"graph": str(where / "model.onnx")})
    for other in map(Path, compare):
        rt = Runtime.load(other, device=device, threads=threads)
        if rt.manifest.fingerprint != manifest.fingerprint:
            raise InputError(f"--compare {other} holds another model (fingerprint {rt.manifest.fingerprint}, not "
                             f"{manifest.fingerprint}): compare exports of the same model")
        name = f"full:{other.name}"
        runs[name] = RunSpec(name, "compare", stitched_runner(rt, Plan.full(rt.manifest)),
                             info={"folder": str(other), "dtype": rt.manifest.dtype,  # no layers: not predicted
                                   "quantization": (rt.manifest.data.get("quantization") or {}).get("settings")})
    if "llamacpp" in baselines:
        if device != "cpu":
            raise InputError("the llamacpp baseline runs llama.cpp's CPU build: use --device cpu")
        runs["llamacpp"] = RunSpec("llamacpp", "llamacpp", llamacpp_runner(gguf, threads, context, manifest.num_layers),
                                   info={"gguf": str(Path(gguf).resolve()), "xllamacpp": _version("xllamacpp")})
    return runtime, runs


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


# -- the measurement ------------------------------------------------------------------------------------------------
@dataclass
class BenchResult:
    config: dict
    runs: dict[str, dict] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"format": "dlexport-bench", "version": 1, "config": self.config, "runs": self.runs}


def interleave(runs: dict[str, RunSpec], prompts: list[dict], new_tokens: int, repeats: int, *, warmup: int = 1,
               log=print) -> dict[str, list[Measured]]:
    """``repeats`` rounds; each round runs every spec once on the same prompt, in an order rotated per round so
    that no run always follows the same neighbour. Warm-up rounds are discarded."""
    names = list(runs)
    for _ in range(warmup):
        for name in names:
            runs[name].run(prompts[0]["ids"], new_tokens)
    records: dict[str, list[Measured]] = {n: [] for n in names}
    for r in range(repeats):
        prompt = prompts[r % len(prompts)]["ids"]
        k = r % len(names)
        for name in names[k:] + names[:k]:
            records[name].append(runs[name].run(prompt, new_tokens))
        log(f"  round {r + 1}/{repeats}: " + ", ".join(f"{n} {records[n][-1].tokens_per_s:.1f}" for n in names)
            + " tokens/s")
    return records


def _dist(values) -> dict:
    return {"median": median(values), "p90": percentile(values, 90)}


def summarise(runs: dict[str, RunSpec], records: dict[str, list[Measured]], num_layers: int) -> dict[str, dict]:
    full = records["full"]
    out = {}
    for name, ms in records.items():
        spec = runs[name]
        agree = [m.tokens == f.tokens for m, f in zip(ms, full)]
        matching = [sum(a == b for a, b in zip(m.tokens, f.tokens)) / len(f.tokens) for m, f in zip(ms, full)]
        out[name] = {
            "kind": spec.kind,
            "layers_per_token": median([m.layers_per_token for m in ms]),
            "fraction_of_layers": median([m.layers_per_token for m in ms]) / num_layers,
            "tokens_per_s": _dist([m.tokens_per_s for m in ms]),
            "ttft_ms": _dist([m.ttft_ms for m in ms]),
            "decode_ms_per_token": _dist([d for m in ms for d in m.decode_ms]),
            "speed_vs_full": _dist([m.tokens_per_s / f.tokens_per_s for m, f in zip(ms, full)]),
            "decode_speed_vs_full": _dist([median(f.decode_ms) / median(m.decode_ms) for m, f in zip(ms, full)]),
            "same_tokens_as_full": all(agree),
            "expected_same_tokens": spec.same_as_full,
            "token_agreement_with_full": median(matching),
            "per_round_tokens_per_s": [m.tokens_per_s for m in ms],
        }
    return out


def predictions(table: CostTable, layer_sets: dict[str, tuple[int, ...]], manifest: Manifest, prompt_tokens: int,
                new_tokens: int) -> dict[str, dict]:
    """Per named layer set (a stitched run): predicted prefill and decode-step ms from profile.json, and the
    tokens/s they imply ("full" is the reference of ``speed_vs_full``).

    Portable layers attend over the whole cache buffer (prompt + new tokens), so their decode steps are priced at that
    context; in-place layers attend over the filled part, priced at its mean (prompt + half the new tokens).
    """
    capacity = prompt_tokens + new_tokens if manifest.kv == "portable" else prompt_tokens + new_tokens // 2
    out = {}
    for name, layers in layer_sets.items():
        names = [manifest.layer_key(i) for i in layers]
        prefill = table.predict(names, prompt_tokens, "prefill")["total_ms"]
        decode = table.predict(names, capacity, "decode")["total_ms"]
        out[name] = {"prefill_ms": prefill, "decode_ms_per_token": decode,
                     "tokens_per_s": new_tokens / ((prefill + (new_tokens - 1) * decode) / 1e3)}
    if "full" in out:
        for p in out.values():
            p["speed_vs_full"] = p["tokens_per_s"] / out["full"]["tokens_per_s"]
    return out


def run_bench(folder: Path | str, plans: list[Plan], *, baselines=DEFAULT_BASELINES, prompt_tokens: int = 64,
              new_tokens: int = 64, repeats: int = 5, prompt_count: int = 3, threads: int | None = None,
              device: str = "cpu", profile: Path | None = None, mono_dir: Path | None = None, warmup: int = 1,
              extra_runs: Callable[[Runtime], dict[str, RunSpec]] | None = None, command: str = "",
              gguf: Path | None = None, compare=(), log=print) -> BenchResult:
    """Build the runs, interleave them, summarise, and add predictions when a profile is given.

    ``extra_runs(runtime)`` adds named runs (e.g. a decoding strategy) on the same loaded engines.
    """
    from .prompts import prose_prompts

    for name, value in (("--prompt-tokens", prompt_tokens), ("--new-tokens", new_tokens), ("--repeats", repeats),
                        ("--prompts", prompt_count)):
        integer(value, name, 1, 1 << 20)
    integer(warmup, "warmup", 0, 1 << 20)
    threads = use_threads(threads)
    runtime, runs = build_runs(folder, plans, baselines, device=device, threads=threads, mono_dir=mono_dir, gguf=gguf,
                               context=prompt_tokens + new_tokens + 16, compare=compare, log=log)
    for name, spec in (extra_runs(runtime) if extra_runs else {}).items():
        if name in runs:
            raise InputError(f"run name {name!r} is taken; give the extra run another name")
        runs[name] = spec
    manifest = runtime.manifest
    prompts = prose_prompts(prompt_count, prompt_tokens, runtime.tokenizer, manifest.arch["vocab_size"])
    log(f"benchmarking {', '.join(runs)}: {repeats} rounds of {prompt_tokens} prompt + {new_tokens} new tokens")
    records = interleave(runs, prompts, new_tokens, repeats, warmup=warmup, log=log)
    config = {
        "command": command, "folder": str(folder),
        "model": {"source": manifest.data.get("source"), "fingerprint": manifest.fingerprint,
                  "num_layers": manifest.num_layers, "dtype": manifest.dtype},
        "device": describe_device(device), "threads": threads, "versions": versions(),
        "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "repeats": repeats, "warmup_rounds": warmup,
        "batch": 1, "greedy": True,
        "prompts": [{"source": p["source"], "offset_tokens": p["offset_tokens"]} for p in prompts],
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "runs": {name: spec.info for name, spec in runs.items()},
    }
    result = BenchResult(config, summarise(runs, records, manifest.num_layers))
    if profile is not None:
        table = CostTable.load(profile)
        config["profile"] = {"path": str(profile), "tool": table.meta.get("tool"), "device": table.meta.get("device")}
        layer_sets = {name: spec.layers for name, spec in runs.items() if spec.layers is not None}
        for name, pred in predictions(table, layer_sets, manifest, prompt_tokens, new_tokens).items():
            result.runs[name]["predicted"] = pred
    return result
