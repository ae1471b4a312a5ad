"""TensorRT for RTX builds real engines here without a GPU; its engines cannot run here (no GPU it supports)."""
import pytest

from dlexport.engines.base import BackendUnavailableError


@pytest.fixture(scope="session")
def rtx():
    from dlexport.engines.tensorrt.compat import load_flavour

    try:
        return load_flavour("tensorrt-rtx")
    except BackendUnavailableError as e:
        pytest.skip(f"TensorRT for RTX is not installed, so no engine can be built here: {e}")
