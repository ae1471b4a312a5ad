"""Folder ownership: dlexport writes only into new, empty or its own folders, and never deletes a user's file."""
from __future__ import annotations

import json

import pytest

from dlexport.errors import CorruptFileError, FolderError, InputError, MissingFileError
from dlexport.files import OWNER, OwnedFolder, check_apart, check_replaceable, read_json


def _own(folder, model="m1", files=("a.onnx", "sub/b.onnx"), **kw):
    own = OwnedFolder.claim(folder, "export", model, **kw)
    own.add(*files)
    for f in files:
        (folder / f).parent.mkdir(parents=True, exist_ok=True)
        (folder / f).write_text(f)
    return own


def test_new_and_empty_folders_are_claimed_and_marked(tmp_path):
    _own(tmp_path / "new")
    (tmp_path / "empty").mkdir()
    _own(tmp_path / "empty")
    marker = json.loads((tmp_path / "new" / OWNER).read_text())
    assert marker == {"format": "dlexport-folder", "kind": "export", "model": "m1", "files": ["a.onnx", "sub/b.onnx"]}


def test_a_folder_with_the_users_files_is_refused_untouched(tmp_path):
    user = tmp_path / "mine"
    (user / "src").mkdir(parents=True)
    (user / "notes.txt").write_text("mine")
    (user / "embed.onnx").write_text("my own graph")
    for overwrite in (False, True):
        with pytest.raises(FolderError, match="not empty and was not made by dlexport"):
            OwnedFolder.claim(user, "export", "m1", overwrite=overwrite)
    assert sorted(p.name for p in user.iterdir()) == ["embed.onnx", "notes.txt", "src"]
    assert (user / "embed.onnx").read_text() == "my own graph"


def test_an_existing_file_is_refused_as_out(tmp_path):
    (tmp_path / "f").write_text("data")
    with pytest.raises(FolderError, match="is a file, not a folder"):
        OwnedFolder.claim(tmp_path / "f", "export", "m1")
    assert (tmp_path / "f").read_text() == "data"


def test_same_kind_and_model_resumes_and_cleans_stale_temporaries(tmp_path):
    _own(tmp_path / "e")
    (tmp_path / "e" / ".a.onnx.x1y2.partial").write_text("half")
    (tmp_path / "e" / "sub" / ".b.onnx.k3.partial.onnx").write_text("half")
    (tmp_path / "e" / ".partial").mkdir()
    (tmp_path / "e" / ".partial" / "layer.onnx").write_text("half")
    own = OwnedFolder.claim(tmp_path / "e", "export", "m1")
    assert own.files == {"a.onnx", "sub/b.onnx"}
    assert sorted(p.name for p in (tmp_path / "e").rglob("*")) == [OWNER, "a.onnx", "b.onnx", "sub"]


def test_another_model_needs_overwrite_which_removes_only_dlexports_files(tmp_path):
    folder = tmp_path / "e"
    _own(folder)
    (folder / "notes.txt").write_text("the user's")
    (folder / "sub" / "mine.txt").write_text("the user's too")
    with pytest.raises(FolderError, match="another model.*--overwrite"):
        OwnedFolder.claim(folder, "export", "m2")
    assert (folder / "a.onnx").exists()
    own = OwnedFolder.claim(folder, "export", "m2", overwrite=True)
    assert own.files == set() and not (folder / "a.onnx").exists() and not (folder / "sub" / "b.onnx").exists()
    assert (folder / "notes.txt").read_text() == "the user's" and (folder / "sub" / "mine.txt").exists()


def test_overwrite_never_follows_a_listed_path_out_of_the_folder(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("keep")
    folder = tmp_path / "e"
    folder.mkdir()
    (folder / OWNER).write_text(json.dumps({"format": "dlexport-folder", "kind": "export", "model": "m1",
                                            "files": ["../outside.txt", "/etc/hostname"]}))
    OwnedFolder.claim(folder, "export", "m2", overwrite=True)
    assert outside.read_text() == "keep"


def test_another_kind_is_refused_even_with_overwrite(tmp_path):
    _own(tmp_path / "e")
    for overwrite in (False, True):
        with pytest.raises(FolderError, match="holds a dlexport export, not a engines"):
            OwnedFolder.claim(tmp_path / "e", "engines", "m1", overwrite=overwrite)
    assert (tmp_path / "e" / "a.onnx").exists()


def test_damaged_marker_is_refused(tmp_path):
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / OWNER).write_text("[1, 2]")
    with pytest.raises(FolderError, match="damaged"):
        OwnedFolder.claim(tmp_path / "e", "export", "m1", overwrite=True)


