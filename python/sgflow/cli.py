"""The ``sgflow`` command line: ``train``, ``sample``, ``eval``, ``demo``, ``quality`` and ``list``.

    sgflow demo --out /tmp/demo                       # ~1 min on a CPU: train, plot, score
    sgflow train --data ring8 --steps 3000 --out runs/ring8
    sgflow train --data digits --model digits --steps 20000 --batch-size 128 --out runs/digits
    sgflow train --resume runs/ring8 --steps 6000     # continue (bit-exact) to 6000 steps
    sgflow sample runs/ring8 --steps 1 2 4 --n 2000 --out runs/ring8/samples
    sgflow eval runs/ring8 --steps 1 2 4 8 16 --baseline
    sgflow quality --quick --out runs/quality         # every method vs NFE: JSON, Markdown table, figure
    torchrun --nproc_per_node=4 -m sgflow.cli train --data cifar10 --data-root ~/data --model cifar10 ...

User errors (unknown names, missing files, bad checkpoints, bad batch sizes) print one line
``sgflow: error: ...`` on stderr and exit with status 1 (2 for malformed command lines).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

EXIT_USER_ERROR = 1
EXIT_USAGE = 2


class CLIError(ValueError):
    """A user error found by the command line itself."""


def _user_errors() -> tuple:
    from sgflow.data import DatasetError
    from sgflow.distributed import DistributedError
    from sgflow.evaluate import EvalError
    from sgflow.train import CheckpointError, ConfigError, TrainingDiverged

    return (CLIError, ConfigError, CheckpointError, DatasetError, EvalError, DistributedError, TrainingDiverged,
            FileNotFoundError, NotADirectoryError, PermissionError, ImportError)


# ---------------------------------------------------------------------- parsing helpers
def _parse_value(text: str):
    """``k=v`` values: JSON literals (numbers, true/false, null, lists) else the raw string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _parse_kv(items, what: str) -> dict:
    out = {}
    for item in items or ():
        if "=" not in item:
            raise CLIError(f"{what} options are key=value, got {item!r}")
        k, v = item.split("=", 1)
        k = k.strip().replace("-", "_")
        if not k:
            raise CLIError(f"{what} option {item!r} has an empty key")
        out[k] = _parse_value(v)
    return out


def _positive_ints(values, what: str) -> tuple:
    if not values or any(v < 1 for v in values):
        raise CLIError(f"{what} must be positive integers, got {values}")
    return tuple(values)


def _set_threads(n):
    if n is not None:
        if n < 1:
            raise CLIError(f"--threads must be >= 1, got {n}")
        torch.set_num_threads(n)


def _device(arg: str) -> str:
    if arg in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if arg.startswith("cuda") and not torch.cuda.is_available():
        raise CLIError(f"--device {arg} asked for but CUDA is not available")
    return arg


# ---------------------------------------------------------------------- train
_TRAIN_FIELDS = {
    # argparse dest -> TrainConfig field
    "method": "method", "data": "data", "model": "model", "steps": "steps", "batch_size": "batch_size", "lr": "lr",
    "betas": "betas", "weight_decay": "weight_decay", "grad_clip": "grad_clip", "warmup": "warmup",
    "lr_schedule": "lr_schedule", "ema_decay": "ema_decay", "seed": "seed", "interpolant": "interpolant",
    "time_dist": "time_dist", "diagonal_fraction": "diagonal_fraction", "out": "out_dir", "log_every": "log_every",
    "sample_every": "sample_every", "ckpt_every": "ckpt_every", "sample_steps": "sample_steps", "device": "device",
    "divergence_threshold": "divergence_threshold", "teacher": "teacher", "teacher_mode": "teacher_mode",
    "teacher_schedule": "teacher_schedule",
}


