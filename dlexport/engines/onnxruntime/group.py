"""Consecutive in-place layers as ONE ONNX Runtime session (a layer group).

Measured on SmolLM2-135M (1 thread, prompt 64 / 64 new): the same 30 layer graphs run as 30 sessions decode at
0.89x the monolithic graph, and as one composed session at 1.01x, with identical tokens
(``benchmarks/cpu-smollm2-groups-2026-12-02``). What a session boundary costs is not the kernels (each layer
session alone is as fast as its part of the single graph) but what happens between ``Run`` calls, so the runtime
runs each maximal run of consecutive layers it loads as one group; single layers remain for whatever a strategy
runs apart (an exit check inside the run, a draft's prefix), opened on first use.

A group is composed once, on its first load, into dlexport's cache (``$DLEXPORT_CACHE/groups``, by default
``~/.cache/dlexport/groups``), keyed by its layer files' sha256: a graph file with the weights as external data,
written one layer at a time, so loading a group holds no more memory than loading its layers one by one (an
in-memory protobuf held the weights three times over during the load). A group's graph is its layers' graphs side
by side: internal names get a ``lN.`` prefix, layer ``i``'s
``hidden_states_out`` feeds layer ``i + 1``'s ``hidden_states``, and the inputs every layer takes alike
(``attention_mask``, rotary cos/sin, ``past_length``) are one input. So every layer of a group must take the same
such inputs (one sliding window or none, one rotary kind) and have the same filled length when it runs.

The hidden states between its layers are outputs too (``hidden_states_out.k``: after the group's first k layers),
so a strategy that reads the plan's hidden state at some depth (a prefix draft's shadow probe, the online depth
search) runs the whole group and reads it there instead of splitting the run into sessions. A tap is a value the
graph computes anyway: SmolLM2's 30-layer group decodes as fast with its 29 taps bound as without (1.01x, 1 thread;
``benchmarks/speculative-2026-12-02b/tapcost.py``).
"""
from __future__ import annotations

from pathlib import Path

from ...contract import (
    PAST_LENGTH,
    TensorSpec,
    hidden_tap_name as tap,
    past_key_name,
    past_value_name,
    present_key_name,
    present_value_name,
)

HIDDEN_IN, HIDDEN_OUT = "hidden_states", "hidden_states_out"
GRAPH, DATA = "group.onnx", "group.onnx.data"
FORMAT = 2  # in the cache key: a change of the composed form gets new folders (2: the taps)


def group_name(layers: list[int]) -> str:
    return f"layers_{layers[0]:02d}-{layers[-1]:02d}"


def shared_inputs(specs: list[TensorSpec], index: int) -> list[TensorSpec]:
    """A layer's inputs other than its hidden states and its own KV buffers (what a group takes once)."""
    own = {HIDDEN_IN, past_key_name(index), past_value_name(index)}
    return [s for s in specs if s.name not in own]


