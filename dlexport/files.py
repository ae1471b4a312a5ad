"""File helpers every long job uses: hashing, atomic writes, JSON reading, a resumable progress journal, and the
ownership marker that keeps dlexport from writing into (or deleting from) folders that are not its own."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import CorruptFileError, DlexportError, FolderError, InputError, MissingFileError, echo

MAX_JSON_BYTES = 64 << 20  # indexes and reports are KBs to a few MB; anything larger is not one of ours
OWNER = ".dlexport-folder.json"  # the marker of a folder dlexport writes
OWNER_FORMAT = "dlexport-folder"


def cache_dir() -> Path:
    """dlexport's own cache (converted checkpoints, baseline graphs, layer groups): ``$DLEXPORT_CACHE`` or
    ``~/.cache/dlexport``."""
    return Path(os.environ.get("DLEXPORT_CACHE", Path.home() / ".cache" / "dlexport"))


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


def read_json(path: Path, what: str, limit: int = MAX_JSON_BYTES) -> dict:
    """A JSON object from ``path``; every failure names the file: missing, a folder, too large, not UTF-8, not JSON,
    nested too deeply, NaN/Infinity (not JSON), or not an object."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{what} {path} is a folder, not a file: give the path of the {what} file")
    if path.is_file() and path.stat().st_size > limit:
        raise CorruptFileError(f"{what} {path} is {path.stat().st_size} bytes; a {what} is at most {limit}: it is "
                               "not one")
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read().decode("utf-8"), parse_constant=_no_constant)
    except FileNotFoundError:
        raise MissingFileError(f"{what} not found: {path}") from None
    except UnicodeDecodeError as e:
        raise CorruptFileError(f"{what} {path} is not UTF-8 text ({e.reason} at byte {e.start}): it is corrupt or "
                               "not a JSON file; recreate it") from None
    except json.JSONDecodeError as e:
        raise CorruptFileError(f"{what} {path} is not valid JSON ({e}); it may be corrupt: recreate it") from None
    except RecursionError:
        raise CorruptFileError(f"{what} {path} is nested too deeply to be a {what}: recreate it") from None
    except ValueError as e:  # NaN / Infinity
        raise CorruptFileError(f"{what} {path} is not valid JSON ({e}): recreate it") from None
    if not isinstance(data, dict):
        raise CorruptFileError(f"{what} {path} holds a JSON {type(data).__name__}, not an object: it is not a {what}")
    return data


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


class Journal:
    """Finished steps of a long job, keyed by name, each with the facts that make it reusable (hashes, settings).

    A step is recorded only after its files are complete and renamed into place, so an interrupted job resumes
    from the last finished step and nothing half-written is ever taken for done.
    """

    def __init__(self, path: Path, identity: dict):
        self.path, self.identity = Path(path), identity
        try:
            data = read_json(self.path, "progress journal") if self.path.exists() else {}
        except CorruptFileError:
            data = {}  # a damaged journal only costs the steps it recorded: they are redone
        self.steps: dict = data.get("steps", {}) if data.get("identity") == identity else {}

    def get(self, name: str):
        return self.steps.get(name)

    def record(self, name: str, facts) -> None:
        self.steps[name] = facts
        write_json_atomic(self.path, {"identity": self.identity, "steps": self.steps})

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


# -- folder ownership ---------------------------------------------------------------------------------------------
def check_apart(out: Path, inputs, what: str = "--out") -> None:
    """Refuse an output folder that is an input, inside one, or holds one (resolved, so through symlinks too)."""
    target = Path(out).resolve()
    for source in inputs:
        if source is None:
            continue
        src = Path(source).resolve()
        if target == src or target.is_relative_to(src) or src.is_relative_to(target):
            how = "the same folder" if target == src else "one is inside the other"
            link = ", through a symlink" if _via_link(out, source) else ""
            raise FolderError(f"{what} {out} and the input {source} overlap ({how}{link}): choose an {what} outside "
                              "the inputs")


def _via_link(*paths) -> bool:
    return any(Path(p).absolute() != Path(p).resolve() for p in paths)


def check_replaceable(path: Path, fmt: str, what: str) -> None:
    """A single output file (a plan, a profile) may replace only a file of the same dlexport format."""
    path = Path(path)
    if path.is_dir():
        raise FolderError(f"{what} {path} is a folder: give a file name")
    if not path.exists() and not path.is_symlink():
        return
    try:
        ours = read_json(path, what).get("format") == fmt
    except (CorruptFileError, InputError, MissingFileError):
        ours = False
    if not ours or path.is_symlink():
        raise FolderError(f"{path} exists and is not a {fmt} file dlexport wrote: choose another name for {what} "
                          "(the file is left as it is)")