def _add_train(sub):
    from sgflow.train import TrainConfig

    d = TrainConfig()
    p = sub.add_parser("train", help="train a flow map", description="Train a flow map (SGFlow or a baseline). "
                       "Under torchrun the batch is split over the processes and the model is wrapped in "
                       "DistributedDataParallel, whose forward syncs the gradients (sgflow_fused, meanflow_fused, "
                       "flow_matching, progressive); sgflow, meanflow, lagrangian and eulerian compute their JVP "
                       "with torch.func.jvp, which DDP's forward does not support, so they train the plain module "
                       "and all-reduce the gradients after backward (the same update).")
    # Every default is None so an explicitly given option can be told apart (it must agree with a
    # checkpoint being resumed); TrainConfig's defaults are shown in the help.
    a = p.add_argument
    a("--method", default=None, help=f"loss: sgflow, sgflow_fused, flow_matching, meanflow, lagrangian, eulerian, progressive (default {d.method})")
    a("--data", default=None, help=f"data set (see `sgflow list`; default {d.data})")
    a("--data-root", default=None, help="directory of the cifar10 / folder data")
    a("--data-opt", action="append", metavar="K=V", help="data set option, e.g. dim=16 (gmm), pad=4 (digits); repeatable")
    a("--model", default=None, help="network config: mlp, mlp-small, tiny, digits, cifar10 (default: the data set's)")
    a("--model-opt", action="append", metavar="K=V", help="network override, e.g. hidden=512; repeatable")
    a("--loss-opt", action="append", metavar="K=V", help="loss option added to the method's recipe (SGFlow's: update=semi target=ema); "
      "update=paper replaces it with the paper's update, e.g. with both_terms=true; repeatable")
    a("--steps", type=int, default=None, help=f"total optimisation steps (default {d.steps})")
    a("--batch-size", type=int, default=None, help=f"global batch size (default {d.batch_size})")
    a("--lr", type=float, default=None, help=f"Adam learning rate (default {d.lr})")
    a("--betas", type=float, nargs=2, default=None, metavar=("B1", "B2"), help=f"Adam betas (default {d.betas[0]} {d.betas[1]})")
    a("--weight-decay", type=float, default=None, help="decoupled weight decay, AdamW when > 0 (default 0)")
    a("--grad-clip", type=float, default=None, help=f"max global gradient norm, 0 disables (default {d.grad_clip})")
    a("--warmup", type=int, default=None, help="linear learning-rate warm-up steps (default 0)")
    a("--lr-schedule", choices=("constant", "cosine"), default=None, help="after warm-up (default constant)")
    a("--ema-decay", type=float, default=None, help=f"EMA decay (default {d.ema_decay})")
    a("--seed", type=int, default=None, help="seed of the whole run (default 0)")
    a("--interpolant", default=None, help="linear or trig (default linear)")
    a("--time-dist", default=None, help="uniform or logit_normal (default uniform)")
    a("--diagonal-fraction", type=float, default=None, help=f"share of t = u samples (default {d.diagonal_fraction})")
    a("--out", default=None, help=f"output directory (default {d.out_dir}; when resuming, the checkpoint's)")
    a("--log-every", type=int, default=None, help=f"steps between log lines (default {d.log_every})")
    a("--sample-every", type=int, default=None, help="steps between sample figures, 0: at the end only")
    a("--ckpt-every", type=int, default=None, help="steps between checkpoints, 0: at the end only")
    a("--sample-steps", type=int, nargs="+", default=None, help="step counts shown in the figures (default 1 2 4 8)")
    a("--device", default=None, help="auto, cpu, cuda or cuda:N (default auto)")
    a("--divergence-threshold", type=float, default=None, help="stop when |loss| or the gradient norm exceeds this "
      f"(0: only on NaN/inf; default {d.divergence_threshold:g})")
    _add_teacher_options(a, d)
    a("--resume", default=None, metavar="CKPT", help="continue from a checkpoint file or run directory; 'auto': "
      "from OUT/checkpoint.pt when it exists")
    a("--overwrite", action="store_true", help="start a fresh run even where OUT already holds one")
    a("--no-progress", action="store_true", help="no progress bar")
    a("--no-figures", action="store_true", help="no PNG figures")
    a("--threads", type=int, default=None, help="CPU threads for torch")
    p.set_defaults(func=cmd_train)


