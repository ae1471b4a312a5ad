"""``dlexport`` command line: a thin layer over the library; each module registers its own subcommands."""
from __future__ import annotations

import argparse
import os
import re
import sys

from ..errors import DlexportError
from . import building, exporting, planning, profiling, quantizing, running, serving

COMMAND_MODULES = [exporting, quantizing, running, planning, building, profiling, serving]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dlexport", description=__doc__.split(":")[0])
    parser.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMAND_MODULES:
        module.register(sub)
    return parser


def main(argv=None) -> int:
    """Run one command; an error is one line on stderr and a non-zero exit (2: refused, 1: a bug), never a traceback
    unless ``--debug`` asks for it."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except BrokenPipeError:  # the reader went away (`dlexport inspect DIR | head`): nothing left to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # as the Python docs advise for SIGPIPE
        return 0
    except KeyboardInterrupt:
        resume = "; finished steps are kept: run the same command again to resume" if getattr(
            args, "resumable", False) else ""
        print(f"\ninterrupted{resume}", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the one place that turns every failure into a message
        if args.debug:
            raise
        refused = isinstance(e, (DlexportError, ValueError, FileNotFoundError, RuntimeError, ImportError))
        text = str(e) if refused else f"unexpected {type(e).__name__}: {e} (a bug in dlexport: please report it " \
                                      "with the output of --debug)"
        print(f"dlexport {args.command}: error: {one_line(text)}", file=sys.stderr)
        return 2 if refused else 1


def one_line(text: str, limit: int = 1000) -> str:
    """Whitespace collapsed, cut to ``limit`` characters: a message stays readable whatever it quotes."""
    text = re.sub(r"\s+", " ", text).strip()
    return text if len(text) <= limit else text[:limit - 1] + "…"
