"""The dual-forward protocol: ``dual_forward(t, u, x, t_dot, u_dot, x_dot) -> (ftilde, ftilde_dot)``.

Any network gets one from :func:`sgflow.dualize` (through its own forward; what the fused losses do
for a plain model, ``sgflow.nn``'s included). :class:`JVPDual` gives one
from ``torch.func.jvp`` (correct, with the memory cost of forward AD; kept for comparison).
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

    # Under sgflow.decompose.decomposed(): PyTorch's layer/batch/instance-norm JVP gradients are wrong
    # (pytorch#196700, #196699) and the fused SDPA kernels have no forward AD.
    def dual(self, x: torch.Tensor, x_dot: torch.Tensor):
        from sgflow.decompose import decomposed

        with decomposed():
            return torch.func.jvp(self.module, (x,), (x_dot,))

    def dual_forward(self, t, u, x, t_dot, u_dot, x_dot):
        from sgflow.decompose import decomposed

        with decomposed():
            return torch.func.jvp(self.module, (t, u, x), (t_dot, u_dot, x_dot))


def unwrap_parallel(model: nn.Module) -> nn.Module:
    """The inner module of DataParallel / DistributedDataParallel wrappers."""
    while isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        model = model.module
    return model


def dual_forward(model, t, u, x, t_dot, u_dot, x_dot):
    """(f~, JVP f~) of any model, with checks: both of x's shape.

    t, u, t_dot, u_dot: [B]; x, x_dot: [B, *D]. A model with its own ``dual_forward`` (a
    :class:`sgflow.DualizedModel`, or one a user wrote) uses it; any other model —
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
