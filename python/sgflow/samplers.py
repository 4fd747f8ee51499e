"""Samplers: multi-step flow-map jumps, and Euler / Heun ODE integration for velocity models.

Time runs from t=0 (noise) to t=1 (data).
"""
from __future__ import annotations

import torch

from sgflow.checks import check_data, check_model_output
from sgflow.losses.common import flow_map


def time_grid(steps: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Uniform grid 0 = t_0 < t_1 < ... < t_steps = 1, shape [steps + 1]."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    return torch.linspace(0.0, 1.0, steps + 1, device=device, dtype=dtype)


def _grid(steps, grid, x):
    if grid is None:
        return time_grid(steps, device=x.device, dtype=x.dtype)
    grid = torch.as_tensor(grid, device=x.device, dtype=x.dtype)
    if grid.dim() != 1 or grid.numel() < 2:
        raise ValueError("grid must be a 1-D increasing sequence of at least two times")
    if bool((grid[1:] < grid[:-1]).any()) or bool((grid < 0).any()) or bool((grid > 1).any()):
        raise ValueError("grid must be non-decreasing within [0, 1]")
    return grid


@torch.no_grad()
def sample_flow_map(model, x0: torch.Tensor, steps: int = 1, grid=None) -> torch.Tensor:
    """Jump along a time grid with the flow map: x <- f(t_i, t_{i+1}, x) = x + (t_{i+1}-t_i) f~(t_i, t_{i+1}, x).

    x0: noise [B, *D]; returns samples [B, *D] at t = grid[-1] (1 by default).
    """
    check_data(x0, "x0")
    grid = _grid(steps, grid, x0)
    x = x0
    ones = torch.ones(x0.shape[0], device=x0.device, dtype=x0.dtype)
    for t0, t1 in zip(grid[:-1], grid[1:]):
        x = flow_map(model, ones * t0, ones * t1, x)
    return x


def _velocity(model, t, x):
    return check_model_output(model(t, t, x), x, "model(t, t, x)")


@torch.no_grad()
def sample_euler(model, x0: torch.Tensor, steps: int = 100, grid=None) -> torch.Tensor:
    """Euler on dx/dt = v(t, x) with v = f~(t, t, x): x <- x + h v(t, x). x0: [B, *D]."""
    check_data(x0, "x0")
    grid = _grid(steps, grid, x0)
    x = x0
    ones = torch.ones(x0.shape[0], device=x0.device, dtype=x0.dtype)
    for t0, t1 in zip(grid[:-1], grid[1:]):
        x = x + (t1 - t0) * _velocity(model, ones * t0, x)
    return x


@torch.no_grad()
def sample_heun(model, x0: torch.Tensor, steps: int = 50, grid=None) -> torch.Tensor:
    """Heun (trapezoidal predictor-corrector) on dx/dt = f~(t, t, x); 2 evaluations per step."""
    check_data(x0, "x0")
    grid = _grid(steps, grid, x0)
    x = x0
    ones = torch.ones(x0.shape[0], device=x0.device, dtype=x0.dtype)
    for t0, t1 in zip(grid[:-1], grid[1:]):
        h = t1 - t0
        v0 = _velocity(model, ones * t0, x)
        x_pred = x + h * v0
        v1 = _velocity(model, ones * t1, x_pred)
        x = x + 0.5 * h * (v0 + v1)
    return x


SAMPLERS = {"flow_map": sample_flow_map, "euler": sample_euler, "heun": sample_heun}


def sample(model, x0, steps: int, method: str = "flow_map", grid=None):
    """Dispatch to :func:`sample_flow_map`, :func:`sample_euler` or :func:`sample_heun` by name."""
    if method not in SAMPLERS:
        raise ValueError(f"unknown sampler {method!r}; expected one of {sorted(SAMPLERS)}")
    return SAMPLERS[method](model, x0, steps=steps, grid=grid)