def _add_teacher_options(a, d) -> None:
    from sgflow.losses.sgflow import TEACHER_MODES
    from sgflow.train import TEACHER_SCHEDULES

    a("--teacher", default=None, metavar="CKPT", help="distil SGFlow from this checkpoint's velocity (its EMA f~(t, t, x)): "
      "a flow-matching run, or any sgflow run, of the same data (method sgflow or sgflow_fused)")
    a("--teacher-mode", default=None, choices=TEACHER_MODES, help="second: the teacher replaces the stop-gradient "
      f"velocity in L_sg's second term; both: Xdot_t too (the ideal loss per sample); default {d.teacher_mode}")
    a("--teacher-schedule", default=None, choices=TEACHER_SCHEDULES, help="constant: the teacher throughout; linear: "
      "blended into the model's own velocity by the end; warm: the teacher for the first half only "
      f"(default {d.teacher_schedule})")


def build_train_config(args):
    """(TrainConfig, resume path or None) from parsed ``train`` arguments."""
    import dataclasses

    from sgflow.train import TrainConfig, read_checkpoint

    given = {field: getattr(args, dest) for dest, field in _TRAIN_FIELDS.items() if getattr(args, dest) is not None}
    if "betas" in given:
        given["betas"] = tuple(given["betas"])
    if "sample_steps" in given:
        given["sample_steps"] = _positive_ints(given["sample_steps"], "--sample-steps")
    data_kwargs = _parse_kv(args.data_opt, "--data-opt")
    if args.data_root is not None:
        data_kwargs["root"] = args.data_root
    if data_kwargs:
        given["data_kwargs"] = data_kwargs
    if args.model_opt:
        given["model_kwargs"] = _parse_kv(args.model_opt, "--model-opt")
    if args.loss_opt:
        given["loss_kwargs"] = _parse_kv(args.loss_opt, "--loss-opt")
    if args.no_progress:
        given["progress"] = False
    if args.no_figures:
        given["figures"] = False

    resume = args.resume
    if resume == "auto":
        out = Path(given.get("out_dir") or TrainConfig().out_dir)
        resume = str(out / "checkpoint.pt") if (out / "checkpoint.pt").exists() else None
    if resume is None:
        out = Path(given.get("out_dir") or TrainConfig().out_dir)
        if (out / "checkpoint.pt").exists() and not args.overwrite:
            raise CLIError(f"{out} already holds a run (checkpoint.pt): pass --resume auto to continue it, "
                           "--overwrite to start over, or another --out")
        if "loss_kwargs" in given and "update" not in given["loss_kwargs"]:
            # --loss-opt adds to the method's training recipe; one that picks the update (update=paper) replaces it.
            from sgflow.train import METHOD_DEFAULTS

            method = given.get("method", TrainConfig().method)
            given["loss_kwargs"] = {**METHOD_DEFAULTS.get(method, {}), **given["loss_kwargs"]}
        return TrainConfig(**given), None
    ckpt = read_checkpoint(resume)
    base = ckpt["config"]
    if "out_dir" not in given:
        given["out_dir"] = str(Path(ckpt["path"]).parent)
    # A resumed run keeps the checkpoint's options; explicitly given ones are checked against it by the Trainer.
    return dataclasses.replace(base, **given), ckpt["path"]


def cmd_train(args) -> int:
    from sgflow.train import Trainer

    _set_threads(args.threads)
    cfg, resume = build_train_config(args)
    trainer = Trainer(cfg, resume=resume)
    try:
        if resume and trainer.step >= cfg.steps:  # (below the checkpoint's step the Trainer refused)
            if trainer.dist.is_main:
                print(f"{resume} is already at step {trainer.step}: nothing to train (pass --steps above "
                      f"{trainer.step} to continue)", file=sys.stderr)
            return 0
        if resume and trainer.dist.is_main:
            print(f"resuming from {resume} at step {trainer.step}", file=sys.stderr)
        if trainer.dist.enabled and trainer.dist.is_main:
            print(trainer.data_parallel_note(), file=sys.stderr)
        trainer.run()
        if trainer.dist.is_main:
            last = trainer.history[-1] if trainer.history else {}
            loss = f", final loss {last['loss']:.4g}" if "loss" in last else ""
            where = f"; outputs in {trainer.out_dir}" if trainer.out_dir else ""
            print(f"trained {cfg.method} on {cfg.data} to step {trainer.step} in {trainer.wall_time:.1f}s{loss}{where}")
    finally:
        trainer.close()
    return 0


