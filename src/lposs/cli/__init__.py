"""The ``lposs`` command line: thin wrappers that parse, call the library and print.

One module per command (``segment``, ``refine``, ``eval``, ``compare``, ``convert``, ``demo``),
each with ``SUMMARY``, ``add_parser(subparsers)`` and ``run(args)``; what they share is in
``options``. A command imports its heavy dependencies only when its options are built or
it runs, and ``main`` builds only the options of the command given, so that ``lposs segment``
never imports the datasets or the web demo. Every user mistake (the library's typed errors,
its ``ValueError``/``TypeError``) and running out of memory becomes one line on stderr and a
non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from collections.abc import Iterable, Sequence
from types import ModuleType

from ..errors import LpossError, is_out_of_memory
from .options import EXIT_FAILED, EXIT_INTERRUPTED, HelpFormatter, fail, memory_message

__all__ = ["main", "build_parser"]

COMMANDS = ("segment", "refine", "eval", "compare", "convert", "demo")
"""The sub-commands, in the order ``lposs --help`` lists them; each is a module here."""


def _command(name: str) -> ModuleType:
    return importlib.import_module(f"{__name__}.{name}")


def build_parser(commands: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The ``lposs`` argument parser.

    Args:
        commands: the commands whose options are built in full (the others are listed with
            their summary only, enough for ``lposs --help``); None for every command.

    Returns:
        The parser; parsed arguments carry ``run``, the command's ``run(args)``.
    """
    from .. import __version__

    full = set(COMMANDS if commands is None else commands)
    parser = argparse.ArgumentParser(
        prog="lposs", formatter_class=HelpFormatter,
        description="Training-free open-vocabulary semantic segmentation (LPOSS, LPOSS+).",
    )
    parser.add_argument("--version", action="version", version=f"lposs {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        module = _command(name)
        if name in full:
            module.add_parser(sub)
        else:
            sub.add_parser(name, help=module.SUMMARY)
    return parser


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """The library's warnings (slow precision, a diverging solve, a bad cache entry) as one
    ``lposs: warning:`` line on stderr, without Python's source line."""
    print(f"lposs: warning: {message}", file=file or sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    # The first word that is not an option names the command (lposs's own options,
    # --help and --version, take no value).
    command = next((word for word in argv if not word.startswith("-")), None)
    args = build_parser([command] if command in COMMANDS else []).parse_args(argv)
    warnings.showwarning = _one_line_warning
    try:
        return args.run(args)
    except (LpossError, ValueError, TypeError) as err:  # the library's word on bad input
        fail(str(err))
        return EXIT_FAILED
    except (MemoryError, RuntimeError) as err:
        if not is_out_of_memory(err):
            raise  # a bug: its traceback is what a report needs
        fail(memory_message(err))
        return EXIT_FAILED
    except KeyboardInterrupt:
        fail("interrupted")
        return EXIT_INTERRUPTED
