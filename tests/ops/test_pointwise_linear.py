"""The elementwise -> linear / conv dual ops (``sgflow.ops.conv_linear.PointwiseLinearDual``: a transformer
MLP's GELU -> fc2; ``PointwiseConvDual``: a U-Net block's SiLU -> conv) and the dual engine's fusion into
them (a lazy GELU / SiLU node read by ``F.linear`` or a convolution).

Reference: ``torch.func.jvp`` of ``x -> f(x) W^T + b`` in float64 for (y, y_dot), and autograd of
``<G, y> + <Gd, y_dot>`` through it for the gradients of x, x_dot, W and b.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sgflow
from sgflow.autodual.rules.pointwise import _SPECS
from sgflow.memory import saved_tensor_bytes
from sgflow.ops.conv_linear import PointwiseConvDual, PointwiseLinearDual
from sgflow.testing import rel_err

ACTS = {"gelu_tanh": (lambda a: F.gelu(a, approximate="tanh"), "gelu", "tanh"),
        "gelu_erf": (F.gelu, "gelu", "none"),
        "silu": (F.silu, "silu", None)}


def _case(shape, n_out, bias, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x, x_dot = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 for _ in range(2))
    w = torch.randn(n_out, shape[-1], generator=g, dtype=torch.float64) / shape[-1] ** 0.5
    b = torch.randn(n_out, generator=g, dtype=torch.float64) if bias else None
    cot = [torch.randn(*shape[:-1], n_out, generator=g, dtype=torch.float64) for _ in range(2)]
    return [None if t is None else t.to(dtype) for t in (x, x_dot, w, b, *cot)]


def _reference(fn, x, x_dot, w, b, gy, gyd):
    leaves = [t.double().requires_grad_() for t in (x, x_dot, w)] + ([b.double().requires_grad_()] if b is not None else [])
    xr, xdr, wr = leaves[:3]
    br = leaves[3] if b is not None else None
    y, y_dot = torch.func.jvp(lambda a: F.linear(fn(a), wr, br), (xr,), (xdr,))
    loss = sum((o * c.double()).sum() for o, c in ((y, gy), (y_dot, gyd)) if c is not None)
    return (y, y_dot), torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)


@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("shape,bias", [((7, 5, 63), True), ((1, 63), False), ((3, 2, 4, 9), True)],
                         ids=["7x5x63-bias", "batch1-nobias", "4d-bias"])
@pytest.mark.parametrize("which", ["both", "primal", "tangent"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4), (torch.bfloat16, 3e-2)],
                         ids=["fp64", "fp32", "bf16"])
def test_pointwise_linear_matches_jvp_reference(act, shape, bias, which, dtype, tol):
    fn, name, extra = ACTS[act]
    x, x_dot, w, b, gy, gyd = _case(shape, 11, bias, dtype, seed=len(shape) * 7 + bias)
    gy = gy if which != "tangent" else None
    gyd = gyd if which != "primal" else None
    (yr, ydr), ref = _reference(fn, x, x_dot, w, b, gy, gyd)
    leaves = [t.clone().requires_grad_() for t in (x, x_dot, w)] + ([b.clone().requires_grad_()] if b is not None else [])
    y, y_dot = PointwiseLinearDual.apply(*leaves[:3], leaves[3] if b is not None else None, _SPECS[name], extra)
    assert rel_err(y, yr) < tol and rel_err(y_dot, ydr) < tol
    loss = sum((o * c).sum() for o, c in ((y, gy), (y_dot, gyd)) if c is not None)
    got = torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)
    for name_, a, r in zip(("x", "x_dot", "w", "b"), got, ref):
        assert a.dtype == dtype
        assert rel_err(a, r) < tol if r.abs().max() > 0 else a.abs().max() == 0, (act, which, name_)


def test_pointwise_linear_saves_the_activations_input_only_and_passes_gradcheck():
    """Saved: x, x_dot (and W, a parameter); not the activation f(x), f'(x) x_dot. Its backward passes
    gradcheck in float64 (GELU and SiLU)."""
    x, x_dot, w, b, *_ = _case((6, 13), 9, True, torch.float64, seed=3)
    w, b = nn.Parameter(w), nn.Parameter(b)
    xa, xda = x.clone().requires_grad_(), x_dot.clone().requires_grad_()

    def step():  # x, x_dot made inside (not leaves, which count as parameters); sums save nothing
        y, y_dot = PointwiseLinearDual.apply(xa * 2.0, xda * 2.0, w, b, _SPECS["gelu"], "tanh")
        return y.sum() + y_dot.sum()

    saved = saved_tensor_bytes(step)
    assert saved["bytes"] == 2 * x.numel() * 8, saved
    small = [t[:2, :4].clone().requires_grad_() for t in (x, x_dot)] + [w[:3, :4].detach().clone().requires_grad_(),
                                                                          b[:3].detach().clone().requires_grad_()]
    for name, extra in (("gelu", "tanh"), ("silu", None)):
        fn = lambda xx, xd, ww, bb, n=name, e=extra: PointwiseLinearDual.apply(xx, xd, ww, bb, _SPECS[n], e)  # noqa: E731
        assert torch.autograd.gradcheck(fn, small)


class _MLP(nn.Module):
    def __init__(self, act):
        super().__init__()
        self.fc1, self.fc2, self.side = nn.Linear(63, 40), nn.Linear(40, 63), nn.Linear(40, 5)
        self.act = act

    def forward(self, h):
        a = self.act(self.fc1(h))
        return self.fc2(a), self.side(a) * 2.0, a.square().mean(-1)  # two linear readers and a plain one


@pytest.mark.parametrize("act", list(ACTS))
def test_engine_fuses_the_activation_into_the_linear_layers_reading_it(act):
    """make_dual -> fc1 -> GELU / SiLU -> (fc2, another linear, a square): values and gradients (x, x_dot and
    the parameters) equal the reference in float64 with the fusion, and equal the unfused engine's."""
    import sgflow.autodual.rules.fusions as pw

    torch.manual_seed(5)
    model = _MLP(ACTS[act][0]).double()
    g = torch.Generator().manual_seed(6)
    h, h_dot = (torch.randn(3, 7, 63, generator=g, dtype=torch.float64) for _ in range(2))
    cots = None
    results = {}
    for fused in (True, False):
        pw.LAZY_POINTWISE = ("gelu", "silu") if fused else ()
        try:
            ha, hda = h.clone().requires_grad_(), h_dot.clone().requires_grad_()
            outs = model(sgflow.autodual.make_dual(ha, hda))
            vals = [v for o in outs for v in (sgflow.autodual.primal(o), sgflow.autodual.tangent(o))]
            if cots is None:
                cots = [torch.randn(v.shape, generator=g, dtype=torch.float64) for v in vals]
            loss = sum((v * c).sum() for v, c in zip(vals, cots))
            grads = torch.autograd.grad(loss, [ha, hda, *model.parameters()])
            results[fused] = (vals, grads)
        finally:
            pw.LAZY_POINTWISE = ("gelu", "silu")
    for a, b in zip(results[True][0] + list(results[True][1]), results[False][0] + list(results[False][1])):
        assert rel_err(a, b) < 1e-12
    # The reference: forward-mode JVP of the model, autograd through it.
    ha, hda = h.clone().requires_grad_(), h_dot.clone().requires_grad_()
    outs, touts = torch.func.jvp(model, (ha,), (hda,))
    vals = [v for o, t in zip(outs, touts) for v in (o, t)]
    loss = sum((v * c).sum() for v, c in zip(vals, cots))
    ref = torch.autograd.grad(loss, [ha, hda, *model.parameters()])
    for a, b in zip(results[True][0] + list(results[True][1]), vals + list(ref)):
        assert rel_err(a, b) < 1e-10


