"""Base class of the flow-map networks: the calling protocol and input validation.

A network is called as ``net(t, u, x) -> ftilde`` (t, u: [B]; ftilde of x's shape) and
``net.dual_forward(t, u, x, t_dot, u_dot, x_dot) -> (ftilde, ftilde_dot)`` where ftilde_dot is the
JVP of ftilde at (t, u, x) in direction (t_dot, u_dot, x_dot), computed with explicit tangents on the
same weights (docs/DESIGN.md, "Dual (fused) protocol").
"""
from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["FlowMapNet"]


class FlowMapNet(nn.Module):
    """Validates inputs, then calls ``_forward(t, u, x)`` / ``_dual_forward(t, u, x, t_dot, u_dot, x_dot)``.

    Subclasses implement ``_check_x(x)`` (raise on a wrong shape), ``_forward`` and ``_dual_forward``.
    Times of another floating dtype than x are cast to x's dtype (the losses pass them that way).
    """

    def _check_x(self, x: torch.Tensor) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _forward(self, t, u, x):  # pragma: no cover - abstract
        raise NotImplementedError

    def _dual_forward(self, t, u, x, t_dot, u_dot, x_dot):  # pragma: no cover - abstract
        raise NotImplementedError

    def _check_inputs(self, t, u, x):
        name = type(self).__name__
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name}: x must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name}: x must be a floating-point tensor, got dtype {x.dtype}")
        if x.dim() == 0 or x.shape[0] == 0:
            raise ValueError(f"{name}: x must be a non-empty batch [B, ...], got shape {tuple(x.shape)}")
        self._check_x(x)
        batch = x.shape[0]
        out = []
        for tname, s in (("t", t), ("u", u)):
            if not isinstance(s, torch.Tensor):
                raise TypeError(f"{name}: {tname} must be a torch.Tensor of shape [{batch}], got {type(s).__name__}")
            if not s.is_floating_point():
                raise TypeError(f"{name}: {tname} must be a floating-point tensor, got dtype {s.dtype}")
            if s.shape != (batch,):
                raise ValueError(f"{name}: {tname} must have shape [B] = [{batch}] (one time per sample), got {tuple(s.shape)}")
            if s.device != x.device:
                raise ValueError(f"{name}: {tname} is on {s.device} but x is on {x.device}")
            out.append(s.to(x.dtype))
        return out[0], out[1]

    def _check_tangents(self, t, x, t_dot, u_dot, x_dot):
        name = type(self).__name__
        if not isinstance(x_dot, torch.Tensor) or x_dot.shape != x.shape:
            shape = tuple(x_dot.shape) if isinstance(x_dot, torch.Tensor) else type(x_dot).__name__
            raise ValueError(f"{name}: x_dot must have x's shape {tuple(x.shape)}, got {shape}")
        if x_dot.dtype != x.dtype or x_dot.device != x.device:
            raise TypeError(f"{name}: x_dot must match x in dtype and device ({x.dtype}, {x.device}), got ({x_dot.dtype}, {x_dot.device})")
        out = []
        for tname, s in (("t_dot", t_dot), ("u_dot", u_dot)):
            if s is None:
                out.append(torch.zeros_like(t))
                continue
            if not isinstance(s, torch.Tensor) or not s.is_floating_point() or s.shape != t.shape:
                shape = tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
                raise ValueError(f"{name}: {tname} must be a floating tensor of shape {tuple(t.shape)} (or None for 0), got {shape}")
            if s.device != x.device:
                raise ValueError(f"{name}: {tname} is on {s.device} but x is on {x.device}")
            out.append(s.to(x.dtype))
        return out[0], out[1]

    def forward(self, t: torch.Tensor, u: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """ftilde(t, u, x): t, u [B]; x [B, *D] -> [B, *D]."""
        t, u = self._check_inputs(t, u, x)
        return self._forward(t, u, x)

    def dual_forward(self, t, u, x, t_dot, u_dot, x_dot):
        """``(ftilde, ftilde_dot)``: ftilde(t, u, x) and its JVP in direction (t_dot, u_dot, x_dot).

        Args:
            t, u: [B] times; x: [B, *D].
            t_dot, u_dot: [B] time tangents (None means zero); x_dot: [B, *D].

        Returns:
            Two tensors of x's shape.
        """
        t, u = self._check_inputs(t, u, x)
        t_dot, u_dot = self._check_tangents(t, x, t_dot, u_dot, x_dot)
        return self._dual_forward(t, u, x, t_dot, u_dot, x_dot)
