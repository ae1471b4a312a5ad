"""The Python environment Triton's Python backend runs dlexport in, and the ``tritonserver`` that uses it.

Why a separate environment: the ``nvidia-pytriton`` wheel bundles ``tritonserver`` 2.51 with a Python-backend stub
built against pybind11 2.10, which reads numpy's array descriptors directly; numpy 2 moved their fields, so under
numpy 2 every tensor the stub hands over is garbage (BYTES inputs fail to unpack, outputs come back empty).
pybind11 2.12 fixed it (python_backend took it after 2.51). numpy 1.26 works, but torch and ONNX Runtime here use
numpy 2, and the wheel itself requires numpy < 2: installing it normally would downgrade numpy for everything.

So ``prepare_env`` makes a venv *with* the system's site-packages (torch, onnxruntime, transformers, dlexport come
from there) that holds only numpy 1.26 and the wheel (installed without its dependencies). The stub embeds
libpython and finds its ``sys.executable`` on ``PATH``; with the venv's ``bin`` first on ``PATH``, it reads the
venv's ``pyvenv.cfg``, so the venv's numpy 1.26 shadows numpy 2 inside the model process only. ``PYTHONPATH`` does
not work: the stub initialises an isolated interpreter, which ignores it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError, MissingFileError, UnavailableError
from ..files import OwnedFolder

PYTRITON = "nvidia-pytriton==0.7.0"  # tritonserver 2.51 with the Python backend
NUMPY = "numpy>=1.24,<2"  # what the stub's pybind11 can read (see the module docstring)
KIND = "triton python environment"
PYTHON = f"{sys.version_info[0]}.{sys.version_info[1]}"


def default_env() -> Path:
    return Path(os.environ.get("DLEXPORT_TRITON_ENV") or
                Path.home() / ".cache" / "dlexport" / f"triton-python{PYTHON}")


def prepare_command() -> str:
    return "dlexport serve --prepare-env"


@dataclass
class TritonEnv:
    """A prepared environment: the venv, the bundled server and a backend folder with this Python's stub."""

    root: Path

    @property
    def bin(self) -> Path:
        return self.root / "bin"

    @property
    def site(self) -> Path:
        return self.root / "lib" / f"python{PYTHON}" / "site-packages"

    @property
    def bundle(self) -> Path:
        return self.site / "pytriton" / "tritonserver"

    @property
    def tritonserver(self) -> Path:
        return self.bundle / "bin" / "tritonserver"

    @property
    def backends(self) -> Path:
        return self.root / "triton-backends"

    def process_env(self) -> dict:
        """Environment variables for ``tritonserver``: the venv first on PATH, this Python's libpython and the
        wheel's bundled libraries on the loader path."""
        env = dict(os.environ)
        env["PATH"] = f"{self.bin}:{env.get('PATH', '')}"
        libs = [sysconfig.get_config_var("LIBDIR"), str(self.site / "nvidia_pytriton.libs")]
        if env.get("LD_LIBRARY_PATH"):
            libs.append(env["LD_LIBRARY_PATH"])
        env["LD_LIBRARY_PATH"] = ":".join(p for p in libs if p)
        return env


def _fix(root: Path) -> str:
    return f"run `{prepare_command()}` (or `dlexport serve --prepare-env --python-env {root}`; about 30 s, needs " \
           "the package registry), or give your own server with --tritonserver"


def check_env(root: Path | None = None) -> TritonEnv:
    """The prepared environment at ``root``, or an error naming what is missing and the command that makes it."""
    env = TritonEnv(Path(root) if root is not None else default_env())
    if not (env.root / "pyvenv.cfg").is_file():
        raise MissingFileError(f"no Triton Python environment at {env.root}: {_fix(env.root)}")
    for path, what in ((env.tritonserver, "the tritonserver binary"),
                       (env.backends / "python" / "triton_python_backend_stub", f"the Python {PYTHON} backend stub")):
        if not path.exists():
            raise MissingFileError(f"{env.root} lacks {what} ({path}): {_fix(env.root)}")
    numpy = _numpy_version(env)
    if int(numpy.split(".")[0]) >= 2:
        raise UnavailableError(f"{env.root} has numpy {numpy}; the Triton 2.51 Python backend stub reads tensors "
                               f"wrongly under numpy 2 (it is built with pybind11 2.10): {_fix(env.root)}")
    return env


def _numpy_version(env: TritonEnv) -> str:
    python = env.bin / "python"
    try:
        out = subprocess.run([str(python), "-c", "import numpy; print(numpy.__version__)"], capture_output=True,
                             text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise UnavailableError(f"cannot run {python} ({e}): {_fix(env.root)}") from None
    if out.returncode != 0:
        raise UnavailableError(f"{python} cannot import numpy ({out.stderr.strip()[-300:]}): {_fix(env.root)}")
    return out.stdout.strip()


def prepare_env(root: Path | None = None, log=print) -> TritonEnv:
    """Create (or finish) the environment: venv with system site-packages, numpy < 2, the server wheel without its
    dependencies, and a backend folder linking the wheel's Python backend with the stub for this Python."""
    env = TritonEnv(Path(root) if root is not None else default_env())
    if env.root.exists() and env.root.resolve() == Path(sys.prefix).resolve():
        raise InputError(f"{env.root} is the running Python's own environment: choose another --python-env")
    OwnedFolder.claim(env.root, KIND, {"python": PYTHON, "server": PYTRITON, "numpy": NUMPY}, overwrite=None,
                      what="--python-env")
    if not (env.root / "pyvenv.cfg").exists():
        log(f"creating {env.root} (a venv over this Python's packages)")
        _run([sys.executable, "-m", "venv", "--system-site-packages", str(env.root)])
    pip = [str(env.bin / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    log(f"installing {NUMPY} there (the system's numpy stays as it is)")
    _run(pip + [NUMPY])
    log(f"installing {PYTRITON} there without its dependencies (it would downgrade numpy for everything)")
    _run(pip + ["--no-deps", PYTRITON])
    stub = env.bundle / "python_backend_stubs" / PYTHON / "triton_python_backend_stub"
    if not stub.exists():
        raise UnavailableError(f"{PYTRITON} has no Python backend stub for Python {PYTHON} (it ships 3.8-3.13): run "
                               "dlexport with one of those, or give your own server with --tritonserver")
    python = env.backends / "python"
    python.mkdir(parents=True, exist_ok=True)
    for link, target in (("triton_python_backend_stub", stub),
                         ("libtriton_python.so", env.bundle / "backends" / "python" / "libtriton_python.so"),
                         ("triton_python_backend_utils.py",
                          env.bundle / "backends" / "python" / "triton_python_backend_utils.py")):
        (python / link).unlink(missing_ok=True)
        (python / link).symlink_to(target)
    (env.root / "dlexport-env.json").write_text(json.dumps({"python": PYTHON, "server": PYTRITON}) + "\n")
    return check_env(env.root)


def _run(cmd: list[str]) -> None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        raise UnavailableError(f"`{' '.join(cmd)}` did not finish in 15 minutes: check the package registry") \
            from None
    if out.returncode != 0:
        raise UnavailableError(f"`{' '.join(cmd)}` failed: {(out.stderr or out.stdout).strip()[-800:]}")
