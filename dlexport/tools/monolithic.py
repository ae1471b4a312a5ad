"""Baseline: the whole model as ONE ONNX graph, with the same KV convention as the per-layer subgraphs.

Inputs ``input_ids``, ``position_ids``, ``attention_mask`` (plus ``sliding_attention_mask`` for the sliding-window
layers, where there are any) and every layer's ``past_key_values.N.key/value`` (the
whole preallocated buffer); outputs the last position's ``logits`` and every layer's ``present.N.key/value`` (new
tokens only). It gets the per-layer in-place graphs' opset-23 fusions (RMSNormalization, RotaryEmbedding:
``exporter/fusions.py``), so that stitching is compared with the best single graph of the same ops. Its loop is
deliberately minimal (one engine call per token, greedy), so the benchmark can tell what
stitching per-layer engines costs against a single graph in the same runtime (ONNX Runtime, same threads).
"""
from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from ..engines.onnxruntime import OrtConfig, OrtEngine
from ..engines.base import TORCH_DTYPES
from ..exporter.architectures import (TensorSpec, architecture_for, past_key_name, past_value_name,
                                      present_key_name, present_value_name)
from ..exporter.architectures.base import BATCH, KEYS, PAST, TOKENS
from ..exporter.fusions import FUSED_OPSET, fuse_standard_ops
from ..exporter.onnx_export import DEFAULT_OPSET, Subgraph, example_inputs
from ..files import OwnedFolder, cache_dir, read_json, write_json_atomic
from ..manifest import Manifest
from ..runtime.kv_cache import KVCache

FILE, INFO = "model.onnx", "monolithic.json"


SLIDING_MASK = "sliding_attention_mask"  # an input only where some layers attend within a sliding window


def sliding_window(layer_windows) -> int | None:
    """The one window of the model's sliding-window layers (Hugging Face configs have one), None without any."""
    windows = {w for w in layer_windows if w is not None}
    if len(windows) > 1:
        raise ValueError(f"layers with different sliding windows {sorted(windows)}: the monolithic baseline takes one")
    return next(iter(windows), None)


class _Whole(nn.Module):
    """embed -> every layer -> head on the last position, as one function of tensors."""

    def __init__(self, arch):
        super().__init__()
        self.arch = arch
        self.windowed = sliding_window(arch.numbers.layer_windows) is not None
        self.embed = arch.embed_module()
        self.layers = nn.ModuleList(arch.layer_module(i) for i in range(arch.numbers.num_layers))
        self.head = arch.head_module()

    def forward(self, input_ids, position_ids, attention_mask, *rest):
        sliding_mask, past = (rest[0], rest[1:]) if self.windowed else (None, rest)
        hidden, rotary = self.arch.split_embed(self.embed(input_ids, position_ids))
        presents = []
        for i, layer in enumerate(self.layers):
            mask = attention_mask if layer.window is None else sliding_mask
            hidden, key, value = layer.step(hidden, mask, rotary, past[2 * i], past[2 * i + 1])
            presents += [key, value]
        return (self.head(hidden[:, -1:]), *presents)


def io_specs(arch) -> tuple[list[TensorSpec], list[TensorSpec]]:
    n, f = arch.numbers, arch.float_dtype()
    kv, new_kv = (BATCH, n.num_kv_heads, PAST, n.head_dim), (BATCH, n.num_kv_heads, TOKENS, n.head_dim)
    inputs = [TensorSpec("input_ids", (BATCH, TOKENS), "int64"), TensorSpec("position_ids", (BATCH, TOKENS), "int64"),
              TensorSpec("attention_mask", (BATCH, 1, TOKENS, KEYS), f)]
    if sliding_window(n.layer_windows) is not None:
        inputs.append(TensorSpec(SLIDING_MASK, (BATCH, 1, TOKENS, KEYS), f))
    outputs = [TensorSpec("logits", (BATCH, 1, n.vocab_size), f)]
    for i in range(n.num_layers):
        inputs += [TensorSpec(past_key_name(i), kv, f), TensorSpec(past_value_name(i), kv, f)]
        outputs += [TensorSpec(present_key_name(i), new_kv, f), TensorSpec(present_value_name(i), new_kv, f)]
    return inputs, outputs


