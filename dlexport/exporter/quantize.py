"""Weight-only int4/int8 exports: every MatMul weight of the layers and the head quantised block-wise.

Decoding a small LLM reads every weight once per token, so the weight format sets the speed on a CPU and decides
whether a 1B model fits a Jetson. Two graph forms, both written by ONNX Runtime's own quantiser where it can:

- ``ort``: ``com.microsoft.MatMulNBits`` (ONNX Runtime's CPU and CUDA kernels; int4 and int8; ``accuracy_level``
  picks the activation precision of the CPU kernel, 4 = int8 activations).
- ``qdq``: standard opset-21 block-wise ``DequantizeLinear`` -> ``MatMul``, the form TensorRT builds (signed weights
  only: TensorRT does not import UINT4/UINT8 weights, so it is symmetric). ONNX Runtime's quantiser writes int4; it
  has no int8 Q/DQ path, so int8 codes (symmetric round to nearest per block) are computed here.

The embedding (a Gather) stays as it is unless ``embed="int4"``: then ONNX Runtime's quantiser turns the token
table's Gather into ``com.microsoft.GatherBlockQuantized`` (int4 rows in blocks along the hidden size; ONNX Runtime
only, TensorRT has no such op). On opt-1.3b the fp32 table alone is 412 MB. The quantised folder is an ordinary export with the source's fingerprint
(plans made on the fp32 export stay valid: the layers are the same) plus a ``quantization`` record; the runtime loads
it unchanged. Its quality is measured by ``dlexport.plans.quality`` against the source export.
"""
from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..files import Journal, atomic_path, sha256_file
from ..manifest import MANIFEST, Manifest
from .onnx_export import ExportDirError, _files_of, _still_whole

WEIGHTS = {"int4": 4, "int8": 8}
FORMATS = ("ort", "qdq")
EMBEDS = ("keep", "int4")  # the embedding table: as exported, or GatherBlockQuantized (ONNX Runtime's quantiser
# quantises a Gather to 4 bits only)
METHODS = ("hqq", "rtn")  # ONNX Runtime's quantiser algorithms that need no calibration data
JOURNAL = ".quantize-progress.json"
QDQ_OPSET = 21  # block-wise DequantizeLinear and the INT4 type
GRAPH_FORM = 4  # bumped whenever the graphs written for the same settings change: older files are redone


