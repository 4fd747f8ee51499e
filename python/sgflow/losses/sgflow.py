"""The SGFlow loss, reference implementation (any network).

    L_sg = E[ ||d_t f + (d_x f) Xdot_t||^2 - ||(d_x f)(Xdot_t - sg[f~(t, t, X_t)])||^2 ]

with f(t, u, x) = x + (u - t) f~(t, u, x). Both terms are squared Jacobian-vector products of f at
(t, u, X_t): the first in direction (1, 0, Xdot_t), the second in direction
(0, 0, Xdot_t - sg[f~(t, t, X_t)]). The gradient flows *through* the JVP (reverse over forward).

The JVP comes from ``torch.func.jvp`` (``jvp="forward"``) or from reverse mode alone
(``jvp="double_vjp"``: the JVP is the gradient, with respect to a dummy cotangent w, of
<(df/dp)^T w, v>), and ``jvp="auto"`` switches to the latter when an op has no forward-AD formula.
The network runs under :func:`sgflow.decompose.decomposed` by default, because PyTorch's
higher-order formulas for layer / batch / instance norm are silently wrong (pytorch#196700, #196699).
"""
from __future__ import annotations

import contextlib
import os
import sys
import warnings
import weakref
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from sgflow.checks import check_model_output, check_not_ddp, check_split
from sgflow.decompose import decomposed
from sgflow.forward_ad import missing_forward_ad
from sgflow.losses.common import Batch, bcast, draw_batch, flow_map, mean_sq
from sgflow.losses.semi import check_update, semi_loss, warning_signals
from sgflow.times import random_tensor

JVP_METHODS = ("auto", "forward", "double_vjp")


@dataclass
class SGFlowRows:
    """The JVPs one SGFlow step evaluates, one row each.

    index: [R] batch index of each row; first: [R] bool, True for a first-term row; t_dot: [R] time
    tangent (1 for the first term, 0 for the second); x_dot: [R, *D] x tangent.
    v_hat: [S, *D] the detached diagonal velocity f~(t, t, X_t) of the second-term rows (S of them);
    with ``aligned`` (rows built under ``torch.compile``): [R, *D], one per row, the first-term rows'
    entries computed but unused (see :func:`sgflow_rows`).
    """

    index: torch.Tensor
    first: torch.Tensor
    t_dot: torch.Tensor
    x_dot: torch.Tensor
    v_hat: torch.Tensor
    aligned: bool = False


TEACHER_MODES = ("second", "both")


def check_teacher(teacher, teacher_mode: str) -> None:
    """Validate ``teacher=`` / ``teacher_mode=`` of the SGFlow losses (see :func:`sgflow_loss`)."""
    if teacher_mode not in TEACHER_MODES:
        raise ValueError(f"teacher_mode must be one of {', '.join(repr(m) for m in TEACHER_MODES)}; got {teacher_mode!r}")
    if teacher is None:
        if teacher_mode != "second":
            raise ValueError(f"teacher_mode={teacher_mode!r} needs a teacher: pass teacher=v(t, x)")
    elif not callable(teacher):
        raise TypeError(f"teacher must be a callable v(t, x) -> [B, *D], got {type(teacher).__name__}")


