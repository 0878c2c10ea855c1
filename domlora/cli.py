"""The `domlora` command line: one subcommand per module in `domlora/commands/`.

Run as: domlora probe --model embedded --data data/code/probe.jsonl --out probes/embedded/code
        domlora select --probe probes/embedded/code/page.json --strategy dom --out placement.json
"""
from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys
from collections.abc import Callable

from domlora import commands
from domlora.errors import DomloraError


def discover_commands() -> dict:
    """name -> module, for every module in `domlora.commands` (a `_` in a file name is a `-`)."""
    out = {}
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        out[info.name.replace("_", "-")] = importlib.import_module(f"{commands.__name__}.{info.name}")
    return out


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    cmds = discover_commands()
    parser = argparse.ArgumentParser(prog="domlora",
                                     description="Where should my LoRA adapter go? PAGE, DomLoRA and the baselines.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, mod in cmds.items():
        mod.add_arguments(sub.add_parser(name, help=mod.HELP, description=mod.HELP))
    return parser, cmds


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


def main(argv: list[str] | None = None) -> int:
    parser, cmds = build_parser()
    args = parser.parse_args(argv)
    return run_main(lambda: cmds[args.command].run(args), name=f"domlora {args.command}", verbose=args.verbose)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