@dataclass(frozen=True)
class WeightQuant:
    """How weights are quantised. ``None`` picks the default: int4, HQQ (scale and zero point fitted per block
    without data: on SmolLM2 it reproduces the GGUF's Q4_1 blocks, which plain rounding shifts: +0.2% perplexity
    against +28-34%); int8, round to nearest. ``qdq`` codes are signed, without zero point (what TensorRT takes);
    HQQ's zero points then travel as per-block offsets (see ``_offsets_from_zero_points``)."""

    weights: str = "int4"
    block_size: int = 32
    symmetric: bool | None = None
    accuracy_level: int | None = None
    format: str = "ort"
    method: str | None = None
    head: str = "int8"  # the exit head's weights: see ``for_head``
    embed: str = "keep"  # the token table: see ``quantize_embed``

    def __post_init__(self):
        for flag, value in (("--weights", self.weights), ("--head-weights", self.head)):
            if value not in WEIGHTS:
                raise ValueError(f"{flag} {value!r} is not one of {', '.join(WEIGHTS)}")
        if self.embed not in EMBEDS:
            raise ValueError(f"--embed-weights {self.embed!r} is not one of {', '.join(EMBEDS)}")
        if self.embed != "keep" and self.format != "ort":
            raise ValueError("--embed-weights int4 writes ONNX Runtime's GatherBlockQuantized, which TensorRT does not "
                             "build: use it with --format ort, or keep the embedding (--embed-weights keep)")
        if self.format not in FORMATS:
            raise ValueError(f"--format {self.format!r} is not one of {', '.join(FORMATS)} (ort: ONNX Runtime's "
                             "MatMulNBits; qdq: DequantizeLinear -> MatMul, for TensorRT)")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ValueError(f"--block-size {self.block_size} must be a power of two >= 16 (MatMulNBits' rule)")
        if self.symmetric is None:
            object.__setattr__(self, "symmetric", self.format == "qdq")
        default_method = "hqq" if self.bits == 4 and (self.format == "qdq" or not self.symmetric) else "rtn"
        object.__setattr__(self, "method", self.method or default_method)
        if self.method not in METHODS:
            raise ValueError(f"--method {self.method!r} is not one of {', '.join(METHODS)}")
        if self.format == "qdq" and not self.symmetric:
            raise ValueError("--format qdq is for TensorRT, which imports only signed (symmetric) INT4/INT8 weights: "
                             "drop --no-symmetric, or use --format ort for asymmetric weights")
        if self.method == "hqq" and self.format == "ort" and self.symmetric:
            raise ValueError("--method hqq fits a zero point per block: with --format ort it is asymmetric; use "
                             "--method rtn for symmetric MatMulNBits weights")
        if self.method == "hqq" and self.bits == 8:
            raise ValueError("--method hqq is for int4 here (int8 round to nearest already loses under 0.3% "
                             "perplexity on SmolLM2): use --method rtn, the int8 default")
        if self.accuracy_level is not None:
            if self.format != "ort":
                raise ValueError("--accuracy-level is an attribute of ONNX Runtime's MatMulNBits: it needs "
                                 "--format ort")
            if self.accuracy_level not in range(5):
                raise ValueError(f"--accuracy-level {self.accuracy_level} is not 0-4 (0 unset, 1 fp32, 2 fp16, "
                                 "3 bf16, 4 int8 activations)")

    @property
    def bits(self) -> int:
        return WEIGHTS[self.weights]

    def for_head(self) -> "WeightQuant":
        """The head's settings: int8 unless asked otherwise. It is the largest matrix (the vocabulary; tied to the
        embedding on SmolLM2) and the most sensitive one: int4 there cost SmolLM2-135M +8.9% perplexity against
        +0.2% with an int8 head, as llama.cpp's 4-bit files also keep it at 6-8 bits."""
        method = self.method if self.head == self.weights else None
        return WeightQuant(self.head, self.block_size, self.symmetric, self.accuracy_level, self.format, method,
                           self.head, self.embed)

    def to_json(self) -> dict:
        return {"weights": self.weights, "bits": self.bits, "head_weights": self.head, "block_size": self.block_size,
                "method": self.method, "symmetric": self.symmetric, "accuracy_level": self.accuracy_level,
                "format": self.format, "embed_weights": self.embed}


def _gemms_to_matmuls(model) -> None:
    """Gemm(A, W, C) with a constant W (OPT's fc1/fc2) -> MatMul(A, W') + C, so the quantiser sees the weight."""
    import onnx
    from onnx import numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    nodes = []
    for node in graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        w = inits.get(node.input[1]) if node.op_type == "Gemm" and len(node.input) > 1 else None
        if w is None or attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
            nodes.append(node)
            continue
        weight = numpy_helper.to_array(w)
        if attrs.get("transB", 0):
            weight = weight.T.copy()
        name = f"{w.name}_kn"
        graph.initializer.append(numpy_helper.from_array(weight, name))
        has_bias = len(node.input) > 2 and node.input[2]
        mm_out = f"{node.output[0]}_matmul" if has_bias else node.output[0]
        nodes.append(onnx.helper.make_node("MatMul", [node.input[0], name], [mm_out], name=f"{node.name}_MatMul"))
        if has_bias:
            nodes.append(onnx.helper.make_node("Add", [mm_out, node.input[2]], [node.output[0]],
                                               name=f"{node.name}_bias"))
    graph.ClearField("node")
    graph.node.extend(nodes)
    _drop_unused_initializers(graph)


def _drop_unused_initializers(graph) -> None:
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    kept = [i for i in graph.initializer if i.name in used]
    graph.ClearField("initializer")
    graph.initializer.extend(kept)


def _qdq_opset(model) -> None:
    """Opset 21 and IR 10 (block-wise DequantizeLinear, INT4), and no contrib domain left."""
    kept = [o for o in model.opset_import if o.domain != "com.microsoft"]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = max(opset.version, QDQ_OPSET)
    model.ir_version = max(model.ir_version, 10)