# ---------------------------------------------------------------------- distill
# The optimiser settings the distillation table was measured with (those of `sgflow demo` and the quality table).
DISTILL_DEFAULTS = dict(lr=3e-3, warmup=100, lr_schedule="cosine", ema_decay=0.995, grad_clip=1.0)


def _add_distill(sub):
    from sgflow.train import TrainConfig

    d = TrainConfig()
    p = sub.add_parser("distill", help="distil a few-step SGFlow flow map from a velocity model (trains one if none)",
                       description="Distil SGFlow from a teacher velocity: --teacher CKPT (a flow-matching or sgflow "
                       "checkpoint of the same data), or, without one, train a flow-matching teacher first "
                       "(--teacher-steps, into OUT/teacher). The student goes to OUT.")
    a = p.add_argument
    a("--data", default=None, help="data set (default: the teacher's, else ring8)")
    a("--data-root", default=None, help="directory of the cifar10 / folder data")
    a("--data-opt", action="append", metavar="K=V", help="data set option, e.g. dim=16 (gmm); repeatable")
    a("--model", default=None, help="network config of the student (and of a trained teacher; default: the data set's)")
    a("--model-opt", action="append", metavar="K=V", help="network override; repeatable")
    a("--method", default="sgflow_fused", choices=("sgflow_fused", "sgflow"), help="student loss (default sgflow_fused)")
    a("--steps", type=int, default=2000, help="student training steps (default 2000)")
    a("--teacher-steps", type=int, default=None, help="flow-matching steps of the teacher trained when --teacher is "
      "not given (default: --steps)")
    a("--batch-size", type=int, default=d.batch_size)
    a("--lr", type=float, default=DISTILL_DEFAULTS["lr"], help=f"learning rate of both runs (default {DISTILL_DEFAULTS['lr']})")
    a("--seed", type=int, default=0)
    a("--out", default="runs/distill", help="output directory of the student (default runs/distill)")
    a("--overwrite", action="store_true", help="start fresh where OUT (or OUT/teacher) already holds a run")
    a("--device", default="auto")
    a("--no-progress", action="store_true")
    a("--threads", type=int, default=None)
    _add_teacher_options(a, d)
    p.set_defaults(func=cmd_distill)


def cmd_distill(args) -> int:
    from sgflow.train import Trainer, TrainConfig, read_checkpoint

    _set_threads(args.threads)
    out = Path(args.out)
    common = dict(DISTILL_DEFAULTS, batch_size=args.batch_size, lr=args.lr, seed=args.seed, device=args.device,
                  progress=not args.no_progress, figures=False, log_every=50)
    data_kwargs = _parse_kv(args.data_opt, "--data-opt")
    if args.data_root is not None:
        data_kwargs["root"] = args.data_root
    model_kwargs = _parse_kv(args.model_opt, "--model-opt")
    if args.teacher is not None and args.teacher_steps is not None:
        raise CLIError("pass either --teacher CKPT or --teacher-steps N (to train one), not both")
    if args.teacher is not None:
        teacher = args.teacher
        if args.data is None:  # the teacher's data set and network
            tcfg = read_checkpoint(teacher)["config"]
            data, data_kwargs = tcfg.data, dict(tcfg.data_kwargs, **data_kwargs)
        else:
            data = args.data
    else:
        data = args.data or "ring8"
        steps = args.steps if args.teacher_steps is None else args.teacher_steps
        if steps < 1:
            raise CLIError(f"--teacher-steps must be >= 1, got {steps}")
        tdir = out / "teacher"
        if (tdir / "checkpoint.pt").exists() and not args.overwrite:
            raise CLIError(f"{tdir} already holds a teacher: pass --teacher {tdir} to use it, or --overwrite")
        tcfg = TrainConfig(method="flow_matching", data=data, data_kwargs=data_kwargs, model=args.model,
                           model_kwargs=model_kwargs, steps=steps, out_dir=str(tdir), **common)
        print(f"training the flow-matching teacher on {data} ({steps} steps) -> {tdir}", file=sys.stderr)
        trainer = Trainer(tcfg)
        try:
            trainer.run()
        finally:
            trainer.close()
        teacher = str(tdir / "checkpoint.pt")
    if (out / "checkpoint.pt").exists() and not args.overwrite:
        raise CLIError(f"{out} already holds a run (checkpoint.pt): pass --overwrite or another --out")
    given = {k: getattr(args, k) for k in ("teacher_mode", "teacher_schedule") if getattr(args, k) is not None}
    cfg = TrainConfig(method=args.method, data=data, data_kwargs=data_kwargs, model=args.model, model_kwargs=model_kwargs,
                      steps=args.steps, out_dir=str(out), teacher=teacher, **given, **common)
    trainer = Trainer(cfg)
    try:
        trainer.run()
    finally:
        trainer.close()
    last = trainer.history[-1] if trainer.history else {}
    loss = f", final loss {last['loss']:.4g}" if "loss" in last else ""
    print(f"distilled {cfg.method} on {data} from {teacher} ({cfg.teacher_mode}, {cfg.teacher_schedule}) to step "
          f"{trainer.step} in {trainer.wall_time:.1f}s{loss}; outputs in {out}; sample with: sgflow sample {out} --steps 1 2 4")
    return 0


