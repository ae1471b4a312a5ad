"""CPU threads of a dlexport process: the one place that decides them.

A runtime opens one ONNX Runtime session per subgraph (30+ for a small model). Sessions with their own intra-op pool
each start their own spinning worker threads, and 30 pools fighting over the machine's cores made two threads 12x
slower than one (issue 16). So every session of every runtime in a process that asks for more than one thread joins
**one shared intra-op pool** (ONNX Runtime's global thread pool, created once per process); a session asked for one
thread runs on the calling thread alone, as long as no pool exists. ONNX Runtime cannot resize its global pool once
made and then runs every session of the process on it, so a process holds one size: a different request is refused
with the ways out. (Other ONNX Runtime sessions the user creates in that process must then set
``SessionOptions.use_per_session_threads = False``: ONNX Runtime's rule, not dlexport's.)

torch's intra-op threads are set to the same count, so that the runtime's few torch ops (masks, argmax, copies) and
the calibration tools' PyTorch work use the cores the user gave and no more.

The default is every core this process may run on (``os.sched_getaffinity``): measured fastest on the 2-core CI
machine (benchmarks/threads-smollm2-*), where the shared pool makes 2 threads ~1.6x faster than 1. Users on machines
with many cores and small models should sweep (``dlexport bench --threads-sweep 1,2,4,...``) and pass ``--threads``.
"""
from __future__ import annotations

import os
import threading

from ..errors import InputError

MAX_THREADS = 1024
_lock = threading.Lock()
_pool_size: int | None = None  # size of this process's shared ONNX Runtime pool, once created


def default_threads() -> int:
    """Cores this process may run on (respects taskset/cgroup CPU sets, unlike os.cpu_count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def resolve_threads(threads: int | None) -> int:
    """The thread count a request means: an explicit count, else the process's shared pool, else the default."""
    if threads is None:
        return _pool_size or default_threads()
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= MAX_THREADS:
        raise InputError(f"threads must be a whole number >= 1 and <= {MAX_THREADS} (leave it out for the default, "
                         f"{default_threads()} here); got {threads!r}")
    return threads


def claim(threads: int) -> bool:
    """Whether a session asked for ``threads`` threads must run on the shared pool (creating it on first need).

    ``threads=1`` before any pool exists runs on the calling thread (no pool: other ONNX Runtime users of the
    process are not affected). Once the pool exists, ONNX Runtime runs *every* session of the process on it, so only
    its own size can be had.
    """
    global _pool_size
    with _lock:
        if _pool_size is None and threads == 1:
            return False
        if _pool_size is None:
            import onnxruntime

            # intra-op = `threads` (the calling thread plus threads-1 workers); inter-op 1: graphs run in sequence.
            onnxruntime.set_global_thread_pool_sizes(threads, 1)
            _pool_size = threads
        if _pool_size != threads:
            raise InputError(
                f"threads={threads} asked for, but this process already runs ONNX Runtime on a shared pool of "
                f"{_pool_size} threads, which ONNX Runtime cannot resize or leave: load with threads={_pool_size} or "
                f"threads=None, or run the {threads}-thread setting in another process (`dlexport bench "
                "--threads-sweep` does that for you)")
        return True


def pool_size() -> int | None:
    """The shared pool's size, or None while no session of this process has needed one."""
    return _pool_size


def use_threads(threads: int | None) -> int:
    """Apply a request's thread count to the process: torch's intra-op threads now, ONNX Runtime's pool when the
    first session needs it. Every entry point (Runtime.load, bench, profile, plan tools) calls this."""
    import torch

    n = resolve_threads(threads)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n
