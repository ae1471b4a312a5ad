"""Weight-only int4/int8 exports: graph forms, manifest, fingerprint, resuming, refusals, and running them."""
from __future__ import annotations

import onnx
import pytest
import torch

from dlexport.cli import main
from dlexport.exporter import ExportDirError
from dlexport.exporter.quantize import WeightQuant, quantize
from dlexport.manifest import Manifest
from dlexport.plans.stack import ExportStack
from dlexport.runtime import Runtime
from dlexport.runtime.plan import Plan, load_plan

SETTINGS = [(w, f) for w in ("int4", "int8") for f in ("ort", "qdq")]
# RMS error of the final logits relative to their RMS, on random-weight tiny models (flat gaussian weights are the
# hardest case for block quantisation; real models do better, see the SmolLM2 numbers in the README).
LOGIT_BOUND = {"int4": 0.7, "int8": 0.06}
MATMULS_PER_LAYER = {"tiny_llama_export": 7, "tiny_opt_export": 6}  # q, k, v, o + gate, up, down / fc1, fc2
KERNELS_PER_LAYER = 4  # MatMulNBits: q/k/v fused, o, gate/up fused (Llama) or fc1, and down / fc2


def quiet(*args):
    pass


def _weight_ops(model) -> dict:
    ops = {}
    for n in model.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    return ops


@pytest.mark.parametrize("fixture", ["tiny_llama_export", "tiny_opt_export"])
@pytest.mark.parametrize("weights,fmt", SETTINGS)
def test_every_layer_and_head_matmul_is_quantised_and_recorded(fixture, weights, fmt, request, quantized):
    source: Manifest = request.getfixturevalue(fixture)
    m = quantized(fixture, weights, fmt)
    q = m.data["quantization"]
    assert q["settings"] == {"weights": weights, "bits": {"int4": 4, "int8": 8}[weights], "head_weights": "int8",
                             "block_size": 32,
                             "method": "hqq" if weights == "int4" else "rtn", "symmetric": fmt == "qdq",
                             "accuracy_level": None, "format": fmt, "embed_weights": "keep"}
    assert q["source_export"] == str(source.folder.resolve())
    assert m.fingerprint == source.fingerprint and m.num_layers == source.num_layers
    assert {k: m.data[k] for k in ("architecture", "dtype", "opset", "rotary")} == \
        {k: source.data[k] for k in ("architecture", "dtype", "opset", "rotary")}
    n = MATMULS_PER_LAYER[fixture]
    assert q["quantized_matmuls"] == {"embed": 0, **{m.layer_key(i): n for i in range(m.num_layers)}, "head": 1}
    m.verify_files()  # sizes and sha256 of every file, as for any export
    for name in [m.layer_key(0), "head"]:
        model = onnx.load(m.path(name))
        ops = _weight_ops(model)
        opset = {o.domain: o.version for o in model.opset_import}
        if fmt == "ort":
            assert ops.get("MatMulNBits") == (KERNELS_PER_LAYER if name != "head" else 1)
            assert "DequantizeLinear" not in ops
            assert opset["com.microsoft"] == 1
            inits = {i.name: i for i in model.graph.initializer}
            for node in (x for x in model.graph.node if x.op_type == "MatMulNBits"):  # the kernel's fast path:
                assert inits[node.input[3]].data_type == onnx.TensorProto.UINT8  # integer zero points only
        else:
            assert ops.get("DequantizeLinear") == (n if name != "head" else 1) and "MatMulNBits" not in ops
            source_opset = {o.domain: o.version for o in onnx.load(source.path(name)).opset_import}[""]
            assert opset[""] == max(21, source_opset) and "com.microsoft" not in opset  # in-place layers are 24
        assert "Gemm" not in ops  # OPT's fc1/fc2 were Gemms: turned into MatMuls so that they are quantised
        assert not [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 2
                    and min(i.dims) >= 32], "an fp32 weight matrix was left unquantised"
        fp32_matrices = sum(4 * i.dims[0] * i.dims[1] for i in onnx.load(source.path(name)).graph.initializer
                            if len(i.dims) == 2 and min(i.dims) >= 32)
        saved = source.path(name).stat().st_size - m.path(name).stat().st_size
        four = weights == "int4" and name != "head"  # the head is int8 by default
        assert saved > fp32_matrices * (0.8 if four else 0.68)  # 4 or 8 bits + a scale per 32
    assert m.path("embed").read_bytes() == source.path("embed").read_bytes()  # a Gather: left as it is


