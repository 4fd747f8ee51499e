"""Training loop: :class:`TrainConfig`, :class:`Trainer` and :func:`train`.

One optimisation step with global batch size B over W processes (W = 1 without torchrun):

1. Draw the *global* batch on every rank from one CPU ``torch.Generator`` (the "stream"): data
   x1 [B, *D], noise x0 [B, *D], times (t, u) [B] from a :class:`~sgflow.TimeSampler`, and for SGFlow
   a paired term split (rows 2i and 2i+1 take different JVP directions, the order a coin flip).
   Each rank keeps rows [r B/W, (r+1) B/W). Because every random number comes from this stream,
   the run depends only on (seed, config), a checkpoint of the stream's state resumes exactly, and a
   W-process run sees the same batches as a 1-process run.
2. ``loss, info = loss_fn(model, x1, noise=x0, t=t, u=u, split=..., generator=loss_gen)``.
3. backward, which averages gradients over ranks (:mod:`sgflow.distributed`): through DDP's own forward
   (:class:`~sgflow.distributed.DualDDP`) for the methods whose network calls all go through
   ``model(...)``, by an explicit all-reduce after backward for the JVP methods that cannot (see
   :data:`MANUAL_ALLREDUCE_METHODS`); clip the global grad norm;
   Adam(W) step at the scheduled learning rate (a ``torch.optim.lr_scheduler.LambdaLR`` of
   :func:`lr_factor`); EMA update by ``torch.optim.swa_utils.AveragedModel``,
   ema <- d ema + (1 - d) theta with d = min(ema_decay, (1 + step) / (10 + step)) (a short warm-up
   so the EMA is useful in short runs; :func:`ema_multi_avg_fn`).

The paired split gives every rank exactly half first-term and half second-term rows, so averaging
the per-rank SGFlow losses equals the loss of one process on the concatenated batch (and the batch
never lacks one of the two terms).

Outputs in ``out_dir``: ``config.json``, ``log.jsonl`` (one JSON object per logged step),
``checkpoint.pt`` (model, EMA, optimizer, LR scheduler, step, every RNG state; written atomically) and
``samples/step_XXXXXXX.png`` figures.

Checkpoint format, version 2: ``"ema"`` holds the EMA network's own state_dict (the model's keys, what
:func:`load_model` reads), ``"ema_n_averaged"`` the :class:`~torch.optim.swa_utils.AveragedModel`'s count and
``"scheduler"`` the LR scheduler's state_dict. Version 1 checkpoints (no count, no scheduler) are migrated on
resume: both follow from the step (the EMA's count is step + 1, the schedule is a function of the step).
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import collections
import json
import math
import os
import sys
import time
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.optim.lr_scheduler import LambdaLR
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import sgflow
from sgflow import distributed as D
from sgflow.data import DatasetError, get_dataset
from sgflow.times import TimeSampler

CHECKPOINT_FORMAT = "sgflow-checkpoint"
CHECKPOINT_VERSION = 2  # 2: "ema_n_averaged" and "scheduler" entries (version 1 checkpoints are migrated)

# Options that may differ between a checkpoint and the run that resumes it; everything else
# (method, data, network, batch size, optimiser...) must match or the resumed run is a different run.
RESUMABLE_OVERRIDES = ("steps", "out_dir", "log_every", "sample_every", "ckpt_every", "device", "progress", "sample_steps",
                       "figures", "divergence_threshold")


# Methods that train the plain module under torchrun and average gradients with an explicit all-reduce after
# backward (sgflow.distributed.allreduce_gradients) instead of through DistributedDataParallel: their JVP is
# torch.func.jvp (or a double VJP), and DDP's forward fails inside it (its bucket rebuild from the second
# iteration; its output autograd.Function with find_unused_parameters / static_graph), so these losses refuse
# a DDP model (sgflow.checks.check_not_ddp). The update is the same average, without DDP's overlap of the
# all-reduce with backward. Every other method (sgflow_fused, meanflow_fused, flow_matching, progressive)
# runs through DDP's forward.
MANUAL_ALLREDUCE_METHODS = ("sgflow", "meanflow", "lagrangian", "eulerian")


class ConfigError(ValueError):
    """An invalid training configuration (bad method, batch size, learning rate...)."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, is not an sgflow checkpoint, or does not fit the config."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


class SGFlowInstabilityWarning(RuntimeWarning):
    """SGFlow's second term is outgrowing its first: the run is heading for divergence (see the message)."""


def available_methods() -> dict:
    """Method name -> loss function: :data:`sgflow.LOSSES`, plus ``sgflow_fused`` when
    :func:`sgflow.fused_loss` exists and ``meanflow_fused`` when :func:`sgflow.fused_meanflow_loss`
    does (checked at call time, so an install without the fused path still trains)."""
    methods = dict(sgflow.LOSSES)
    if hasattr(sgflow, "fused_loss"):
        methods["sgflow_fused"] = sgflow.fused_loss
    if hasattr(sgflow, "fused_meanflow_loss"):
        methods["meanflow_fused"] = sgflow.fused_meanflow_loss
    return methods


def default_sampler(method: str) -> str:
    """Flow-map jumps for flow-map methods; Euler for flow matching, whose f~(t, u, x) is only
    trained on the diagonal u = t."""
    return "euler" if method == "flow_matching" else "flow_map"


# The training recipe of a method where it differs from its loss function's own defaults (which stay the
# papers' losses). SGFlow: the semi-gradient update (sgflow.losses.semi), chosen by measurement: with the
# paper's update SGFlow diverged on the 16-D mixture on 3 of 3 seeds (docs/quality.md, "The SGFlow recipe").
METHOD_DEFAULTS = {"sgflow": {"update": "semi", "target": "ema"}, "sgflow_fused": {"update": "semi", "target": "ema"}}

# Early warning: the geometric mean of SGFlow's term2 / term1 over the last INSTABILITY_STEPS steps above
# INSTABILITY_RATIO. The two terms are equal in expectation at the solution; L_sg = L_ideal - E||J (v_hat - v)||^2
# with L_ideal >= 0, so a persistently larger second term means the loss is falling by growing the Jacobian along
# the velocity error. Measured (gmm16, paper update, lr 3e-3): the per-step ratio sits at 0.7-1.5 (window mean
# ~1.05), then goes 2 -> 20 -> 300 within ~15 steps; the window mean passes 1.5 with the loss near -50, 4 steps
# before it passes -1e3. The default recipe's window mean stays below 1.3 on every shipped data set.
INSTABILITY_RATIO = 1.5
INSTABILITY_STEPS = 10


