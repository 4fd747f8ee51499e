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
# The package, by job: config (TrainConfig, method tables, validation), schedule (LR, EMA, term split), checkpoint
# (read/write/check), teacher (distillation), watch (divergence, SGFlow's early warning), trainer (Trainer, train).
# Every name the single module train.py had is importable from here (private helpers included).
from sgflow.data import DatasetError
from sgflow.train.config import (  # noqa: F401 (the private helpers too)
    MANUAL_ALLREDUCE_METHODS,
    METHOD_DEFAULTS,
    TEACHER_SCHEDULES,
    ConfigError,
    TrainConfig,
    _is_int,
    _validate_teacher,
    available_methods,
    build_network,
    default_sampler,
    validate_config,
)
from sgflow.train.schedule import ema_decay_at, ema_multi_avg_fn, lr_at, lr_factor, paired_split
from sgflow.train.checkpoint import (  # noqa: F401 (the private helpers too)
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    RESUMABLE_OVERRIDES,
    CheckpointError,
    _atomic_save,
    _check_finite_checkpoint,
    _first_non_finite,
    _load_state,
    _optimizer_tensors,
    _verify_zip,
    load_model,
    read_checkpoint,
)
from sgflow.train.teacher import TEACHER_METHODS, TeacherVelocity, load_teacher
from sgflow.train.watch import INSTABILITY_RATIO, INSTABILITY_STEPS, SGFlowInstabilityWarning, TrainingDiverged  # noqa: F401
from sgflow.train.trainer import Trainer, generate, train

__all__ = [
    "TrainConfig", "Trainer", "train", "validate_config", "available_methods", "default_sampler",
    "build_network", "read_checkpoint", "load_model", "generate", "paired_split", "lr_at", "lr_factor",
    "ema_decay_at", "ema_multi_avg_fn",
    "ConfigError", "CheckpointError", "TrainingDiverged", "DatasetError", "RESUMABLE_OVERRIDES",
    "METHOD_DEFAULTS", "SGFlowInstabilityWarning",
    "load_teacher", "TeacherVelocity", "TEACHER_SCHEDULES", "TEACHER_METHODS",
    "MANUAL_ALLREDUCE_METHODS",
]
