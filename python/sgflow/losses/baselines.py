"""Baseline objectives on the same interfaces as :func:`sgflow.sgflow_loss`.

Every loss takes ``(model, x1, *, interpolant, time_sampler, noise, t, u, generator)`` and returns
``(loss, info)``. Squared norms are averaged over feature dims; the flow-map baselines use the
flow-matching loss on diagonal samples (t == u) and their own distillation term elsewhere.
"""
from __future__ import annotations

import torch

from sgflow.checks import check_model_output, check_not_ddp
from sgflow.losses.common import bcast, draw_batch, flow_map, mean_sq
from sgflow.times import random_tensor


def _diag_and_off(b):
    diag = b.t == b.u
    return diag, ~diag


def _combine(fm_rows: torch.Tensor, off_rows: torch.Tensor, name: str):
    """loss = mean of the diagonal flow-matching residuals + mean of the off-diagonal term."""
    zero = off_rows.new_zeros(()) if off_rows.numel() else fm_rows.new_zeros(())
    fm = fm_rows.mean() if fm_rows.numel() else zero
    off = off_rows.mean() if off_rows.numel() else zero
    loss = fm + off
    return loss, {"loss": loss.detach(), "diag_fm": fm.detach(), name: off.detach()}


def _fm_rows(model, b, rows):
    """Per-row flow-matching residuals ||f~(t,t,X_t) - Xdot_t||^2 of the selected rows ([0] if none)."""
    if not bool(rows.any()):
        return b.x1.new_zeros(0)
    t = b.t[rows]
    x = b.xt[rows]
    return mean_sq(check_model_output(model(t, t, x), x, "model(t, t, x)") - b.xdot[rows])


def flow_matching_loss(model, x1, *, interpolant="linear", time_sampler=None, noise=None, t=None, u=None, generator=None):
    """Flow matching: E ||f~(t, t, X_t) - Xdot_t||^2 (the diagonal of the flow map is the velocity).

    ``u`` is ignored (set to ``t``). x1: [B, *D]; t: [B].
    """
    b = draw_batch(x1, interpolant=interpolant, time_sampler=time_sampler, noise=noise, t=t, generator=generator, diagonal=True)
    pred = check_model_output(model(b.t, b.t, b.xt), b.xt, "model(t, t, x)")
    loss = mean_sq(pred - b.xdot).mean()
    return loss, {"loss": loss.detach(), "diag_fm": loss.detach()}


def meanflow_loss(model, x1, *, interpolant="linear", time_sampler=None, noise=None, t=None, u=None, generator=None):
    """MeanFlow (Geng et al. 2025) in flow-map form: f~ is the average velocity over [t, u].

        L = E || f~(t, u, X_t) - sg[ Xdot_t + (u - t) JVP(f~; (1, 0, Xdot_t)) ] ||^2

    from the identity f~ = v + (u - t) (d_t f~ + (d_x f~) v). The JVP is computed under
    ``torch.no_grad`` (no graph through it), as the method detaches it anyway.
    """
    check_not_ddp(model, "meanflow_loss")
    b = draw_batch(x1, interpolant=interpolant, time_sampler=time_sampler, noise=noise, t=t, u=u, generator=generator)
    with torch.no_grad():
        _, dfdt = torch.func.jvp(
            lambda t_, u_, x_: check_model_output(model(t_, u_, x_), x_),
            (b.t, b.u, b.xt),
            (torch.ones_like(b.t), torch.zeros_like(b.u), b.xdot),
        )
        target = b.xdot + bcast(b.u - b.t, dfdt) * dfdt
    pred = check_model_output(model(b.t, b.u, b.xt), b.xt)
    loss = mean_sq(pred - target).mean()
    return loss, {"loss": loss.detach()}


