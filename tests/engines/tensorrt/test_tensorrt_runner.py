"""Loading TensorRT engine folders: refusals (checked on real TensorRT for RTX engines) and execution (GPU only)."""
import json
import shutil

import pytest
import torch

from dlexport.engines.base import BackendUnavailableError
from dlexport.engines.build import build_engines
from dlexport.engines.folder import open_engine_folder
from dlexport.engines.tensorrt.compat import RTX_DEFAULT_CAPABILITIES, device_capability, runs_on
from dlexport.engines.tensorrt.runner import EngineMismatchError, check_compatible
from dlexport.runtime.plan import Plan


@pytest.fixture(scope="module")
def rtx_folder(tiny_llama_export, rtx, tmp_path_factory):
    out = tmp_path_factory.mktemp("rtx") / "engines"
    build_engines(tiny_llama_export.folder, out, plan=Plan.skip(tiny_llama_export, [0, 2]), backend="tensorrt-rtx",
                  progress=False, log=lambda *a: None, max_batch=2, max_prompt=32, max_context=64)
    return out


@pytest.fixture
def folder(rtx_folder, tmp_path):
    return shutil.copytree(rtx_folder, tmp_path / "engines")


def _edit_index(folder, change):
    data = json.loads((folder / "engines.json").read_text())
    change(data)
    (folder / "engines.json").write_text(json.dumps(data))


def test_engine_from_another_tensorrt_version_is_refused(folder):
    _edit_index(folder, lambda d: d["engines"]["layer_02"]["metadata"].update(version="1.6.0.1"))
    with pytest.raises(EngineMismatchError, match=r"built by tensorrt-rtx 1\.6\.0\.1.*rebuild.*dlexport build"):
        open_engine_folder(folder, device="cuda")


def test_engine_from_another_flavour_is_refused(folder):
    _edit_index(folder, lambda d: d["engines"]["embed"]["metadata"].update(flavour="tensorrt", version="10.3.0"))
    with pytest.raises(EngineMismatchError, match="built by tensorrt 10.3.0"):
        open_engine_folder(folder, device="cuda")


def test_corrupt_engine_file_is_refused(folder):
    path = folder / "layer_00.engine"
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    path.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="layer_00.engine does not match engines.json.*corrupt"):
        open_engine_folder(folder, device="cuda")


def test_missing_engine_file_is_refused(folder):
    (folder / "head.engine").unlink()
    with pytest.raises(FileNotFoundError, match="head.engine is missing.*dlexport build"):
        open_engine_folder(folder, device="cuda")


def test_engine_built_from_another_graph_is_refused(folder):
    _edit_index(folder, lambda d: d["manifest"]["subgraphs"]["layer_02"]["files"][0].update(sha256="0" * 64))
    with pytest.raises(ValueError, match="engine layer_02 was built from another ONNX graph"):
        open_engine_folder(folder, device="cuda")


def test_other_folder_format_version_is_refused(folder):
    _edit_index(folder, lambda d: d.update(format_version=2))
    with pytest.raises(ValueError, match="format 2"):
        open_engine_folder(folder)


def test_layers_that_were_not_built_are_refused(folder):
    with pytest.raises(ValueError, match="no engines for layer_01"):
        open_engine_folder(folder, device="cuda", layers=[0, 1])


def test_engines_need_a_cuda_device(folder):
    with pytest.raises(ValueError, match="pass device='cuda'"):
        open_engine_folder(folder, device="cpu")
    if torch.cuda.is_available():
        return
    with pytest.raises(BackendUnavailableError, match="need a CUDA GPU"):
        open_engine_folder(folder, device="cuda")


def test_other_gpu_is_refused(rtx):
    rtx_meta = {"flavour": "tensorrt-rtx", "version": rtx.version,
                "compute_capabilities": list(RTX_DEFAULT_CAPABILITIES), "device_name": None}
    for capability in ("8.6", "8.9", "12.0", "12.1"):
        check_compatible("layer_00", rtx_meta, rtx, capability, "rebuild")
    for capability in ("8.7", "9.0", "7.5"):  # Jetson Orin, Hopper, Turing (not in the defaults)
        with pytest.raises(EngineMismatchError, match=f"compute capability {capability}"):
            check_compatible("layer_00", rtx_meta, rtx, capability, "rebuild")
    from dlexport.engines.tensorrt.compat import Flavour

    standard = Flavour("tensorrt", rtx.trt, "tensorrt")  # only name and version are compared
    orin_meta = {"flavour": "tensorrt", "version": rtx.version, "compute_capabilities": ["8.7"],
                 "device_name": "Orin"}
    check_compatible("embed", orin_meta, standard, "8.7", "rebuild")
    with pytest.raises(EngineMismatchError, match="built for Orin.*compute capability 8.6"):
        check_compatible("embed", orin_meta, standard, "8.6", "rebuild")
    assert runs_on("12.0", ("12.x",)) and not runs_on("8.7", ("8.6",))


def _runnable_here(data) -> str | None:
    """Why the engines cannot run here, or None when they can."""
    capability = device_capability()
    if capability is None:
        return "no CUDA GPU here"
    targets = tuple(data["engines"]["embed"]["metadata"]["compute_capabilities"])
    if not runs_on(capability, targets):
        return f"this GPU (compute capability {capability}) is not among the engines' targets {targets}"
    return None


