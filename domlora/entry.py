"""Shared plumbing for entry points (stage scripts): logging, params, errors -> exit codes."""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable


def stage_parser(doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="params.yaml", help="params file")
    p.add_argument("--profile", default=None, help="profile name (default: the active one, `run`)")
    p.add_argument("--root", default=".", help="repository root where data/, probes/, runs/ live")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p


def run_main(fn: Callable[[], object]) -> int:
    """Configure logging, run `fn`, turn user errors into a one-line message and exit status 2."""
    from .errors import DomloraError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    try:
        fn()
    except DomloraError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