def lagrangian_loss(model, x1, *, interpolant="linear", time_sampler=None, noise=None, t=None, u=None, generator=None):
    """Lagrangian map distillation of the model's own velocity (Boffi et al. 2024/2025).

    Off the diagonal:  || d_u f(t, u, X_t) - sg[ f~(u, u, f(t, u, X_t)) ] ||^2
    (the map's endpoint moves with the velocity at the endpoint); flow matching on the diagonal.
    d_u f is a JVP in direction (0, 1, 0) with the gradient flowing through it.
    """
    check_not_ddp(model, "lagrangian_loss")
    b = draw_batch(x1, interpolant=interpolant, time_sampler=time_sampler, noise=noise, t=t, u=u, generator=generator)
    diag, off = _diag_and_off(b)
    fm = _fm_rows(model, b, diag)
    if bool(off.any()):
        t_, u_, x_ = b.t[off], b.u[off], b.xt[off]
        end, du_f = torch.func.jvp(
            lambda uu: flow_map(model, t_, uu, x_), (u_,), (torch.ones_like(u_),)
        )
        with torch.no_grad():
            teacher = check_model_output(model(u_, u_, end.detach()), x_, "model(u, u, x)")
        res = mean_sq(du_f - teacher)
    else:
        res = fm.new_zeros(0)
    return _combine(fm, res, "lagrangian")


def eulerian_loss(model, x1, *, interpolant="linear", time_sampler=None, noise=None, t=None, u=None, generator=None):
    """Eulerian map distillation of the model's own velocity (Boffi et al. 2025).

    Off the diagonal:  || d_t f(t, u, X_t) + (d_x f) sg[ f~(t, t, X_t) ] ||^2
    (the flow-map PDE with the model's diagonal as the velocity); flow matching on the diagonal.
    A JVP in direction (1, 0, sg[f~(t,t,X_t)]) with the gradient flowing through it.
    """
    check_not_ddp(model, "eulerian_loss")
    b = draw_batch(x1, interpolant=interpolant, time_sampler=time_sampler, noise=noise, t=t, u=u, generator=generator)
    diag, off = _diag_and_off(b)
    fm = _fm_rows(model, b, diag)
    if bool(off.any()):
        t_, u_, x_ = b.t[off], b.u[off], b.xt[off]
        with torch.no_grad():
            v_hat = check_model_output(model(t_, t_, x_), x_, "model(t, t, x)")
        _, jf = torch.func.jvp(
            lambda tt, uu, xx: flow_map(model, tt, uu, xx), (t_, u_, x_), (torch.ones_like(t_), torch.zeros_like(u_), v_hat)
        )
        res = mean_sq(jf)
    else:
        res = fm.new_zeros(0)
    return _combine(fm, res, "eulerian")


def progressive_loss(model, x1, *, interpolant="linear", time_sampler=None, noise=None, t=None, u=None, generator=None, s=None):
    """Progressive (semigroup) self-distillation (Boffi et al. 2025).

    Off the diagonal, with s ~ U(t, u) (or the given ``s`` [B]):
        || f~(t, u, X_t) - sg[ (f(s, u, f(t, s, X_t)) - X_t) / (u - t) ] ||^2
    i.e. one jump must agree with two shorter jumps, measured at velocity scale
    (= ||f(t,u,X_t) - sg[f(s,u,f(t,s,X_t))]||^2 / (u-t)^2); flow matching on the diagonal.
    """
    b = draw_batch(x1, interpolant=interpolant, time_sampler=time_sampler, noise=noise, t=t, u=u, generator=generator)
    diag, off = _diag_and_off(b)
    fm = _fm_rows(model, b, diag)
    if bool(off.any()):
        t_, u_, x_ = b.t[off], b.u[off], b.xt[off]
        if s is None:
            w = random_tensor("rand", t_.shape, t_.device, t_.dtype, generator)
            s_ = t_ + w * (u_ - t_)
        else:
            s_ = s[off]
        with torch.no_grad():
            mid = flow_map(model, t_, s_, x_)
            teacher = (flow_map(model, s_, u_, mid) - x_) / bcast(u_ - t_, x_)
        res = mean_sq(check_model_output(model(t_, u_, x_), x_) - teacher)
    else:
        res = fm.new_zeros(0)
    return _combine(fm, res, "progressive")
