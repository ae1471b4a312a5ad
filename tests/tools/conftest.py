"""Fixtures for the profiling and benchmark tests: a monolithic export of tiny-llama, made once per session."""
from __future__ import annotations

import pytest

from dlexport.exporter import load_model


@pytest.fixture(scope="session")
def tiny_llama_mono(tiny_llama_export, tmp_path_factory):
    from dlexport.tools.monolithic import ensure_monolithic

    folder = tmp_path_factory.mktemp("mono") / "tiny-llama"
    return ensure_monolithic(tiny_llama_export, lambda: load_model("tiny-llama", random_weights=True).model, folder,
                             log=lambda *a: None)