def _logits(folder, ids):
    s = ExportStack(folder)
    h, extras = s.embed(ids)
    return s.logits(s.run(h, extras, range(s.num_layers)))


@pytest.mark.parametrize("fixture", ["tiny_llama_export", "tiny_opt_export"])
@pytest.mark.parametrize("weights,fmt", SETTINGS)
def test_onnx_runtime_runs_it_close_to_fp32_and_fp32_plans_load(fixture, weights, fmt, request, quantized, tmp_path):
    source: Manifest = request.getfixturevalue(fixture)
    m = quantized(fixture, weights, fmt)
    ids = torch.randint(3, source.arch["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(0))
    ref, got = _logits(source.folder, ids), _logits(m.folder, ids)
    rel = float((got - ref).norm() / ref.norm())
    assert 0 < rel < LOGIT_BOUND[weights]

    plan = Plan.skip(source, [0, 2, 3])  # made on the fp32 export: the layers it runs
    plan.save(tmp_path / "plan.json")
    rt = Runtime.load(m.folder)
    loaded = load_plan(tmp_path / "plan.json", rt.manifest)
    out = rt.generate([[5, 6, 7, 8]], 6, plan=loaded, stop_tokens=[])
    assert len(out.tokens[0]) == 6 and out.mean_layers == source.num_layers - 1
    assert len(rt.generate([[5, 6, 7, 8]], 6, stop_tokens=[]).tokens[0]) == 6


def test_int8_is_closer_to_fp32_than_int4_and_hqq_than_round_to_nearest(tiny_llama_export, quantized, tmp_path):
    ids = torch.randint(3, 512, (2, 24), generator=torch.Generator().manual_seed(1))
    ref = _logits(tiny_llama_export.folder, ids)

    def err(folder):
        return float((_logits(folder, ids) - ref).norm())

    hqq = {w: err(quantized("tiny_llama_export", w, "ort").folder) for w in ("int4", "int8")}
    assert hqq["int8"] < hqq["int4"] / 4
    rtn = quantize(tiny_llama_export.folder, tmp_path / "rtn", WeightQuant("int4", method="rtn"), progress=False,
                   log=quiet)
    assert hqq["int4"] < err(rtn.folder)


def test_resumes_after_an_interruption_and_redoes_a_damaged_file(tiny_llama_export, tmp_path, monkeypatch):
    from dlexport.exporter import quantize as module

    out, q = tmp_path / "q", WeightQuant("int4", accuracy_level=4)
    real, done = module.quantize_graph, []

    def interrupted(model, settings):
        if len(done) == 2:
            raise KeyboardInterrupt
        done.append(1)
        return real(model, settings)

    monkeypatch.setattr(module, "quantize_graph", interrupted)
    with pytest.raises(KeyboardInterrupt):
        quantize(tiny_llama_export.folder, out, q, progress=False, log=quiet)
    assert not (out / "manifest.json").exists() and not list(out.rglob(".*.partial"))
    first = {p: p.stat().st_mtime_ns for p in out.rglob("*.onnx")}
    assert sorted(p.name for p in first) == ["embed.onnx", "layer_00.onnx", "layer_01.onnx"]
    monkeypatch.setattr(module, "quantize_graph", real)
    quantize(tiny_llama_export.folder, out, q, progress=False, log=quiet)
    assert all(p.stat().st_mtime_ns == t for p, t in first.items())  # finished graphs were kept

    layer = out / "layers" / "layer_01.onnx"
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.onnx")}
    layer.write_bytes(layer.read_bytes()[:-10])  # damaged after the run finished
    m = quantize(tiny_llama_export.folder, out, q, progress=False, log=quiet)
    m.verify_files()
    assert [p for p in out.rglob("*.onnx") if p.stat().st_mtime_ns != mtimes[p]] == [layer]
    for name, bits in ((m.layer_key(0), 4), ("head", 8)):
        nodes = [n for n in onnx.load(m.path(name)).graph.node if n.op_type == "MatMulNBits"]
        assert [{a.name: a.i for a in n.attribute if a.name in ("accuracy_level", "bits", "block_size")}
                for n in nodes] == [{"accuracy_level": 4, "bits": bits, "block_size": 32}] * len(nodes)


@pytest.mark.parametrize("fixture", ["tiny_llama_export", "tiny_opt_export"])
def test_matmuls_reading_one_input_are_fused_bit_exactly(fixture, request, monkeypatch, tmp_path):
    import numpy as np

    from dlexport.engines.onnxruntime.loader import OrtConfig, create_session
    from dlexport.exporter import quantize as module

    source: Manifest = request.getfixturevalue(fixture)
    q = WeightQuant("int4", accuracy_level=4)
    fused = module.quantize_graph(onnx.load(source.path(source.layer_key(1))), q)
    monkeypatch.setattr(module, "_fuse_shared_input", lambda model: None)
    plain = module.quantize_graph(onnx.load(source.path(source.layer_key(1))), q)
    # q, k, v and (Llama) gate, up share their input: 4 kernels instead of 7 (OPT: 4 instead of 6)
    assert _weight_ops(fused)["MatMulNBits"] == 4 and _weight_ops(fused)["Split"] == 2 - (fixture == "tiny_opt_export")
    assert module.quantized_matmuls(fused) == module.quantized_matmuls(plain) == MATMULS_PER_LAYER[fixture]
    for name, model in (("fused", fused), ("plain", plain)):
        onnx.save(model, str(tmp_path / f"{name}.onnx"))
    sessions = [create_session(tmp_path / f"{name}.onnx", OrtConfig()) for name in ("fused", "plain")]
    rng = np.random.default_rng(0)
    dims = {"batch": 2, "tokens": 5, "capacity": 16, "past_plus_tokens": 8, "past_tokens": 3}
    feeds = {i.name: (np.full([2], 3, np.int64) if i.type == "tensor(int64)" else
                      rng.standard_normal([d if isinstance(d, int) else dims[d] for d in i.shape]).astype(np.float32))
             for i in sessions[0].get_inputs()}
    feeds["attention_mask"] = np.zeros_like(feeds["attention_mask"])
    for a, b in zip(*(s.run(None, feeds) for s in sessions)):
        assert np.array_equal(a, b)  # every output column computed as before


def test_head_weights_int4_on_request(tiny_opt_export, tmp_path):
    m = quantize(tiny_opt_export.folder, tmp_path / "q", WeightQuant("int4", head="int4"), progress=False, log=quiet)
    assert m.data["quantization"]["settings"]["head_weights"] == "int4"
    (node,) = [n for n in onnx.load(m.path("head")).graph.node if n.op_type == "MatMulNBits"]
    assert {a.name: a.i for a in node.attribute}["bits"] == 4


@pytest.mark.parametrize("fixture", ["tiny_llama_export", "tiny_opt_export"])
def test_embed_weights_int4_is_gather_block_quantized_within_half_a_step(fixture, request, tmp_path):
    import numpy as np
    from onnx import numpy_helper

    source: Manifest = request.getfixturevalue(fixture)
    m = quantize(source.folder, tmp_path / "q", WeightQuant("int4", embed="int4"), progress=False, log=quiet)
    assert m.data["quantization"]["settings"]["embed_weights"] == "int4" and m.data["quantization"]["unchanged"] == []
    ops = _weight_ops(onnx.load(m.path("embed")))
    assert ops.get("GatherBlockQuantized") == 1 and "Gather" not in ops  # OPT's positions are a GatherND: kept
    table = next(numpy_helper.to_array(i) for i in onnx.load(source.path("embed")).graph.initializer
                 if i.name == "tokens.weight")
    vocab, hidden = table.shape
    saved = source.path("embed").stat().st_size - m.path("embed").stat().st_size
    assert saved > 0.8 * table.nbytes  # 4 bits + a scale and a zero point per 32 (OPT's position table is kept)

    ids = torch.arange(vocab).reshape(-1, 32)  # every row of the table (OPT's positions stop at 256)
    got, ref = (ExportStack(folder).embed(ids)[0].reshape(1, vocab, hidden) for folder in (m.folder, source.folder))
    # asymmetric round to nearest over blocks of 32 along the hidden size, range widened to hold 0 (ONNX Runtime's
    # rule): every value within half a quantisation step of its block, and no closer than fp32 (it is quantised)
    blocks = table.reshape(vocab, hidden // 32, 32)
    step = (np.maximum(blocks.max(-1), 0) - np.minimum(blocks.min(-1), 0)) / 15
    err = (got[0] - ref[0]).abs().numpy().reshape(vocab, hidden // 32, 32).max(-1)
    assert 0 < err.max() and (err <= step / 2 * (1 + 1e-4) + 1e-7).all()
    out = Runtime.load(m.folder).generate([[5, 6, 7, 8]], 6, stop_tokens=[])
    assert len(out.tokens[0]) == 6
    with pytest.raises(ValueError, match="--embed-weights int4 writes ONNX Runtime's GatherBlockQuantized"):
        WeightQuant("int4", format="qdq", embed="int4")


def test_refusals(tiny_llama_export, quantized, tmp_path):
    src = tiny_llama_export.folder
    with pytest.raises(ValueError, match="signed .symmetric."):
        WeightQuant("int4", format="qdq", symmetric=False)
    with pytest.raises(ValueError, match="needs --format ort"):
        WeightQuant("int8", format="qdq", accuracy_level=4)
    with pytest.raises(ValueError, match="with --format ort it is asymmetric"):
        WeightQuant("int4", symmetric=True, method="hqq")
    with pytest.raises(ValueError, match="use --method rtn, the int8 default"):
        WeightQuant("int8", method="hqq")
    assert WeightQuant("int4", symmetric=True).method == WeightQuant("int8").method == "rtn"
    with pytest.raises(ValueError, match="power of two"):
        WeightQuant("int4", block_size=24)
    with pytest.raises(ValueError, match="--weights 'int3'"):
        WeightQuant("int3")
    with pytest.raises(ExportDirError, match="source export itself"):
        quantize(src, src, progress=False, log=quiet)
    with pytest.raises(ValueError, match="already quantised"):
        quantize(quantized("tiny_llama_export", "int4", "ort").folder, tmp_path / "x", progress=False, log=quiet)
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    with pytest.raises(ExportDirError, match="not a dlexport export"):
        quantize(src, user, progress=False, log=quiet)
    assert (user / "notes.txt").read_text() == "mine"
    out = tmp_path / "q"
    quantize(src, out, WeightQuant("int8"), progress=False, log=quiet)
    with pytest.raises(ExportDirError, match="--overwrite"):
        quantize(src, out, WeightQuant("int4"), progress=False, log=quiet)
    m = quantize(src, out, WeightQuant("int4"), overwrite=True, progress=False, log=quiet)
    assert m.data["quantization"]["settings"]["bits"] == 4


def test_cli_quantize_validates_and_reports(tiny_opt_export, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quantize", str(tiny_opt_export.folder), "--out", str(out), "--weights", "int8", "--format", "qdq",
                 "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "quantised 25 MatMuls" in printed and "perplexity" in printed and "top-1 agreement" in printed
    quality = Manifest.load(out).data["quantization"]["quality"]
    assert quality["tokens"] >= 2000
    assert main(["inspect", str(out)]) == 0
    described = capsys.readouterr().out
    assert "weights      int8 (head int8), qdq, rtn, block 32, symmetric" in described
    assert f"top-1 agreement {quality['agreement']:.4f}" in described
    assert main(["quantize", str(tiny_opt_export.folder), "--out", str(tmp_path / "bad"), "--weights", "int4",
                 "--format", "qdq", "--no-symmetric"]) == 2
    assert "--format ort for asymmetric" in capsys.readouterr().err
