"""The `domlora` command line: one subcommand per module in `domlora/commands/`.

Run as: domlora probe --model embedded --data data/code/probe.jsonl --out probes/embedded/code
        domlora select --probe probes/embedded/code/page.json --strategy dom --out placement.json
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from domlora import commands
from domlora.entry import run_main, stage_parser  # noqa: F401 (stage_parser: for scripts that import it from here)


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


def main(argv: list[str] | None = None) -> int:
    parser, cmds = build_parser()
    args = parser.parse_args(argv)
    return run_main(lambda: cmds[args.command].run(args), name=f"domlora {args.command}", verbose=args.verbose)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
