"""Start ``tritonserver`` on a model repository, wait until it is ready, stop it cleanly.

The bundled server (``nvidia-pytriton``, in the prepared environment, see environment.py) by default, or a given
``tritonserver`` (an NGC container's, whose Python backend already reads numpy 2; dlexport must be importable by
its Python then). Binds to 127.0.0.1 unless told otherwise.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError, MissingFileError, UnavailableError
from .environment import TritonEnv, check_env


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class Server:
    repository: Path
    host: str = "127.0.0.1"
    http_port: int = 0  # 0: a free port
    grpc_port: int = 0
    metrics_port: int = 0
    tritonserver: Path | None = None  # None: the bundled one of ``env``
    env: TritonEnv | None = None
    log: Path | None = None  # where the server writes its output (default: a new temporary file)
    extra_args: list[str] = field(default_factory=list)
    process: subprocess.Popen | None = None

    def __post_init__(self):
        self.repository = Path(self.repository).resolve()
        if not self.repository.is_dir():
            raise MissingFileError(f"model repository {self.repository} does not exist: write one with "
                                   "`dlexport serve-repo DIR --out REPO`")
        self.http_port = self.http_port or free_port()
        self.grpc_port = self.grpc_port or free_port()
        self.metrics_port = self.metrics_port or free_port()
        if self.log is None:
            import tempfile

            fd, name = tempfile.mkstemp(prefix="tritonserver-", suffix=".log")
            os.close(fd)
            self.log = Path(name)

    @property
    def http_url(self) -> str:
        return f"{_client_host(self.host)}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{_client_host(self.host)}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{_client_host(self.host)}:{self.metrics_port}/metrics"

    def command(self) -> tuple[list[str], dict]:
        if self.tritonserver is not None:
            binary, env, backends = Path(self.tritonserver), dict(os.environ), []
            if not binary.is_file():
                raise MissingFileError(f"--tritonserver {binary} is not a file: give the path of the binary")
        else:
            self.env = self.env or check_env()
            binary, env = self.env.tritonserver, self.env.process_env()
            backends = [f"--backend-directory={self.env.backends}"]
        cmd = [str(binary), f"--model-repository={self.repository}", *backends,
               f"--http-address={self.host}", f"--http-port={self.http_port}",
               f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
               f"--metrics-address={self.host}", f"--metrics-port={self.metrics_port}",
               "--allow-gpu-metrics=false", "--exit-timeout-secs=10", *self.extra_args]
        return cmd, env

    def start(self, timeout: float = 300.0) -> "Server":
        """Start and wait until every model is ready; on failure the server's own last lines are in the error."""
        cmd, env = self.command()
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True, preexec_fn=_die_with_parent)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise UnavailableError(f"tritonserver exited with code {self.process.returncode} before it was "
                                       f"ready; its log ({self.log}) ends with: {self.log_tail()}")
            if self.ready():
                return self
            time.sleep(0.25)
        self.stop()
        raise UnavailableError(f"tritonserver was not ready after {timeout:.0f} s; its log ({self.log}) ends with: "
                               f"{self.log_tail()}")

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 30.0) -> None:
        """SIGINT (Triton unloads its models and stops its stubs), then SIGKILL to the group if it hangs."""
        p = self.process
        if p is None or p.poll() is not None:
            return
        p.send_signal(signal.SIGINT)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)

    def __enter__(self):
        return self.start() if self.process is None else self

    def __exit__(self, *exc):
        self.stop()


def _die_with_parent() -> None:
    """Linux: the server gets SIGTERM (a clean shutdown) when the process that started it dies, so a killed test
    run or CLI never leaves a server holding its ports. It runs in its own session, so a terminal's Ctrl-C reaches
    only dlexport, which stops it in order."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _client_host(host: str) -> str:
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if ":" in host and not host.startswith("["):
        return f"[{host}]"
    return host


def check_host(host: str) -> str:
    try:
        socket.getaddrinfo(host, None)
    except socket.gaierror:
        raise InputError(f"--host {host!r} is not an address of this machine: use 127.0.0.1 (default) or "
                         "0.0.0.0 to listen on every interface") from None
    return host
