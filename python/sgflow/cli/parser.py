"""The ``sgflow`` parser and :func:`main`, the console script's entry point, with ``sgflow quality`` and
``sgflow list``."""
from __future__ import annotations

import argparse
import os
import sys

from sgflow.cli.common import EXIT_USAGE, EXIT_USER_ERROR, CLIError, _user_errors
from sgflow.cli.demo import _add_demo
from sgflow.cli.sample_eval import _add_eval, _add_sample
from sgflow.cli.training import _add_distill, _add_train


# ---------------------------------------------------------------------- quality
def _add_quality(sub):
    from sgflow.quality import add_arguments

    p = sub.add_parser("quality", help="the quality table: every method trained alike, scored at 1-16 steps",
                       description="Train every method on the same network, data, step budget and seeds; score "
                       "each at 1, 2, 4, 8, 16 network evaluations; write quality.json, quality.md and quality.png.")
    add_arguments(p)
    p.set_defaults(func=cmd_quality)


def cmd_quality(args) -> int:
    from sgflow.quality import run_from_args

    try:
        run_from_args(args)
    except ValueError as e:  # unknown data set / method, bad steps or seeds
        raise CLIError(str(e)) from None
    return 0


# ---------------------------------------------------------------------- list
def cmd_list(args) -> int:
    from sgflow.data import DESCRIPTIONS
    from sgflow.train import available_methods

    print("methods:  " + ", ".join(available_methods()))
    print("data sets:")
    for k, v in DESCRIPTIONS.items():
        print(f"  {k:<13}{v}")
    try:
        from sgflow.nn import MODEL_CONFIGS

        print("networks: " + ", ".join(MODEL_CONFIGS))
    except ImportError:
        print("networks: (sgflow.nn not available)")
    return 0


# ---------------------------------------------------------------------- main
class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line on stderr, exit 2 (argparse's usual code), no usage dump
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def make_parser() -> argparse.ArgumentParser:
    from sgflow import __version__

    p = _Parser(prog="sgflow", description="Few-step flow maps trained with SGFlow.")
    p.add_argument("--version", action="version", version=f"sgflow {__version__}")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)
    _add_train(sub)
    _add_distill(sub)
    _add_sample(sub)
    _add_eval(sub)
    _add_demo(sub)
    _add_quality(sub)
    lp = sub.add_parser("list", help="list methods, data sets and networks")
    lp.set_defaults(func=cmd_list)
    return p


def _error_prefix() -> str:
    world = os.environ.get("WORLD_SIZE")
    if world and world != "1":
        return f"sgflow [rank {os.environ.get('RANK', '?')}]: error: "
    return "sgflow: error: "


def _one_line(e: BaseException) -> str:
    msg = str(e).strip() or type(e).__name__
    if isinstance(e, KeyError):
        msg = msg.strip("'\"")
    return " ".join(msg.split("\n")[0].split())


def main(argv=None) -> int:
    """Entry point of the ``sgflow`` console script; returns the exit status."""
    parser = make_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, malformed command line: return argparse's code
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return int(args.func(args) or 0)
    except _user_errors() as e:
        if os.environ.get("SGFLOW_DEBUG"):
            raise
        print(_error_prefix() + _one_line(e), file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("sgflow: interrupted", file=sys.stderr)
        return 130