@dataclass
class TrainConfig:
    """Everything that defines a training run (stored in every checkpoint).

    batch_size is the *global* batch (split over processes under torchrun). ``model=None`` picks
    the data set's default network config. ``grad_clip`` <= 0 or None disables clipping.
    ``lr_schedule``: "constant" or "cosine" (to 0 at ``steps``), after ``warmup`` linear steps.
    ``diagonal_fraction`` (share of t = u samples, where f~(t, t, .) learns the velocity that SGFlow's
    stop-gradient substitutes) defaults to 0.5: with 0.25 SGFlow diverged on ``moons`` (the velocity
    estimate lagged and the second term, which is maximised, blew up).
    ``sample_every`` / ``ckpt_every`` = 0: only at the end (``figures=False``: no PNGs at all).
    ``loss_kwargs`` go to the loss; ``None`` (default) takes the method's training recipe,
    :data:`METHOD_DEFAULTS` (SGFlow: ``{"update": "semi", "target": "ema"}``), a dict is used exactly as
    given (``{}``: the loss's own defaults, for SGFlow the paper's L_sg with a split batch); ``sample_steps``: step
    counts in the figures. ``divergence_threshold``: stop when |loss| or the gradient norm exceeds it
    (0: only on NaN/inf).
    """

    method: str = "sgflow"
    data: str = "ring8"
    data_kwargs: dict = field(default_factory=dict)
    model: str | None = None
    model_kwargs: dict = field(default_factory=dict)
    steps: int = 2000
    batch_size: int = 256
    lr: float = 1e-3
    betas: tuple = (0.9, 0.999)
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    warmup: int = 0
    lr_schedule: str = "constant"
    ema_decay: float = 0.999
    seed: int = 0
    interpolant: str = "linear"
    time_dist: str = "uniform"
    diagonal_fraction: float = 0.5
    loss_kwargs: dict | None = None
    out_dir: str | None = "runs/sgflow"
    log_every: int = 10
    sample_every: int = 0
    ckpt_every: int = 0
    sample_steps: tuple = (1, 2, 4, 8)
    device: str = "auto"
    progress: bool = True
    figures: bool = True
    divergence_threshold: float = 1e6
    # Distillation (SGFlow methods only): ``teacher`` is a checkpoint (file or run directory) of the same data whose
    # EMA diagonal f~(t, t, x) is the teacher velocity (see :func:`load_teacher`); ``teacher_mode`` and
    # ``teacher_schedule`` as in :data:`TEACHER_SCHEDULES` and :func:`sgflow.sgflow_loss`. Default "both" (the teacher
    # in both terms: the ideal loss per sample) by measurement: it beat "second" (semi or paper update) and the
    # schedules on ring8 and gmm16, 3 seeds each (README, "Distil your own model"; benchmarks/distill.py).
    teacher: str | None = None
    teacher_mode: str = "both"
    teacher_schedule: str = "constant"

    def __post_init__(self):
        if self.loss_kwargs is None:
            self.loss_kwargs = dict(METHOD_DEFAULTS.get(self.method, {}))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(d["betas"])
        d["sample_steps"] = list(d["sample_steps"])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown training options: {', '.join(unknown)}")
        d = dict(d)
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        if "sample_steps" in d:
            d["sample_steps"] = tuple(d["sample_steps"])
        return cls(**d)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def validate_config(cfg: TrainConfig, world_size: int = 1) -> None:
    """Raise :class:`ConfigError` with a one-line explanation for any invalid option."""
    methods = available_methods()
    if cfg.method not in methods:
        hint = " (the fused path is not available in this install)" if cfg.method == "sgflow_fused" else ""
        raise ConfigError(f"unknown method {cfg.method!r}{hint}; expected one of: {', '.join(methods)}")
    if not _is_int(cfg.steps) or cfg.steps < 0:
        raise ConfigError(f"steps must be a non-negative integer, got {cfg.steps!r}")
    if not _is_int(cfg.batch_size) or cfg.batch_size < 1:
        raise ConfigError(f"batch size must be a positive integer, got {cfg.batch_size!r}")
    if cfg.batch_size % world_size:
        raise ConfigError(f"batch size {cfg.batch_size} is not divisible by the number of processes {world_size}")
    local = cfg.batch_size // world_size
    one_row = cfg.loss_kwargs.get("both_terms", False) or cfg.loss_kwargs.get("update") == "semi"
    if cfg.method.startswith("sgflow") and local < 2 and not one_row:
        raise ConfigError(
            f"method {cfg.method!r} splits each batch between its two terms and needs at least 2 samples per "
            f"process; got batch size {cfg.batch_size} over {world_size} process(es)"
        )
    if cfg.method.startswith("sgflow") and world_size > 1 and local % 2 and not one_row:
        # Each process averages each term over its own rows; only with an even per-process batch does
        # every process hold exactly half first-term rows, so that the averaged update equals one process's.
        raise ConfigError(
            f"method {cfg.method!r} over {world_size} processes needs an even batch per process (each gets exactly "
            f"half of each SGFlow term); got {local} per process from batch size {cfg.batch_size}"
        )
    if not (isinstance(cfg.lr, (int, float)) and math.isfinite(cfg.lr) and cfg.lr > 0):
        raise ConfigError(f"learning rate must be a positive number, got {cfg.lr!r}")
    if len(cfg.betas) != 2 or not all(0.0 <= b < 1.0 for b in cfg.betas):
        raise ConfigError(f"Adam betas must be two numbers in [0, 1), got {cfg.betas!r}")
    if cfg.weight_decay < 0:
        raise ConfigError(f"weight decay must be >= 0, got {cfg.weight_decay}")
    if cfg.divergence_threshold < 0:
        raise ConfigError(f"divergence threshold must be >= 0 (0 disables it), got {cfg.divergence_threshold}")
    if cfg.grad_clip is not None and cfg.grad_clip < 0:
        raise ConfigError(f"grad clip must be >= 0 (0 disables it), got {cfg.grad_clip}")
    if not 0.0 <= cfg.ema_decay < 1.0:
        raise ConfigError(f"EMA decay must lie in [0, 1), got {cfg.ema_decay}")
    if not _is_int(cfg.warmup) or cfg.warmup < 0:
        raise ConfigError(f"warmup must be a non-negative integer, got {cfg.warmup!r}")
    if cfg.lr_schedule not in ("constant", "cosine"):
        raise ConfigError(f"unknown lr schedule {cfg.lr_schedule!r}; expected 'constant' or 'cosine'")
    if cfg.time_dist not in TimeSampler.KINDS:
        raise ConfigError(f"unknown time distribution {cfg.time_dist!r}; expected one of {', '.join(TimeSampler.KINDS)}")
    if not 0.0 <= cfg.diagonal_fraction <= 1.0:
        raise ConfigError(f"diagonal fraction must lie in [0, 1], got {cfg.diagonal_fraction}")
    try:
        sgflow.get_interpolant(cfg.interpolant)
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e)) from None
    for name in ("log_every", "sample_every", "ckpt_every"):
        v = getattr(cfg, name)
        if not _is_int(v) or v < (1 if name == "log_every" else 0):
            raise ConfigError(f"{name.replace('_', ' ')} must be an integer >= {1 if name == 'log_every' else 0}, got {v!r}")
    if not cfg.sample_steps or not all(_is_int(k) and k >= 1 for k in cfg.sample_steps):
        raise ConfigError(f"sample steps must be positive integers, got {cfg.sample_steps!r}")
    if not _is_int(cfg.seed):
        raise ConfigError(f"seed must be an integer, got {cfg.seed!r}")
    fn = methods[cfg.method]
    params = inspect.signature(fn).parameters
    has_var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    reserved = {"noise", "t", "u", "split", "generator", "interpolant", "time_sampler", "teacher", "teacher_mode"}
    _validate_teacher(cfg)
    if "target" in cfg.loss_kwargs and cfg.loss_kwargs["target"] != "ema":
        raise ConfigError(f"loss option target must be 'ema' (the run's EMA weights as the semi update's target "
                          f"network), got {cfg.loss_kwargs['target']!r}")
    for k in cfg.loss_kwargs:
        if k in reserved:
            raise ConfigError(f"loss option {k!r} is set by the trainer; use the training options instead")
        if k not in params and not has_var_kw:
            raise ConfigError(f"method {cfg.method!r} has no option {k!r}")


