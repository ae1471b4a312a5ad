"""Calibration text: real prose already on the machine (or the user's files), tokenised into fixed-length sequences.

Plans are chosen on one split and judged on another, so the text is cut into sequences, shuffled with a fixed seed
and dealt into named splits; nothing is vendored, and the same files always give the same splits.
"""
from __future__ import annotations

import gzip
import hashlib
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import InputError

DEFAULT_SOURCES = (Path("/usr/share/common-licenses"), Path("/usr/share/doc"))
_DOC_NAMES = ("readme", "changelog", "news", "copyright", "authors", "history", "faq", "todo")


class NotEnoughTextError(InputError):
    pass


@dataclass
class Splits:
    """Token sequences [n, seq_len] per split, and where they came from."""

    splits: dict[str, torch.Tensor]
    seq_len: int
    files: int
    tokenizer: str
    digest: str

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.splits[name]

    def describe(self) -> dict:
        return {"seq_len": self.seq_len, "files": self.files, "tokenizer": self.tokenizer, "sha256": self.digest,
                "sequences": {k: int(v.shape[0]) for k, v in self.splits.items()},
                "tokens": {k: int(v.numel()) for k, v in self.splits.items()}}


def _candidate_files(sources) -> list[Path]:
    """Files under the sources, sorted; in /usr/share/doc only the prose-like ones (README, changelog, ...)."""
    out = []
    for src in map(Path, sources):
        if src.is_file():
            out.append(src)
        elif src.is_dir():
            picky = src == Path("/usr/share/doc")
            for p in sorted(src.rglob("*")):
                if p.is_file() and (not picky or p.name.lower().startswith(_DOC_NAMES)):
                    out.append(p)
    return out


def _read_prose(path: Path) -> str | None:
    try:
        raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError):
        return None
    if b"\0" in raw[:4096]:
        return None  # binary
    text = raw.decode("utf-8", errors="ignore")
    letters = sum(c.isalpha() or c.isspace() for c in text[:20000])
    return text if text and letters / min(len(text), 20000) > 0.8 else None


class ByteTokenizer:
    """For exports without a tokenizer (random tiny models): UTF-8 bytes as token ids, folded into the vocabulary."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        return [b % self.vocab_size for b in text.encode("utf-8")]


def tokenizer_for(manifest, loaded=None):
    """The export's own tokenizer, else the loaded model's, else bytes (named in every report)."""
    tdir = manifest.tokenizer_dir() if manifest is not None else None
    if tdir is not None and tdir.exists():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(tdir), "export"
    if loaded is not None and loaded.tokenizer is not None:
        return loaded.tokenizer, "model"
    vocab = manifest.arch["vocab_size"] if manifest is not None else loaded.model.config.vocab_size
    return ByteTokenizer(vocab), "bytes"


def _encode(tokenizer, text: str) -> list[int]:
    if isinstance(tokenizer, ByteTokenizer):
        return tokenizer.encode(text)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _prefix(tokenizer) -> list[int]:
    """What the tokenizer puts before any text (Gemma's <bos>; nothing for SmolLM2's): every sequence starts with it,
    as every prompt the model sees does. Gemma 3 270M without it: perplexity 226 instead of 32 on license prose."""
    if isinstance(tokenizer, ByteTokenizer):
        return []
    return tokenizer("", add_special_tokens=True)["input_ids"]


HELD_OUT = "evaluation"


def _held_out(chunk: list[int]) -> bool:
    """A quarter of all sequences are held out, chosen by a hash of their tokens (not by the sizes asked for)."""
    return hashlib.sha256(repr(chunk).encode()).digest()[0] % 4 == 0


def load_splits(tokenizer, sizes: dict[str, int], seq_len: int = 128, sources=None, seed: int = 0,
                tokenizer_name: str = "") -> Splits:
    """Deal ``sizes[name]`` sequences of ``seq_len`` tokens into each split, from ``sources`` (files or folders), each
    starting with the tokenizer's prefix (``_prefix``).

    The ``evaluation`` split only ever draws from held-out sequences and every other split only from the rest,
    so no command (calibrate, calibrate-exit, analyze, whatever sizes they ask for) fits on text another one
    evaluates on; each split depends only on the files and its own pool's size. Files are read in sorted order
    only until both pools are full, so a machine with lots of docs stays fast.
    """
    sources = list(sources or DEFAULT_SOURCES)
    prefix = _prefix(tokenizer)
    body = seq_len - len(prefix)
    need = {True: sizes.get(HELD_OUT, 0), False: sum(v for k, v in sizes.items() if k != HELD_OUT)}
    pools, seen, used = {True: [], False: []}, set(), 0
    for path in _candidate_files(sources):
        if all(len(pools[h]) >= 2 * need[h] for h in pools):  # twice what is needed, so shuffles mix documents
            break
        text = _read_prose(path)
        if text is None:
            continue
        key = hashlib.sha256(text.encode()).digest()
        if key in seen:  # GPL -> GPL-3 and the like
            continue
        seen.add(key)
        ids = _encode(tokenizer, text)
        for i in range(0, len(ids) - body + 1, body):
            chunk = prefix + ids[i:i + body]
            pools[_held_out(chunk)].append(chunk)
        used += 1
    if any(len(pools[h]) < need[h] for h in pools):
        raise NotEnoughTextError(
            f"calibration needs {sum(need.values())} sequences of {seq_len} tokens ("
            + ", ".join(f"{k} {v}" for k, v in sizes.items())
            + f"; a quarter of the text is set aside for evaluation) but {', '.join(map(str, sources))} gave "
            f"{len(pools[False])} for fitting and {len(pools[True])} held out ({used} readable prose files): pass "
            "more text with --data FILE_OR_FOLDER, or ask for less (--calib-seqs, --eval-seqs, --seq-len)")
    for h in pools:
        pools[h] = pools[h][: 2 * need[h]]
        random.Random(seed).shuffle(pools[h])
    splits, start = {}, {True: 0, False: 0}
    for name, n in sizes.items():
        h = name == HELD_OUT
        splits[name] = torch.tensor(pools[h][start[h]:start[h] + n], dtype=torch.int64).reshape(n, seq_len)
        start[h] += n
    digest = hashlib.sha256(b"".join(t.numpy().tobytes() for t in splits.values())).hexdigest()[:16]
    return Splits(splits, seq_len, used, tokenizer_name, digest)
