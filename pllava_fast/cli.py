"""``pllava-fast`` command line: one subcommand per module.

Each subcommand lives in the module named here, which defines ``configure_parser(parser)`` and
``run(args) -> int`` (the exit code). Modules load only when their subcommand runs. A ``UsageError``
raised by ``run`` (arguments that parse but do not fit together) prints its message and exits 2.
"""
from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "demo": ("pllava_fast.demo", "run the whole pipeline on a generated clip with a tiny model"),
    "caption": ("pllava_fast.caption", "caption videos (one, many, or a dataset list/folder)"),
    "chat": ("pllava_fast.chat", "interactive multi-turn chat about one video"),
    "profile": ("pllava_fast.profile", "profile high-norm visual tokens: report.json + plots"),
    "bench": ("pllava_fast.bench", "benchmark the fast pipeline against the original order"),
}


class UsageError(ValueError):
    """Command-line arguments that do not fit together: exit code 2, no traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pllava-fast", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.configure_parser(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
