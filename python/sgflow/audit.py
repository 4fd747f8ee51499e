r"""Gradient audit: are the SGFlow gradients of a network right?

:func:`check_gradients` compares, on one float64 batch, the parameter gradients of

- the fused path (:func:`sgflow.fused_loss`),
- the reference (:func:`sgflow.sgflow_loss`: network under :func:`sgflow.decompose.decomposed`,
  ``jvp="auto"``),
- optionally PyTorch as it is (``sgflow_loss(..., decompose=False, jvp="forward")``), which is
  silently wrong for layer / batch / instance norm in torch 2.13 (pytorch#196700, #196699),

with central finite differences of the loss along random unit directions d_k in parameter space:

    fd_k = (L(theta + eps d_k) - L(theta - eps d_k)) / (2 eps),   a_k = <grad L(theta), d_k>,

    error = ||a - fd|| / ||fd||   (over the k = 1..directions directional derivatives).

The SGFlow update is not the gradient of a scalar unless the stop-gradient target
sg[f~(t, t, X_t)] is held fixed, so L here is :func:`sgflow.losses.sgflow.sgflow_loss_on_rows`
with the rows (JVP directions and targets) computed once at theta. L(theta +- eps d) needs only JVP
*values*, which PyTorch gets right even where its norm layers' gradients are wrong; they come from the
decomposed forward JVP (or the double-VJP value where forward AD is missing).
"""
from __future__ import annotations

import copy
import inspect
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from sgflow.decompose import decomposed
from sgflow.losses.common import draw_batch
from sgflow.losses.sgflow import forward_ad_failure, sgflow_loss, sgflow_loss_on_rows, sgflow_rows
from sgflow.times import TimeSampler, random_tensor

__all__ = ["PathCheck", "GradientReport", "check_gradients"]


@dataclass
class PathCheck:
    """One gradient path of the audit.

    name: ``"fused"``, ``"reference"`` or ``"raw torch"``. loss: the loss value at theta.
    directional: a_k = <grad, d_k> for each direction. fd_error: ||a - fd|| / ||fd||.
    grad_norm: ||grad|| over all parameters. error: the exception text when the path raised (the
    other fields are then None).
    """

    name: str
    loss: float | None = None
    directional: list[float] | None = None
    fd_error: float | None = None
    grad_norm: float | None = None
    error: str | None = None

    @property
    def ran(self) -> bool:
        return self.error is None


@dataclass
class GradientReport:
    """What :func:`check_gradients` measured (all in float64).

    fd: the finite-difference directional derivatives fd_k. fused, reference, raw_torch: the paths
    (raw_torch None when not requested). fused_vs_reference: ||g_fused - g_ref|| / ||g_ref|| over
    the full gradient vector (None if the fused path raised). zero_grad_params: names of parameters
    whose reference gradient is exactly zero. reference_jvp: ``"forward"`` or ``"double_vjp"`` (what
    ``jvp="auto"`` used), with forward_ad_failure the reason for a switch. num_params: parameter
    count (entries), num_tensors: parameter tensors. eps, directions: the FD settings.
    perturbed_params: the all-zero (zero-initialised) parameters given small random values on the float64
    copy before the audit, so that the layers behind them get a gradient (``perturb_zero=True``).
    """

    fd: list[float]
    fused: PathCheck
    reference: PathCheck
    raw_torch: PathCheck | None
    fused_vs_reference: float | None
    zero_grad_params: list[str]
    reference_jvp: str
    forward_ad_failure: str | None
    num_params: int
    num_tensors: int
    eps: float
    directions: int
    perturbed_params: list[str] = field(default_factory=list)
    paths: list[PathCheck] = field(init=False, repr=False)

    def __post_init__(self):
        self.paths = [p for p in (self.fused, self.reference, self.raw_torch) if p is not None]

    def ok(self, tol: float = 1e-6) -> bool:
        """True when the reference and the fused gradients both agree with finite differences and
        with each other within ``tol`` (relative), and the check is not vacuous (||fd|| > 0).

        The raw-torch column is informational and does not count; a fused path that raised fails.
        """
        if not any(v != 0.0 for v in self.fd):
            return False
        for p in (self.reference, self.fused):
            if not p.ran or not p.fd_error <= tol:
                return False
        return self.fused_vs_reference is not None and self.fused_vs_reference <= tol

    def __str__(self) -> str:
        fd_norm = math.sqrt(sum(v * v for v in self.fd))
        lines = [
            f"SGFlow gradient audit: {self.num_params:,} parameters in {self.num_tensors} tensors, float64, "
            f"{self.directions} random unit directions, central differences eps={self.eps:g}",
            f"reference JVP: {self.reference_jvp}"
            + (f" (forward AD missing: {self.forward_ad_failure})" if self.forward_ad_failure else "")
            + f"; ||fd|| = {fd_norm:.3e}",
            f"{'path':<11}{'loss':>14}{'|grad|':>12}{'rel. error vs FD':>18}",
        ]
        for p in self.paths:
            if p.ran:
                lines.append(f"{p.name:<11}{p.loss:>14.6e}{p.grad_norm:>12.4e}{p.fd_error:>18.2e}")
            else:
                text = " ".join(p.error.split())
                lines.append(f"{p.name:<11}  raised: {text[:160]}{'...' if len(text) > 160 else ''}")
        fvr = "n/a (fused path raised)" if self.fused_vs_reference is None else f"{self.fused_vs_reference:.2e}"
        lines.append(f"fused vs reference, full gradient: {fvr}")
        zero = ", ".join(self.zero_grad_params) if self.zero_grad_params else "none"
        if self.perturbed_params:
            lines.append(f"zero-initialised parameters given small random values on the float64 copy: "
                         f"{len(self.perturbed_params)} ({', '.join(self.perturbed_params)})")
        lines.append(f"parameters with exactly zero reference gradient (not audited): {zero}")
        return "\n".join(lines)


