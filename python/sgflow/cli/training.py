"""``sgflow train`` and ``sgflow distill``: their options, :func:`build_train_config` and the commands."""
from __future__ import annotations

import sys
from pathlib import Path

from sgflow.cli.common import CLIError, _parse_kv, _positive_ints, _set_threads


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