def export_monolithic(model: nn.Module, out: Path | str, fingerprint: str, *, opset: int = DEFAULT_OPSET) -> Path:
    """Export ``model`` (already in its dtype, eval) to ``out/model.onnx`` with its I/O recorded in ``monolithic.json``.

    ``fingerprint`` is the per-layer export's, which the caller has checked these weights against. Call it on a
    model nobody else uses: the architecture wrapper switches the config to eager attention.
    """
    import onnx_ir as ir

    out = Path(out)
    arch = architecture_for(model)
    inputs, outputs = io_specs(arch)
    sub = Subgraph("monolithic", FILE, _Whole(arch), inputs, outputs)
    dims = {BATCH: torch.export.Dim("batch", min=1, max=4096), TOKENS: torch.export.Dim("tokens", min=1, max=1 << 16),
            PAST: torch.export.Dim("past", min=0, max=1 << 16), KEYS: torch.export.Dim.AUTO}
    shapes = [{i: dims[d] for i, d in enumerate(s.shape) if isinstance(d, str)} for s in inputs]
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(sub.module, example_inputs(arch, sub), dynamo=True,
                                    dynamic_shapes=(shapes[0], shapes[1], shapes[2], tuple(shapes[3:])),
                                    input_names=[s.name for s in inputs], output_names=[s.name for s in outputs],
                                    opset_version=opset, verbose=False)
    fuse_standard_ops(program.model)
    graph = program.model.graph
    for value, spec in zip(list(graph.inputs) + list(graph.outputs), inputs + outputs):
        value.shape = ir.Shape([ir.SymbolicDim(d) if isinstance(d, str) else d for d in spec.shape])
    out.mkdir(parents=True, exist_ok=True)
    program.save(str(out / FILE), external_data=None)
    write_json_atomic(out / INFO, {"fingerprint": fingerprint, "dtype": arch.float_dtype(), "opset": opset,
                                   "fused_opset": FUSED_OPSET,
                                   "inputs": [s.to_json() for s in inputs], "outputs": [s.to_json() for s in outputs]})
    return out / FILE


def default_dir(manifest: Manifest) -> Path:
    return cache_dir() / "monolithic" / f"{manifest.fingerprint}-{manifest.dtype}-opset{manifest.data['opset']}-fused{FUSED_OPSET}"


def ensure_monolithic(manifest: Manifest, model_factory, folder: Path | None = None, log=print) -> Path:
    """The monolithic export of ``manifest``'s model in ``folder`` (a cache by default), exported once.

    ``model_factory()`` returns a fresh copy of the same weights in the export's dtype (only called when needed).
    """
    folder = Path(folder) if folder else default_dir(manifest)
    info = folder / INFO
    if info.exists() and (folder / FILE).exists():
        data = read_json(info, "monolithic export info")
        if (data.get("fingerprint"), data.get("dtype"), data.get("opset"), data.get("fused_opset")) == (
                manifest.fingerprint, manifest.dtype, manifest.data["opset"], FUSED_OPSET):
            return folder
    own = OwnedFolder.claim(folder, "monolithic export", [manifest.fingerprint, manifest.dtype, manifest.data["opset"]],
                            overwrite=True, inputs=[manifest.folder], what="--mono-dir")
    own.add(FILE, FILE + ".data", INFO)
    log(f"exporting the monolithic baseline graph to {folder} (once per model)")
    t0 = time.perf_counter()
    export_monolithic(model_factory(), folder, manifest.fingerprint, opset=manifest.data["opset"])
    log(f"  done in {time.perf_counter() - t0:.0f} s")
    return folder


class MonolithicModel:
    """The monolithic graph in ONNX Runtime with the runtime's KV buffers; greedy only."""

    def __init__(self, folder: Path | str, manifest: Manifest, *, device: str = "cpu", threads: int | None = None):
        folder = Path(folder)
        data = read_json(folder / INFO, "monolithic export info")
        provider = "cuda" if device.startswith("cuda") else "cpu"
        config = OrtConfig(provider=provider, threads=threads,
                           device_id=int(device.split(":")[1]) if ":" in device else 0)
        self.engine = OrtEngine("monolithic", folder / FILE, [TensorSpec.from_json(s) for s in data["inputs"]],
                                [TensorSpec.from_json(s) for s in data["outputs"]], config)
        a = manifest.arch
        self.num_layers, self.kv_heads, self.head_dim = a["num_layers"], a["num_kv_heads"], a["head_dim"]
        self.dtype, self.device = TORCH_DTYPES[manifest.dtype], self.engine.device
        self.window = sliding_window(a.get("layer_windows") or ())

    def _step(self, cache: KVCache, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        cache.new_step()
        tokens = ids.shape[1]
        feeds = {"input_ids": ids, "position_ids": positions, "attention_mask": cache.mask(cache.length[0], tokens)}
        if self.window is not None:
            feeds[SLIDING_MASK] = cache.mask(cache.length[0], tokens, self.window)
        for i in range(self.num_layers):
            feeds[past_key_name(i)], feeds[past_value_name(i)] = cache.key[i], cache.value[i]
        out = self.engine.run(feeds)
        for i in range(self.num_layers):
            cache.write(i, out[present_key_name(i)], out[present_value_name(i)])
        return out["logits"][:, -1].argmax(-1)

    def generate_timed(self, prompt: list[int], new_tokens: int) -> tuple[list[int], list[float]]:
        """Greedy tokens and the perf_counter time at which each was known (index 0 = after prefill)."""
        with torch.inference_mode():
            cache = KVCache(range(self.num_layers), 1, self.kv_heads, len(prompt) + new_tokens, self.head_dim,
                            self.dtype, self.device)
            cache.valid[:] = True
            ids = torch.tensor([prompt], device=self.device)
            token = self._step(cache, ids, torch.arange(len(prompt), device=self.device)[None])
            tokens, stamps = [int(token)], [time.perf_counter()]
            for n in range(1, new_tokens):
                pos = torch.tensor([[len(prompt) + n - 1]], device=self.device)
                token = self._step(cache, token.view(1, 1), pos)
                tokens.append(int(token))
                stamps.append(time.perf_counter())
        return tokens, stamps