def teacher_velocity(teacher, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The teacher's velocity v(t, x) without a graph (no saved activations; its parameters get no
    gradient and keep their ``requires_grad``), checked to match x in shape, dtype and device."""
    with torch.no_grad():
        v = teacher(t, x)
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"teacher(t, x) must return a tensor, got {type(v).__name__}")
    if v.shape != x.shape or v.dtype != x.dtype or v.device != x.device:
        raise ValueError(f"teacher(t, x) returned {tuple(v.shape)} {v.dtype} on {v.device}; expected x's "
                         f"{tuple(x.shape)} {x.dtype} on {x.device}")
    return v.detach()


def _teacher_rows(b: Batch, split, teacher) -> SGFlowRows:
    """``teacher_mode="both"``: Xdot_t replaced by v = teacher(t, X_t) in both terms, so the second term
    ||J (v - v)||^2 vanishes and every sample takes one first-term row, direction (1, 0, v) off the
    diagonal; diagonal rows (t = u) keep direction (1, 0, Xdot_t), i.e. flow matching
    ||Xdot_t - f~(t, t, X_t)||^2, as without a teacher. ``split`` is checked and otherwise unused."""
    batch = b.x1.shape[0]
    if split is not None:
        check_split(split, batch, b.x1)
    index = torch.arange(batch, device=b.x1.device)
    first = torch.ones(batch, dtype=torch.bool, device=b.x1.device)
    v = teacher_velocity(teacher, b.t, b.xt)
    x_dot = torch.where(bcast(b.t == b.u, v), b.xdot, v)
    return SGFlowRows(index=index, first=first, t_dot=first.to(b.x1.dtype), x_dot=x_dot, v_hat=v,
                      aligned=torch.compiler.is_compiling())


def semi_setup(update: str, split, both_terms: bool, teacher_mode: str, teacher, target,
               split_fraction: float = 0.5) -> bool:
    """Validate ``update=`` / ``target=``; True where the semi-gradient path runs. Refuses the paper-estimator
    options that ``update="semi"`` has no use for (one row per sample). With ``teacher_mode="both"`` there is
    no second term to treat either way: the teacher rows run, whatever ``update`` says."""
    check_update(update)
    if update != "semi":
        if target is not None:
            raise ValueError("target= is the semi-gradient update's target network: pass update='semi' with it")
        return False
    if split is not None or both_terms or split_fraction != 0.5:
        raise ValueError("update='semi' takes one row per sample (the second term is its stop-gradient "
                         "target): split=, split_fraction= and both_terms= apply to update='paper' only")
    if target is not None and not callable(target):
        raise TypeError(f"target must be a model target(t, u, x) (e.g. the EMA of the model), got {type(target).__name__}")
    return not (teacher is not None and teacher_mode == "both")


def velocity_estimate(model, t: torch.Tensor, x: torch.Tensor, teacher=None) -> torch.Tensor:
    """v_hat [R, *D] at times t [R] and points x [R, *D]: sg[f~(t, t, x)], or the teacher's v(t, x), without
    a graph (the velocity both SGFlow updates hold fixed)."""
    if teacher is not None:
        return teacher_velocity(teacher, t, x)
    with torch.no_grad():
        return check_model_output(model(t, t, x), x, "model(t, t, x)").detach()


def _data_parallel() -> bool:
    """Whether this process is one of several in a torch.distributed process group (DDP, FSDP, manual
    all-reduce: each rank's loss is averaged with the others')."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def balanced_split(batch: int, device, split_fraction: float = 0.5, generator=None) -> torch.Tensor:
    """bool [batch]: exactly ``round(split_fraction * batch)`` first-term rows, at random positions.

    The SGFlow losses' default ``split`` inside a process group of more than one process. DDP / FSDP average
    the ranks' gradients, i.e. differentiate the mean of the ranks' losses, and each loss averages each term over
    its own rows: that mean equals the loss of one process on the concatenated batch only when every rank holds as
    many rows of each term (the trainer's :func:`sgflow.train.paired_split` slices do the same). A split drawn
    row by row (the one-process default) gives each rank its own count: measured 0.52 relative gradient error
    against one process. An explicit ``split=`` under data parallel must keep that layout itself."""
    r = random_tensor("rand", (batch,), device, torch.float32, generator)
    k = int(round(split_fraction * batch))
    return r.argsort().argsort() < k


