"""Small text settings so that every plan test runs in seconds on two cores."""
from __future__ import annotations

import pytest
import torch

from dlexport.plans.calibrate import TextConfig


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def small_text() -> TextConfig:
    return TextConfig(seq_len=32, calib_seqs=6, eval_seqs=6)
