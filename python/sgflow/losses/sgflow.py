"""The SGFlow loss (reference implementation with ``torch.func.jvp``).

    L_sg = E[ ||d_t f + (d_x f) Xdot_t||^2 - ||(d_x f)(Xdot_t - sg[f~(t, t, X_t)])||^2 ]

with f(t, u, x) = x + (u - t) f~(t, u, x). Both terms are squared Jacobian-vector products of f at
(t, u, X_t): the first in direction (1, 0, Xdot_t), the second in direction
(0, 0, Xdot_t - sg[f~(t, t, X_t)]). The gradient flows *through* the JVP (reverse over forward).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sgflow.checks import check_model_output, check_not_ddp, check_split
from sgflow.losses.common import Batch, bcast, draw_batch, flow_map, mean_sq
from sgflow.times import random_tensor


@dataclass
class SGFlowRows:
    """The JVPs one SGFlow step evaluates, one row each.

    index: [R] batch index of each row; first: [R] bool, True for a first-term row; t_dot: [R] time
    tangent (1 for the first term, 0 for the second); x_dot: [R, *D] x tangent.
    v_hat: [S, *D] the detached diagonal velocity f~(t, t, X_t) of the second-term rows (S of them).
    """

    index: torch.Tensor
    first: torch.Tensor
    t_dot: torch.Tensor
    x_dot: torch.Tensor
    v_hat: torch.Tensor


def sgflow_rows(model, b: Batch, split: torch.Tensor | None, both_terms: bool, split_fraction: float, generator) -> SGFlowRows:
    """Assign each sample its JVP direction(s) and compute sg[f~(t, t, X_t)] where needed."""
    batch = b.x1.shape[0]
    if both_terms:
        if split is not None:
            raise ValueError("pass either split= or both_terms=True, not both")
        index = torch.arange(batch, device=b.x1.device).repeat(2)
        first = torch.arange(2 * batch, device=b.x1.device) < batch
    else:
        if split is None:
            if not 0.0 < split_fraction < 1.0:
                raise ValueError(f"split_fraction must lie in (0, 1), got {split_fraction}")
            split = random_tensor("rand", (batch,), b.x1.device, torch.float32, generator) < split_fraction
        check_split(split, batch, b.x1)
        index = torch.arange(batch, device=b.x1.device)
        first = split
    second_idx = index[~first]
    xdot = b.xdot[index]
    if second_idx.numel():
        with torch.no_grad():
            ts = b.t[second_idx]
            v_hat = check_model_output(model(ts, ts, b.xt[second_idx]), b.xt[second_idx], "model(t, t, x)").detach()
        x_dot = xdot.clone()
        x_dot[~first] = xdot[~first] - v_hat
    else:
        v_hat = b.xt[:0]
        x_dot = xdot
    t_dot = first.to(b.x1.dtype)
    return SGFlowRows(index=index, first=first, t_dot=t_dot, x_dot=x_dot, v_hat=v_hat)


def reduce_sgflow(jvp_f: torch.Tensor, rows: SGFlowRows, b: Batch):
    """loss = mean over first-term rows of ||JVP||^2 - mean over second-term rows of ||JVP||^2.

    Averaging each term over its own rows keeps the estimate unbiased for L_sg (given how many rows
    each term got); an empty term contributes 0.
    """
    per_row = mean_sq(jvp_f)
    zero = per_row.new_zeros(())
    n1, n2 = int(rows.first.sum()), int((~rows.first).sum())
    term1 = per_row[rows.first].mean() if n1 else zero
    term2 = per_row[~rows.first].mean() if n2 else zero
    loss = term1 - term2
    second_idx = rows.index[~rows.first]
    diag_fm = mean_sq(b.xdot[second_idx] - rows.v_hat).mean().detach() if n2 else zero
    info = {
        "loss": loss.detach(),
        "term1": term1.detach(),
        "term2": term2.detach(),
        "diag_fm": diag_fm,
        "n_first": torch.tensor(n1),
        "n_second": torch.tensor(n2),
    }
    return loss, info


def flow_map_tangent(x_dot, t_dot, u_dot, t, u, ftilde, ftilde_dot):
    """JVP of f = x + (u - t) f~ in direction (t_dot, u_dot, x_dot), given f~ and its JVP ftilde_dot."""
    return x_dot + bcast(u_dot - t_dot, ftilde) * ftilde + bcast(u - t, ftilde) * ftilde_dot


def sgflow_loss(
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
):
    """Reference SGFlow loss via ``torch.func.jvp``; its gradient is the SGFlow update.

    Args:
        model: callable ``model(t, u, x) -> f~`` with t, u: [B] and f~ of x's shape.
        x1: data batch [B, *D].
        interpolant: ``"linear"``, ``"trig"`` or an :class:`~sgflow.interpolants.Interpolant`.
        time_sampler: a :class:`~sgflow.times.TimeSampler` (default: uniform, half of the samples on the diagonal).
        noise, t, u: optional explicit X_0 [B, *D] and times [B] (t <= u).
        split: optional bool mask [B]: True where a sample takes the first term (direction
            (1, 0, Xdot_t)), False for the second (direction (0, 0, Xdot_t - sg[f~(t,t,X_t)])).
            Drawn with probability ``split_fraction`` when omitted.
        both_terms: compute both JVPs for every sample instead of splitting the batch.

    Returns:
        ``(loss, info)``: the scalar mean_first ||JVP_1 f||^2 - mean_second ||JVP_2 f||^2 (squared
        norms averaged over feature dims) and detached diagnostics: ``term1``, ``term2``,
        ``diag_fm`` (||Xdot_t - f~(t,t,X_t)||^2 on the second-term samples), row counts.
    """
    check_not_ddp(model, "sgflow_loss")
    b = draw_batch(x1, interpolant=interpolant, time_sampler=time_sampler, noise=noise, t=t, u=u, generator=generator)
    rows = sgflow_rows(model, b, split, both_terms, split_fraction, generator)
    tr, ur, xr = b.t[rows.index], b.u[rows.index], b.xt[rows.index]
    _, jvp_f = torch.func.jvp(
        lambda t_, u_, x_: flow_map(model, t_, u_, x_),
        (tr, ur, xr),
        (rows.t_dot, torch.zeros_like(ur), rows.x_dot),
    )
    return reduce_sgflow(jvp_f, rows, b)
