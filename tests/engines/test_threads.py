"""Every ONNX Runtime session of a multi-threaded runtime joins the process's one shared pool (issue 16).

ONNX Runtime creates that pool once per process, so the checks run in a fresh interpreter each.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from dlexport.engines.threads import resolve_threads


def _in_fresh_process(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_every_session_of_a_runtime_uses_the_shared_pool(tiny_llama_export):
    out = _in_fresh_process(f"""
        import torch
        from dlexport.engines import threads
        from dlexport.runtime import Runtime

        rt = Runtime.load({str(tiny_llama_export.folder)!r}, threads=2)
        assert threads.pool_size() == 2, threads.pool_size()
        assert torch.get_num_threads() == 2
        for name, engine in rt.engines.items():
            so = engine.session.get_session_options()
            assert not so.use_per_session_threads, name
        # a second runtime in the same process joins the same pool
        again = Runtime.load({str(tiny_llama_export.folder)!r})
        assert all(not e.session.get_session_options().use_per_session_threads for e in again.engines.values())
        print(len(rt.engines), len(again.engines))
    """)
    assert out.split() == ["7", "7"]  # embed, head, 4 layers, the group of the 4 layers


def test_one_thread_needs_no_pool_and_a_second_pool_size_is_refused(tiny_llama_export):
    out = _in_fresh_process(f"""
        import torch
        from dlexport.engines import threads
        from dlexport.runtime import Runtime

        one = Runtime.load({str(tiny_llama_export.folder)!r}, threads=1)
        assert threads.pool_size() is None  # the calling thread alone: nothing spinning
        assert torch.get_num_threads() == 1
        for e in one.engines.values():
            so = e.session.get_session_options()
            assert so.use_per_session_threads and so.intra_op_num_threads == 1
        two = Runtime.load({str(tiny_llama_export.folder)!r}, threads=2)
        for bad in (3, 1):  # once the pool exists, ONNX Runtime runs every session on it
            try:
                Runtime.load({str(tiny_llama_export.folder)!r}, threads=bad)
            except ValueError as e:
                print("refused:", e)
        # the single-threaded runtime still runs, and gives the pooled runtime's tokens
        print(one.generate([[1, 2, 3]], 6, stop_tokens=[]).tokens == two.generate([[1, 2, 3]], 6, stop_tokens=[]).tokens)
    """)
    assert out.count("already runs ONNX Runtime on a shared pool of 2 threads") == 2
    assert "threads=3 asked for" in out and "threads=1 asked for" in out
    assert "load with threads=2 or threads=None" in out
    assert out.strip().endswith("True")


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", True])
def test_a_bad_thread_count_is_refused(bad):
    with pytest.raises(ValueError, match="threads must be a whole number >= 1"):
        resolve_threads(bad)


def test_the_default_is_every_usable_core(tiny_llama_export):
    out = _in_fresh_process(f"""
        import os
        from dlexport.engines import threads
        from dlexport.runtime import Runtime

        rt = Runtime.load({str(tiny_llama_export.folder)!r})
        cores = len(os.sched_getaffinity(0))
        assert rt.threads == cores, (rt.threads, cores)
        assert threads.pool_size() == (cores if cores > 1 else None)
        print("ok")
    """)
    assert out.strip() == "ok"
