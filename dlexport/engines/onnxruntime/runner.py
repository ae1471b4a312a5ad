"""ONNX Runtime engine: numpy feeds on the CPU (cheapest there), IO binding to torch buffers on CUDA, and on the CPU
too when outputs must land in given buffers (an in-place layer writing its KV buffer)."""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import torch

from ...contract import TensorSpec
from ..base import TORCH_DTYPES, Engine, OutputPool
from .config import OrtConfig
from .loader import create_session

_NP = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64}


class OrtEngine(Engine):
    """``lazy``: the session is created on the first call (single layers a layer group also covers are opened only
    when a strategy runs them apart)."""

    def __init__(self, name: str, path: Path, inputs: list[TensorSpec], outputs: list[TensorSpec], config: OrtConfig,
                 *, lazy: bool = False):
        self.name, self.path, self.inputs, self.outputs, self.config = name, Path(path), inputs, outputs, config
        self._session = None if lazy else create_session(self.path, config)
        self._opening = threading.Lock()
        self.on_gpu = config.provider in ("cuda", "tensorrt")
        self.device = torch.device("cuda", config.device_id) if self.on_gpu else torch.device("cpu")
        self._output_names = [o.name for o in outputs]
        self._where = ("cuda", config.device_id) if self.on_gpu else ("cpu", 0)
        # each output's dims: a number, or (input, axis) that carries the same symbolic dim (resolved per call)
        source = {d: (s.name, a) for s in inputs for a, d in enumerate(s.shape) if isinstance(d, str)}
        self._free_outputs = [(o.name, [source[d] if isinstance(d, str) else d for d in o.shape], TORCH_DTYPES[o.dtype])
                              for o in outputs]
        self._local = threading.local()  # bindings and output buffers per thread: requests may run concurrently

    @property
    def session(self):
        if self._session is None:
            with self._opening:
                if self._session is None:
                    self._session = create_session(self.path, self.config)
        return self._session

    def _state(self):
        """This thread's IO binding, its output buffers, and what is bound: name -> (pointer, shape)."""
        st = self._local
        if not hasattr(st, "binding"):
            st.binding, st.pool, st.bound = self.session.io_binding(), OutputPool(self.device), {}
        return st

    def run(self, feeds: dict[str, torch.Tensor], out: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        if self.on_gpu or out:
            return self._run_bound(feeds, out or {})
        results = self.session.run(self._output_names, {k: v.numpy() for k, v in feeds.items()})
        return {n: torch.from_numpy(r) for n, r in zip(self._output_names, results)}

    def _run_bound(self, feeds: dict[str, torch.Tensor], out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every tensor bound by address, no host copy and no allocation per call: the given outputs (ONNX Runtime
        writes them in place), the others to reused buffers (views valid until this thread's next call of this
        engine). A binding whose address and shape did not change since the last call (a request's KV buffers, the
        previous layer's output buffer) is kept as it is, so a decode step rebinds only what moved.

        On CUDA, ONNX Runtime runs on torch's current stream (``user_compute_stream``), so ordering needs no sync.
        """
        st = self._state()
        b, bound = st.binding, st.bound
        held = []  # contiguous copies live until the run is done
        for name, t in feeds.items():
            if not t.is_contiguous():
                t = t.contiguous()
                held.append(t)
            key = (t.data_ptr(), t.shape)
            if bound.get(name) != key:
                b.bind_input(name, *self._where, _NP[t.dtype], key[1], key[0])
                bound[name] = key
        results = dict(out)
        for name, dims, dtype in self._free_outputs:
            if name not in results:
                shape = tuple(feeds[d[0]].shape[d[1]] if isinstance(d, tuple) else d for d in dims)
                results[name] = st.pool.view(name, shape, dtype)
        for name, t in results.items():
            key = (t.data_ptr(), t.shape)
            if bound.get(name) != key:
                b.bind_output(name, *self._where, _NP[t.dtype], key[1], key[0])
                bound[name] = key
        self.session.run_with_iobinding(b)
        return results
