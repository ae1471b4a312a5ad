"""Export a model to per-subgraph ONNX files, one at a time, resumably (``pipeline.export`` validates them after)."""
from __future__ import annotations

import logging
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import __version__
from ..errors import DlexportError, FolderError, InputError
from ..files import Journal, OwnedFolder, is_whole, read_json, sha256_file
from ..manifest import FORMAT, FORMAT_VERSION, MANIFEST, Manifest, layer_name, model_fingerprint
from .architectures import Architecture, TensorSpec, architecture_for
from ..contract import KV_FLAVOURS, PAST_LENGTH
from .fusions import fuse_standard_ops
from .kv_inplace import inplace_io, make_inplace
from .sources import LoadedModel, load_model

DEFAULT_OPSET = 18  # plain MatMul/Softmax: parsed by TensorRT 10.3 (JetPack 6) as well as 10.x/11.x and ORT
JOURNAL = ".export-progress.json"
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


ExportDirError = FolderError  # the name older code catches


@dataclass
class Subgraph:
    name: str  # "embed", "layer_07", "head"
    file: str  # relative to the export folder
    module: torch.nn.Module
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    index: int | None = None  # the layer's index, for layer subgraphs


def subgraphs(arch: Architecture, kv: str = "portable") -> list[Subgraph]:
    """The subgraphs with the I/O they are exported with (``kv="inplace"``: layers as kv_inplace.py rewrites them)."""
    n = arch.numbers.num_layers
    out = [Subgraph("embed", "embed.onnx", arch.embed_module(), *arch.embed_io())]
    for i in range(n):
        name = layer_name(i, n)
        io = arch.layer_io(i)
        out.append(Subgraph(name, f"layers/{name}.onnx", arch.layer_module(i),
                            *(inplace_io(*io, i) if kv == "inplace" else io), index=i))
    out.append(Subgraph("head", "head.onnx", arch.head_module(), *arch.head_io()))
    return out


def example_inputs(arch: Architecture, sub: Subgraph, batch=2, tokens=3, past=5) -> tuple:
    """Export-time examples; sizes are not 0 or 1 so that torch.export keeps every dimension dynamic."""
    n, dtype = arch.numbers, next(arch.model.parameters()).dtype
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    values = []
    for spec in sub.inputs:
        sizes = {"batch": batch, "tokens": tokens, "past": past, "past_plus_tokens": past + tokens}
        shape = [sizes.get(d, d) for d in spec.shape]
        if spec.name == "input_ids":
            values.append(torch.randint(0, n.vocab_size, shape, generator=gen))
        elif spec.name == "position_ids":
            values.append(torch.arange(past, past + tokens).expand(batch, tokens).contiguous())
        elif spec.name == "attention_mask":
            values.append(torch.zeros(shape, dtype=dtype))
        else:
            values.append(rand(*shape))
    return tuple(values)


def _dynamic_shapes(sub: Subgraph) -> tuple:
    dims = {
        "batch": torch.export.Dim("batch", min=1, max=4096),
        "tokens": torch.export.Dim("tokens", min=1, max=1 << 16),
        "past": torch.export.Dim("past", min=0, max=1 << 16),
        "past_plus_tokens": torch.export.Dim.AUTO,  # torch.export derives it from past and tokens
    }
    shapes = [{i: dims[d] for i, d in enumerate(s.shape) if isinstance(d, str)} for s in sub.inputs]
    if sub.name.startswith("layer_"):
        return (shapes[0], shapes[1], tuple(shapes[2:]))  # the layer wrapper's forward(hidden, mask, *rest)
    return tuple(shapes)


def _name_io(model, sub: Subgraph) -> None:
    """Give graph inputs/outputs the contract's names and dimension names (torch.export calls some dims s43, s20 +
    s69); a layer graph made from another layer's trace gets its own ``past_key_values.N``/``present.N`` names."""
    import onnx_ir as ir

    for value, spec in zip(list(model.graph.inputs) + list(model.graph.outputs), sub.inputs + sub.outputs):
        value.name = spec.name
        value.shape = ir.Shape([ir.SymbolicDim(d) if isinstance(d, str) else d for d in spec.shape])


def _trace(arch: Architecture, sub: Subgraph, opset: int):
    """torch.export + ONNX translation, unoptimised: weights stay initializers named by their parameter."""
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            sub.module,
            example_inputs(arch, sub),
            dynamo=True,
            dynamic_shapes=_dynamic_shapes(sub),
            input_names=[s.name for s in sub.inputs],
            output_names=[s.name for s in sub.outputs],
            opset_version=opset,
            optimize=False,
            verbose=False,
        )
    return program.model


