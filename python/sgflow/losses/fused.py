"""SGFlow and MeanFlow through the fused dual (primal + tangent) path.

Same signature, semantics and return as :func:`sgflow.sgflow_loss`, but the JVP of the network comes
from a ``dual_forward`` that carries primal and tangent together and recomputes activations in
backward, instead of ``torch.func.jvp``'s dual tensors with every intermediate kept for the reverse
pass: :func:`sgflow.dualize` (through the model's own forward; done once per model for a plain model
or a DistributedDataParallel), or the model's own ``dual_forward`` where it defines one.
"""
from __future__ import annotations

import torch

from sgflow.dual import dual_forward
from sgflow.losses.common import bcast, draw_batch, mean_sq
from sgflow.losses.semi import semi_loss
from sgflow.losses.sgflow import check_teacher, flow_map_tangent, reduce_sgflow, semi_setup, sgflow_rows, velocity_estimate


def dual_jvp_of_f(model):
    """``jvp_of_f(t, u, x, t_dot, x_dot) -> JVP of f`` (u_dot = 0) through ``model``'s dual forward, for
    :func:`sgflow.losses.semi.semi_loss`. t, t_dot: [R]; x, x_dot: [R, *D]."""
    def jvp_of_f(t, u, x, t_dot, x_dot):
        u_dot = torch.zeros_like(u)
        ft, ft_dot = dual_forward(model, t, u, x, t_dot, u_dot, x_dot)
        return flow_map_tangent(x_dot, t_dot, u_dot, t, u, ft, ft_dot)
    return jvp_of_f


def fused_loss(
    model,
    x1: torch.Tensor,
    *,
    interpolant="linear",
    time_sampler=None,
    noise: torch.Tensor | None = None,
    t: torch.Tensor | None = None,
    u: torch.Tensor | None = None,
    split: torch.Tensor | None = None,
    split_fraction: float = 0.5,
    both_terms: bool = False,
    generator: torch.Generator | None = None,
    teacher=None,
    teacher_mode: str = "second",
    update: str = "paper",
    target=None,
):
    """SGFlow loss via the network's dual forward; gradients equal :func:`sgflow.sgflow_loss`'s.

        L_sg = mean_first ||JVP_(1,0,Xdot) f||^2 - mean_second ||JVP_(0,0,Xdot - sg[f~(t,t,X_t)]) f||^2

    with JVP f = x_dot + (u_dot - t_dot) f~ + (u - t) JVP f~ and (f~, JVP f~) from the model's dual
    forward (see module doc). Arguments and the returned ``(loss, info)`` are those of
    :func:`sgflow.sgflow_loss`; ``model`` is any ``nn.Module`` (or callable) ``model(t, u, x)``, a
    :class:`sgflow.DualizedModel`, or a DistributedDataParallel of one (its forward, and so its
    gradient sync, runs). ``teacher`` / ``teacher_mode``: distillation from a velocity ``v(t, x)``, as in
    :func:`sgflow.sgflow_loss` (its bias and variance per mode are stated there). ``update="semi"``: the
    semi-gradient update of :mod:`sgflow.losses.semi` (the target JVP without a graph, through ``target``
    when given: a target network such as the model's EMA, see :func:`sgflow.sgflow_loss`).
    """
    check_teacher(teacher, teacher_mode)
    semi = semi_setup(update, split, both_terms, teacher_mode, teacher, target, split_fraction)
    b = draw_batch(x1, interpolant=interpolant, time_sampler=time_sampler, noise=noise, t=t, u=u, generator=generator)
    if semi:
        tgt = model if target is None else target
        v_hat = velocity_estimate(tgt, b.t, b.xt, teacher)

        target_jvp = dual_jvp_of_f(tgt)

        def jvp_target(*args):
            with torch.no_grad():
                return target_jvp(*args)

        return semi_loss(dual_jvp_of_f(model), b, v_hat, jvp_target=jvp_target)
    rows = sgflow_rows(model, b, split, both_terms, split_fraction, generator, teacher, teacher_mode)
    tr, ur, xr = b.t[rows.index], b.u[rows.index], b.xt[rows.index]
    u_dot = torch.zeros_like(ur)
    ftilde, ftilde_dot = dual_forward(model, tr, ur, xr, rows.t_dot, u_dot, rows.x_dot)
    jvp_f = flow_map_tangent(rows.x_dot, rows.t_dot, u_dot, tr, ur, ftilde, ftilde_dot)
    return reduce_sgflow(jvp_f, rows)


def fused_meanflow_loss(model, x1, *, interpolant="linear", time_sampler=None, noise=None, t=None, u=None, generator=None):
    """MeanFlow with the JVP from the dual forward, run without a graph (it is detached anyway).

        L = E || f~(t, u, X_t) - sg[ Xdot_t + (u - t) JVP(f~; (1, 0, Xdot_t)) ] ||^2
    """
    b = draw_batch(x1, interpolant=interpolant, time_sampler=time_sampler, noise=noise, t=t, u=u, generator=generator)
    with torch.no_grad():
        ones, zeros = torch.ones_like(b.t), torch.zeros_like(b.u)
        _, dfdt = dual_forward(model, b.t, b.u, b.xt, ones, zeros, b.xdot)
        target = b.xdot + bcast(b.u - b.t, dfdt) * dfdt
    pred = model(b.t, b.u, b.xt)
    loss = mean_sq(pred - target).mean()
    return loss, {"loss": loss.detach()}
