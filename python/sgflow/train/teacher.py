"""Teachers for distillation: :class:`TeacherVelocity` (a network's frozen diagonal f~(t, t, x)) and
:func:`load_teacher` (one from a checkpoint of any method in :data:`TEACHER_METHODS`). The teacher options
themselves are validated with the config (:data:`~sgflow.train.config.TEACHER_SCHEDULES`)."""
from __future__ import annotations

import torch

from sgflow.train.checkpoint import CheckpointError, load_model, read_checkpoint

# Methods whose checkpoint's diagonal f~(t, t, x) is trained as the velocity (flow matching on t = u).
TEACHER_METHODS = ("flow_matching", "sgflow", "sgflow_fused", "meanflow", "meanflow_fused", "lagrangian", "eulerian",
                   "progressive")


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