class OwnedFolder:
    """A folder dlexport writes, with a marker (``.dlexport-folder.json``) saying what it holds (``kind``: export,
    engines, analysis, ...), for which model, and every file dlexport put there.

    dlexport writes only into a new or empty folder, or one whose marker names the same kind and model (a job
    resuming). ``overwrite`` lets a folder of the same kind for another model be reused: it deletes only the files
    the marker lists, never anything else. Each file is recorded *before* it is written, so an interrupted job's
    files are never mistaken for the user's.
    """

    def __init__(self, folder: Path, kind: str, model, files):
        self.folder, self.kind, self.model, self.files = Path(folder), kind, model, set(files)

    @classmethod
    def claim(cls, folder: Path | str, kind: str, model, *, overwrite: bool | None = False, inputs=(),
              what: str = "--out", legacy=None) -> "OwnedFolder":
        """Take ``folder`` for writing ``kind`` of ``model``; ``overwrite=None``: the command has no --overwrite.

        ``legacy(folder)`` -> (model, files) or None reads a folder written before markers existed from its own
        index; it is adopted only when every file in it is one the index lists.
        """
        folder = Path(folder)
        check_apart(folder, inputs, what)
        old = cls.inspect(folder, kind, what, legacy)
        if old is not None and old.model == model:
            old._remove_temporaries()
            old._save()
            return old
        if old is not None:
            if not overwrite:
                remedy = "" if overwrite is None else (", or pass --overwrite to replace the files dlexport wrote "
                                                       "there (nothing else is touched)")
                raise FolderError(f"{folder} holds a dlexport {kind} of another model or setting ({echo(old.model)}); "
                                  f"this one is {echo(model)}. Choose another {what}{remedy}")
            old._remove_temporaries()
            old.remove_files()
        folder.mkdir(parents=True, exist_ok=True)
        own = cls(folder, kind, model, ())
        own._save()
        return own

    @classmethod
    def inspect(cls, folder: Path, kind: str, what: str = "--out", legacy=None) -> "OwnedFolder | None":
        """The folder's owner record when dlexport may write there as ``kind``; None for a new or empty folder."""
        folder = Path(folder)
        if folder.exists() and not folder.is_dir():
            raise FolderError(f"{what} {folder} is a file, not a folder: choose a folder path (the file is left "
                              "as it is)")
        marker = folder / OWNER
        if not marker.exists():
            adopted = cls._adopt(folder, kind, legacy) if legacy is not None and folder.is_dir() else None
            if adopted is not None:
                return adopted
            if folder.exists() and any(folder.iterdir()):
                raise FolderError(f"{what} {folder} is not empty and was not made by dlexport (no {OWNER}): dlexport "
                                  "writes only into a new or empty folder or one it made; choose another folder "
                                  "(nothing in it was changed)")
            return None
        try:
            data = read_json(marker, "dlexport folder marker")
            found = data["kind"], data.get("model"), list(data.get("files", []))
            if data.get("format") != OWNER_FORMAT or not all(isinstance(f, str) for f in found[2]):
                raise KeyError
        except (CorruptFileError, KeyError, TypeError):
            raise FolderError(f"{marker} is damaged, so dlexport cannot tell which files there are its own: choose "
                              "another folder, or delete this one yourself") from None
        if found[0] != kind:
            raise FolderError(f"{what} {folder} holds a dlexport {found[0]}, not a {kind}: choose another folder "
                              f"(dlexport does not replace one kind of folder by another)")
        return cls(folder, *found)

    @classmethod
    def _adopt(cls, folder: Path, kind: str, legacy) -> "OwnedFolder | None":
        try:
            found = legacy(folder)
        except DlexportError:
            return None
        if found is None:
            return None
        model, files = found
        present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() or p.is_symlink()}
        temporary = {f for f in present if Path(f).name.startswith(".") and ".partial" in Path(f).name
                     or f.startswith(".partial/")}
        return cls(folder, kind, model, files) if present - temporary <= set(files) else None

    def add(self, *relative: str) -> None:
        """Record files (paths relative to the folder) as dlexport's, before writing them."""
        new = {str(Path(r).as_posix()) for r in relative} - self.files
        if new:
            self.files |= new
            self._save()

    def add_tree(self, relative: str) -> None:
        """Record every file now under a subfolder dlexport just wrote (e.g. a tokenizer it saved)."""
        root = self.folder / relative
        self.add(*(p.relative_to(self.folder).as_posix() for p in root.rglob("*") if p.is_file()))

    def forget_missing(self) -> None:
        """Drop recorded names a finished job did not write after all (e.g. external data a small graph lacks)."""
        present = {f for f in self.files if (self.folder / f).is_file()}
        if present != self.files:
            self.files = present
            self._save()

    def remove_files(self) -> None:
        """Delete the recorded files (and folders they leave empty); the user's files stay."""
        dirs = set()
        for rel in sorted(self.files):
            path = self._inside(rel)
            if path is not None and (path.is_file() or path.is_symlink()):
                path.unlink()
            if path is not None:
                dirs.update(p for p in path.parents if p.is_relative_to(self.folder) and p != self.folder)
        for d in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
            if d.is_dir() and not any(d.iterdir()):
                d.rmdir()
        self.files = set()
        self._save()

    def _inside(self, rel: str) -> Path | None:
        path = self.folder / rel
        parent = path.parent.resolve()
        return path if parent.is_relative_to(self.folder.resolve()) else None

    def _remove_temporaries(self) -> None:
        """Temporary files of an interrupted job (``.NAME.*.partial``, the export's ``.partial/`` staging folder)."""
        dirs = {self.folder} | {p.parent for p in map(self._inside, self.files) if p is not None}
        for d in dirs:
            if not d.is_dir():
                continue
            for entry in d.iterdir():
                if entry.name.startswith(".") and ".partial" in entry.name and entry.is_file() \
                        and not entry.is_symlink():
                    entry.unlink()
        staging = self.folder / ".partial"
        if staging.is_dir() and not staging.is_symlink():
            import shutil

            shutil.rmtree(staging)

    def _save(self) -> None:
        write_json_atomic(self.folder / OWNER, {"format": OWNER_FORMAT, "kind": self.kind, "model": self.model,
                                                "files": sorted(self.files)})