def _check_no_active_dropout(model: nn.Module) -> None:
    """Finite differences need a deterministic loss: refuse active dropout (modules or attributes)."""
    for name, m in model.named_modules():
        if not m.training:
            continue
        p = None
        # Looked up without __getattr__: diffusers' models answer a missing attribute from their config
        # with a FutureWarning (their dropout modules are found as modules).
        rate = inspect.getattr_static(m, "dropout", None)
        if isinstance(m, nn.modules.dropout._DropoutNd):
            p = m.p
        elif isinstance(rate, (int, float)) and not isinstance(rate, bool):
            # e.g. nn.MultiheadAttention(dropout=p), sgflow.nn's GNSiLUConv(dropout=p)
            p = float(rate)
        if p is not None and p > 0:
            label = name or type(m).__name__
            raise ValueError(
                f"check_gradients needs a deterministic loss, but {label} ({type(m).__name__}) applies dropout "
                f"p={p:g} in training mode; call model.eval() or set p=0 before the audit"
            )


def _flat_grads(loss: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g.detach() for g, p in zip(grads, params)]


def _dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return float(sum((x * y).sum() for x, y in zip(a, b)))


def _rel(a: list[float], b: list[float]) -> float:
    num = math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b)))
    den = math.sqrt(sum(y * y for y in b))
    return num / den if den > 0 else num


@torch.no_grad()
def _restore_buffers(model: nn.Module, saved: list[torch.Tensor]) -> None:
    for buf, s in zip(model.buffers(), saved):
        buf.copy_(s)


