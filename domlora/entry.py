"""What every entry point shares (CLI subcommands and DVC stage scripts): one door that configures logging and
turns a user error into one line (`run_main`), and the arguments of every stage script (`stage_parser`)."""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from domlora.errors import DomloraError


def run_main(fn: Callable[[], object], *, name: str = "domlora", verbose: bool = False) -> int:
    """The one door of every entry point (CLI subcommands and DVC stage scripts): configure
    logging, run `fn`, turn a user error into one line naming the problem and the fix, exit 2."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return int(fn() or 0)
    except DomloraError as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 2


def stage_parser(doc: str) -> argparse.ArgumentParser:
    """The arguments every DVC stage script shares."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="params.yaml", help="params file")
    p.add_argument("--profile", default=None, help="profile name (default: the active one, `run`)")
    p.add_argument("--root", default=".", help="repository root where data/, probes/, runs/ live")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p
