"""The dual-forward protocol and the fallback for networks (or layers) without a dual form.

A network supports the fused path when it has ``dual_forward(t, u, x, t_dot, u_dot, x_dot) ->
(ftilde, ftilde_dot)``: its output and its JVP in direction (t_dot, u_dot, x_dot), computed with
explicit tangents. Networks and layers without one are wrapped in :class:`JVPDual`, which gets the
JVP from ``torch.func.jvp`` — correct, but without the memory savings of the fused ops.
"""
from __future__ import annotations

import torch
from torch import nn

from sgflow.checks import check_model_output


class JVPDual(nn.Module):
    """Give any module a dual form through ``torch.func.jvp``.

    As a whole network (``module(t, u, x)``): ``dual_forward(t, u, x, t_dot, u_dot, x_dot)``.
    As a layer (``module(x)``): ``dual(x, x_dot) -> (y, y_dot)``. The gradient flows through the
    tangent (reverse over forward), so it composes with the fused ops of the other layers.
    """

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def dual(self, x: torch.Tensor, x_dot: torch.Tensor):
        return torch.func.jvp(self.module, (x,), (x_dot,))

    def dual_forward(self, t, u, x, t_dot, u_dot, x_dot):
        return torch.func.jvp(self.module, (t, u, x), (t_dot, u_dot, x_dot))


def unwrap_parallel(model: nn.Module) -> nn.Module:
    """The inner module of DataParallel / DistributedDataParallel wrappers."""
    while isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        model = model.module
    return model


def dual_forward(model, t, u, x, t_dot, u_dot, x_dot):
    """(f~, JVP f~) of any model, with checks: both of x's shape.

    t, u, t_dot, u_dot: [B]; x, x_dot: [B, *D]. A model with its own ``dual_forward`` (a
    :class:`sgflow.dualize.DualizedModel`, an ``sgflow.nn`` network) uses it; any other model —
    and any model wrapped in (Distributed)DataParallel, whose forward must run for its gradient
    sync — is dualized through its own forward (:func:`sgflow.dualize`, once per model).
    """
    from sgflow.autodual import as_dual_model, dual_call

    if not isinstance(model, nn.Module):
        if not callable(model):
            raise TypeError(f"the model must be an nn.Module or a callable model(t, u, x), got {type(model).__name__}")
        # A plain function: the tangent travels through it the same way, with no blocks to recompute.
        out, out_dot = dual_call(model, (t, u, x), (t_dot, u_dot, x_dot))
    else:
        out, out_dot = as_dual_model(model).dual_forward(t, u, x, t_dot, u_dot, x_dot)
    out = check_model_output(out, x, "model.dual_forward(...)[0]")
    out_dot = check_model_output(out_dot, x, "model.dual_forward(...)[1]")
    return out, out_dot