def check_gradients(
    model: nn.Module,
    x1: torch.Tensor,
    *,
    directions: int = 4,
    eps: float = 1e-5,
    seed: int = 0,
    split_fraction: float = 0.5,
    both_terms: bool = False,
    interpolant="linear",
    include_raw_torch: bool = True,
    perturb_zero: bool = True,
) -> GradientReport:
    r"""Audit a network's SGFlow gradients against finite differences, in float64.

    Works on ``copy.deepcopy(model).double()`` (train / eval modes kept) and ``x1.double()``; the
    noise X_0 [B, *D], times t <= u [B] (uniform, half on the diagonal) and the term split [B] are
    drawn once from ``torch.Generator().manual_seed(seed)`` and passed explicitly to every path. The
    directions d_k (one tensor per parameter requiring grad, jointly of unit norm) come from the same
    generator. Running buffers (e.g. batch-norm statistics) are restored before every evaluation.

    Args:
        model: ``model(t, u, x) -> f~`` (an ``nn.Module``). x1: data batch [B, *D].
        directions: number of random directions. eps: finite-difference step along each.
        seed: seeds the batch draw and the directions.
        split_fraction, both_terms: the term assignment, as in :func:`sgflow.sgflow_loss`.
        interpolant: ``"linear"``, ``"trig"`` or an Interpolant.
        include_raw_torch: also audit ``sgflow_loss(..., decompose=False, jvp="forward")`` (its
            exception text is recorded if it raises).
        perturb_zero: give every parameter tensor that is exactly zero (a zero-initialised output layer,
            as in ``sgflow.nn``'s U-Net) small random values on the float64 copy first (std 0.1 / sqrt(fan in),
            from ``seed``), so that it and the layers before it have a gradient to audit; the names are in
            ``report.perturbed_params``, and ``report.zero_grad_params`` lists what still has none.

    Returns:
        :class:`GradientReport` (``print(report)`` shows a table; ``report.ok(tol)``).

    Raises:
        ValueError: when dropout is active (p > 0 in training mode): finite differences of a random
            loss mean nothing.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"check_gradients needs an nn.Module, got {type(model).__name__}")
    if directions < 1:
        raise ValueError(f"directions must be >= 1, got {directions}")
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")
    model64 = copy.deepcopy(model).double()
    _check_no_active_dropout(model64)
    named = [(n, p) for n, p in model64.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("check_gradients: the model has no parameters that require grad")
    names = [n for n, _ in named]
    params = [p for _, p in named]
    perturbed = []
    if perturb_zero:
        # Zero-initialised layers (output convs, adaLN gates) make every gradient before them exactly zero:
        # an audit at such a point checks little. Its own generator: the batch and directions are unchanged.
        g_init = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for n, p in named:
                if p.numel() and not bool(p.any()):
                    fan_in = p[0].numel() if p.dim() > 1 else 1
                    p.copy_(random_tensor("randn", p.shape, p.device, torch.float64, g_init) * (0.1 / math.sqrt(fan_in)))
                    perturbed.append(n)
    device = params[0].device
    x1 = x1.detach().to(device=device, dtype=torch.float64)
    buffers0 = [b.detach().clone() for b in model64.buffers()]

    # One CPU generator for every draw: the audit is reproducible across devices.
    gen = torch.Generator().manual_seed(seed)
    batch = x1.shape[0]
    noise = random_tensor("randn", x1.shape, device, torch.float64, gen)
    t, u = TimeSampler()(batch, device=device, dtype=torch.float64, generator=gen)
    split = None
    if not both_terms:
        if not 0.0 < split_fraction < 1.0:
            raise ValueError(f"split_fraction must lie in (0, 1), got {split_fraction}")
        split = random_tensor("rand", (batch,), device, torch.float32, gen) < split_fraction
    dirs = []
    for _ in range(directions):
        d = [random_tensor("randn", p.shape, device, torch.float64, gen) for p in params]
        norm = math.sqrt(sum(float(x.square().sum()) for x in d))
        dirs.append([x / norm for x in d])
    kw = dict(noise=noise, t=t, u=u, split=split, both_terms=both_terms, interpolant=interpolant)

    def run(name: str, fn) -> tuple[PathCheck, list[torch.Tensor] | None]:
        _restore_buffers(model64, buffers0)
        try:
            loss, _ = fn()
            grads = _flat_grads(loss, params)
        except Exception as err:  # recorded, not raised: a failing path is a finding of the audit
            return PathCheck(name, error=f"{type(err).__name__}: {err}"), None
        check = PathCheck(
            name,
            loss=float(loss.detach()),
            directional=[_dot(grads, d) for d in dirs],
            grad_norm=math.sqrt(sum(float(g.square().sum()) for g in grads)),
        )
        return check, grads

    from sgflow.losses.fused import fused_loss  # here: fused imports the reference module

    fused, g_fused = run("fused", lambda: fused_loss(model64, x1, **kw))
    reference, g_ref = run("reference", lambda: sgflow_loss(model64, x1, jvp="auto", **kw))
    if g_ref is None:
        raise RuntimeError(f"check_gradients: the reference loss failed on this model: {reference.error}")
    failure = forward_ad_failure(model64, decompose=True)
    method = "double_vjp" if failure else "forward"
    raw = None
    if include_raw_torch:
        raw, _ = run("raw torch", lambda: sgflow_loss(model64, x1, jvp="forward", decompose=False, **kw))

    # Finite differences on a frozen copy (no parameter graph), rows fixed at theta.
    _restore_buffers(model64, buffers0)
    b = draw_batch(x1, interpolant=interpolant, noise=noise, t=t, u=u)
    with decomposed():
        rows = sgflow_rows(model64, b, split, both_terms, split_fraction, None)
    model_fd = copy.deepcopy(model64).requires_grad_(False)
    params_fd = [dict(model_fd.named_parameters())[n] for n in names]
    theta = [p.detach().clone() for p in params_fd]

    def loss_at(d: list[torch.Tensor], step: float) -> float:
        with torch.no_grad():
            for p, p0, dd in zip(params_fd, theta, d):
                p.copy_(p0 + step * dd)
        _restore_buffers(model_fd, buffers0)
        loss, _ = sgflow_loss_on_rows(model_fd, b, rows, jvp=method, decompose=True)
        return float(loss.detach())

    # Safety net for randomness the dropout scan cannot see (e.g. F.dropout(..., training=True) in a
    # forward): the loss at theta must reproduce the reference path's value.
    loss0 = loss_at([torch.zeros_like(p) for p in params_fd], 0.0)
    if abs(loss0 - reference.loss) > 1e-9 * max(1.0, abs(reference.loss)):
        raise RuntimeError(
            f"check_gradients: the loss is not deterministic ({reference.loss!r} vs {loss0!r} on the same batch "
            "and parameters); remove randomness from the forward (dropout: model.eval() or p=0)"
        )
    fd = [(loss_at(d, eps) - loss_at(d, -eps)) / (2 * eps) for d in dirs]
    for p in (fused, reference, raw):
        if p is not None and p.ran:
            p.fd_error = _rel(p.directional, fd)

    fvr = None
    if g_fused is not None:
        flat_f = torch.cat([g.flatten() for g in g_fused])
        flat_r = torch.cat([g.flatten() for g in g_ref])
        den = flat_r.norm()
        fvr = float((flat_f - flat_r).norm() / den) if den > 0 else float(flat_f.norm())
    zero = [n for n, g in zip(names, g_ref) if not bool(g.any())]
    return GradientReport(
        fd=fd,
        fused=fused,
        reference=reference,
        raw_torch=raw,
        fused_vs_reference=fvr,
        zero_grad_params=zero,
        reference_jvp=method,
        forward_ad_failure=failure,
        num_params=sum(p.numel() for p in params),
        num_tensors=len(params),
        eps=eps,
        directions=directions,
        perturbed_params=perturbed,
    )
