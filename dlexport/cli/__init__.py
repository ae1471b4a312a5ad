"""``dlexport`` command line: a thin layer over the library; each module registers its own subcommands."""
from __future__ import annotations

import argparse
import sys

from . import building, exporting, planning, profiling, quantizing, running

COMMAND_MODULES = [exporting, quantizing, running, planning, building, profiling]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dlexport", description=__doc__.split(":")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMAND_MODULES:
        module.register(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        print("\ninterrupted: finished steps are kept; run the same command again to resume", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, RuntimeError, ImportError) as e:
        print(f"dlexport {args.command}: error: {e}", file=sys.stderr)
        return 2