# ---------------------------------------------------------------------- sample
def _add_sample(sub):
    p = sub.add_parser("sample", help="draw samples from a checkpoint",
                       description="Draw samples at chosen step counts; save PNG figures and arrays.")
    p.add_argument("checkpoint", help="checkpoint file or run directory")
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 8], help="step counts (default 1 2 4 8)")
    p.add_argument("--n", type=int, default=None, help="samples per step count (default 2000 points / 64 images)")
    p.add_argument("--out", default=None, help="output directory (default CHECKPOINT_DIR/samples)")
    p.add_argument("--sampler", default="auto", choices=("auto", "flow_map", "euler", "heun"),
                   help="auto: flow-map jumps, or Euler for flow matching")
    p.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--format", choices=("npy", "pt", "both", "none"), default="npy", help="array format (default npy)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(func=cmd_sample)


def _sampler(choice, method):
    from sgflow.train import default_sampler

    return default_sampler(method) if choice == "auto" else choice


def cmd_sample(args) -> int:
    from sgflow.data import get_dataset
    from sgflow.plotting import image_grid, samples_figure, save_png
    from sgflow.train import generate, load_model

    _set_threads(args.threads)
    steps = _positive_ints(args.steps, "--steps")
    device = _device(args.device)
    model, cfg, ckpt = load_model(args.checkpoint, device=device, use_ema=not args.raw)
    shape = tuple(ckpt["data_shape"])
    is_image = len(shape) == 3
    n = args.n if args.n is not None else (64 if is_image else 2000)
    if n < 1:
        raise CLIError(f"--n must be >= 1, got {n}")
    out = Path(args.out) if args.out else Path(ckpt["path"]).parent / "samples"
    out.mkdir(parents=True, exist_ok=True)
    sampler = _sampler(args.sampler, cfg.method)
    g = torch.Generator().manual_seed(args.seed)
    x0 = torch.randn((n, *shape), generator=g)
    t0 = time.perf_counter()
    samples = {k: v.cpu() for k, v in generate(model, x0.to(device), steps, sampler).items()}
    elapsed = time.perf_counter() - t0
    for k, x in samples.items():
        stem = out / f"samples_{k}step{'s' if k != 1 else ''}"
        if is_image:  # every sample at full resolution, one grid per step count
            save_png(image_grid(x, scale=max(1, round(96 / shape[-1]))), stem.with_suffix(".png"))
        if args.format in ("npy", "both"):
            import numpy as np

            np.save(stem.with_suffix(".npy"), x.numpy())
        if args.format in ("pt", "both"):
            torch.save(x, stem.with_suffix(".pt"))
    try:
        data = get_dataset(cfg.data, **cfg.data_kwargs).sample(min(n, 2000) if not is_image else min(n, 64), generator=g)
    except (FileNotFoundError, NotADirectoryError, ImportError, ValueError):
        data = None  # the data may not be on this machine (or torchvision missing): plot the samples alone
    which = "raw" if args.raw else "EMA"
    title = f"{cfg.method} on {cfg.data}, step {ckpt['step']} ({which}, {sampler})"
    if data is None:
        first = next(iter(samples.values()))
        fig = samples_figure(first, {k: v for k, v in list(samples.items())[1:]}, title=title)
    else:
        fig = samples_figure(data, samples, title=title)
    png = save_png(fig, out / "samples.png")
    print(f"{n} samples at {', '.join(map(str, steps))} steps ({sampler}) in {elapsed:.2f}s -> {out} ({png.name}"
          + (", samples_*.png" if is_image else "")
          + (f", samples_*.{args.format if args.format != 'both' else '{npy,pt}'}" if args.format != "none" else "") + ")")
    return 0