def _int8_qdq(model, q: WeightQuant) -> None:
    """Every constant fp32 2-D MatMul weight -> INT8 block-wise DequantizeLinear (axis 0) -> MatMul, opset 21.

    ONNX Runtime's quantiser has no int8 Q/DQ path, and its 8-bit block kernel gives negative scales (which
    TensorRT refuses), so the symmetric round-to-nearest codes are computed here: scale = max|w| / 127 per block.
    """
    import numpy as np
    import onnx
    from onnx import numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    nodes, bs = [], q.block_size
    for node in graph.node:
        w = inits.get(node.input[1]) if node.op_type == "MatMul" else None
        if w is None or len(w.dims) != 2 or w.data_type != onnx.TensorProto.FLOAT:
            nodes.append(node)
            continue
        weight = numpy_helper.to_array(w)
        k, n = weight.shape
        blocks = np.pad(weight, ((0, -k % bs), (0, 0))).reshape(-1, bs, n)
        scales = np.abs(blocks).max(axis=1) / 127
        scales[scales == 0] = 1.0
        codes = np.clip(np.rint(blocks / scales[:, None]), -127, 127).astype(np.int8).reshape(-1, n)[:k]
        graph.initializer.extend([numpy_helper.from_array(codes, f"{w.name}_DQ_Q8"),
                                  numpy_helper.from_array(scales.astype(np.float32), f"{w.name}_DQ_scales")])
        deq = f"{w.name}_DQ_Q8_output"
        nodes.append(onnx.helper.make_node("DequantizeLinear", [f"{w.name}_DQ_Q8", f"{w.name}_DQ_scales"], [deq],
                                           name=f"{node.name}_DQ_Q8", axis=0, block_size=bs))
        nodes.append(onnx.helper.make_node("MatMul", [node.input[0], deq], list(node.output), name=node.name))
    graph.ClearField("node")
    graph.node.extend(nodes)
    _drop_unused_initializers(graph)
    _qdq_opset(model)


def quantize_graph(model, q: WeightQuant):
    """One ONNX model (a layer or the head) with its MatMul weights quantised as ``q`` says; returns the model."""
    from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig, MatMulNBitsQuantizer
    from onnxruntime.quantization.quant_utils import QuantFormat

    _gemms_to_matmuls(model)
    if q.format == "qdq" and q.bits == 8:
        _int8_qdq(model, q)
        return model
    algo = HQQWeightOnlyQuantConfig(block_size=q.block_size, bits=q.bits) if q.method == "hqq" else None
    qdq = q.format == "qdq" and q.method == "rtn"  # HQQ writes MatMulNBits only; its Q/DQ form is made below
    quantizer = MatMulNBitsQuantizer(
        model, bits=q.bits, block_size=q.block_size, is_symmetric=q.symmetric, accuracy_level=q.accuracy_level,
        quant_format=QuantFormat.QDQ if qdq else QuantFormat.QOperator, op_types_to_quantize=("MatMul",),
        algo_config=algo)
    logging.getLogger("onnxruntime").setLevel(logging.ERROR)
    quantizer.process()
    model = quantizer.model.model
    if q.format == "ort":
        _fuse_shared_input(model)
    if q.method == "hqq":
        _offsets_from_zero_points(model, q)
    return model


FUSED = "_fused_split"  # name suffix of the Split after a fused MatMulNBits