class LayerTraces:
    """Fast export: one trace per distinct layer structure (``Architecture.layer_structure``); every other layer of
    that structure gets a copy of the traced graph with its own weights put in as initializers.

    Tracing dominates export time (seconds per layer) while the layers of a model differ only in weights. A layer
    whose parameters do not all appear as initializers of the trace is traced itself; validation checks every
    layer graph against its own PyTorch module either way.
    """

    def __init__(self, arch: Architecture, opset: int):
        self.arch, self.opset = arch, opset
        self._traces: dict = {}
        self.traced = self.reused = 0

    def graph(self, sub: Subgraph):
        key = self.arch.layer_structure(sub.index)
        trace = self._traces.get(key)
        if trace is not None:
            model = self._with_weights(trace, sub.module)
            if model is not None:
                self.reused += 1
                return model
        model = _trace(self.arch, sub, self.opset)
        self.traced += 1
        self._traces.setdefault(key, model)
        return model.clone()  # optimising works on the copy; the trace stays unoptimised for the next layers

    @staticmethod
    def _with_weights(trace, module: torch.nn.Module):
        import onnx_ir as ir

        tensors = dict(module.named_parameters()) | dict(module.named_buffers())
        inits = trace.graph.initializers
        if any(name not in inits or tuple(inits[name].shape) != tuple(t.shape) for name, t in tensors.items()):
            return None
        model = trace.clone()  # shares the tensors of the trace until they are replaced here
        for name, value in model.graph.initializers.items():
            if name in tensors:
                value.const_value = ir.tensor(tensors[name].detach(), name=name)
        return model


def export_subgraph(arch: Architecture, sub: Subgraph, path: Path, opset: int,
                    traces: LayerTraces | None = None) -> None:
    """Trace ``sub`` (a layer: reuse a trace of its structure from ``traces``), optimise it as torch.onnx.export does
    (constant folding), name its I/O and save it (inline below the 2 GB protobuf limit, external data above).

    An in-place layer (kv_inplace.py) is traced with the portable I/O, given opset 23's fused RMSNormalization and
    RotaryEmbedding (fusions.py) and rewritten after saving."""
    inplace = any(s.name == PAST_LENGTH for s in sub.inputs)
    if inplace:
        sub = Subgraph(sub.name, sub.file, sub.module, *arch.layer_io(sub.index), index=sub.index)
    model = traces.graph(sub) if traces is not None and sub.index is not None else _trace(arch, sub, opset)
    program = torch.onnx.ONNXProgram(model, None)
    program.optimize()
    _name_io(program.model, sub)
    if inplace:
        fuse_standard_ops(program.model)
    path.parent.mkdir(parents=True, exist_ok=True)
    program.save(str(path), external_data=None)
    if inplace:
        make_inplace(path, sub.index)


def _files_of(folder: Path, rel: str) -> list[dict]:
    files = [rel] + ([rel + ".data"] if (folder / (rel + ".data")).exists() else [])
    return [{"path": f, "size": (folder / f).stat().st_size, "sha256": sha256_file(folder / f)} for f in files]


def _legacy_export(folder: Path):
    """An export written before ownership markers: its identity and the files its manifest accounts for."""
    data = Manifest.load(folder).data
    files = [f["path"] for s in data["subgraphs"].values() for f in s["files"]] + [MANIFEST, JOURNAL, "profile.json"]
    if data.get("tokenizer"):
        files += [p.relative_to(folder).as_posix() for p in (folder / "tokenizer").rglob("*") if p.is_file()]
    identity = {k: data.get(k) for k in ("fingerprint", "dtype", "opset")}
    identity["kv"] = data.get("kv", "portable")  # exports from before the KV flavours are portable
    return {**identity, "format_version": data.get("format_version")}, files


def _still_whole(folder: Path, facts) -> bool:
    try:
        return bool(facts) and all(is_whole(folder / f["path"], f["size"], f["sha256"]) for f in facts)
    except (KeyError, TypeError, OSError):  # a malformed entry is redone, not trusted
        return False


def _previous_entries(out: Path, identity: dict) -> dict:
    """The subgraph entries of a finished export of the same model in ``out`` (a re-run reuses its files).

    Read without Manifest's checks: an entry from an older I/O contract is still a hint, redone below when its I/O
    differs; each reused file is checked against its size and sha256.
    """
    try:
        old = read_json(out / MANIFEST, "export manifest")
    except DlexportError:
        return {}
    subs = old.get("subgraphs")
    old.setdefault("kv", "portable")  # exports from before the KV flavours are portable
    if not isinstance(subs, dict) or {k: old.get(k) for k in identity} != identity:
        return {}
    return {name: entry for name, entry in subs.items() if isinstance(entry, dict)}