def build_network(name: str | None, data_shape: tuple, dataset=None, **overrides) -> tuple[torch.nn.Module, str]:
    """``sgflow.nn.build_model(name, data_shape, **overrides)`` with user-facing errors.

    ``name=None`` takes the data set's ``default_model``. Returns ``(module, resolved name)``.
    """
    try:
        from sgflow.nn import MODEL_CONFIGS, build_model
    except ImportError as e:
        raise ConfigError(f"the networks module sgflow.nn is not available: {e}") from None
    if name is None:
        name = getattr(dataset, "default_model", None) or ("mlp" if len(data_shape) == 1 else "tiny")
    if name not in MODEL_CONFIGS:
        raise ConfigError(f"unknown network config {name!r}; expected one of: {', '.join(MODEL_CONFIGS)}")
    try:
        net = build_model(name, tuple(data_shape), **overrides)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"cannot build network {name!r} for data shape {tuple(data_shape)}: {e}") from None
    return net, name


def paired_split(n: int, generator: torch.Generator) -> torch.Tensor:
    """bool [n]: rows (2i, 2i+1) get opposite SGFlow terms, which one first is a fair coin.

    Any slice of even length at an even offset holds exactly half first-term rows.
    """
    coin = torch.rand((n + 1) // 2, generator=generator) < 0.5
    return torch.stack([coin, ~coin], 1).flatten()[:n]


def lr_factor(cfg: TrainConfig, step: int) -> float:
    """The learning rate of optimisation step ``step`` (0-based) over ``cfg.lr``: linear warm-up over
    ``cfg.warmup`` steps, then constant or cosine (to 0 at ``cfg.steps``). The trainer's
    ``LambdaLR`` multiplies it by ``cfg.lr``."""
    scale = 1.0
    if cfg.warmup > 0:
        scale = min(1.0, (step + 1) / cfg.warmup)
    if cfg.lr_schedule == "cosine" and cfg.steps > 0:
        progress = min(max(step - cfg.warmup, 0) / max(cfg.steps - cfg.warmup, 1), 1.0)
        scale *= 0.5 * (1 + math.cos(math.pi * progress))
    return scale


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Learning rate for optimisation step ``step`` (0-based): linear warm-up, then constant/cosine."""
    return cfg.lr * lr_factor(cfg, step)


def ema_decay_at(decay: float, n_averaged: int) -> float:
    """The EMA decay of the update that follows ``n_averaged`` averages: ``min(decay, n / (9 + n))``.

    The first average is the initial copy of the network, so the update after optimisation step ``s``
    (0-based) has n = s + 1 and decay min(decay, (1 + s) / (10 + s)): a short warm-up so that the EMA is
    useful in short runs."""
    return min(decay, n_averaged / (9 + n_averaged))


def ema_multi_avg_fn(decay: float):
    """``multi_avg_fn`` for :class:`~torch.optim.swa_utils.AveragedModel`: torch's
    :func:`~torch.optim.swa_utils.get_ema_multi_avg_fn` at the warmed-up decay :func:`ema_decay_at`
    (``lerp(ema, theta, 1 - d)``)."""

    def update(ema_params, params, n_averaged):
        # n_averaged is a one-element tensor on the parameters' device (reading it syncs a GPU once a step,
        # as AveragedModel's own checks of it do).
        get_ema_multi_avg_fn(ema_decay_at(decay, int(n_averaged)))(ema_params, params, n_averaged)

    return update


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _first_non_finite(groups) -> str | None:
    """``groups``: (label, {name: value}) pairs. The "label 'name'" of the first floating-point tensor holding a
    NaN or inf, or None when all are finite (one reduction per tensor, one sync for the whole check)."""
    entries = [(label, name, v) for label, named in groups for name, v in named.items()
               if torch.is_tensor(v) and v.is_floating_point() and v.numel()]
    if not entries:
        return None
    by_device: dict = {}
    for _, _, v in entries:
        by_device.setdefault(v.device, []).append(torch.isfinite(v).all())
    if all(bool(torch.stack(flags).all()) for flags in by_device.values()):  # one sync per device
        return None
    label, name, _ = next(e for e in entries if not bool(torch.isfinite(e[2]).all()))
    return f"{label} {name!r}"


def _optimizer_tensors(opt_state: dict) -> dict:
    """The tensors of an optimizer state_dict's per-parameter state (Adam's moments...), by "param.key"."""
    return {f"{i}.{k}": v for i, st in (opt_state or {}).get("state", {}).items() for k, v in st.items()}


def _check_finite_checkpoint(ckpt: dict, keys=("model", "ema", "optimizer")) -> None:
    """A one-line :class:`CheckpointError` when the weights (or optimizer state) of a checkpoint are not finite
    (a checkpoint written by a diverged run of an sgflow before checkpoints were checked on save)."""
    labels = {"model": "weights", "ema": "EMA weights", "optimizer": "optimizer state"}
    groups = [(labels[k], _optimizer_tensors(ckpt.get(k)) if k == "optimizer" else ckpt.get(k) or {}) for k in keys]
    bad = _first_non_finite(groups)
    if bad is not None:
        raise CheckpointError(f"checkpoint {ckpt['path']} holds non-finite values ({bad} has NaN or inf): it was "
                              "written by a diverged run; use an earlier checkpoint or train again")


def _verify_zip(path: Path) -> None:
    """Check every record of a torch.save zip archive against the CRC-32 that torch.save stored for it in the
    archive (torch.load never checks them): a damaged file is a one-line :class:`CheckpointError`. Every
    checkpoint has them, those of earlier sgflow versions included. Reads the file once (~1 GB/s)."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint {path} is damaged ({str(e).strip()[:160] or type(e).__name__}): "
                              "its bytes changed after it was written; use another copy or checkpoint") from None
    if bad is not None:
        raise CheckpointError(f"checkpoint {path} is damaged: record {bad!r} fails its CRC-32 check (its bytes changed "
                              "after it was written); use another copy or checkpoint")


