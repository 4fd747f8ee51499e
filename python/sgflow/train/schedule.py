"""The per-step schedules of a run: :func:`paired_split` (SGFlow's term split), the learning rate
(:func:`lr_factor`, :func:`lr_at`) and the EMA decay (:func:`ema_decay_at`, :func:`ema_multi_avg_fn`)."""
from __future__ import annotations

import math

import torch
from torch.optim.swa_utils import get_ema_multi_avg_fn

from sgflow.train.config import TrainConfig


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
