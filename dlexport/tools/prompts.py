"""The benchmark's prompts: real English prose (the license texts every Debian/Ubuntu system ships), read at run
time and cut to an exact token count, so every run and every baseline sees the same inputs."""
from __future__ import annotations

import re
from pathlib import Path

from ..errors import InputError, MissingFileError

LICENSES = Path("/usr/share/common-licenses")
PREFERRED = ("GPL-3", "Apache-2.0", "MPL-2.0", "LGPL-2.1", "Artistic", "GFDL-1.3", "CC0-1.0", "GPL-2")


def prose_texts(folder: Path = LICENSES) -> list[tuple[str, str]]:
    """(name, text) of the license files found, preferred ones first, whitespace collapsed, title lines skipped."""
    folder = Path(folder)
    files = [folder / n for n in PREFERRED if (folder / n).is_file()]
    files += sorted(p for p in folder.glob("*") if p.is_file() and p not in files) if folder.is_dir() else []
    texts = []
    for path in files:
        paragraphs = [p for p in re.split(r"\n\s*\n", path.read_text(errors="replace")) if len(p.split()) > 20]
        if paragraphs:
            texts.append((path.name, re.sub(r"\s+", " ", " ".join(paragraphs)).strip()))
    if not texts:
        raise MissingFileError(f"no prose found in {folder} (the benchmark's prompts are read from the license "
                                "texts there): install the base-files package or pass another folder of text files")
    return texts


def prose_prompts(count: int, length: int, tokenizer=None, vocab_size: int | None = None,
                  folder: Path = LICENSES) -> list[dict]:
    """``count`` prompts of exactly ``length`` token ids: prompt i comes from file i mod files, at window i div files.

    Without a tokenizer (random-weight test models) the ids are the text's UTF-8 bytes modulo the vocabulary, which
    keeps the inputs fixed and text-derived.
    """
    if tokenizer is None and vocab_size is None:
        raise InputError("give a tokenizer or the vocabulary size")
    texts = prose_texts(folder)
    prompts = []
    for i in range(count):
        name, text = texts[i % len(texts)]
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] if tokenizer else [b % vocab_size for b in text.encode()]
        start = (i // len(texts)) * length
        if start + length > len(ids):
            raise InputError(f"{name} has {len(ids)} tokens, too few for prompt {i} of {length} tokens: ask for fewer "
                             "or shorter prompts")
        prompts.append({"source": str(Path(folder) / name), "offset_tokens": start, "ids": ids[start:start + length]})
    return prompts
