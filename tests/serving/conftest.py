"""A real tritonserver on 127.0.0.1 (free ports) serving the tiny Llama export, one per test module."""
from __future__ import annotations

import pytest

from dlexport.runtime import ExitPolicy, Plan, Runtime
from dlexport.runtime.plan import Draft
from dlexport.serving.repository import RepoSettings, write_repository

START_TIMEOUT_S = 120


@pytest.fixture(scope="session")
def triton_env():
    """The prepared Python environment for the bundled server, or a skip naming the command that makes it."""
    pytest.importorskip("tritonclient.grpc", reason="tritonclient is not installed: pip install -e '.[serve]'")
    from dlexport.errors import DlexportError
    from dlexport.serving.environment import check_env

    try:
        return check_env()
    except DlexportError as e:
        pytest.skip(f"tritonserver is not set up: {e}")


@pytest.fixture(scope="session")
def served_plans(tiny_llama_export, tmp_path_factory):
    """Plans the test servers carry: a skip plan, an early-exit plan that exits often, a speculative draft."""
    m = tiny_llama_export
    plans = {"skip": Plan.skip(m, (0, 1, 3)),
             "exit": Plan.skip(m, range(4), exit=ExitPolicy((0, 1, 2), "top1_prob", 0.05)),
             "spec": Plan.skip(m, range(4), draft=Draft((0, 1), k=3, adaptive=False))}
    folder = tmp_path_factory.mktemp("plans")
    for name, plan in plans.items():
        plan.save(folder / f"{name}.json")
    return {name: folder / f"{name}.json" for name in plans}


@pytest.fixture(scope="session")
def reference(tiny_llama_export):
    """The library itself, in this process: what every served answer must equal."""
    return Runtime.load(tiny_llama_export.folder)


def start_server(export, plans, out, **settings):
    from dlexport.serving.server import Server

    write_repository(export.folder, out, RepoSettings(plans=plans, threads=1, **settings))
    server = Server(out)
    try:
        server.start(START_TIMEOUT_S)
    except Exception:
        server.stop()
        raise
    return server