def test_outputs_inside_inputs_and_the_reverse_are_refused_also_through_symlinks(tmp_path):
    src = tmp_path / "export"
    src.mkdir()
    (tmp_path / "link").symlink_to(src)
    for out in (src, src / "engines", tmp_path / "link" / "engines", tmp_path):
        with pytest.raises(FolderError, match="overlap"):
            check_apart(out, [src])
    with pytest.raises(FolderError, match="through a symlink"):
        check_apart(tmp_path / "link" / "engines", [src])
    check_apart(tmp_path / "elsewhere", [src])


def test_single_output_files_replace_only_files_of_their_format(tmp_path):
    ours, theirs = tmp_path / "plan.json", tmp_path / "notes.json"
    ours.write_text(json.dumps({"format": "dlexport-plan"}))
    theirs.write_text(json.dumps({"shopping": ["milk"]}))
    check_replaceable(ours, "dlexport-plan", "-o")
    check_replaceable(tmp_path / "absent.json", "dlexport-plan", "-o")
    for path in (theirs, tmp_path):
        with pytest.raises(FolderError):
            check_replaceable(path, "dlexport-plan", "-o")
    assert json.loads(theirs.read_text()) == {"shopping": ["milk"]}


@pytest.mark.parametrize("content, error, message", [
    (b"[1, 2]", CorruptFileError, "holds a JSON list, not an object"),
    (b'{"a": NaN}', CorruptFileError, "NaN is not a JSON number"),
    (b'{"a": "\xff"}', CorruptFileError, "not UTF-8"),
    (b"[" * 100_000 + b"]" * 100_000, CorruptFileError, "nested too deeply"),
    (b'{"a": ', CorruptFileError, "not valid JSON"),
])
def test_read_json_names_the_file_in_every_error(tmp_path, content, error, message):
    path = tmp_path / "thing.json"
    path.write_bytes(content)
    with pytest.raises(error, match=message) as info:
        read_json(path, "index")
    assert str(path) in str(info.value)


def test_read_json_missing_folder_and_too_large(tmp_path):
    with pytest.raises(MissingFileError, match="index not found"):
        read_json(tmp_path / "absent.json", "index")
    with pytest.raises(InputError, match="is a folder"):
        read_json(tmp_path, "index")
    (tmp_path / "big.json").write_text("{}" + " " * 200)
    with pytest.raises(CorruptFileError, match="at most 100"):
        read_json(tmp_path / "big.json", "index", limit=100)


def test_a_folder_from_before_markers_is_adopted_only_when_its_index_accounts_for_every_file(tmp_path):
    folder = tmp_path / "old"
    (folder / "layers").mkdir(parents=True)
    for f in ("manifest.json", "embed.onnx", "layers/l0.onnx", ".embed.onnx.x1.partial"):
        (folder / f).write_text(f)
    index = lambda f: ("m1", ["manifest.json", "embed.onnx", "layers/l0.onnx"])  # noqa: E731 - its manifest's list
    own = OwnedFolder.claim(folder, "export", "m1", legacy=index)
    assert own.files == {"manifest.json", "embed.onnx", "layers/l0.onnx"} and (folder / OWNER).exists()
    assert not (folder / ".embed.onnx.x1.partial").exists()

    (folder / OWNER).unlink()
    (folder / "layers" / "notes.txt").write_text("mine")
    with pytest.raises(FolderError, match="not empty and was not made by dlexport"):
        OwnedFolder.claim(folder, "export", "m1", overwrite=True, legacy=index)
    assert not (folder / OWNER).exists() and (folder / "layers" / "notes.txt").read_text() == "mine"