def read_checkpoint(path, map_location="cpu") -> dict:
    """Load and sanity-check an sgflow checkpoint file (weights-only unpickling: no code runs).

    The archive's CRC-32s are verified first (a damaged file is a :class:`CheckpointError` saying so). The
    values are not checked here: :func:`load_model` and a resume refuse non-finite weights."""
    path = Path(os.path.expanduser(str(path)))
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        cand = path / "checkpoint.pt"
        if not cand.exists():
            raise FileNotFoundError(f"no checkpoint.pt in directory {path}")
        path = cand
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"cannot read checkpoint {path}: not a valid PyTorch file (torch.save zip archive)")
    _verify_zip(path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises assorted types for truncated/garbage files
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights only" in msg.lower():
            raise CheckpointError(f"{path} is not an sgflow checkpoint (it holds arbitrary Python objects)") from None
        raise CheckpointError(f"cannot read checkpoint {path}: not a valid PyTorch file ({msg[:160]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not an sgflow checkpoint")
    if ckpt.get("version", 0) > CHECKPOINT_VERSION:
        raise CheckpointError(f"{path} has checkpoint version {ckpt.get('version')}; this sgflow reads up to {CHECKPOINT_VERSION}")
    for key in ("config", "model", "ema", "step"):
        if key not in ckpt:
            raise CheckpointError(f"{path} is incomplete: no {key!r} entry")
    try:
        ckpt["config"] = TrainConfig.from_dict(ckpt["config"])
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{path} holds an invalid training config: {e}") from None
    ckpt["path"] = str(path)
    return ckpt


def _load_state(module: torch.nn.Module, state: dict, what: str, path: str, cfg: TrainConfig) -> None:
    try:
        module.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError) as e:
        first = str(e).strip().splitlines()
        detail = " ".join(line.strip() for line in first[:3])[:240]
        raise CheckpointError(
            f"checkpoint {path} does not fit network {cfg.model!r} for data {cfg.data!r} ({what}: {detail})"
        ) from None


def load_model(path, device="cpu", use_ema: bool = True):
    """Rebuild the network from a checkpoint. Returns ``(model in eval mode, TrainConfig, checkpoint dict)``."""
    ckpt = read_checkpoint(path)
    cfg = ckpt["config"]
    shape = tuple(ckpt.get("data_shape") or ())
    if not shape:
        raise CheckpointError(f"{ckpt['path']} is incomplete: no data shape")
    _check_finite_checkpoint(ckpt, ("ema" if use_ema else "model",))
    net, _ = build_network(cfg.model, shape, **cfg.model_kwargs)
    _load_state(net, ckpt["ema" if use_ema else "model"], "EMA weights" if use_ema else "weights", ckpt["path"], cfg)
    return net.to(device).eval(), cfg, ckpt


# How the teacher velocity v_T enters over a run of ``steps`` steps (step s, 0-based): "constant": v_T throughout;
# "linear": the blend a v_T + (1 - a) sg[f~(t, t, X_t)] of the teacher and the model's own diagonal with
# a = 1 - s / steps; "warm": v_T for the first half of the steps, then the model's own v_hat (the paper's L_sg).
TEACHER_SCHEDULES = ("constant", "linear", "warm")

# Methods whose checkpoint's diagonal f~(t, t, x) is trained as the velocity (flow matching on t = u).
TEACHER_METHODS = ("flow_matching", "sgflow", "sgflow_fused", "meanflow", "meanflow_fused", "lagrangian", "eulerian",
                   "progressive")


def _validate_teacher(cfg: TrainConfig) -> None:
    from sgflow.losses.sgflow import TEACHER_MODES

    if cfg.teacher_mode not in TEACHER_MODES:
        raise ConfigError(f"unknown teacher mode {cfg.teacher_mode!r}; expected one of: {', '.join(TEACHER_MODES)}")
    if cfg.teacher_schedule not in TEACHER_SCHEDULES:
        raise ConfigError(f"unknown teacher schedule {cfg.teacher_schedule!r}; expected one of: "
                          f"{', '.join(TEACHER_SCHEDULES)}")
    if cfg.teacher is not None:
        if not isinstance(cfg.teacher, str) or not cfg.teacher:
            raise ConfigError(f"teacher must be a checkpoint path, got {cfg.teacher!r}")
        if not cfg.method.startswith("sgflow"):
            raise ConfigError(f"a teacher distils into SGFlow (method sgflow or sgflow_fused), not {cfg.method!r}")