def export(
    model: str | LoadedModel,
    out: Path | str,
    *,
    random_weights: bool = False,
    dtype: str = "fp32",
    opset: int = DEFAULT_OPSET,
    kv: str = "inplace",
    check=None,
    overwrite: bool = False,
    progress: bool = True,
    reuse_traces: bool = True,
    log=print,
) -> Manifest:
    """Export ``model`` into ``out`` (see architectures/base.py for the I/O contract).

    ``check(manifest, loaded, log=)``: run on the written export with the PyTorch model it came from; its report is
    saved in the manifest as ``validation`` before a failure is raised (``pipeline.export`` passes validation).
    ``kv``: "inplace" (layers update their cache buffer and attend over its filled part; ONNX Runtime and TensorRT for
    RTX) or "portable" (opset-18 layers that return only the new key/values; also TensorRT 10.3 on JetPack 6).
    ``reuse_traces``: trace one layer per distinct layer structure and give the others its graph with their own
    weights (``LayerTraces``); False traces every layer.
    """
    from tqdm.auto import tqdm

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    out = Path(out)
    if dtype not in _DTYPES:
        raise InputError(f"dtype {dtype!r} is not one of {', '.join(_DTYPES)}")
    if kv not in KV_FLAVOURS:
        raise InputError(f"kv {kv!r} is not one of {', '.join(KV_FLAVOURS)}")
    inputs = [model] if isinstance(model, (str, Path)) and Path(model).exists() else []
    OwnedFolder.inspect(out, "export", legacy=_legacy_export)  # refuse a folder not ours before loading the model
    loaded = model if isinstance(model, LoadedModel) else load_model(model, random_weights=random_weights)
    fingerprint = model_fingerprint(loaded.model)
    loaded.model.to(_DTYPES[dtype]).eval()
    arch = architecture_for(loaded.model)
    identity = {"fingerprint": fingerprint, "dtype": arch.float_dtype(), "opset": opset, "kv": kv,
                "format_version": FORMAT_VERSION}
    own = OwnedFolder.claim(out, "export", identity, overwrite=overwrite, inputs=inputs, legacy=_legacy_export)
    finished = _previous_entries(out, identity)
    own.add(JOURNAL, MANIFEST)
    journal = Journal(out / JOURNAL, identity)
    staging = out / ".partial"

    entries = {}
    traces = LayerTraces(arch, opset) if reuse_traces else None
    t0 = time.perf_counter()
    subs = subgraphs(arch, kv)
    bar = tqdm(subs, desc=f"export {loaded.source}", unit="graph", disable=not progress)
    for sub in bar:
        bar.set_postfix_str(sub.name)
        io = {"inputs": [s.to_json() for s in sub.inputs], "outputs": [s.to_json() for s in sub.outputs]}
        previous = finished.get(sub.name, {})
        same_io = {k: previous.get(k) for k in io} == io  # a file from an older I/O contract is redone
        facts = journal.get(sub.name) or (previous.get("files") if same_io else None)
        if not _still_whole(out, facts):
            own.add(sub.file, sub.file + ".data")
            tmp = staging / sub.file
            export_subgraph(arch, sub, tmp, opset, traces)
            # move data first, the .onnx last, then record: an interrupted step is redone, never trusted
            for suffix in (".data", ""):
                src = staging / (sub.file + suffix)
                if src.exists():
                    (out / sub.file).parent.mkdir(parents=True, exist_ok=True)
                    src.replace(out / (sub.file + suffix))
            facts = _files_of(out, sub.file)
            journal.record(sub.name, facts)
        entries[sub.name] = {"file": sub.file, "files": facts, **io}
    shutil.rmtree(staging, ignore_errors=True)

    tokenizer = None
    if loaded.tokenizer is not None:
        loaded.tokenizer.save_pretrained(out / "tokenizer")
        own.add_tree("tokenizer")
        tokenizer = "tokenizer"

    manifest = Manifest(out, {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "source": loaded.source,
        **identity,
        "architecture": arch.numbers.to_json(),
        "rotary": arch.rotary,
        "special_tokens": _special_tokens(loaded),
        "created_by": {"dlexport": __version__, "torch": torch.__version__, "transformers": _version("transformers")},
        "subgraphs": entries,
        "tokenizer": tokenizer,
    })
    manifest.save()
    journal.remove()
    own.forget_missing()
    seconds = time.perf_counter() - t0
    reused = f"; layer graphs: {traces.traced} traced, {traces.reused} from a trace of their structure" if traces else ""
    log(f"exported {len(entries)} subgraphs of {loaded.source} to {out} in {seconds:.1f} s{reused}")
    if check is not None:
        report = check(manifest, loaded, log=log)
        manifest.data["validation"] = report.to_json()
        manifest.save()
        report.raise_if_failed()
    return manifest


def _special_tokens(loaded: LoadedModel) -> dict:
    cfg = loaded.model.generation_config if hasattr(loaded.model, "generation_config") else None
    eos = getattr(cfg, "eos_token_id", None) if cfg is not None else None
    eos = eos if isinstance(eos, list) else ([eos] if eos is not None else [])
    pad = getattr(loaded.tokenizer, "pad_token_id", None) if loaded.tokenizer is not None else None
    bos = getattr(loaded.model.config, "bos_token_id", None)
    return {"eos_token_ids": eos, "pad_token_id": pad, "bos_token_id": bos}


def _version(pkg: str) -> str:
    from importlib.metadata import version

    return version(pkg)
