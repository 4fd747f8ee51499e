"""The options of ``sgflow quality`` and ``benchmarks/quality.py``."""
from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path

from .config import DATA_SPECS, METHODS, QualityConfig, check_config, preset
from .report import render
from .runs import run_quality

# ---------------------------------------------------------------------- command line
def add_arguments(p) -> None:
    """The options shared by ``sgflow quality`` and ``benchmarks/quality.py``."""
    p.add_argument("--quick", action="store_true", help="ring8 and grid9, 2 seeds, 800 steps (~3 min on 2 CPU cores)")
    p.add_argument("--preset", choices=("full", "quick", "smoke"), default=None, help="full (default), quick or smoke")
    p.add_argument("--out", default=None, help="output directory (default ./sgflow-quality[_quick]; "
                   "benchmarks/quality.py: benchmarks/results/quality[_quick])")
    p.add_argument("--datasets", nargs="+", default=None, help=f"subset of {' '.join(DATA_SPECS)}")
    p.add_argument("--methods", nargs="+", default=None, help=f"subset of {' '.join(METHODS)}")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="training seeds")
    p.add_argument("--train-steps", type=int, default=None, help="training steps for every data set (overrides the preset)")
    p.add_argument("--n-eval", type=int, default=None, help="samples per evaluation (default 2000)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate of every method (default 3e-3)")
    p.add_argument("--diagonal-fraction", type=float, default=None,
                   help="fraction of training pairs on t = u, for every method (default 0.5)")
    p.add_argument("--tune", action=argparse.BooleanOptionalAction, default=None,
                   help="first tune every method's lr and own knob with the same number of trials on --tune-seed "
                        "(default: on for the full preset, off for quick and smoke)")
    p.add_argument("--tune-seed", type=int, default=None, help="the seed tuning trials run on (default 100; never a reported seed)")
    p.add_argument("--jobs", type=int, default=None, help="runs trained at once, one process each (default 1)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per run (default 1)")
    p.add_argument("--device", default=None, help="cpu (default) or cuda")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement of step 2")
    p.add_argument("--cache-dir", default=None, help="where the digits feature classifier is cached")
    p.add_argument("--render", action="store_true", help="only recompute the summary, table and figure from --out's quality.json")
    p.add_argument("--no-progress", action="store_true", help="no line per trained run (as `sgflow train --no-progress`)")


def config_from_args(args) -> QualityConfig:
    """A :class:`QualityConfig` from parsed :func:`add_arguments` options (ValueError on bad values)."""
    name = args.preset or ("quick" if args.quick else "full")
    if args.quick and args.preset not in (None, "quick"):
        raise ValueError(f"--quick contradicts --preset {args.preset}")
    cfg = preset(name)
    over = {}
    if args.datasets:
        over["datasets"] = tuple(args.datasets)
    if args.methods:
        over["methods"] = tuple(args.methods)
    if args.seeds:
        over["seeds"] = tuple(args.seeds)
    datasets = over.get("datasets", cfg.datasets)
    steps = dict(cfg.train_steps)
    for d in datasets:
        if args.train_steps is not None:
            steps[d] = args.train_steps
        elif d not in steps:  # a data set outside the preset: the full mode's budget
            steps[d] = QualityConfig().train_steps.get(d)
    over["train_steps"] = steps
    for name_, val in (("n_eval", args.n_eval), ("lr", args.lr), ("threads", args.threads), ("device", args.device),
                       ("cache_dir", args.cache_dir), ("diagonal_fraction", args.diagonal_fraction),
                       ("tune", getattr(args, "tune", None)), ("tune_seed", getattr(args, "tune_seed", None)),
                       ("jobs", getattr(args, "jobs", None))):
        if val is not None:
            over[name_] = val
    if args.no_memory:
        over["measure_memory"] = False
    cfg = dataclasses.replace(cfg, **over)
    if not (math.isfinite(cfg.lr) and cfg.lr > 0):
        raise ValueError(f"--lr must be a positive number, got {cfg.lr}")
    if not 0.0 < cfg.diagonal_fraction < 1.0:
        raise ValueError(f"--diagonal-fraction must be in (0, 1) (flow-map methods need pairs with t < u and t = u), "
                         f"got {cfg.diagonal_fraction}")
    if cfg.threads is not None and cfg.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {cfg.threads}")
    if cfg.tune:
        fixed = [flag for flag, val in (("--lr", args.lr), ("--diagonal-fraction", args.diagonal_fraction)) if val is not None]
        if fixed:
            raise ValueError(f"{' and '.join(fixed)} would be replaced by the tuned settings: pass --no-tune to train every "
                             "method with them")
    check_config(cfg)
    return cfg


def default_out(cfg: QualityConfig, prog: str = "sgflow quality") -> str:
    """benchmarks/results/quality[_preset] for the repository's script, ./sgflow-quality[_preset] for the CLI."""
    base = "sgflow-quality" if prog.startswith("sgflow") else "benchmarks/results/quality"
    return base + ("" if cfg.preset == "full" else f"_{cfg.preset}")


def command_line(args, prog: str = "sgflow quality") -> str:
    """The options of parsed ``args`` written back as a command line (for the report's header)."""
    parts = [prog]
    for dest, value in sorted(vars(args).items()):
        if dest in ("func", "command") or value is None or (value is False and dest != "tune"):
            continue
        flag = "--" + dest.replace("_", "-")
        if dest == "tune":
            parts.append("--tune" if value else "--no-tune")
        elif value is True:
            parts.append(flag)
        elif isinstance(value, (list, tuple)):
            parts += [flag, *map(str, value)]
        else:
            parts += [flag, str(value)]
    return " ".join(parts)


def run_from_args(args, prog: str = "sgflow quality") -> dict:
    """Run the table from parsed options (or with ``--render`` redraw it); prints progress."""
    cfg = config_from_args(args)
    out = args.out or default_out(cfg, prog)
    if args.render:
        results = render(out)
        print(f"recomputed {Path(out) / 'quality.json'}'s summary; rewrote {Path(out) / 'quality.md'} and {Path(out) / 'quality.png'}")
        return results
    command = command_line(args, prog)
    print(f"quality table ({cfg.preset}): {len(cfg.datasets)} data set(s) x {len(cfg.seeds)} seed(s) x "
          f"{len(cfg.methods)} methods -> {out}", flush=True)
    quiet = getattr(args, "no_progress", False)

    def log(line: str) -> None:
        if not (quiet and line.startswith("[")):  # --no-progress: no per-run lines ("[  12.3s] ring8 seed 0 ...")
            print(line, flush=True)

    return run_quality(cfg, out, log=log, command=command)