def _fuse_shared_input(model) -> None:
    """MatMulNBits nodes that read the same activation with the same settings (q, k, v; gate, up) -> one MatMulNBits
    over their concatenated output columns and a Split: at one token a layer's time is mostly per-kernel overhead
    (and HQQ's offset MatMul is then done once per input). Every column is computed as before: the kernel quantises
    the activations per block of K (accuracy level 4) the same way for all N."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    groups: dict[tuple, list] = {}
    for n in graph.node:
        if n.op_type == "MatMulNBits" and all(i in inits for i in n.input[1:] if i):
            attrs = tuple(sorted((a.name, a.i) for a in n.attribute if a.name != "N"))
            groups.setdefault((n.input[0], attrs, tuple(bool(i) for i in n.input[1:])), []).append(n)
    fused = {id(ns[0]): ns for ns in groups.values() if len(ns) > 1}
    if not fused:
        return
    dropped = {id(n) for ns in fused.values() for n in ns[1:]}
    nodes = []
    for node in graph.node:
        if id(node) in dropped:
            continue
        if id(node) not in fused:
            nodes.append(node)
            continue
        members = fused[id(node)]
        widths = [next(a.i for a in n.attribute if a.name == "N") for n in members]
        inputs = [node.input[0]]
        for k in range(1, len(node.input)):
            if not node.input[k]:
                inputs.append("")
                continue
            arrays = [numpy_helper.to_array(inits[n.input[k]]) for n in members]
            joined = np.concatenate([a.reshape(w, -1) for a, w in zip(arrays, widths)])
            shape = (sum(widths), *arrays[0].shape[1:]) if arrays[0].ndim > 1 else (-1,)
            name = f"{node.input[k]}_fused"
            graph.initializer.append(numpy_helper.from_array(joined.reshape(shape), name))
            inputs.append(name)
        out = f"{node.output[0]}_fused"
        attrs = {a.name: a.i for a in node.attribute}
        attrs["N"] = sum(widths)
        nodes.append(onnx.helper.make_node("MatMulNBits", inputs, [out], name=f"{node.name}_fused",
                                           domain="com.microsoft", **attrs))
        split = numpy_helper.from_array(np.array(widths, np.int64), f"{node.name}{FUSED}_widths")
        graph.initializer.append(split)
        nodes.append(onnx.helper.make_node("Split", [out, split.name], [n.output[0] for n in members], axis=-1,
                                           name=f"{node.name}{FUSED}"))
    graph.ClearField("node")
    graph.node.extend(nodes)
    _drop_unused_initializers(graph)


def _offsets_from_zero_points(model, q: WeightQuant) -> None:
    """HQQ's float zero points as a per-block offset: W x = codes x (zero point 0) + offsets . blocksum(x).

    ONNX Runtime's CPU kernel has no fast path for float zero points (a SmolLM2 layer decoded 10x slower than fp32
    with them, 2x faster with integer ones), and TensorRT takes no zero points at all. With x summed over each
    block of K, sum_k x_k s (q_k - z) = s (q - 8) . x + s (8 - z) . blocksum(x): MatMulNBits keeps codes q with the
    integer zero point 8, Q/DQ gets signed codes q - 8 in a block-wise INT4 DequantizeLinear (centred codes also
    keep accuracy level 4's int8 activations accurate: zero point 0 there cost 1.2% perplexity on SmolLM2). The
    offsets are one small fp32 MatMul ([K/block, N], 1/block of the weights).
    """
    import ml_dtypes
    import numpy as np
    import onnx
    import onnx_ir as ir
    from onnx import numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    nodes, bs, qdq = [], q.block_size, q.format == "qdq"
    for node in graph.node:
        if node.op_type != "MatMulNBits":
            nodes.append(node)
            continue
        attrs = {a.name: a.i for a in node.attribute}
        k, n = attrs["K"], attrs["N"]
        if k % bs:
            raise ValueError(f"{node.name}: K={k} is not a multiple of --block-size {bs}; choose a block size that "
                             "divides the model's hidden and intermediate sizes, or --method rtn")
        blocks, centre = k // bs, 1 << (q.bits - 1)
        scales = numpy_helper.to_array(inits[node.input[2]]).reshape(n, blocks)
        zeros = numpy_helper.to_array(inits[node.input[3]]).reshape(n, blocks)
        stem, x, out = node.input[1], node.input[0], node.output[0]
        p = f"{stem}_offset"
        graph.initializer.extend([
            numpy_helper.from_array(np.ascontiguousarray((scales * (centre - zeros)).T.astype(np.float32)),
                                    f"{stem}_offsets"),
            numpy_helper.from_array(np.array([blocks, bs], np.int64), f"{p}_block"),
            numpy_helper.from_array(np.array([-1], np.int64), f"{p}_last")])
        if qdq:
            packed = numpy_helper.to_array(inits[stem]).reshape(n, k // 2)  # two codes a byte, low nibble first
            codes = np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(n, k).T.astype(np.int8) - centre
            graph.initializer.extend([
                ir.serde.serialize_tensor(ir.Tensor(codes.astype(ml_dtypes.int4), name=f"{stem}_DQ")),
                numpy_helper.from_array(np.ascontiguousarray(scales.T), f"{stem}_DQ_scales")])
            nodes += [onnx.helper.make_node("DequantizeLinear", [f"{stem}_DQ", f"{stem}_DQ_scales"], [f"{stem}_W"],
                                            axis=0, block_size=bs, name=f"{stem}_dequantize"),
                      onnx.helper.make_node("MatMul", [x, f"{stem}_W"], [f"{out}_codes"], name=f"{stem}_matmul")]
        else:
            graph.initializer.append(numpy_helper.from_array(  # zero point 8 in both nibbles of every byte
                np.full(n * -(-blocks * q.bits // 8), 0x88, np.uint8), f"{stem}_zero8"))
            node.input[3], node.output[0] = f"{stem}_zero8", f"{out}_codes"
            if q.accuracy_level:  # ONNX Runtime's HQQ path does not write it
                node.attribute.append(onnx.helper.make_attribute("accuracy_level", q.accuracy_level))
            nodes.append(node)
        nodes += [
            onnx.helper.make_node("Shape", [x], [f"{p}_lead"], end=-1, name=f"{p}_shape"),
            onnx.helper.make_node("Concat", [f"{p}_lead", f"{p}_block"], [f"{p}_dims"], axis=0, name=f"{p}_dims"),
            onnx.helper.make_node("Reshape", [x, f"{p}_dims"], [f"{p}_xb"], name=f"{p}_reshape"),
            onnx.helper.make_node("ReduceSum", [f"{p}_xb", f"{p}_last"], [f"{p}_sums"], keepdims=0, name=f"{p}_sum"),
            onnx.helper.make_node("MatMul", [f"{p}_sums", f"{stem}_offsets"], [f"{p}_add"], name=f"{p}_matmul"),
            onnx.helper.make_node("Add", [f"{out}_codes", f"{p}_add"], [out], name=f"{p}_add"),
        ]
    graph.ClearField("node")
    graph.node.extend(nodes)
    _drop_unused_initializers(graph)
    if qdq:
        _qdq_opset(model)


def quantize_embed(model, q: WeightQuant):
    """The embed graph with its token table's Gather (the one indexed by ``input_ids``) made int4
    ``GatherBlockQuantized`` by ONNX Runtime's quantiser (round to nearest, blocks of ``q.block_size`` along the hidden
    size; asymmetric unless ``q.symmetric``); other gathers (OPT's positions) stay. Returns the model."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer
    from onnxruntime.quantization.quant_utils import QuantFormat

    inits = {i.name for i in model.graph.initializer}
    gathers = [n for n in model.graph.node if n.op_type == "Gather"]
    table = [n for n in gathers if n.input[0] in inits and n.input[1] == "input_ids"]
    if len(table) != 1 or not all(n.name for n in gathers):
        raise ValueError(f"the embed graph has {len(table)} named Gathers of a constant table by input_ids (expected "
                         "one): quantise with --embed-weights keep")
    hidden = next(i.dims for i in model.graph.initializer if i.name == table[0].input[0])[-1]
    if hidden % q.block_size:
        raise ValueError(f"the hidden size {hidden} is not a multiple of --block-size {q.block_size}: choose a block "
                         "size that divides it, or --embed-weights keep")
    config = DefaultWeightOnlyQuantConfig(block_size=q.block_size, is_symmetric=q.symmetric, bits=4,
                                          quant_format=QuantFormat.QOperator, op_types_to_quantize=("Gather",),
                                          quant_axes=(("Gather", 1),))
    quantizer = MatMulNBitsQuantizer(model, nodes_to_exclude=[n.name for n in gathers if n is not table[0]],
                                     algo_config=config)
    logging.getLogger("onnxruntime").setLevel(logging.ERROR)
    quantizer.process()
    return quantizer.model.model


def quantized_matmuls(model) -> int:
    """How many MatMuls of the source graph take quantised weights here (MatMulNBits, each fused one counting the
    MatMuls it holds, or MatMul fed by a DequantizeLinear)."""
    dq = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    fused = sum(len(n.output) - 1 for n in model.graph.node if n.op_type == "Split" and n.name.endswith(FUSED))
    return fused + sum(n.op_type == "MatMulNBits" or (n.op_type == "MatMul" and n.input[1] in dq)
                       for n in model.graph.node)


def _check_out(source: Manifest, out: Path, identity: dict, overwrite: bool) -> dict:
    """Refuse a folder holding anything else; return the entries of a finished quantisation with the same identity."""
    if out.resolve() == source.folder.resolve():
        raise ExportDirError(f"--out {out} is the source export itself: give a new folder for the quantised export")
    if not (out / MANIFEST).exists():
        if out.exists() and any(out.iterdir()) and not (out / JOURNAL).exists():
            raise ExportDirError(f"{out} exists and is not a dlexport export: choose an empty or new --out")
        return {}
    try:
        old = Manifest.load(out).data
    except (ValueError, FileNotFoundError):
        old = {}
    quant = old.get("quantization") or {}
    if {k: quant.get(k) for k in identity} == identity:
        return {name: {"files": sub["files"], "quantized_matmuls": quant["quantized_matmuls"][name]}
                for name, sub in old["subgraphs"].items()}
    if not overwrite:
        raise ExportDirError(f"{out} holds another export ({old.get('source')!r}, quantization "
                             f"{quant.get('settings')}); choose another --out, or pass --overwrite to replace it")
    shutil.rmtree(out)
    return {}


def quantize(export_dir, out, q: WeightQuant = WeightQuant(), *, overwrite: bool = False, progress: bool = True,
             log=print) -> Manifest:
    """Write a weight-only quantised copy of the export ``export_dir`` into ``out``, one subgraph at a time.

    Resumable like the exporter: each graph is written under a temporary name, renamed into place and journalled
    with its sha256 and the source graph's; a repeated run redoes only what is missing, damaged or from another
    source or setting.
    """
    import onnx
    from tqdm.auto import tqdm

    source = Manifest.load(export_dir)
    source.verify_files()
    if source.data.get("quantization"):
        raise ValueError(f"{export_dir} is already quantised ({source.data['quantization']['settings']}): quantise "
                         f"its source export {source.data['quantization']['source_export']} instead")
    out = Path(out)
    src_sha = {name: sub["files"][0]["sha256"] for name, sub in source.data["subgraphs"].items()}
    identity = {"fingerprint": source.fingerprint, "settings": q.to_json(), "form": GRAPH_FORM,
                "source_files": src_sha}
    finished = _check_out(source, out, identity, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    journal = Journal(out / JOURNAL, identity)

    entries, counts = {}, {}
    names = list(source.data["subgraphs"])
    bar = tqdm(names, desc=f"quantize {q.weights} {q.format}", unit="graph", disable=not progress)
    for name in bar:
        bar.set_postfix_str(name)
        sub = source.subgraph(name)
        facts = journal.get(name) or finished.get(name)
        if not (facts and _still_whole(out, facts["files"])):
            dest = out / sub["file"]
            dest.parent.mkdir(parents=True, exist_ok=True)
            if name == "embed" and q.embed == "int4":
                model = quantize_embed(onnx.load(str(source.path(name))), q)
                count = 0
                with atomic_path(dest) as tmp:
                    onnx.save(model, str(tmp))
            elif name == "embed":  # a Gather: copied as it is (the vocabulary rows are read, not multiplied)
                for f in sub["files"]:
                    with atomic_path(out / f["path"]) as tmp:
                        shutil.copyfile(source.folder / f["path"], tmp)
                count = 0
            else:
                model = quantize_graph(onnx.load(str(source.path(name))), q.for_head() if name == "head" else q)
                count = quantized_matmuls(model)
                with atomic_path(dest) as tmp:
                    onnx.save(model, str(tmp))
            facts = {"files": _files_of(out, sub["file"]), "quantized_matmuls": count}
            journal.record(name, facts)
        counts[name] = facts["quantized_matmuls"]
        entries[name] = {**sub, "files": facts["files"]}

    if source.tokenizer_dir() is not None and source.tokenizer_dir().exists():
        shutil.copytree(source.tokenizer_dir(), out / source.data["tokenizer"], dirs_exist_ok=True)
    from importlib.metadata import version

    data = {k: v for k, v in source.data.items() if k != "validation"}
    data["subgraphs"] = entries
    data["quantization"] = {
        **identity,
        "source_export": str(source.folder.resolve()),
        "source_manifest_sha256": sha256_file(source.folder / MANIFEST),
        "graph_opset": QDQ_OPSET if q.format == "qdq" else data.get("opset"),
        "quantized_matmuls": counts,
        "library": "dlexport (ONNX Runtime has no int8 Q/DQ path)" if q.format == "qdq" and q.bits == 8
                   else f"onnxruntime {version('onnxruntime')} MatMulNBitsQuantizer",
        "unchanged": [] if q.embed == "int4" else ["embed (Gather)"],
    }
    manifest = Manifest(out, data)
    manifest.save()
    journal.remove()
    total = sum(counts.values())
    log(f"quantised {total} MatMuls in {len(names) - 1} subgraphs of {source.data['source']} to {q.weights} "
        f"(head {q.head}; {q.format}, {q.method}, block {q.block_size}, {'symmetric' if q.symmetric else 'asymmetric'}"
        f"{'; embedding int4 GatherBlockQuantized' if q.embed == 'int4' else ''}) into {out}")
    return manifest