def test_engines_match_onnx_runtime_on_the_gpu(rtx_folder, tiny_llama_export):
    """Run each built engine on both profiles and compare with ONNX Runtime on the export (needs a supported GPU)."""
    data = json.loads((rtx_folder / "engines.json").read_text())
    reason = _runnable_here(data)
    if reason:
        pytest.skip(f"TensorRT engine execution not possible: {reason}; TensorRT for RTX engines run only on "
                    "compute capability 8.0/8.6/8.9/12.x GPUs")
    from dlexport.engines import open_engines
    from dlexport.runtime.runtime import Runtime

    _, trt_engines = open_engine_folder(rtx_folder, device="cuda")
    _, ort_engines = open_engines(tiny_llama_export.folder, layers=[0, 2])
    gen = torch.Generator().manual_seed(0)
    for name, engine in trt_engines.items():
        for tokens, past in ((5, 12), (1, 20)):  # prefill, decode
            feeds = {}
            for spec in engine.inputs:
                sizes = {"batch": 2, "tokens": tokens, "past": past, "past_plus_tokens": past + tokens}
                shape = [sizes.get(d, d) for d in spec.shape]
                feeds[spec.name] = (torch.randint(0, 200, shape, generator=gen) if spec.dtype == "int64"
                                    else torch.randn(shape, generator=gen))
            want = ort_engines[name].run(feeds)
            got = engine.run({k: v.cuda() for k, v in feeds.items()})
            for k in want:
                torch.testing.assert_close(got[k].cpu(), want[k], atol=2e-3, rtol=2e-3)
    plan = Plan.skip(tiny_llama_export, [0, 2])
    expected = Runtime.load(tiny_llama_export.folder).generate([[1, 5, 7]], 8, plan).tokens
    assert Runtime.load(rtx_folder, device="cuda").generate([[1, 5, 7]], 8, plan).tokens == expected


class _FakeContext:
    """Records what the runner asks of an execution context (the TensorRT 10 calls it makes)."""

    def __init__(self):
        self.calls = []

    def set_device_memory(self, ptr, size):
        self.calls.append(("memory", ptr, size))

    def set_optimization_profile_async(self, index, stream):
        self.calls.append(("profile", index))

    def set_input_shape(self, name, shape):
        self.calls.append(("shape", name, tuple(shape)))

    def set_tensor_address(self, name, ptr):
        self.calls.append(("address", name, ptr))

    def execute_async_v3(self, stream):
        self.calls.append(("execute",))
        return True


class _FakeEngine:
    def __init__(self, trt, tensors: dict, scratch: int):
        self.trt, self.tensors, self.device_memory_size_v2 = trt, tensors, scratch
        self.num_io_tensors = len(tensors)
        self.context = _FakeContext()
        self.strategy = None

    def get_tensor_name(self, i):
        return list(self.tensors)[i]

    def get_tensor_dtype(self, name):
        return self.tensors[name]

    def create_runtime_config(self):
        engine = self

        class Config:
            def set_execution_context_allocation_strategy(self, strategy):
                engine.strategy = strategy

        return Config()

    def create_execution_context(self, config):
        return self.context


def test_runner_binds_shapes_addresses_profiles_and_one_shared_scratch(rtx, monkeypatch):
    """The runner's bookkeeping against a recording stand-in for TensorRT's engine (real execution needs a GPU)."""
    from dlexport.engines.tensorrt.config import ShapeLimits, profiles_for
    from dlexport.engines.tensorrt.runner import TrtEngine, share_scratch
    from dlexport.exporter.architectures import TensorSpec

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: type("S", (), {"cuda_stream": 7})())
    trt = rtx.trt
    inputs = [TensorSpec("hidden_states", ("batch", "tokens", 8), "float32"),
              TensorSpec("past_key_values.0.key", ("batch", 2, "past", 4), "float32")]
    outputs = [TensorSpec("present.0.key", ("batch", 2, "tokens", 4), "float32")]
    profiles = profiles_for([s.to_json() for s in inputs], ShapeLimits(2, 16, 32, 4))
    tensors = {"hidden_states": trt.DataType.FLOAT, "past_key_values.0.key": trt.DataType.FLOAT,
               "present.0.key": trt.DataType.FLOAT}
    small, large = _FakeEngine(trt, tensors, 1000), _FakeEngine(trt, tensors, 5000)
    cpu = torch.device("cpu")
    engines = [TrtEngine(f"layer_0{i}", e, inputs, outputs, profiles, rtx, cpu) for i, e in enumerate((small, large))]
    assert small.strategy == trt.ExecutionContextAllocationStrategy.USER_MANAGED
    scratch = share_scratch(engines, cpu)
    assert scratch.numel() == 5000
    assert small.context.calls == large.context.calls == [("memory", scratch.data_ptr(), 5000)]

    engine, ctx = engines[0], small.context
    ctx.calls.clear()
    hidden, cache = torch.randn(1, 5, 8), torch.zeros(1, 2, 20, 4)
    out = engine.run({"hidden_states": hidden, "past_key_values.0.key": cache})
    assert out["present.0.key"].shape == (1, 2, 5, 4)
    assert ctx.calls == [("profile", 0), ("shape", "hidden_states", (1, 5, 8)),
                         ("address", "hidden_states", hidden.data_ptr()),
                         ("shape", "past_key_values.0.key", (1, 2, 20, 4)),
                         ("address", "past_key_values.0.key", cache.data_ptr()),
                         ("address", "present.0.key", out["present.0.key"].data_ptr()), ("execute",)]
    ctx.calls.clear()
    engine.run({"hidden_states": torch.randn(1, 1, 8), "past_key_values.0.key": cache})  # one new token: decode
    assert ctx.calls[0] == ("profile", 1)
    ctx.calls.clear()
    engine.run({"hidden_states": torch.randn(1, 1, 8), "past_key_values.0.key": cache})
    assert ("profile", 1) not in ctx.calls  # unchanged profile is not set again