def test_engine_mlp_keeps_no_activation_output():
    """fc2(GELU(fc1(h))) through the dual engine saves fc1's input and output pairs only: the GELU's output
    pair (what the unfused engine keeps for fc2) is gone."""
    import sgflow.autodual.rules.fusions as pw

    torch.manual_seed(2)
    fc1, fc2 = nn.Linear(63, 40), nn.Linear(40, 63)
    h, h_dot = torch.randn(5, 7, 63), torch.randn(5, 7, 63)

    def step():
        out = fc2(F.gelu(fc1(sgflow.autodual.make_dual(h * 2.0, h_dot * 2.0)), approximate="tanh"))
        return sgflow.autodual.primal(out).sum() + sgflow.autodual.tangent(out).sum()

    h.requires_grad_()
    h_dot.requires_grad_()
    pair = 2 * 5 * 7 * 4  # bytes per row of a float32 pair, times the width below
    saved = saved_tensor_bytes(step)["bytes"]
    assert saved == pair * (63 + 40)
    pw.LAZY_POINTWISE = ()
    try:
        assert saved_tensor_bytes(step)["bytes"] == pair * (63 + 40 + 40)
    finally:
        pw.LAZY_POINTWISE = ("gelu", "silu")


CONVS = {  # (input shape, weight shape, conf: stride, padding, dilation, transposed, output_padding, groups)
    "2d-pad1-7x5": ((2, 6, 7, 5), (9, 6, 3, 3), ([1, 1], [1, 1], [1, 1], False, [0, 0], 1)),
    "2d-stride2-groups3-batch1": ((1, 6, 7, 5), (9, 2, 3, 3), ([2, 2], [1, 1], [1, 1], False, [0, 0], 3)),
    "1d": ((3, 4, 11), (5, 4, 3), ([1], [0], [1], False, [0], 1)),
    "2d-transposed": ((2, 6, 7, 5), (6, 4, 3, 3), ([2, 2], [1, 1], [1, 1], True, [1, 0], 1)),
}