# ---------------------------------------------------------------------- eval
def _add_eval(sub):
    p = sub.add_parser("eval", help="score a checkpoint at several step counts",
                       description="Energy distance and exact flow-map error (mixtures) or a classifier Frechet "
                       "distance (digits) at several step counts.")
    p.add_argument("checkpoint", help="checkpoint file or run directory")
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="step counts (default 1 2 4 8 16)")
    p.add_argument("--n", type=int, default=2000, help="samples per step count (default 2000)")
    p.add_argument("--sampler", default="auto", choices=("auto", "flow_map", "euler", "heun"))
    p.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--baseline", action="store_true", help="also score the untrained network (same seed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default=None, help="where the digits feature classifier is cached "
                   "(default $SGFLOW_CACHE or ~/.cache/sgflow)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(func=cmd_eval)


def cmd_eval(args) -> int:
    from sgflow.data import get_dataset
    from sgflow.evaluate import evaluate, format_table
    from sgflow.train import build_network, load_model

    _set_threads(args.threads)
    steps = _positive_ints(args.steps, "--steps")
    if args.n < 2:
        raise CLIError(f"--n must be >= 2, got {args.n}")
    device = _device(args.device)
    model, cfg, ckpt = load_model(args.checkpoint, device=device, use_ema=not args.raw)
    dataset = get_dataset(cfg.data, **cfg.data_kwargs)
    sampler = _sampler(args.sampler, cfg.method)
    results = {}
    if args.baseline:
        torch.manual_seed(cfg.seed)
        base, _ = build_network(cfg.model, tuple(ckpt["data_shape"]), **cfg.model_kwargs)
        results["untrained"] = evaluate(base.to(device), dataset, steps, args.n, args.seed, sampler, device, args.cache_dir,
                                        interpolant=cfg.interpolant)
    label = f"step {ckpt['step']}"
    results[label] = evaluate(model, dataset, steps, args.n, args.seed, sampler, device, args.cache_dir,
                              interpolant=cfg.interpolant)
    print(f"{cfg.method} on {cfg.data}, {'raw' if args.raw else 'EMA'} weights, sampler {sampler}, n={args.n}")
    print(format_table(results))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"checkpoint": ckpt["path"], "step": ckpt["step"], "method": cfg.method,
                                               "data": cfg.data, "sampler": sampler, "results": results}, indent=2))
    return 0


# ---------------------------------------------------------------------- demo
# Chosen by sweeps on a 2-core CPU (see the report in the demo's docstring): a small MLP trained for
# many steps beats a wide one trained for few; both SGFlow terms on every sample (both_terms) cancel
# the conditional-velocity noise per sample and beat the split batch at equal cost; the time
# embedding's frequencies are lowered (time_scale) because the t-JVP differentiates them.
DEMO_DEFAULTS = dict(data="ring8", steps=4000, batch_size=256, lr=3e-3, warmup=100, ema_decay=0.995, model="mlp-small",
                     model_kwargs={"time_scale": 30.0}, loss_kwargs={"both_terms": True}, diagonal_fraction=0.5)


