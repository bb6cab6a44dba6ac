"""Command-line entry: ``python -m genie_kernels <command> [options]``.

Each command lives in its own module, which provides ``add_arguments(parser)`` and
``run(args) -> int``; its docstring's first line is the command's one-line help.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Collection
from pathlib import Path

COMMANDS = {
    "sample": "genie_kernels.cli.sample",
    "distill": "genie_kernels.cli.distill",
    "train-base": "genie_kernels.cli.train_base",
    "export": "genie_kernels.cli.export",
}


def int_at_least(minimum: int):
    """An argparse type: an integer no smaller than ``minimum``."""
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {value}")
        return value
    parse.__name__ = "integer"  # argparse names the type in its "invalid integer value" message
    return parse


def output_file(suffixes: Collection[str]):
    """An argparse type: a file path that can be written, checked before any work is done.

    The name must end in one of ``suffixes`` (as written: ``.png``, not ``.PNG``), must not
    be a folder, and :func:`~genie_kernels.checkpoint.unwritable_reason` must find nothing
    (an existing file writable, no dangling link, a file can be created in the folder).
    """
    def parse(text: str) -> str:
        try:
            problem = _output_file_problem(Path(text), suffixes)
        except OSError as err:  # e.g. a folder on the way that may not be searched
            problem = f"{err.filename or text}: {err.strerror}"
        if problem:
            raise argparse.ArgumentTypeError(f"cannot write {text!r}: {problem}")
        return text
    parse.__name__ = "output file"
    return parse


def _output_file_problem(path: Path, suffixes: Collection[str]) -> str | None:
    from ..checkpoint import unwritable_reason

    if path.is_dir():
        return "it is a folder; give a file name"
    if path.suffix not in suffixes:
        return f"the name must end in {', '.join(suffixes)}"
    return unwritable_reason(path)


def device_from_option(name: str):
    """The torch device of a ``--device`` option; ValueError when it is not one, or not here."""
    from ..checks import check_device

    return check_device(name, "--device")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m genie_kernels", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="command", required=True)
    modules = {}
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        doc = (module.__doc__ or "").strip()
        p = sub.add_parser(name, help=doc.splitlines()[0] if doc else None, description=doc,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        modules[name] = module
    args = parser.parse_args(argv)
    return modules[args.command].run(args) or 0

