"""Base class of the flow-map networks: the calling protocol and input validation.

A network is called as ``net(t, u, x) -> ftilde`` (t, u: [B]; ftilde of x's shape). It has one
forward: the fused losses carry the tangent through that same forward with :func:`sgflow.dualize`
(docs/DESIGN.md, "Dual (fused) protocol").
"""
from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["FlowMapNet"]


class FlowMapNet(nn.Module):
    """Validates inputs, then calls ``_forward(t, u, x)``.

    Subclasses implement ``_check_x(x)`` (raise on a wrong shape) and ``_forward``.
    Times of another floating dtype than x are cast to x's dtype (the losses pass them that way).
    """

    def _check_x(self, x: torch.Tensor) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _forward(self, t, u, x):  # pragma: no cover - abstract
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

    def forward(self, t: torch.Tensor, u: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """ftilde(t, u, x): t, u [B]; x [B, *D] -> [B, *D]."""
        t, u = self._check_inputs(t, u, x)
        return self._forward(t, u, x)
