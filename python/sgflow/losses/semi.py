"""SGFlow's semi-gradient update (``update="semi"``): the second JVP as a stop-gradient target.

Per sample, with J = d_x f(t, u, X_t), v_hat = sg[f~(t, t, X_t)] (or a teacher's velocity) and

    r1 = JVP_(1,0,Xdot) f = d_t f + J Xdot        (the paper's first term)
    r2 = JVP_(0,0,Xdot - v_hat) f = J (Xdot - v_hat)   (the paper's second term)
    e  = r1 - r2 = JVP_(1,0,v_hat) f = d_t f + J v_hat,

the paper's L_sg = E[||r1||^2 - ||r2||^2] has the per-sample gradient 2<r1, de> + 2<e, dr2> (d: with
respect to the parameters). The semi-gradient update keeps the first part only:

    loss_semi = E || e + sg[r2] ||^2,   gradient 2<r1, de>.

Why (v = E[Xdot | X_t] the true velocity, r = d_t f + J v the ideal residual, L = E||r||^2):

- expected L_sg gradient  = grad L - grad_theta E||J (v_hat - v)||^2 (J held at v_hat - v): where
  v_hat is wrong it rewards a larger Jacobian along its error, without bound (the divergence on the
  mixtures; ``tests/test_sgflow_identity.py``);
- expected semi gradient  = grad L - 2 E<r, (dJ)(v - v_hat)>: an error linear in the velocity error
  *and* in the residual r, so it vanishes as the map approaches the flow of v, and the loss it
  follows, E||r1||^2 in value, is bounded below by 0.

Both equal grad L in expectation when v_hat = v, so the true flow map (with the exact velocity on
the diagonal) is a stationary point of both; on the diagonal (t = u, J = I) both are flow matching.
The semi update drops the term 2<e, dr2> of L_sg's gradient, so it is *not* the gradient of L_sg:
it is the training recipe's default (:data:`sgflow.train.METHOD_DEFAULTS`, with the run's EMA as the target
network that gives v_hat and r2: the losses' ``target=``), the losses' default stays the paper's
``update="paper"``.

Cost per sample: one JVP row with the graph (direction (1, 0, v_hat)) and, off the diagonal, one JVP
without a graph (direction (0, 0, Xdot - v_hat); on the diagonal r2 = Xdot - v_hat needs no network).
"""
from __future__ import annotations

from typing import Callable

import torch

from sgflow.losses.common import Batch, bcast, mean_sq

UPDATES = ("paper", "semi")


def check_update(update: str) -> str:
    """Validate ``update=`` of the SGFlow losses; returns it unchanged."""
    if update not in UPDATES:
        raise ValueError(f"update must be one of {', '.join(repr(u) for u in UPDATES)}; got {update!r}")
    return update


def semi_loss(jvp_of_f: Callable, b: Batch, v_hat: torch.Tensor, jvp_target: Callable | None = None):
    """The semi-gradient SGFlow loss on batch ``b`` (see the module doc).

    Args:
        jvp_of_f: ``jvp_of_f(t, u, x, t_dot, x_dot) -> JVP of f`` ([R] times, [R, *D] x; u_dot = 0),
            with the graph when grad mode is on.
        b: the drawn batch. v_hat: [B, *D] the detached velocity estimate at (t, X_t).
        jvp_target: the JVP for r2, without a graph, of the model or of a target network (default:
            ``jvp_of_f`` under ``torch.no_grad``; the reference passes one that detaches, since its
            double-VJP JVP needs grad mode).

    Returns:
        ``(loss, info)``: loss = mean_B ||e + sg[r2]||^2 (its value is mean ||r1||^2); info holds the
        paper's terms on the off-diagonal samples (``term1`` = mean ||r1||^2, ``term2`` = mean
        ||r2||^2, ``ratio`` = term2 / term1 and ``gain2`` = ||r2|| / ||Xdot - v_hat|| in RMS, which
        is 1 at J = I), ``diag_fm`` (||Xdot - v_hat||^2 on the diagonal samples) and the row counts.
    """
    ones, zeros = torch.ones_like(b.t), torch.zeros_like(b.t)
    w = b.xdot - v_hat
    diag = b.t == b.u
    if jvp_target is None:
        def jvp_target(*args):
            with torch.no_grad():
                return jvp_of_f(*args)
    if torch.compiler.is_compiling():
        # Data-independent shapes: r2 on every sample, the diagonal's exact value where t = u.
        r2 = torch.where(bcast(diag, w), w, jvp_target(b.t, b.u, b.xt, zeros, w))
    else:
        r2 = w.clone()  # on the diagonal J = I: r2 = Xdot - v_hat without a network call
        off = (~diag).nonzero().squeeze(1)
        if off.numel():
            r2[off] = jvp_target(b.t[off], b.u[off], b.xt[off], zeros[off], w[off])
    r2 = r2.detach()
    e = jvp_of_f(b.t, b.u, b.xt, ones, v_hat)
    per = mean_sq(e + r2)
    loss = per.mean()
    with torch.no_grad():
        offm = (~diag).to(per.dtype)
        n_off = offm.sum()
        n = n_off.clamp(min=1)
        term1 = (per * offm).sum() / n
        term2 = (mean_sq(r2) * offm).sum() / n
        w2 = (mean_sq(w) * offm).sum() / n
        diagm = 1.0 - offm
        info = {
            "loss": loss.detach(),
            "term1": term1,
            "term2": term2,
            **warning_signals(term1, term2, w2),
            "diag_fm": (mean_sq(w) * diagm).sum() / diagm.sum().clamp(min=1),
            "n_first": torch.tensor(b.t.shape[0]),
            "n_second": n_off.long(),
        }
    return loss, info


def warning_signals(term1: torch.Tensor, term2: torch.Tensor, w2: torch.Tensor) -> dict:
    """``ratio`` = term2 / term1 and ``gain2`` = RMS ||J (Xdot - v_hat)|| / ||Xdot - v_hat|| (1 at J = I).

    Near the solution the two terms are equal in expectation (ratio ~ 1); since
    L_sg = L_ideal - E||J (v_hat - v)||^2 and L_ideal >= 0, a ratio well above 1 says the loss is
    falling by growing the Jacobian along the velocity estimate's error (the trainer warns on it)."""
    tiny = torch.finfo(term1.dtype).tiny
    return {"ratio": term2 / term1.clamp(min=tiny), "gain2": (term2 / w2.clamp(min=tiny)).sqrt()}
