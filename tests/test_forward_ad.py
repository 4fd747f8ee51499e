"""One classifier of "forward-mode AD cannot run this" (sgflow.forward_ad), shared by the reference loss's
jvp="auto" switch and the dual engine's forward-AD fallback: real torch errors in, a one-line reason or None out."""
import pytest
import torch
import torch.nn.functional as F

import sgflow
from sgflow.forward_ad import missing_forward_ad


class _NoJvp(torch.autograd.Function):
    @staticmethod
    def forward(x):
        return x.sin()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * x.cos()


def _jvp_error(fn, x):
    with pytest.raises((RuntimeError, NotImplementedError)) as info:
        torch.func.jvp(fn, (x,), (torch.ones_like(x),))
    return info.value


def _grid_sample(x):
    grid = torch.zeros(x.shape[0], 2, 2, 2, dtype=x.dtype)
    return F.grid_sample(x, grid + x.mean(), align_corners=False)


def _inplace_on_captured(x, buf=torch.zeros(3, dtype=torch.float64)):
    buf.add_(x.detach()[0])  # a running statistic updated in place, as BatchNorm does in training mode
    return x * 2


@pytest.mark.parametrize("case", ["op_without_formula", "function_without_jvp", "inplace_on_captured"])
def test_forward_ad_failures_are_recognised(case):
    if case == "op_without_formula":
        err = _jvp_error(_grid_sample, torch.randn(1, 1, 4, 4, dtype=torch.float64))
        assert missing_forward_ad(err) == "grid_sampler_2d has no forward-mode AD formula"
    elif case == "function_without_jvp":
        err = _jvp_error(_NoJvp.apply, torch.randn(3, dtype=torch.float64))
        assert missing_forward_ad(err) is not None
    else:
        bn = torch.nn.BatchNorm1d(3).double().train()
        err = _jvp_error(bn, torch.randn(4, 3, dtype=torch.float64))
        assert "captured tensor" in missing_forward_ad(err)


@pytest.mark.parametrize("msg", [
    "mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)",
    '"addmm_impl_cpu_" not implemented for \'Half\'',  # a dtype gap, not a forward-AD one
    "CUDA out of memory. Tried to allocate 2.00 GiB",
])
def test_other_errors_are_not(msg):
    assert missing_forward_ad(RuntimeError(msg)) is None


def test_the_engine_names_the_op_and_the_fix():
    class GridSampleMap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 2)

        def forward(self, t, u, x):
            grid = self.lin(torch.stack([t, u], -1))[:, None, None, :].expand(-1, 2, 2, 2)
            return F.grid_sample(x, grid, align_corners=False).expand_as(x)

    model = GridSampleMap().double()
    x1 = torch.randn(2, 1, 2, 2, dtype=torch.float64)
    with pytest.raises(sgflow.autodual.DualizeError, match="grid_sampler_2d has no forward-mode AD formula.*register_rule"):
        sgflow.fused_loss(model, x1)
