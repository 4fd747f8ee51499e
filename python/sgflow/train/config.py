"""Training configuration: :class:`TrainConfig`, :class:`ConfigError`, the method tables
(:func:`available_methods`, :data:`METHOD_DEFAULTS`, :data:`MANUAL_ALLREDUCE_METHODS`, :data:`TEACHER_SCHEDULES`),
:func:`validate_config` and :func:`build_network` (network config names to modules, with user-facing errors)."""
from __future__ import annotations

import dataclasses
import inspect
import math
from dataclasses import dataclass, field

import torch

import sgflow
from sgflow.times import TimeSampler

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


# How the teacher velocity v_T enters over a run of ``steps`` steps (step s, 0-based): "constant": v_T throughout;
# "linear": the blend a v_T + (1 - a) sg[f~(t, t, X_t)] of the teacher and the model's own diagonal with
# a = 1 - s / steps; "warm": v_T for the first half of the steps, then the model's own v_hat (the paper's L_sg).
TEACHER_SCHEDULES = ("constant", "linear", "warm")


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