class TeacherVelocity(torch.nn.Module):
    """``v(t, x) = net(t, t, x)``: the diagonal of a flow-map network (or a flow-matching network's velocity)
    as a teacher for :func:`sgflow.sgflow_loss`'s ``teacher=``. Frozen (no parameter requires grad), eval mode."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net.requires_grad_(False)
        self.eval()

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.net(t, t, x)

    def train(self, mode: bool = True):  # stays in eval mode (dropout off) whatever its owner does
        return super().train(False)


def load_teacher(path, data_shape=None, device="cpu", interpolant: str | None = None) -> TeacherVelocity:
    """A teacher velocity from an sgflow checkpoint: its EMA network's diagonal f~(t, t, x), frozen.

    Any method in :data:`TEACHER_METHODS` (all train their diagonal by flow matching). ``data_shape`` /
    ``interpolant``: this run's, which the teacher must share. Raises :class:`CheckpointError` (one line) for a
    checkpoint of another data shape or interpolant, or of an unknown kind.
    """
    try:
        ckpt = read_checkpoint(path)
    except CheckpointError as e:
        raise CheckpointError(f"teacher: {e}") from None
    cfg = ckpt["config"]
    if cfg.method not in TEACHER_METHODS:
        raise CheckpointError(f"teacher {ckpt['path']} is a checkpoint of method {cfg.method!r}, whose diagonal is not a "
                              f"velocity; expected one of: {', '.join(TEACHER_METHODS)}")
    shape = tuple(ckpt.get("data_shape") or ())
    if data_shape is not None and shape != tuple(data_shape):
        raise CheckpointError(f"teacher {ckpt['path']} is for data of shape {list(shape)} ({cfg.data}), but this run's "
                              f"data has shape {list(data_shape)}")
    if interpolant is not None and cfg.interpolant != interpolant:
        raise CheckpointError(f"teacher {ckpt['path']} was trained on the {cfg.interpolant!r} interpolant, this run uses "
                              f"{interpolant!r} (the velocities differ)")
    net, _, _ = load_model(ckpt["path"], device=device, use_ema=True)
    return TeacherVelocity(net)


class Trainer:
    """Holds the run's state; :meth:`run` trains up to ``config.steps``.

    Args:
        config: a :class:`TrainConfig`.
        resume: a checkpoint path (file or run directory) to continue from; its config must agree
            with ``config`` except for :data:`RESUMABLE_OVERRIDES`.
        model: optional prebuilt network (then ``config.model`` is only recorded, not built).
        teacher: optional teacher velocity, any callable ``v(t, x)`` (e.g. a mixture's exact velocity), in place
            of the checkpoint ``config.teacher`` names (not both); used with ``config.teacher_mode`` /
            ``teacher_schedule``. Not stored in checkpoints: pass it again on resume.
    """

    def __init__(self, config: TrainConfig, resume=None, model: torch.nn.Module | None = None, teacher=None):
        self.config = cfg = copy.deepcopy(config)
        world = D.env_world_size()
        ckpt = None
        if resume is not None:
            ckpt = read_checkpoint(resume)
            # Before validating: an option that differs from the checkpoint's is the error to report.
            self._check_resume(ckpt["config"], cfg, ckpt["path"])
        validate_config(cfg, world)
        if ckpt is not None:
            if cfg.steps < int(ckpt["step"]):
                raise CheckpointError(f"checkpoint {ckpt['path']} is at step {int(ckpt['step'])}, past the {cfg.steps} "
                                      f"steps asked for: ask for more steps than {int(ckpt['step'])} to train further")
            _check_finite_checkpoint(ckpt)
        self.dist = D.init_distributed(cfg.device)
        try:
            self._setup(cfg, ckpt, model, teacher)
        except BaseException:
            D.cleanup(self.dist)
            raise

    # ------------------------------------------------------------------ setup
    def _setup(self, cfg, ckpt, model, teacher=None):
        info = self.dist
        self.device = D.resolve_device(cfg.device, info)
        self.loss_fn = available_methods()[cfg.method]
        data_kwargs = dict(cfg.data_kwargs)
        self.dataset = get_dataset(cfg.data, **data_kwargs)
        self.data_shape = tuple(self.dataset.shape)

        torch.manual_seed(cfg.seed)  # identical initial weights on every rank (and broadcast below anyway)
        if model is None:
            model, cfg.model = build_network(cfg.model, self.data_shape, self.dataset, **cfg.model_kwargs)
        self.model = model.to(self.device)
        if info.enabled:
            D.broadcast_module(self.model)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if not self.params:
            raise ConfigError("the network has no trainable parameters")
        # The EMA: an AveragedModel of the network's parameters. Its buffers (use_buffers=False) are copied from
        # the network, not averaged. Its first "average" copies the initial weights (n_averaged = 1), each
        # optimisation step then averages once. ``self.ema`` is the averaged network itself (a plain module with
        # the model's state_dict keys), what sampling, evaluation and checkpoints use.
        self.averaged_model = AveragedModel(self.model, multi_avg_fn=ema_multi_avg_fn(cfg.ema_decay), use_buffers=False)
        self.averaged_model.requires_grad_(False)
        self.averaged_model.update_parameters(self.model)
        self.ema = self.averaged_model.module
        opt_kw = dict(lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
        self.optimizer = torch.optim.AdamW(self.params, **opt_kw) if cfg.weight_decay > 0 else torch.optim.Adam(self.params, **opt_kw)

        diag = 1.0 if cfg.method == "flow_matching" else cfg.diagonal_fraction  # FM: t uniform, u = t
        self.time_sampler = TimeSampler(cfg.time_dist, diagonal_fraction=diag)
        params = inspect.signature(self.loss_fn).parameters
        self.use_paired_split = (
            "split" in params and "split_fraction" not in cfg.loss_kwargs and not cfg.loss_kwargs.get("both_terms", False)
            and cfg.loss_kwargs.get("update", "paper") != "semi"
        )
        # One CPU stream for data, noise, times and the split (same on every rank, device-independent);
        # a per-rank generator on the training device for draws inside the loss (e.g. progressive's s).
        self.stream = torch.Generator().manual_seed(cfg.seed)
        self.loss_gen = torch.Generator(device=self.device).manual_seed(cfg.seed + 7919 * (info.rank + 1))
        torch.manual_seed(cfg.seed + 104729 * info.rank)  # dropout etc.: different per rank
        self.step = 0
        self.instability: dict | None = None  # step, ratio, gain2 where the early warning fired
        self._log_ratios = collections.deque(maxlen=INSTABILITY_STEPS)
        self.history: list[dict] = []
        self.out_dir = Path(os.path.expanduser(cfg.out_dir)) if cfg.out_dir else None
        if ckpt is not None:
            self._restore(ckpt)
        self._build_scheduler(ckpt)
        self._wrap_data_parallel()
        self.teacher = teacher
        if teacher is not None and (cfg.teacher is not None or not cfg.method.startswith("sgflow")):
            raise ConfigError("teacher= distils into SGFlow (method sgflow or sgflow_fused) in place of "
                              "config.teacher, not beside it")
        if cfg.teacher is not None:
            with torch.random.fork_rng(devices=[]):  # building its network draws nothing from the run's RNG
                self.teacher = load_teacher(cfg.teacher, self.data_shape, self.device, cfg.interpolant)

    def _build_scheduler(self, ckpt) -> None:
        """``self.scheduler``: a LambdaLR of :func:`lr_factor` under this run's config, at ``self.step``.

        The schedule is a function of (config, step), so a resumed run builds it at its step rather than
        loading the saved one: a resume that changes ``steps`` follows the new cosine from its first step
        (the saved state would hold the old one's current rate). A version 2 checkpoint's scheduler state is
        only checked against the step; version 1 checkpoints have none."""
        cfg = self.config
        for group in self.optimizer.param_groups:
            group["initial_lr"] = cfg.lr  # the base rate (a restored group's "lr" is the last scheduled one)
        self.scheduler = LambdaLR(self.optimizer, functools.partial(lr_factor, cfg), last_epoch=self.step - 1)
        saved = ckpt.get("scheduler") if ckpt is not None else None
        if saved is not None and saved.get("last_epoch") != self.step:
            raise CheckpointError(f"checkpoint {ckpt['path']} has a scheduler at step {saved.get('last_epoch')!r} "
                                  f"but is at step {self.step}")

    @staticmethod
    def _check_resume(saved: TrainConfig, cfg: TrainConfig, path: str) -> None:
        a, b = saved.to_dict(), cfg.to_dict()
        if b.get("model") is None:
            b["model"] = a.get("model")
        diffs = [k for k in a if k not in RESUMABLE_OVERRIDES and a[k] != b[k]]
        if diffs:
            k = diffs[0]
            raise CheckpointError(
                f"checkpoint {path} was trained with {k}={a[k]!r} but this run asks for {k}={b[k]!r}"
                + (f" (and {len(diffs) - 1} more differences)" if len(diffs) > 1 else "")
            )

    def _restore(self, ckpt: dict) -> None:
        cfg, path = self.config, ckpt["path"]
        if tuple(ckpt.get("data_shape") or ()) != self.data_shape:
            raise CheckpointError(f"checkpoint {path} is for data of shape {ckpt.get('data_shape')}, not {self.data_shape}")
        if ckpt.get("version", 1) >= 2 and ("ema_n_averaged" not in ckpt or "scheduler" not in ckpt):
            raise CheckpointError(f"checkpoint {path} (version {ckpt['version']}) is incomplete: no EMA count or "
                                  "scheduler state")
        _load_state(self.model, ckpt["model"], "weights", path, cfg)
        _load_state(self.ema, ckpt["ema"], "EMA weights", path, cfg)
        # Version 1 checkpoints hold no count: the EMA started as a copy (1) and averaged once per step.
        self.averaged_model.n_averaged.fill_(int(ckpt.get("ema_n_averaged", int(ckpt["step"]) + 1)))
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
            rng = ckpt["rng"]
            self.stream.set_state(rng["stream"])
            per_rank = rng["ranks"]
        except (KeyError, ValueError, RuntimeError, TypeError) as e:
            raise CheckpointError(f"checkpoint {path} has a broken optimizer or RNG state: {e}") from None
        self.step = int(ckpt["step"])
        # Per-rank generators resume exactly when the process count is unchanged; otherwise re-seed
        # them deterministically from (seed, step) (the shared data stream is exact either way).
        if len(per_rank) == self.dist.world_size:
            mine = per_rank[self.dist.rank]
            self.loss_gen.set_state(mine["loss"])
            torch.set_rng_state(mine["torch"])
            if mine.get("cuda") is not None and self.device.type == "cuda":
                torch.cuda.set_rng_state(mine["cuda"], self.device)
        else:
            self.loss_gen.manual_seed(cfg.seed + 7919 * (self.dist.rank + 1) + self.step)
            torch.manual_seed(cfg.seed + 104729 * self.dist.rank + self.step)
        self.history = [r for r in ckpt.get("history", []) if r.get("step", 0) <= self.step]

    def _wrap_data_parallel(self) -> None:
        """``self.train_model``: what the loss is given. Under torchrun, a :class:`~sgflow.distributed.DualDDP`
        (DDP's forward syncs the gradients) unless the method is in :data:`MANUAL_ALLREDUCE_METHODS`
        (then the plain module, gradients all-reduced after backward). Built after a resume so DDP's
        initial broadcast sends the restored weights."""
        self.ddp = None
        self.data_parallel = "none"
        if self.dist.enabled:
            if self.config.method in MANUAL_ALLREDUCE_METHODS:
                self.data_parallel = "allreduce"
            else:
                self.ddp = D.DualDDP(self.model)
                self.data_parallel = "ddp"
        self.train_model = self.ddp if self.ddp is not None else self.model

    def data_parallel_note(self) -> str:
        """One line saying how gradients are averaged over the processes ("" in a single process)."""
        w = self.dist.world_size
        if self.data_parallel == "ddp":
            return f"data parallel over {w} processes: DistributedDataParallel (gradients synced in its forward/backward)"
        if self.data_parallel == "allreduce":
            return (f"data parallel over {w} processes: method {self.config.method!r} computes its JVP with "
                    "torch.func.jvp, which DDP's forward does not support; training the plain module and "
                    "all-reducing gradients after backward (same update)")
        return ""

    # ------------------------------------------------------------------ one step
    def draw_batch(self):
        """The global batch from the stream, sliced to this rank and moved to the device.

        Returns ``(x1, kwargs for the loss)``.
        """
        cfg, B = self.config, self.config.batch_size
        g = self.stream
        x1 = self.dataset.sample(B, generator=g)
        noise = torch.randn(x1.shape, generator=g, dtype=x1.dtype)
        t, u = self.time_sampler(B, dtype=x1.dtype, generator=g)
        split = paired_split(B, g) if self.use_paired_split else None
        W, r = self.dist.world_size, self.dist.rank
        lo, hi = r * B // W, (r + 1) * B // W
        dev = self.device
        nb = dev.type == "cuda"
        x1 = x1[lo:hi].to(dev, non_blocking=nb)
        kw = dict(noise=noise[lo:hi].to(dev, non_blocking=nb), t=t[lo:hi].to(dev), u=u[lo:hi].to(dev),
                  interpolant=cfg.interpolant, generator=self.loss_gen, **cfg.loss_kwargs)
        if kw.get("target") == "ema":
            kw["target"] = self.ema  # the semi update's target network: this run's EMA weights
        if self.teacher is not None:
            kw.update(self._teacher_kwargs())
        if split is not None:
            kw["split"] = split[lo:hi].to(dev)
        return x1, kw

    def _teacher_kwargs(self) -> dict:
        """``teacher=`` / ``teacher_mode=`` for this step under ``config.teacher_schedule``."""
        cfg = self.config
        if cfg.teacher_schedule == "warm" and self.step >= cfg.steps // 2:
            return {}  # the model's own v_hat: the paper's L_sg
        a = 1.0 - self.step / max(cfg.steps, 1) if cfg.teacher_schedule == "linear" else 1.0
        teacher, model = self.teacher, self.model
        if a < 1.0:
            def teacher(t, x, _t=self.teacher):  # a v_T + (1 - a) sg[f~(t, t, x)]
                return a * _t(t, x) + (1.0 - a) * model(t, t, x)
        kw = {"teacher": teacher, "teacher_mode": cfg.teacher_mode}
        if cfg.teacher_mode == "both" and "update" in cfg.loss_kwargs:
            # No second term is left (Xdot_t -> v_T in both): one plain squared loss per sample, the same under
            # either update rule; the paper's estimator takes it (the semi update refuses it).
            kw["update"] = "paper"
            kw["target"] = None  # and no target network for it
        return kw

    def train_step(self) -> dict:
        """One optimisation step; returns the loss's (detached, on-device) info dict plus grad_norm and lr."""
        cfg = self.config
        self.train_model.train()
        x1, kw = self.draw_batch()
        loss, info = self.loss_fn(self.train_model, x1, **kw)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # under DualDDP this also averages the gradients over the ranks
        if self.ddp is None:
            D.allreduce_gradients(self.params, self.dist.world_size)
        clip = cfg.grad_clip if cfg.grad_clip else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, clip)
        lr = self.scheduler.get_last_lr()[0]  # lr_at(cfg, self.step), set by the scheduler's last step
        self.optimizer.step()
        self.scheduler.step()
        self._update_ema()
        self.step += 1
        out = dict(info)
        out["loss"] = loss.detach()
        out["grad_norm"] = grad_norm.detach()
        out["lr"] = lr
        return out

    @torch.no_grad()
    def _update_ema(self) -> None:
        self.averaged_model.update_parameters(self.model)

    # ------------------------------------------------------------------ outputs
    def state_dict(self) -> dict:
        """Checkpoint contents. Collective under torchrun (gathers every rank's RNG states)."""
        mine = {
            "loss": self.loss_gen.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
        }
        # Each rank's RNG states, and (data parallel) a digest of its weights: the replicas must be identical.
        digest = D.state_digest(self.model) if self.dist.enabled else None
        gathered = D.gather_objects((mine, digest), self.dist)
        ranks = [g[0] for g in gathered]
        replicas = [g[1] for g in gathered]
        if self.dist.is_main and len(set(replicas)) > 1:
            warnings.warn(f"data-parallel replicas differ at step {self.step} (weight digests {replicas})", stacklevel=2)
        return {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "sgflow_version": sgflow.__version__,
            "config": self.config.to_dict(),
            "data_shape": list(self.data_shape),
            "step": self.step,
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "ema_n_averaged": int(self.averaged_model.n_averaged),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": {"stream": self.stream.get_state(), "ranks": ranks},
            "world_size": self.dist.world_size,
            "replica_digests": replicas,
            "history": self.history,
        }

    def save_checkpoint(self, path=None) -> Path | None:
        """Write ``checkpoint.pt`` (rank 0 only; every rank must call it). Returns the path on rank 0.

        Only from a finite state: when a weight, EMA weight or optimizer moment holds a NaN or inf (a run
        diverging between two logged steps) it raises :class:`TrainingDiverged` on every rank and writes
        nothing, so the last good checkpoint stays."""
        bad = _first_non_finite([("weight", self.model.state_dict()), ("EMA weight", self.ema.state_dict()),
                                 ("optimizer state", _optimizer_tensors(self.optimizer.state_dict()))])
        if bad is not None:
            kept = getattr(self, "_saved_step", None)
            raise TrainingDiverged(
                f"training diverged: {bad} is not finite at step {self.step}; no checkpoint written"
                + (f" (the last one, step {kept}, is kept)" if kept is not None else "")
                + f"; lower the learning rate (now {self.config.lr}) or add warm-up steps")
        state = self.state_dict()
        if not self.dist.is_main or self.out_dir is None and path is None:
            return None
        path = Path(path) if path is not None else self.out_dir / "checkpoint.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_save(state, path)
        self._saved_step = self.step
        return path

    @torch.no_grad()
    def sample_figure(self, path=None, n_points: int = 2000, n_images: int = 64):
        """Samples of the EMA model at ``config.sample_steps`` beside the data, saved as a PNG.

        Uses its own fixed-seed generator so figures never disturb the training RNG.
        """
        from sgflow.plotting import samples_figure, save_png

        g = torch.Generator().manual_seed(self.config.seed + 1)
        n = n_images if self.dataset.is_image else n_points
        data = self.dataset.sample(n, generator=g)
        x0 = torch.randn((n, *self.data_shape), generator=g)
        samples = generate(self.ema, x0.to(self.device), self.config.sample_steps, default_sampler(self.config.method))
        footers = None
        if not self.dataset.is_image:
            from sgflow.metrics import energy_distance

            ref = self.dataset.sample(n, generator=g)
            footers = [f"ED {energy_distance(data, ref).item():.4f}"] + [
                f"ED {energy_distance(s.cpu(), ref).item():.4f}" for s in samples.values()
            ]
        img = samples_figure(data, {k: v.cpu() for k, v in samples.items()},
                             title=f"{self.config.method} on {self.config.data}, step {self.step}", footers=footers)
        if path is None:
            path = self.out_dir / "samples" / f"step_{self.step:07d}.png"
        return save_png(img, path)

    def _write_log(self, record: dict) -> None:
        self.history.append(record)
        if self.out_dir is not None and self.dist.is_main:
            with open(self.out_dir / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def _prepare_out_dir(self) -> None:
        if self.out_dir is None or not self.dist.is_main:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "config.json").write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
        # The log mirrors the checkpoint: drop lines past the resumed step (written after the last save).
        log = self.out_dir / "log.jsonl"
        with open(log, "w") as f:
            for rec in self.history:
                f.write(json.dumps(rec) + "\n")

    # ------------------------------------------------------------------ loop
    def run(self) -> "Trainer":
        """Train from the current step to ``config.steps``; writes logs, figures and checkpoints."""
        from sgflow._extras import require

        tqdm = require("tqdm.auto", "the trainer's progress bar").tqdm

        cfg, info = self.config, self.dist
        self._prepare_out_dir()
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not (cfg.progress and info.is_main),
                   unit="step", dynamic_ncols=True, desc=f"{cfg.method}/{cfg.data}")
        t_start = t_last = time.perf_counter()
        step_last = self.step
        try:
            while self.step < cfg.steps:
                out = self.train_step()
                self._watch_instability(out)
                last = self.step == cfg.steps
                if self.step % cfg.log_every == 0 or last:
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)
                    now = time.perf_counter()
                    sps = (self.step - step_last) * cfg.batch_size / max(now - t_last, 1e-9)
                    t_last, step_last = now, self.step
                    vals = {k: float(v) for k, v in out.items() if isinstance(v, (float, int)) or (torch.is_tensor(v) and v.numel() == 1)}
                    vals = D.allreduce_mean(vals, info.world_size, self.device)
                    self._check_divergence(vals)
                    rec = {"step": self.step, **{k: vals[k] for k in sorted(vals)},
                           "samples_per_s": round(sps, 1), "time": round(now - t_start, 3)}
                    self._write_log(rec)
                    bar.set_postfix(loss=f"{vals['loss']:.4g}", samples_s=f"{sps:,.0f}", refresh=False)
                bar.update(1)
                if self.out_dir is not None:
                    if cfg.ckpt_every and self.step % cfg.ckpt_every == 0 and not last:
                        self.save_checkpoint()
                    if cfg.figures and cfg.sample_every and self.step % cfg.sample_every == 0 and not last and info.is_main:
                        self.sample_figure()
        finally:
            bar.close()
        if self.out_dir is not None:
            self.save_checkpoint()
            if info.is_main and cfg.figures:
                self.sample_figure()
        self.wall_time = time.perf_counter() - t_start
        return self

    def _watch_instability(self, out: dict) -> None:
        """Warn once (and remember the step) when SGFlow's second term outgrows its first: the geometric
        mean of term2 / term1 over the last :data:`INSTABILITY_STEPS` steps above :data:`INSTABILITY_RATIO`.
        Checked every step (a float of a scalar the loss already computed), since a run on the paper's update
        can go from ratio 2 to 300 within 15 steps."""
        ratio = out.get("ratio")
        if ratio is None or self.instability is not None:
            return
        r = float(ratio)
        self._log_ratios.append(math.log(max(r, 1e-30)) if math.isfinite(r) else math.inf)
        if len(self._log_ratios) < INSTABILITY_STEPS:
            return
        mean_log = sum(self._log_ratios) / len(self._log_ratios)
        if not mean_log > math.log(INSTABILITY_RATIO):
            return
        r = math.exp(mean_log) if math.isfinite(mean_log) else math.inf
        cfg = self.config
        gain = float(out["gain2"]) if "gain2" in out else float("nan")
        self.instability = {"step": self.step, "ratio": r, "gain2": gain}
        if self.dist.is_main:
            warnings.warn(f"step {self.step}: {self._instability_cause(r, gain)}; this run is likely to diverge. "
                          f"{self._instability_advice()}", SGFlowInstabilityWarning, stacklevel=2)

    @staticmethod
    def _instability_cause(ratio: float, gain: float) -> str:
        return (f"SGFlow's second term is {ratio:.3g}x its first (mean over {INSTABILITY_STEPS} steps; about 1 near a "
                f"solution) and the Jacobian's gain "
                f"along Xdot - v_hat is {gain:.3g}: since L_sg = L_ideal - E||J (v_hat - v)||^2, the loss is falling by "
                f"growing the Jacobian along the error of the velocity estimate f~(t, t, x)")

    def _instability_advice(self) -> str:
        cfg = self.config
        fixes = []
        if cfg.loss_kwargs.get("update", "paper") != "semi":
            fixes.append("use the default recipe, the semi-gradient update with the EMA as its target (drop "
                         "--loss-opt update=paper; in Python loss_kwargs=None)")
        fixes.append(f"raise the diagonal fraction (now {cfg.diagonal_fraction})")
        fixes.append(f"lower the learning rate (now {cfg.lr})")
        return "Fixes: " + "; ".join(fixes)

    def _check_divergence(self, vals: dict) -> None:
        """Stop on a non-finite loss or gradient norm, or (``divergence_threshold`` > 0) on one whose
        magnitude exceeds it: SGFlow's second term is maximised, so a run whose velocity estimate
        lags can run off to -1e20 with finite numbers and never produce a NaN."""
        cfg, lim = self.config, self.config.divergence_threshold
        for key, name in (("loss", "loss"), ("grad_norm", "gradient norm")):
            v = vals[key]
            if not math.isfinite(v) or (lim and abs(v) > lim):
                if self.instability is not None:
                    w = self.instability
                    raise TrainingDiverged(
                        f"training diverged: the {name} reached {v:.3g} at step {self.step}. Cause, seen from step "
                        f"{w['step']}: {self._instability_cause(w['ratio'], w['gain2'])}. {self._instability_advice()}")
                raise TrainingDiverged(
                    f"training diverged: the {name} reached {v:.3g} at step {self.step}; lower the learning rate "
                    f"(now {cfg.lr}), add warm-up steps, or raise the diagonal fraction (now {cfg.diagonal_fraction})"
                )

    def close(self, wait: bool | None = None) -> None:
        """Leave the process group if this trainer created it.

        ``wait``: meet the other ranks at a barrier first (see :func:`sgflow.distributed.cleanup`). By default
        it waits unless an exception is propagating, so that ``close()`` in a ``finally`` never blocks on a
        peer that is not coming."""
        if wait is None:
            wait = sys.exc_info()[0] is None
        D.cleanup(self.dist, wait=wait)


