"""dlexport's exception types: one base class, so callers (and the CLI) can tell a refusal from a bug.

Each class also derives from the builtin it refines (``ValueError``, ``FileNotFoundError``, ...), so code that
caught those before keeps working. Every message names the problem and the fix; load errors name the file.
This module imports nothing of dlexport: every layer may raise these.
"""
from __future__ import annotations

MAX_ECHO = 120  # characters of a user's value repeated in a message


class DlexportError(Exception):
    """Base of every error dlexport raises on purpose (bad input, a folder it may not write, a damaged file)."""


class InputError(DlexportError, ValueError):
    """An argument, setting or plan field is of the wrong type or out of range."""


class MissingFileError(DlexportError, FileNotFoundError):
    """A file or folder dlexport needs is not there."""


class CorruptFileError(DlexportError, ValueError):
    """A file is unreadable, malformed, or does not match what its index records (size, sha256, shapes)."""


class FolderError(DlexportError, RuntimeError):
    """A folder dlexport was asked to write is not its own (a user's files, another model, another kind)."""


class UnavailableError(DlexportError, RuntimeError):
    """A backend, provider or tool is not installed or has no device here."""


def echo(value, limit: int = MAX_ECHO) -> str:
    """``repr(value)`` cut to ``limit`` characters, so a huge input never makes a huge message."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"