def sgflow_rows(model, b: Batch, split: torch.Tensor | None, both_terms: bool, split_fraction: float, generator,
                teacher=None, teacher_mode: str = "second") -> SGFlowRows:
    """Assign each sample its JVP direction(s) and compute sg[f~(t, t, X_t)] where needed.

    With ``teacher`` (a callable v(t, x)), v = teacher(t, X_t) replaces sg[f~(t, t, X_t)]
    (``teacher_mode="second"``), or Xdot_t in both terms (``"both"``: :func:`_teacher_rows`).

    Eagerly sg[f~(t, t, X_t)] is evaluated on the second-term rows only (a boolean-mask selection,
    whose size depends on the split). While ``torch.compile`` traces this, shapes must not depend on
    data, so it is evaluated on the whole batch instead and used on the second-term rows only
    (:func:`_aligned_rows`): the same numbers for any network whose output for one sample does not
    depend on the others in the batch (all of ``sgflow.nn``; not a training-mode BatchNorm, whose
    statistics then span the whole batch).
    """
    batch = b.x1.shape[0]
    if teacher is not None and teacher_mode == "both":
        return _teacher_rows(b, split, teacher)
    if both_terms:
        if split is not None:
            raise ValueError("pass either split= or both_terms=True, not both")
        index = torch.arange(batch, device=b.x1.device).repeat(2)
        first = torch.arange(2 * batch, device=b.x1.device) < batch
    else:
        if split is None:
            if not 0.0 < split_fraction < 1.0:
                raise ValueError(f"split_fraction must lie in (0, 1), got {split_fraction}")
            if _data_parallel():
                split = balanced_split(batch, b.x1.device, split_fraction, generator)
            else:
                split = random_tensor("rand", (batch,), b.x1.device, torch.float32, generator) < split_fraction
        check_split(split, batch, b.x1)
        index = torch.arange(batch, device=b.x1.device)
        first = split
    if torch.compiler.is_compiling():
        return _aligned_rows(model, b, index, first, teacher)
    second_idx = index[~first]
    xdot = b.xdot[index]
    if second_idx.numel():
        v_hat = velocity_estimate(model, b.t[second_idx], b.xt[second_idx], teacher)
        x_dot = xdot.clone()
        x_dot[~first] = xdot[~first] - v_hat
    else:
        v_hat = b.xt[:0]
        x_dot = xdot
    t_dot = first.to(b.x1.dtype)
    return SGFlowRows(index=index, first=first, t_dot=t_dot, x_dot=x_dot, v_hat=v_hat)


def _aligned_rows(model, b: Batch, index: torch.Tensor, first: torch.Tensor, teacher=None) -> SGFlowRows:
    """:func:`sgflow_rows` with data-independent shapes (for ``torch.compile``: no graph break).

    sg[f~(t, t, X_t)] (or the teacher's v(t, X_t)) of every sample, gathered per row (``index`` is
    fixed-size), and the second-term tangent Xdot_t - v_hat selected by ``torch.where``: the eager
    rows' x_dot exactly.
    """
    v_hat = velocity_estimate(model, b.t, b.xt, teacher)[index]
    xdot = b.xdot[index]
    x_dot = torch.where(bcast(first, xdot), xdot, xdot - v_hat)
    return SGFlowRows(index=index, first=first, t_dot=first.to(b.x1.dtype), x_dot=x_dot, v_hat=v_hat, aligned=True)


def reduce_sgflow(jvp_f: torch.Tensor, rows: SGFlowRows):
    """loss = mean over first-term rows of ||JVP||^2 - mean over second-term rows of ||JVP||^2.

    Averaging each term over its own rows keeps the estimate unbiased for L_sg (given how many rows each
    term got); an empty term contributes 0. Each term is a masked sum over its row count (clamped to 1),
    counts kept as tensors: no boolean-mask selection and no host sync, so the same code runs eagerly and
    under ``torch.compile``.
    """
    per_row = mean_sq(jvp_f)
    first = rows.first
    zero = per_row.new_zeros(())
    n1 = first.sum()
    n2 = first.numel() - n1
    term1 = torch.where(first, per_row, zero).sum() / n1.clamp(min=1).to(per_row.dtype)
    term2 = torch.where(first, zero, per_row).sum() / n2.clamp(min=1).to(per_row.dtype)
    loss = term1 - term2
    with torch.no_grad():
        # Second-term rows carry the tangent Xdot_t - v_hat: its mean square there is the diagonal velocity's
        # flow-matching error (diag_fm) and the denominator of the Jacobian gain.
        w2 = torch.where(first, zero, mean_sq(rows.x_dot)).sum() / n2.clamp(min=1).to(per_row.dtype)
    info = {
        "loss": loss.detach(),
        "term1": term1.detach(),
        "term2": term2.detach(),
        **warning_signals(term1.detach(), term2.detach(), w2),
        "diag_fm": w2,
        "n_first": n1,
        "n_second": n2,
    }
    return loss, info


