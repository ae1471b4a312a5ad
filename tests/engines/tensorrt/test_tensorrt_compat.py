"""What differs between standard TensorRT and TensorRT for RTX: typing, precision flags, targets, timing cache."""
from types import SimpleNamespace

import pytest

from dlexport.engines.base import BackendUnavailableError
from dlexport.engines.tensorrt.compat import RTX_DEFAULT_CAPABILITIES, Flavour, load_flavour

# Stand-in for the `tensorrt` module: only the enums the compat layer reads (standard TensorRT is not installed here).
STANDARD = SimpleNamespace(__version__="10.3.0", NetworkDefinitionCreationFlag=SimpleNamespace(STRONGLY_TYPED=1),
                           BuilderFlag=SimpleNamespace(FP16="FP16", BF16="BF16"))


class RecordingConfig:
    def __init__(self):
        self.flags = []

    def set_flag(self, flag):
        self.flags.append(flag)


def test_standard_tensorrt_keeps_the_graph_types_or_uses_precision_flags():
    trt = Flavour("tensorrt", STANDARD, "tensorrt")
    assert trt.strongly_typed_for("float16", "float16") and trt.network_flags(True) == 1 << 1
    assert not trt.strongly_typed_for("float16", "float32") and trt.network_flags(False) == 0
    config = RecordingConfig()
    trt.set_precision(config, "bfloat16", strongly_typed=False)
    trt.set_precision(config, "float16", strongly_typed=True)  # nothing to set: the graph is fp16 already
    assert config.flags == ["BF16"]
    with pytest.raises(ValueError, match="an fp32 engine needs an fp32 export"):
        trt.strongly_typed_for("float32", "float16")
    assert trt.has_timing_cache and trt.set_capabilities(RecordingConfig(), ()) == ()


def test_tensorrt_for_rtx_is_strongly_typed_and_targets_capabilities(rtx):
    assert rtx.network_flags(True) == 0 and not rtx.has_timing_cache
    assert rtx.strongly_typed_for("float16", "float16")
    with pytest.raises(ValueError, match="strongly typed.*this export is float32, not float16"):
        rtx.strongly_typed_for("float16", "float32")
    config = rtx.trt.Builder(rtx.logger()).create_builder_config()
    assert rtx.set_capabilities(config, ()) == RTX_DEFAULT_CAPABILITIES and config.num_compute_capabilities == 0
    assert rtx.set_capabilities(config, ("8.6", "12.0")) == ("8.6", "12.0")
    assert config.num_compute_capabilities == 2
    assert config.get_compute_capability(1) == rtx.trt.ComputeCapability.SM120


def test_unknown_or_missing_flavours_say_what_to_do():
    with pytest.raises(ValueError, match="choose one of tensorrt, tensorrt-rtx"):
        load_flavour("tensorrt-llm")
    try:
        load_flavour("tensorrt")
    except BackendUnavailableError as e:
        assert "install TensorRT 10" in str(e)
    else:
        pytest.skip("standard TensorRT is installed here")
