"""Dead tails of recomputed blocks (``sgflow.autodual.tails``): a block's last convolutions / linear layers, whose
outputs no later op of the block saves, return empty outputs in the block's recomputation instead of computing
them. Their gradients must equal those with the skipping off bit for bit, and the reference's; wherever a tail's
output is read by an op that saves it or takes a value from it, it must be computed.
"""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sgflow
import sgflow.autodual.call as call
import sgflow.ops.recompute as recompute
import testnets
from sgflow.testing import rel_err


@contextlib.contextmanager
def _counting():
    """The number of dual ops that skipped their outputs (``outputs_unused``) while inside."""
    count = [0]
    orig = recompute.outputs_unused

    @contextlib.contextmanager
    def counted(meta):
        count[0] += 1
        with orig(meta):
            yield

    recompute.outputs_unused = counted
    try:
        yield count
    finally:
        recompute.outputs_unused = orig


def _grads(model, x1, blocks, skip, seed=1, **kw):
    """(loss, parameter gradients, ops skipped) of the fused loss with dead tails skipped or not."""
    before = call.SKIP_DEAD_TAILS
    call.SKIP_DEAD_TAILS = skip
    try:
        dual = sgflow.dualize(model, blocks=blocks)
        torch.manual_seed(seed)
        loss, _ = sgflow.fused_loss(dual, x1, **kw)
        with _counting() as count:
            grads = _grad(loss, model)
    finally:
        call.SKIP_DEAD_TAILS = before
    return loss, grads, count[0]


def _reference(model, x1, seed=1, **kw):
    torch.manual_seed(seed)
    loss, _ = sgflow.sgflow_loss(model, x1, **kw)
    return loss, _grad(loss, model)


def _grad(loss, model):
    """Every parameter's gradient (zeros for one the loss does not reach)."""
    params = list(model.parameters())
    return [torch.zeros_like(p) if g is None else g
            for p, g in zip(params, torch.autograd.grad(loss, params, allow_unused=True))]


NETS = {  # network, data shape, constructor arguments, tail ops skipped in one step's recomputations (at least)
    "edm": ("edm", (3, 16, 16), {}, 15),
    "adm": ("adm", (3, 16, 16), {}, 10),
    "dit": ("dit", (3, 8, 8), {"depth": 2, "hidden_size": 32, "patch_size": 2}, 2),
    "mlp": ("mlp", (16,), {}, 4),
}


@pytest.mark.parametrize("net", list(NETS))
def test_test_networks_skip_tails_with_equal_gradients(net):
    """Every block recomputed: some tail ops are skipped, and loss and gradients equal those computed with the
    skipping off bit for bit (the skipped outputs reach nothing the backward reads) and the torch.func.jvp
    reference to 1e-10 (float64)."""
    name, shape, kw, least = NETS[net]
    torch.manual_seed(0)
    model = testnets.build(name, shape, **kw).double()
    x1 = torch.randn(4, *shape, dtype=torch.float64)
    loss_on, g_on, skipped = _grads(model, x1, "all", True)
    loss_off, g_off, none = _grads(model, x1, "all", False)
    loss_ref, g_ref = _reference(model, x1)
    assert skipped >= least and none == 0, (skipped, none)
    assert torch.equal(loss_on, loss_off) and all(torch.equal(a, b) for a, b in zip(g_on, g_off))
    assert rel_err(loss_on, loss_ref) < 1e-10 and max(rel_err(a, b) for a, b in zip(g_on, g_ref)) < 1e-10


class _Block(nn.Module):
    """conv1 -> SiLU -> conv2 (the SiLU fused into conv2, which saves conv1's output), then one way to use
    conv2's output ``y``: only ``pass`` leaves it dead in the recomputation."""

    def __init__(self, mode):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.gate = nn.Parameter(torch.randn(4, 1, 1) * 0.5)
        self.mode = mode

    def forward(self, x):
        y = self.conv2(F.silu(self.conv1(x)))
        m = self.mode
        if m == "pass":  # sums, scalar products, views, concatenation: nothing saved
            z = (y + x) * 0.5 - x / 3.0
            return torch.cat([z.flatten(1), (-y).reshape(y.shape[0], -1)], 1).view(y.shape[0], 8, *y.shape[2:])[:, :4]
        if m == "gated":  # a product with a parameter saves y (for the parameter's gradient)
            return x + y * self.gate
        if m == "norm":  # the GroupNorm saves y
            return x + F.group_norm(y, 2)
        if m == "compare":  # a value taken from y: the mask's values come from y
            return torch.where(y > 0, x, -x) + y
        if m == "detach":
            return x + y.detach() * x
        if m == "inplace":
            y += x
            return y * 2.0
        if m == "activation":
            return x + F.silu(y)
        raise ValueError(m)


class _Net(nn.Module):
    def __init__(self, mode):
        super().__init__()
        self.inp = nn.Conv2d(3, 4, 3, padding=1)
        self.block = _Block(mode)
        self.out = nn.Conv2d(4, 3, 3, padding=1)

    def forward(self, t, u, x):
        h = self.inp(x) * (1 + t[:, None, None, None]) + u[:, None, None, None]
        return self.out(self.block(h))


@pytest.mark.parametrize("mode,skipped", [("pass", 1), ("gated", 0), ("norm", 0), ("compare", 0), ("detach", 0),
                                          ("inplace", 0), ("activation", 0)])
def test_a_tail_is_skipped_only_where_nothing_reads_it(mode, skipped):
    """conv2's output passed through sums, scalar products, views and cat to the block's output: skipped (conv1's
    is not: conv2 saves it). Read by a product with a parameter, a GroupNorm, a comparison, ``detach``, an in-place
    op or an activation: computed. Gradients equal the reference in every case (float64)."""
    torch.manual_seed(2)
    model = _Net(mode).double()
    x1 = torch.randn(3, 3, 7, 5, dtype=torch.float64)
    loss, g, n = _grads(model, x1, ["block"], True)
    loss_ref, g_ref = _reference(model, x1)
    assert n == skipped
    assert rel_err(loss, loss_ref) < 1e-10 and max(rel_err(a, b) for a, b in zip(g, g_ref)) < 1e-10


def test_row_slices_skip_the_tail_in_each_slice():
    """A block run in 3 row slices skips its tail once per slice; gradients equal the reference (float64)."""
    from sgflow.autodual.plan import RowSplit

    torch.manual_seed(3)
    model = _Net("pass").double()
    x1 = torch.randn(5, 3, 7, 5, dtype=torch.float64)
    dual = sgflow.dualize(model, blocks=["block"])
    torch.manual_seed(1)
    sgflow.fused_loss(dual, x1)  # a first call, as the plan's
    dual.splits = {"block": RowSplit(3, (0,))}
    torch.manual_seed(1)
    loss, _ = sgflow.fused_loss(dual, x1)
    with _counting() as count:
        grads = _grad(loss, model)
    loss_ref, g_ref = _reference(model, x1)
    assert count[0] == 3
    assert rel_err(loss, loss_ref) < 1e-10 and max(rel_err(a, b) for a, b in zip(grads, g_ref)) < 1e-10
