"""`dlexport serve EXPORT`: a temporary repository, the endpoints printed, Ctrl-C stops everything."""
from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

from dlexport.serving.client import connect, generate
from dlexport.serving.server import free_port


def test_serve_a_folder_then_ctrl_c(triton_env, tiny_llama_export, reference):
    ports = [free_port() for _ in range(3)]
    cmd = [sys.executable, "-m", "dlexport", "serve", str(tiny_llama_export.folder), "--threads", "1",
           "--http-port", str(ports[0]), "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2])]
    # SIGINT as at a terminal, even when the suite itself runs in the background (`cmd &` starts with it ignored)
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         cwd=Path(__file__).resolve().parents[2],
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        line = p.stdout.readline()  # blocks until ready (or the command failed)
        assert line.startswith("ready: HTTP 127.0.0.1:"), (line, p.stderr.read() if p.poll() is not None else "")
        assert f"gRPC 127.0.0.1:{ports[1]}" in line and f"127.0.0.1:{ports[2]}/metrics" in line
        got = generate(connect(f"127.0.0.1:{ports[0]}", "http"), [1, 2, 3], 5)
        assert got.tokens == reference.generate([[1, 2, 3]], 5).tokens[0]
        p.send_signal(signal.SIGINT)
        assert p.wait(60) == 0
        log = p.stderr.read()
        repo = re.search(r"starting tritonserver on (\S+)", log).group(1)
        assert not Path(repo).exists(), "the temporary repository is removed"
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(10)
    assert all(_free(port) for port in ports), "tritonserver still listens"


def _free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a closed connection's TIME_WAIT is not a listener
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False