@pytest.mark.parametrize("act", ["gelu_tanh", "silu", "gelu_erf"])
@pytest.mark.parametrize("conv", list(CONVS))
@pytest.mark.parametrize("which", ["both", "primal", "tangent"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)], ids=["fp64", "fp32"])
def test_pointwise_conv_matches_jvp_reference(act, conv, which, dtype, tol):
    fn, name, extra = ACTS[act]
    xshape, wshape, conf = CONVS[conv]
    g = torch.Generator().manual_seed(len(conv))
    x, x_dot = (torch.randn(xshape, generator=g, dtype=torch.float64) * 2 for _ in range(2))
    w = torch.randn(wshape, generator=g, dtype=torch.float64) / 4
    b = torch.randn(wshape[1] * conf[5] if conf[3] else wshape[0], generator=g, dtype=torch.float64)

    def layer(a, ww, bb):
        return torch.ops.aten.convolution(a, ww, bb, *conf)

    yshape = layer(x, w, b).shape
    gy, gyd = (torch.randn(yshape, generator=g, dtype=torch.float64) for _ in range(2))
    gy, gyd = (gy if which != "tangent" else None), (gyd if which != "primal" else None)
    ref_leaves = [t.clone().requires_grad_() for t in (x, x_dot, w, b)]
    yr, ydr = torch.func.jvp(lambda a: layer(fn(a), ref_leaves[2], ref_leaves[3]), (ref_leaves[0],), (ref_leaves[1],))
    loss = sum((o * c).sum() for o, c in ((yr, gy), (ydr, gyd)) if c is not None)
    ref = torch.autograd.grad(loss, ref_leaves, allow_unused=True, materialize_grads=True)
    leaves = [t.to(dtype).requires_grad_() for t in (x, x_dot, w, b)]
    y, y_dot = PointwiseConvDual.apply(*leaves, conf, _SPECS[name], extra)
    assert rel_err(y, yr) < tol and rel_err(y_dot, ydr) < tol
    loss = sum((o * c.to(dtype)).sum() for o, c in ((y, gy), (y_dot, gyd)) if c is not None)
    got = torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)
    for name_, a, r in zip(("x", "x_dot", "w", "b"), got, ref):
        assert rel_err(a, r) < tol if r.abs().max() > 0 else a.abs().max() == 0, (act, which, name_)


def test_engine_fuses_silu_into_the_convolution_reading_it():
    """x * (1 + scale) + shift -> SiLU -> conv (EDM's second norm of a block, after its GroupNorm): the
    convolution keeps the SiLU's input pair only, and the values and gradients equal the unfused engine's
    (float64)."""
    import sgflow.autodual.rules.fusions as pw

    torch.manual_seed(3)
    conv = nn.Conv2d(6, 5, 3, padding=1).double()
    g = torch.Generator().manual_seed(4)
    h, h_dot, scale = (torch.randn(2, 6, 7, 5, generator=g, dtype=torch.float64) for _ in range(3))
    res = {}
    for fused in (True, False):
        pw.LAZY_POINTWISE = ("gelu", "silu") if fused else ()
        try:
            ha, hda = h.clone().requires_grad_(), h_dot.clone().requires_grad_()

            def step():
                d = sgflow.autodual.make_dual(ha * 1.0, hda * 1.0)
                out = conv(F.silu(torch.addcmul(d, d, scale)))
                res[fused] = [sgflow.autodual.primal(out), sgflow.autodual.tangent(out)]
                return (res[fused][0] * 3.0).sum() + res[fused][1].sum()

            saved = saved_tensor_bytes(step)
            res[fused] += list(torch.autograd.grad(saved["loss"], [ha, hda, *conv.parameters()]))
            res[fused].append(saved["bytes"])
        finally:
            pw.LAZY_POINTWISE = ("gelu", "silu")
    pair = 2 * h.numel() * 8
    assert res[False][-1] - res[True][-1] == pair  # the SiLU's output pair
    for a, b in zip(res[True][:-1], res[False][:-1]):
        assert rel_err(a, b) < 1e-12
