"""Build one TensorRT engine from one ONNX subgraph, with prefill and decode profiles, and describe it.

One builder per engine, released before the next: peak memory stays near one layer's. Standard TensorRT shares one
timing cache across every build (identical layers then reuse the first layer's tactic timings instead of timing
them again); the caller passes the cache in as bytes and persists what comes back.
"""
from __future__ import annotations

import gc
import time
from pathlib import Path

from ... import __version__
from ...contract import PAST_LENGTH
from ...errors import DlexportError
from .compat import Flavour, device_capability
from .config import BuildSettings, profiles_for


class EngineBuildError(DlexportError, RuntimeError):
    pass


def engine_metadata(flavour: Flavour, settings: BuildSettings, strongly_typed: bool, capabilities: tuple[str, ...],
                    device_name: str | None) -> dict:
    """What an engine was built with and for: compared at load time to refuse an engine that cannot run here."""
    return {
        "flavour": flavour.name,
        "version": flavour.version,
        "precision": settings.precision,
        "strongly_typed": strongly_typed,
        "target": settings.target,
        "compute_capabilities": list(capabilities),
        "device_name": device_name,
        "workspace_bytes": settings.workspace_bytes,
        "optimization_level": settings.optimization_level,
        "limits": settings.to_json()["limits"],
        "timing_cache": "shared" if flavour.has_timing_cache else "none (TensorRT for RTX compiles kernels at run time)",
        "dlexport": __version__,
    }


def build_engine(flavour: Flavour, onnx_path: Path, subgraph: dict, settings: BuildSettings, export_dtype: str,
                 timing_cache: bytes | None = None) -> tuple[bytes, list[dict], dict, bytes | None]:
    """Parse and build; returns (serialized engine, profiles, metadata, updated timing cache or None)."""
    trt = flavour.trt
    strongly_typed = flavour.strongly_typed_for(settings.precision, export_dtype)
    capability, device_name = None, None
    if not flavour.rtx:
        capability = device_capability()
        if capability is None:
            raise EngineBuildError("standard TensorRT builds on the GPU that will run the engines, and there is no "
                                   "CUDA GPU here: build on the target device (e.g. the Jetson itself)")
        import torch

        device_name = torch.cuda.get_device_name(0)
    logger = flavour.logger()
    builder = trt.Builder(logger)
    network = builder.create_network(flavour.network_flags(strongly_typed))
    parser = trt.OnnxParser(network, logger)
    inplace = any(i["name"] == PAST_LENGTH for i in subgraph.get("inputs", ()))
    try:
        parsed = (parser.parse(_static_capacity(onnx_path, settings.limits.max_context), str(onnx_path)) if inplace
                  else parser.parse_from_file(str(onnx_path)))
        if not parsed:
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            hint = ("This is an in-place KV layer (ONNX TensorScatter, opset 24): re-export with `dlexport export "
                    "--kv portable` for a TensorRT without that operator (TensorRT 10.3 on JetPack 6)"
                    if inplace else
                    "Re-export with the default opset, or report the operator it names")
            raise EngineBuildError(f"{flavour.name} {flavour.version} cannot parse {onnx_path}: {errors}. {hint}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_bytes)
        config.builder_optimization_level = settings.optimization_level
        flavour.set_precision(config, settings.precision, strongly_typed)
        capabilities = flavour.set_capabilities(config, settings.compute_capabilities) or (capability,)
        cache = _timing_cache(config, timing_cache) if flavour.has_timing_cache else None
        profiles = profiles_for(subgraph["inputs"], settings.limits)
        network_inputs = {network.get_input(i).name for i in range(network.num_inputs)}
        for p in profiles:
            profile = builder.create_optimization_profile()
            for name, s in p["shapes"].items():
                if name in network_inputs:  # an input the graph ignores is dropped by the parser
                    profile.set_shape(name, s["min"], s["opt"], s["max"])
            if config.add_optimization_profile(profile) < 0:
                raise EngineBuildError(f"{flavour.name} refused the {p['name']} profile of {onnx_path}: {p['shapes']}")
        t0 = time.perf_counter()
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise EngineBuildError(f"{flavour.name} {flavour.version} failed to build {onnx_path} (its log above says "
                                   "why); a smaller --max-context / --max-batch or a larger --workspace may help")
        engine_bytes = bytes(memoryview(serialized))
        new_cache = bytes(memoryview(cache.serialize())) if cache is not None else None
        metadata = engine_metadata(flavour, settings, strongly_typed, tuple(c for c in capabilities if c), device_name)
        metadata["optimization_profiles"] = config.num_optimization_profiles  # as TensorRT counted them
        metadata["build_seconds"] = round(time.perf_counter() - t0, 3)
        return engine_bytes, profiles, metadata, new_cache
    finally:
        del parser, network, builder
        gc.collect()


def _timing_cache(config, previous: bytes | None):
    """The shared timing cache on ``config``; a fresh one when TensorRT rejects the previous (other version or GPU)."""
    if previous:
        try:
            cache = config.create_timing_cache(previous)
            if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
                return cache
        except (RuntimeError, TypeError, ValueError):
            pass
    cache = config.create_timing_cache(b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    return cache


def _static_capacity(onnx_path: Path, capacity: int) -> bytes:
    """An in-place layer with its KV buffer's ``capacity`` dim fixed: TensorRT's KV_CACHE_UPDATE needs a static
    sequence dimension. The runtime then allocates every request's buffer at this capacity (attention still reads
    only the filled part, so the fixed size costs memory, not time). Weights stay in the export's data file."""
    import onnx

    from ...contract import CAPACITY

    model = onnx.load(str(onnx_path), load_external_data=False)
    for value in list(model.graph.input) + list(model.graph.output):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param == CAPACITY:
                dim.dim_value = capacity
    return model.SerializeToString()
