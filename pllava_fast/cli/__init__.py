"""``pllava-fast`` command line: one subcommand per module of this package.

Each subcommand module defines ``configure_parser(parser)``, ``check(args)`` (every argument
checked before any heavy import or model load) and ``run(args) -> exit code``. ``main`` imports
only the module of the command it runs. Exit codes and error printing: ``cli.common``.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from .common import EXIT_INTERRUPTED, EXIT_USAGE, add_debug_argument, run_command

SUBCOMMANDS = {
    "demo": ("pllava_fast.cli.demo", "run the whole pipeline on a generated clip with a tiny model"),
    "caption": ("pllava_fast.cli.caption", "caption videos (one, many, or a dataset list/folder)"),
    "chat": ("pllava_fast.cli.chat", "interactive multi-turn chat about one video"),
    "profile": ("pllava_fast.cli.profile", "profile high-norm visual tokens: report.json + plots"),
    "bench": ("pllava_fast.cli.bench", "benchmark the fast pipeline against the original"),
    "make-tiny": ("pllava_fast.cli.make_tiny",
                  "write a tiny random PLLaVA checkpoint to try the other commands with"),
}


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``error: <prog>: <message>``, exit code 2."""

    def error(self, message):
        print(f"error: {self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; subcommands other than ``command`` are listed but not configured (their
    modules stay unimported). ``command=None`` configures every subcommand."""
    parser = _Parser(prog="pllava-fast", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if command is None or name == command:
            module = importlib.import_module(module_name)
            module.configure_parser(p)
            add_debug_argument(p)
            p.set_defaults(_module=module)
    return parser


def main(argv=None) -> int:
    code = _main(argv)
    if code == EXIT_INTERRUPTED and argv is None:
        # a real process (the console script, ``python -m pllava_fast``): exit 130 now. CPython
        # marks a KeyboardInterrupt that passed through C code running Python (imports of C
        # extensions do) as unhandled even once it is caught, and then kills itself with SIGINT
        # at exit, which would replace the documented exit code at random
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_INTERRUPTED)
    return code


def _main(argv) -> int:
    try:
        argv = list(sys.argv[1:] if argv is None else argv)
        command = argv[0] if argv and argv[0] in SUBCOMMANDS else None
        parser = build_parser(command) if command else build_parser(command="")
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:  # argparse: 2 on bad arguments (one usage line), 0 for --help
            return int(exc.code or 0)
        module = getattr(args, "_module", None)
        if module is None:
            parser.error(f"a command is required: one of {', '.join(SUBCOMMANDS)}")
        return run_command(module, args)
    except SystemExit as exc:
        return int(exc.code or 0)
    except KeyboardInterrupt:  # before run_command took over (parsing, importing the command)
        print("interrupted", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