def flow_map_tangent(x_dot, t_dot, u_dot, t, u, ftilde, ftilde_dot):
    """JVP of f = x + (u - t) f~ in direction (t_dot, u_dot, x_dot), given f~ and its JVP ftilde_dot."""
    return x_dot + bcast(u_dot - t_dot, ftilde) * ftilde + bcast(u - t, ftilde) * ftilde_dot


def check_jvp_method(jvp: str) -> str:
    """Validate the ``jvp=`` choice of the reference loss; returns it unchanged."""
    if jvp not in JVP_METHODS:
        raise ValueError(f"jvp must be one of {', '.join(repr(m) for m in JVP_METHODS)}; got {jvp!r}")
    return jvp


def double_vjp_jvp(
    fn: Callable[..., torch.Tensor],
    primals: Sequence[torch.Tensor],
    tangents: Sequence[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""JVP by reverse mode only ("double VJP"); same contract as ``torch.func.jvp`` for one output.

    With y = fn(p) for the primals p (made to require grad), g(w) = (dy/dp)^T w is computed with
    ``autograd.grad(y, p, w, create_graph=True)`` at a dummy cotangent w = 0 (requiring grad). g is
    linear in w, so

        J v = d<g(w), v>/dw = autograd.grad(g, w, v, create_graph=True),

    exact at any w. Both calls keep their graphs, so the gradient of a function of (y, J v) with
    respect to parameters closed over by ``fn`` (and to the tangents) flows through the result.

    Args:
        fn: function of the primals returning one tensor y.
        primals: tensors p_i. tangents: v_i, shaped like p_i.

    Returns:
        ``(y, y_dot)`` with y_dot = sum_i (dy/dp_i) v_i, of y's shape.
    """
    if len(primals) != len(tangents):
        raise ValueError(f"got {len(primals)} primals but {len(tangents)} tangents")
    with torch.enable_grad():
        # A primal that already requires grad keeps its history (gradients then reach its sources).
        inputs = [p if p.requires_grad else p.detach().requires_grad_(True) for p in primals]
        out = fn(*inputs)
        if not out.requires_grad:  # constant in the primals (and parameters): the JVP is zero
            return out, torch.zeros_like(out)
        w = torch.zeros_like(out, requires_grad=True)
        grads = torch.autograd.grad(out, inputs, w, create_graph=True, allow_unused=True)
        # An unused input, or one whose vector-Jacobian product does not depend on w, adds nothing.
        pairs = [(g, v) for g, v in zip(grads, tangents) if g is not None and g.requires_grad]
        out_dot = None
        if pairs:
            (out_dot,) = torch.autograd.grad(
                [g for g, _ in pairs], w, [v.to(g.dtype) for g, v in pairs], create_graph=True, allow_unused=True
            )
    return out, torch.zeros_like(out) if out_dot is None else out_dot


# model -> {decompose flag: "ok" after forward AD worked, or the failure message after it did not}.
# Weak keys: a model that goes away takes its entry with it.
_FORWARD_AD_STATUS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _status_entry(model) -> dict | None:
    try:
        return _FORWARD_AD_STATUS.setdefault(model, {})
    except TypeError:  # not weak-referenceable: nothing is remembered
        return None


def forward_ad_failure(model, decompose: bool = True) -> str | None:
    """The message that made ``sgflow_loss(model, ..., jvp="auto", decompose=decompose)`` switch to
    the double-VJP JVP (it then keeps using it for this model), or None if it has not switched."""
    entry = _status_entry(model)
    status = None if entry is None else entry.get(bool(decompose))
    return None if status in (None, "ok") else status


_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


def _caller_stacklevel() -> int:
    """``stacklevel`` for a warning raised by this function's caller that points at the first frame
    outside the sgflow package (the user's call), however deep inside sgflow it was raised."""
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE_DIR):
        frame, level = frame.f_back, level + 1
    return level


def _snapshot(model, device: torch.device, with_buffers: bool):
    """RNG states (and module buffers) to undo a failed forward-AD attempt: the fallback then draws
    the same dropout masks and updates running statistics once, as a direct double_vjp call would."""
    rng = [torch.get_rng_state()]
    if device.type == "cuda":
        rng.append(torch.cuda.get_rng_state(device))
    buffers = []
    if with_buffers and isinstance(model, torch.nn.Module):
        buffers = [(b, b.detach().clone()) for b in model.buffers()]
    return rng, buffers


@torch.no_grad()
def _restore(state, device: torch.device) -> None:
    rng, buffers = state
    torch.set_rng_state(rng[0])
    if len(rng) > 1:
        torch.cuda.set_rng_state(rng[1], device)
    for buf, saved in buffers:
        buf.copy_(saved)


def flow_map_jvp(
    model,
    t: torch.Tensor,
    u: torch.Tensor,
    x: torch.Tensor,
    t_dot: torch.Tensor,
    u_dot: torch.Tensor,
    x_dot: torch.Tensor,
    *,
    jvp: str = "auto",
    decompose: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""f(t, u, x) = x + (u - t) model(t, u, x) and its JVP in direction (t_dot, u_dot, x_dot).

        JVP f = x_dot + (u_dot - t_dot) f~ + (u - t) [(d_t f~) t_dot + (d_u f~) u_dot + (d_x f~) x_dot]

    Args:
        model: ``model(t, u, x) -> f~``. t, u, t_dot, u_dot: [R]; x, x_dot: [R, *D].
        jvp: ``"forward"`` (``torch.func.jvp``), ``"double_vjp"`` (:func:`double_vjp_jvp`) or
            ``"auto"``: forward, switching to double_vjp, with a warning once per model, when torch
            reports an op (or an ``autograd.Function``) without a forward-mode rule. After a switch
            the failed attempt's RNG draws and buffer updates are undone (not under ``torch.compile``).
        decompose: run the model under :func:`sgflow.decompose.decomposed` (normalisation and
            attention from primitive ops: their higher-order derivatives are right).

    Returns:
        ``(f, jvp_f)``, both [R, *D], with the graph for reverse mode through both.
    """
    check_jvp_method(jvp)
    fn = lambda t_, u_, x_: flow_map(model, t_, u_, x_)  # noqa: E731
    primals, tangents = (t, u, x), (t_dot, u_dot, x_dot)
    mode = decomposed() if decompose else contextlib.nullcontext()
    with mode:
        if jvp == "forward":
            return torch.func.jvp(fn, primals, tangents)
        if jvp == "double_vjp":
            return double_vjp_jvp(fn, primals, tangents)
        entry = _status_entry(model)
        status = None if entry is None else entry.get(bool(decompose))
        reason = None
        if status in (None, "ok"):
            # Buffers are saved only until forward AD has worked once for this model (cheap after).
            # Not while torch.compile traces: dynamo breaks the graph on reading the RNG state; a
            # switch there keeps the failed attempt's draws and buffer updates.
            state = None if torch.compiler.is_compiling() else _snapshot(model, x.device, with_buffers=status is None)
            try:
                out = torch.func.jvp(fn, primals, tangents)
            except (RuntimeError, NotImplementedError) as err:
                reason = missing_forward_ad(err)
                if reason is None:
                    raise
            else:
                if entry is not None:
                    entry[bool(decompose)] = "ok"
                return out
            # Outside the except block: the failed attempt's frames (and tensors) are released.
            if state is not None:
                _restore(state, x.device)
            if entry is not None:
                entry[bool(decompose)] = reason
            warnings.warn(
                f"sgflow_loss(jvp='auto'): {reason}; computing the JVP by reverse mode (double VJP) for "
                f"this model from now on. Pass jvp='double_vjp' to choose it explicitly and silence this warning.",
                stacklevel=_caller_stacklevel(),
            )
        else:
            reason = status
        try:
            return double_vjp_jvp(fn, primals, tangents)
        except (RuntimeError, NotImplementedError) as err:
            hint = "" if decompose else " (decompose=True replaces fused attention / normalisation kernels)"
            raise RuntimeError(
                f"sgflow_loss(jvp='auto'): forward-mode AD failed ({reason}) and the double-VJP fallback failed "
                f"too: {err}{hint}"
            ) from err


def sgflow_loss_on_rows(model, b: Batch, rows: SGFlowRows, *, jvp: str = "auto", decompose: bool = True):
    """The SGFlow loss for given rows: their JVP directions and stop-gradient targets held fixed.

        loss = mean_first ||JVP_(1,0,Xdot) f||^2 - mean_second ||JVP_(0,0,Xdot - v_hat) f||^2

    at (t, u, X_t) of the rows ``rows.index`` of ``b``, with ``v_hat = rows.v_hat`` as given
    (computed once, e.g. by :func:`sgflow_rows`). Because nothing is redrawn or recomputed outside the
    JVP, this is a deterministic function of the model's parameters: the scalar whose gradient
    :func:`sgflow_loss` returns and whose finite differences :func:`sgflow.audit.check_gradients` takes.

    Args:
        model: ``model(t, u, x) -> f~``. b: the batch (:func:`~sgflow.losses.common.draw_batch`).
        rows: :class:`SGFlowRows`. jvp, decompose: as in :func:`flow_map_jvp`.

    Returns:
        ``(loss, info)`` as :func:`sgflow_loss`.
    """
    tr, ur, xr = b.t[rows.index], b.u[rows.index], b.xt[rows.index]
    _, jvp_f = flow_map_jvp(model, tr, ur, xr, rows.t_dot, torch.zeros_like(ur), rows.x_dot, jvp=jvp, decompose=decompose)
    return reduce_sgflow(jvp_f, rows)


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
    jvp: str = "auto",
    decompose: bool = True,
    teacher=None,
    teacher_mode: str = "second",
    update: str = "paper",
    target=None,
):
    """Reference SGFlow loss for any network; its gradient is the SGFlow update.

    Args:
        model: callable ``model(t, u, x) -> f~`` with t, u: [B] and f~ of x's shape.
        x1: data batch [B, *D].
        interpolant: ``"linear"``, ``"trig"`` or an :class:`~sgflow.interpolants.Interpolant`.
        time_sampler: a :class:`~sgflow.times.TimeSampler` (default: uniform, half of the samples on the diagonal).
        noise, t, u: optional explicit X_0 [B, *D] and times [B] (t <= u).
        split: optional bool mask [B]: True where a sample takes the first term (direction
            (1, 0, Xdot_t)), False for the second (direction (0, 0, Xdot_t - sg[f~(t,t,X_t)])).
            Drawn with probability ``split_fraction`` when omitted; inside a process group of several
            processes (DDP, FSDP) exactly ``round(split_fraction * B)`` rows instead (:func:`balanced_split`), so
            that the average of the ranks' losses is one process's loss on the whole batch. An explicit split
            under data parallel must give every rank the same number of first-term rows.
        both_terms: compute both JVPs for every sample instead of splitting the batch.
        jvp: ``"auto"`` (default: ``torch.func.jvp``, switching with a one-time warning to the
            double-VJP JVP when an op has no forward-AD formula), ``"forward"`` or ``"double_vjp"``
            (reverse mode only; more memory and time, works wherever double backward does).
        decompose: run the network under :func:`sgflow.decompose.decomposed` (default True):
            layer / group / batch / instance / RMS norm and scaled-dot-product attention from
            primitive ops, because torch 2.13's higher-order gradients of layer, batch and instance
            norm are silently wrong. ``False`` runs the network's ops as they are (for audits).
        teacher: distillation (default None: the paper's L_sg exactly). A callable ``v(t, x) -> [B, *D]``
            (t: [B]) giving a velocity of the same interpolant, e.g. a flow-matching network's
            f~(t, t, x) (:func:`sgflow.train.load_teacher`). It runs under ``torch.no_grad`` (no graph, no
            saved activations; its parameters get no gradient and keep their ``requires_grad``), as it
            is called: put a module in eval mode. Its output must match x in shape, dtype and device.
        teacher_mode: where v = teacher(t, X_t) goes. With v_true = E[Xdot_t | X_t] and the ideal loss
            L = E||d_t f + (d_x f) v_true||^2 (off the diagonal):

            - ``"second"`` (default): v replaces sg[f~(t, t, X_t)] in the second term,
              E||d_t f + (d_x f) Xdot_t||^2 - E||(d_x f)(Xdot_t - v)||^2 = L - E||(d_x f)(v - v_true)||^2.
              With the exact velocity it is an unbiased estimate of L and of its gradient (per sample
              it differs by a zero-mean cross term: high variance); a teacher error e = v - v_true biases
              it by -E||(d_x f) e||^2, which rewards a large Jacobian along e (bounded by the teacher's
              error rather than by the model's own, unlike L_sg).
            - ``"both"``: v replaces Xdot_t in both terms, so the second vanishes and each sample gives
              ||d_t f + (d_x f) v||^2: the ideal loss per sample with the exact velocity (no
              conditional noise: lower variance), biased by a teacher error (it then fits the
              teacher's flow, a loss bounded below by 0). One row per sample: ``split`` and
              ``both_terms`` do not apply.

            Either way diagonal rows (t = u) keep flow matching against Xdot_t, as without a teacher.
        update: ``"paper"`` (default): the gradient of L_sg above. ``"semi"``: the semi-gradient
            update (:mod:`sgflow.losses.semi`), E||JVP_(1,0,v_hat) f + sg[JVP_(0,0,Xdot-v_hat) f]||^2
            with one graph row per sample: L_sg's gradient without the part that rewards a larger
            Jacobian along the velocity error (equal to L_sg's in expectation when v_hat is the exact
            velocity; the training recipe's default, see :data:`sgflow.train.METHOD_DEFAULTS`).
            ``split`` / ``both_terms`` do not apply to it.
        target: ``update="semi"`` only: the target network, a model like ``model`` (the trainer's recipe
            passes its EMA, as TD methods stabilise a bootstrapped target): v_hat = sg[target~(t, t, X_t)]
            (unless a teacher gives it) and the stop-gradient target r2 = J_target (Xdot_t - v_hat).
            Default: the model itself. Same fixed point (target = model at convergence); a lagging target
            keeps the model's own Jacobian out of its regression target (measured: without it the semi update
            diverged on the 32-D mixture, seed 0; with it, it did not).

    Returns:
        ``(loss, info)``: the scalar mean_first ||JVP_1 f||^2 - mean_second ||JVP_2 f||^2 (squared
        norms averaged over feature dims) and detached diagnostics: ``term1``, ``term2``,
        ``diag_fm`` (||Xdot_t - f~(t,t,X_t)||^2 on the second-term samples), row counts.
    """
    check_not_ddp(model, "sgflow_loss")
    check_jvp_method(jvp)
    check_teacher(teacher, teacher_mode)
    semi = semi_setup(update, split, both_terms, teacher_mode, teacher, target, split_fraction)
    b = draw_batch(x1, interpolant=interpolant, time_sampler=time_sampler, noise=noise, t=t, u=u, generator=generator)
    if semi:
        tgt = model if target is None else target
        with decomposed() if decompose else contextlib.nullcontext():
            v_hat = velocity_estimate(tgt, b.t, b.xt, teacher)

        def jvp_with(net):
            def jvp_of_f(t_, u_, x_, t_dot, x_dot):
                return flow_map_jvp(net, t_, u_, x_, t_dot, torch.zeros_like(u_), x_dot, jvp=jvp, decompose=decompose)[1]
            return jvp_of_f

        return semi_loss(jvp_with(model), b, v_hat, jvp_target=lambda *a: jvp_with(tgt)(*a).detach())
    with decomposed() if decompose else contextlib.nullcontext():
        rows = sgflow_rows(model, b, split, both_terms, split_fraction, generator, teacher, teacher_mode)
    return sgflow_loss_on_rows(model, b, rows, jvp=jvp, decompose=decompose)