def _add_demo(sub):
    p = sub.add_parser("demo", help="1-minute CPU demo: train SGFlow on a 2-D mixture, plot and score it",
                       description="Train SGFlow (fused path if available) on a 2-D Gaussian mixture with an MLP, "
                       "write one PNG of samples at 1, 2, 4 and 8 steps beside the data, and print the energy "
                       "distance and exact flow-map error per step count, untrained vs trained.")
    p.add_argument("--out", default="sgflow-demo", help="output directory (default ./sgflow-demo)")
    p.add_argument("--data", default=DEMO_DEFAULTS["data"], choices=("ring8", "grid9"))
    p.add_argument("--steps", type=int, default=DEMO_DEFAULTS["steps"], help=f"training steps (default {DEMO_DEFAULTS['steps']})")
    p.add_argument("--batch-size", type=int, default=DEMO_DEFAULTS["batch_size"])
    p.add_argument("--method", default="auto", help="auto (sgflow_fused if available, else sgflow) or any training method")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n", type=int, default=2000, help="evaluation samples per step count")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: more help this small MLP "
                   "little on an idle CPU and slow it down many times on a busy one)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
    from sgflow.evaluate import evaluate, format_table
    from sgflow.plotting import auto_limit, samples_figure, save_png
    from sgflow.train import TrainConfig, Trainer, available_methods, generate

    t_start = time.perf_counter()
    _set_threads(args.threads)
    if args.steps < 1:
        raise CLIError(f"--steps must be >= 1, got {args.steps}")
    method = args.method
    if method == "auto":
        method = "sgflow_fused" if "sgflow_fused" in available_methods() else "sgflow"
    out = Path(args.out)
    cfg = TrainConfig(
        method=method, data=args.data, model=DEMO_DEFAULTS["model"], model_kwargs=dict(DEMO_DEFAULTS["model_kwargs"]),
        steps=args.steps, batch_size=args.batch_size, lr=DEMO_DEFAULTS["lr"], warmup=DEMO_DEFAULTS["warmup"],
        lr_schedule="cosine", ema_decay=DEMO_DEFAULTS["ema_decay"], grad_clip=1.0, seed=args.seed, out_dir=str(out),
        log_every=50, figures=False, progress=not args.no_progress, device="cpu",
        loss_kwargs=dict(DEMO_DEFAULTS["loss_kwargs"]) if method.startswith("sgflow") else {},
        diagonal_fraction=DEMO_DEFAULTS["diagonal_fraction"],
    )
    steps_eval = (1, 2, 4, 8, 16)
    trainer = Trainer(cfg)
    try:
        import copy

        untrained = copy.deepcopy(trainer.model).eval()
        dataset = trainer.dataset
        cache = {}
        before = evaluate(untrained, dataset, steps_eval, n=args.n, seed=args.seed + 1, cache=cache)
        print(f"training {method} on {args.data} (MLP, batch {cfg.batch_size}, {cfg.steps} steps, "
              f"{torch.get_num_threads()} CPU thread(s)) ...", flush=True)
        t_train = time.perf_counter()
        trainer.run()
        train_time = time.perf_counter() - t_train
    finally:
        trainer.close()
    after = evaluate(trainer.ema, dataset, steps_eval, n=args.n, seed=args.seed + 1, cache=cache)

    g = torch.Generator().manual_seed(args.seed + 2)
    data = dataset.sample(args.n, generator=g)
    x0 = torch.randn((args.n, *dataset.shape), generator=g)
    shown = (1, 2, 4, 8)
    samples = generate(trainer.ema, x0, shown, "flow_map")
    ed = {r["steps"]: r["energy"] for r in after["rows"]}
    mse = {r["steps"]: r["map_mse"] for r in after["rows"]}
    footers = [f"ED floor {after['noise_floor']:.4f}"] + [f"ED {ed[k]:.4f}   map MSE {mse[k]:.4f}" for k in shown]
    fig = samples_figure(data, samples, title=f"SGFlow ({method}) on {args.data}: {cfg.steps} training steps, "
                         f"{train_time:.0f}s on CPU", footers=footers, lim=auto_limit(data) * 1.05)
    png = save_png(fig, out / "demo.png")
    print()
    print("Quality vs number of flow-map steps (ED: energy distance to fresh data; map MSE: error of the k-step map")
    print("against the exact flow map f(0,1,x) of the mixture, both lower is better):")
    print(format_table({"untrained": before, "trained": after}))
    print()
    print(f"figure: {png}   checkpoint: {out / 'checkpoint.pt'}")
    print(f"wall time: {time.perf_counter() - t_start:.1f}s (training {train_time:.1f}s)")
    return 0


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


if __name__ == "__main__":
    sys.exit(main())
