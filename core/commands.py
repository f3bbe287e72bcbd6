"""How a package adds its subcommands to the `polyteacher` command (launch/cli.py).

Each package has one registration, `register(subparsers)` in its `cli.py`, which adds every
subcommand the package owns and sets `func` (and `lock_run_dir` for a command that writes into a
run directory). `register_modules` imports the modules named in a registry and calls that function;
a module that is not part of this install is skipped. Registrations import heavy libraries (torch,
deepspeed, transformers) only inside the functions that run a command, so `--help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Iterable


def register_modules(sub: argparse._SubParsersAction, names: Iterable[str], function: str) -> None:
    """Import each module of `names` and call its `function(sub)` to add its subcommands.

    A module that is not part of this install is skipped; any other import error is a real bug and raises.
    """
    for name in names:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:
                continue
            raise
        getattr(module, function)(sub)
