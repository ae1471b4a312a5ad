"""``dlexport profile``: the latency of every engine for a prefill and a decode step at each context length.

Two tools fill the same table (``costs.CostTable``): ``builtin`` times the engines through dlexport's own engine
interface (any backend, CPU or CUDA), ``trtexec`` runs TensorRT's benchmark on each serialized engine.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from ..contract import PAST_LENGTH, is_inplace, past_for_present
from ..engines import open_engines
from ..engines.base import TORCH_DTYPES, Engine
from ..engines.threads import use_threads
from ..errors import InputError
from ..files import read_json
from .costs import PHASES, CostTable, phase_shape
from .environment import profile_meta
from .stats import summary_ms

DEFAULT_CONTEXTS = (128, 512, 1024)
TOOLS = ("builtin", "trtexec")


def bound_outputs(engine: Engine, feeds: dict) -> dict | None:
    """An in-place layer's present outputs bound to its past buffers, as the runtime binds them."""
    if not is_inplace(engine.inputs):
        return None
    return {o.name: feeds[past_for_present(o.name)] for o in engine.outputs if o.name.startswith("present.")}


def feeds_for(engine: Engine, phase: str, context: int, vocab_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Inputs of the shapes the runtime would feed (``costs.phase_shape``); values are random but well-formed."""
    dims = phase_shape(phase, context, engine.name, inplace=is_inplace(engine.inputs))
    gen = torch.Generator().manual_seed(seed)
    feeds = {}
    for spec in engine.inputs:
        shape = [dims[d] if isinstance(d, str) else d for d in spec.shape]
        if spec.name == "input_ids":
            t = torch.randint(0, vocab_size, shape, generator=gen)
        elif spec.name == "position_ids":
            t = torch.arange(context - shape[1], context).clamp(min=0).expand(*shape).contiguous()
        elif spec.name == PAST_LENGTH:
            t = torch.full(shape, dims["past_length"], dtype=torch.int64)
        elif spec.name == "attention_mask":
            t = torch.zeros(shape, dtype=TORCH_DTYPES[spec.dtype])  # every slot visible: the cost is the same
        else:
            t = (torch.randn(shape, generator=gen) * 0.1).to(TORCH_DTYPES[spec.dtype])
        feeds[spec.name] = t.to(engine.device)
    return feeds


def profile_builtin(folder: Path | str, contexts=DEFAULT_CONTEXTS, *, device: str = "cpu", threads: int | None = None,
                    min_runs: int = 5, min_seconds: float = 0.2, max_runs: int = 100, warmup: int = 1,
                    log=print) -> CostTable:
    """Time each engine's ``run`` (synchronised on CUDA) over the engine interface, as the runtime calls it.

    Per phase and context the engines are called in rounds, each once per round in model order, as a generation
    step calls them: calling one engine back to back would keep its weights in the CPU caches and underestimate a
    memory-bound decode step (about 2x for SmolLM2 on a CPU). Shapes outside a built engine's optimization
    profiles (engine folders record them) are skipped, not failed.
    """
    from .trtexec import concrete_shapes, select_profile

    threads = use_threads(threads)
    manifest, engines = open_engines(Path(folder), device=device, threads=threads)
    index = Path(folder) / "engines.json"
    built = read_json(index, "engine folder index") if index.exists() else {"backend": "onnxruntime", "engines": {}}
    vocab = manifest.arch["vocab_size"]
    sync = torch.cuda.synchronize if device.startswith("cuda") or device == "tensorrt" else (lambda: None)
    entries, skipped = [], []
    for context in contexts:
        for phase in PHASES:
            t0 = time.perf_counter()
            feeds = {}
            for name, engine in engines.items():
                profiles = built["engines"].get(name, {}).get("profiles") or []
                shapes = concrete_shapes(engine.inputs, phase_shape(phase, context, name, is_inplace(engine.inputs)))
                if profiles and select_profile(profiles, phase, shapes) is None:
                    skipped.append({"engine": name, "phase": phase, "context": context,
                                    "reason": "shapes outside every optimization profile of the engine"})
                else:
                    feeds[name] = feeds_for(engine, phase, context, vocab)
            samples = {name: [] for name in feeds}
            outs = {name: bound_outputs(engines[name], f) for name, f in feeds.items()}
            rounds = 0
            while rounds < warmup + max_runs and (rounds < warmup + min_runs
                                                  or time.perf_counter() - t0 < min_seconds * len(feeds)):
                for name, f in feeds.items():
                    sync()
                    start = time.perf_counter()
                    engines[name].run(f, outs[name])
                    sync()
                    if rounds >= warmup:
                        samples[name].append((time.perf_counter() - start) * 1e3)
                rounds += 1
            for name, times in samples.items():
                dims = phase_shape(phase, context, name, is_inplace(engines[name].inputs))
                entries.append({"engine": name, "phase": phase, "context": context, "tokens": dims["tokens"],
                                "past": dims.get("past", dims.get("past_length")), **summary_ms(times)})
            log(f"  {phase} at context {context}: {rounds - warmup} rounds, {time.perf_counter() - t0:.1f} s")
    meta = profile_meta(manifest, folder, "builtin", device, built["backend"], contexts)
    meta.update({"threads": threads, "timing": "engines called in rounds, once each per round, in model order"})
    return CostTable(entries, meta, skipped)


def run_profile(folder: Path | str, *, tool: str = "builtin", contexts=DEFAULT_CONTEXTS, device: str = "cpu",
                threads: int | None = None, cuda_graph: bool = False, log=print) -> CostTable:
    """Dispatch to the chosen tool; ``trtexec`` needs an engine folder and the ``trtexec`` binary."""
    if tool not in TOOLS:
        raise InputError(f"unknown profiling tool {tool!r}; choose one of {', '.join(TOOLS)}")
    if tool == "trtexec":
        from .trtexec import profile_trtexec

        return profile_trtexec(folder, contexts, device=device, cuda_graph=cuda_graph, log=log)
    return profile_builtin(folder, contexts, device=device, threads=threads, log=log)
