"""Pieces shared by every loss: drawing the batch (noise, times, X_t, Xdot_t) and reductions."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sgflow.checks import check_data, check_finite, check_like, check_model_output, check_time_pair, check_times
from sgflow.interpolants import Interpolant, get_interpolant
from sgflow.times import TimeSampler, random_tensor


def mean_sq(x: torch.Tensor) -> torch.Tensor:
    """Per-sample squared norm, averaged over the feature dims: [B, *D] -> [B]."""
    return x.pow(2).flatten(1).mean(1)


def bcast(coef: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """[B] -> [B, 1, ..., 1] matching ``x.dim()``."""
    return coef.reshape(coef.shape[0], *([1] * (x.dim() - 1)))


def flow_map(model, t: torch.Tensor, u: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """f(t, u, x) = x + (u - t) * model(t, u, x).  t, u: [B]; x: [B, *D]."""
    out = check_model_output(model(t, u, x), x)
    return x + bcast(u - t, x) * out


@dataclass
class Batch:
    """One drawn training batch. x0: noise [B, *D]; t, u: [B]; xt, xdot: X_t and Xdot_t [B, *D]."""

    x1: torch.Tensor
    x0: torch.Tensor
    t: torch.Tensor
    u: torch.Tensor
    xt: torch.Tensor
    xdot: torch.Tensor


def draw_batch(
    x1: torch.Tensor,
    *,
    interpolant: "str | Interpolant" = "linear",
    time_sampler: TimeSampler | None = None,
    noise: torch.Tensor | None = None,
    t: torch.Tensor | None = None,
    u: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    diagonal: bool = False,
) -> Batch:
    """Validate inputs and draw whatever was not given explicitly.

    Every loss starts here: x1 and a given ``noise`` must be finite (a ``ValueError`` naming the tensor and
    its first bad index, :func:`sgflow.checks.check_finite`).

    ``diagonal=True`` (flow matching) sets u = t and ignores ``u``. Explicit ``noise``, ``t`` and
    ``u`` make two loss implementations comparable on identical inputs.
    """
    check_data(x1)
    check_finite(x1, "x1")
    batch = x1.shape[0]
    interp = get_interpolant(interpolant)
    if noise is None:
        noise = random_tensor("randn", x1.shape, x1.device, x1.dtype, generator)
    else:
        check_like(noise, x1, "noise")
        check_finite(noise, "noise")
    if t is not None:
        check_times(t, batch, x1, "t")
    if u is not None and not diagonal:
        check_times(u, batch, x1, "u")
    sampler = time_sampler or TimeSampler()
    if diagonal:
        # Flow matching: t from the sampler's base distribution, not the min of a pair.
        if t is None:
            t = sampler.sample_diagonal(batch, device=x1.device, dtype=x1.dtype, generator=generator)
    elif t is None or u is None:
        t_draw, u_draw = sampler(batch, device=x1.device, dtype=x1.dtype, generator=generator)
        if t is None and u is None:
            t, u = t_draw, u_draw
        elif u is None:
            # A given t with a drawn u: keep u on or above t.
            u = torch.maximum(u_draw, t)
        else:
            t = torch.minimum(t_draw, u)
    if diagonal:
        u = t
    check_time_pair(t, u, batch, x1)
    t = t.to(x1.dtype)
    u = u.to(x1.dtype)
    xt, xdot = interp.interpolate(noise, x1, t)
    return Batch(x1=x1, x0=noise, t=t, u=u, xt=xt, xdot=xdot)