def group_io(layers: list[int], io: dict[int, tuple[list[TensorSpec], list[TensorSpec]]]
             ) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The group's inputs (hidden states, the shared inputs, every layer's KV buffers) and outputs."""
    first_in, _ = io[layers[0]]
    hidden = next(s for s in first_in if s.name == HIDDEN_IN)
    inputs = [hidden] + shared_inputs(first_in, layers[0])
    out = next(s for s in io[layers[-1]][1] if s.name == HIDDEN_OUT)
    outputs = [out] + [TensorSpec(tap(k), out.shape, out.dtype) for k in range(1, len(layers))]
    for i in layers:
        ins, outs = io[i]
        inputs += [s for s in ins if s.name in (past_key_name(i), past_value_name(i))]
        outputs += [s for s in outs if s.name in (present_key_name(i), present_value_name(i))]
    return inputs, outputs


def layer_io(manifest, i: int) -> tuple[list[TensorSpec], list[TensorSpec]]:
    sub = manifest.subgraph(manifest.layer_key(i))
    return [TensorSpec.from_json(s) for s in sub["inputs"]], [TensorSpec.from_json(s) for s in sub["outputs"]]


def runs(manifest, layers=None) -> list[list[int]]:
    """The maximal runs of consecutive in-place layers among ``layers`` (all by default) that take the same shared
    inputs and sliding window (Gemma 3's local and global layers run apart), two layers or more: the groups."""
    layers = list(range(manifest.num_layers)) if layers is None else list(layers)
    windows = manifest.arch.get("layer_windows") or [None] * manifest.num_layers

    def kind(i):  # None for a portable layer: it writes no buffer of its own, so it joins no group
        ins = layer_io(manifest, i)[0]
        return (windows[i], shared_inputs(ins, i)) if any(s.name == PAST_LENGTH for s in ins) else None

    kinds = {i: kind(i) for i in layers}
    out = []
    for i in layers:
        if out and i == out[-1][-1] + 1 and kinds[i] is not None and kinds[i] == kinds[out[-1][-1]]:
            out[-1].append(i)
        else:
            out.append([i])
    return [r for r in out if len(r) > 1]


def cache_key(manifest, layers: list[int]) -> str:
    """The group's cache folder name: its layers' files, by content."""
    import hashlib

    h = hashlib.sha256(f"dlexport layer group {FORMAT}".encode())
    for i in layers:
        for f in manifest.subgraph(manifest.layer_key(i))["files"]:
            h.update(f["sha256"].encode())
    return f"{group_name(layers)}-{h.hexdigest()[:24]}"


def compose(paths: list[Path], folder: Path) -> Path:
    """The layer graphs at ``paths`` (consecutive layers, in order) as one model written to ``folder`` (a graph file
    and its weights as external data), one layer in memory at a time; returns the graph file. Written under a
    temporary name and renamed, so a folder that is there is whole."""
    import shutil
    import tempfile

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        _write(paths, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing half-written stays behind
        raise
    try:
        tmp.rename(folder)
    except OSError:  # another process composed it first: theirs is as good
        shutil.rmtree(tmp, ignore_errors=True)
    return folder / GRAPH


def _write(paths: list[Path], tmp: Path) -> None:
    import os

    import onnx
    from onnx import compose as onnx_compose
    from onnx import external_data_helper, helper

    nodes, initializers, inputs, outputs, seen = [], [], [], [], set()
    last = len(paths) - 1
    with open(tmp / DATA, "wb") as data:
        for k, path in enumerate(paths):
            model = onnx.load(str(path))
            g = onnx_compose.add_prefix(model, f"l{k}.", rename_inputs=False, rename_outputs=False, inplace=True).graph
            link = {HIDDEN_IN: HIDDEN_IN if k == 0 else tap(k), HIDDEN_OUT: HIDDEN_OUT if k == last else tap(k + 1)}
            for node in g.node:
                for names in (node.input, node.output):
                    for j, name in enumerate(names):
                        names[j] = link.get(name, name)
            for tensor in g.initializer:
                if len(tensor.raw_data) >= 1024:
                    data.write(b"\0" * (-data.tell() % 4096))  # page-aligned: ONNX Runtime can map it
                    offset = data.tell()
                    data.write(tensor.raw_data)
                    external_data_helper.set_external_data(tensor, DATA, offset, len(tensor.raw_data))
                    tensor.ClearField("raw_data")
                    tensor.data_location = onnx.TensorProto.EXTERNAL
            nodes += g.node
            initializers += g.initializer
            for value in g.input:
                if (value.name != HIDDEN_IN or k == 0) and value.name not in seen:
                    seen.add(value.name)
                    inputs.append(value)
            for v in g.output:
                if v.name == HIDDEN_OUT and k < last:
                    v.name = tap(k + 1)
                outputs.append(v)
            opset, ir_version = model.opset_import, model.ir_version
        data.flush()
        os.fsync(data.fileno())
    graph = helper.make_graph(nodes, "layer_group", inputs, outputs, initializers)
    onnx.save(helper.make_model(graph, opset_imports=opset, ir_version=ir_version), str(tmp / GRAPH))
