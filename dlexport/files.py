"""File helpers every long job uses: hashing, atomic writes, and a resumable progress journal."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def is_whole(path: Path, size: int, sha256: str) -> bool:
    """The file exists with the recorded size and hash (size first: it rules out most damage without reading)."""
    path = Path(path)
    return path.exists() and path.stat().st_size == size and sha256_file(path) == sha256


@contextmanager
def atomic_path(path: Path, suffix: str = ".partial"):
    """A temporary path in ``path``'s folder, renamed to ``path`` when the block succeeds and removed when it fails.

    A reader never sees half a file under the final name, and an interrupted writer leaves nothing that looks whole.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it owner-only; give it a normal file's mode
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(path: Path, data) -> None:
    write_bytes_atomic(path, (json.dumps(data, indent=2) + "\n").encode())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_json(path: Path, what: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {path}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} {path} is not valid JSON ({e}); it may be corrupt: recreate it") from None


class Journal:
    """Finished steps of a long job, keyed by name, each with the facts that make it reusable (hashes, settings).

    A step is recorded only after its files are complete and renamed into place, so an interrupted job resumes
    from the last finished step and nothing half-written is ever taken for done.
    """

    def __init__(self, path: Path, identity: dict):
        self.path, self.identity = Path(path), identity
        data = read_json(self.path, "progress journal") if self.path.exists() else {}
        self.steps: dict = data.get("steps", {}) if data.get("identity") == identity else {}

    def get(self, name: str):
        return self.steps.get(name)

    def record(self, name: str, facts) -> None:
        self.steps[name] = facts
        write_json_atomic(self.path, {"identity": self.identity, "steps": self.steps})

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