@torch.no_grad()
def generate(model, x0: torch.Tensor, steps_list, sampler: str = "flow_map", grid_fn=None) -> dict:
    """Samples for each step count: ``{k: sample(model, x0, k, sampler)}`` (model put in eval mode,
    restored afterwards). x0: noise [n, *D]."""
    was_training = model.training
    model.eval()
    try:
        return {int(k): sgflow.sample(model, x0, steps=int(k), method=sampler) for k in steps_list}
    finally:
        model.train(was_training)


def train(config: TrainConfig | dict | None = None, resume=None, model=None, **overrides) -> Trainer:
    """Build a :class:`Trainer`, run it, release the process group; returns the trainer.

    ``train(TrainConfig(...))``, ``train({"method": "sgflow", ...})`` or ``train(steps=100, ...)``.
    """
    if config is None:
        config = TrainConfig()
    elif isinstance(config, dict):
        config = TrainConfig.from_dict(config)
    if overrides:
        config = dataclasses.replace(config, **overrides)
    trainer = Trainer(config, resume=resume, model=model)
    try:
        return trainer.run()
    finally:
        trainer.close()


__all__ = [
    "TrainConfig", "Trainer", "train", "validate_config", "available_methods", "default_sampler",
    "build_network", "read_checkpoint", "load_model", "generate", "paired_split", "lr_at", "lr_factor",
    "ema_decay_at", "ema_multi_avg_fn",
    "ConfigError", "CheckpointError", "TrainingDiverged", "DatasetError", "RESUMABLE_OVERRIDES",
    "METHOD_DEFAULTS", "SGFlowInstabilityWarning",
    "load_teacher", "TeacherVelocity", "TEACHER_SCHEDULES", "TEACHER_METHODS",
    "MANUAL_ALLREDUCE_METHODS",
]
