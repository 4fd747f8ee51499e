"""GroupNormDual's backward from PyTorch's group-norm kernels (native_group_norm, native_group_norm_backward,
closed-form second-order term) vs a torch.func.jvp + autograd reference, in float64 on odd sizes: with and
without affine parameters, each cotangent combination; gradcheck. First order only: a double backward raises
(PyTorch's native_group_norm_backward has no derivative; tests/ops/test_groupnorm_silu.py requires the raise)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sgflow.ops.groupnorm import GroupNormDual

EPS = 1e-5
SHAPES = [((2, 6, 7, 5), 3), ((3, 6, 7), 2), ((2, 4), 2), ((1, 6, 3, 5, 2), 6)]


def _inputs(shape, affine, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5).requires_grad_()
    xd = torch.randn(shape, generator=g, dtype=torch.float64).requires_grad_()
    w = (torch.randn(c, generator=g, dtype=torch.float64) + 1).requires_grad_() if affine else None
    b = torch.randn(c, generator=g, dtype=torch.float64).requires_grad_() if affine else None
    return x, xd, w, b


def _reference(x, xd, w, b, groups):
    return torch.func.jvp(lambda x_: F.group_norm(x_, groups, w, b, EPS), (x,), (xd,))


def _cots(y, which, seed=1):
    g = torch.Generator().manual_seed(seed)
    gy = torch.randn(y.shape, generator=g, dtype=y.dtype)
    gyd = torch.randn(y.shape, generator=g, dtype=y.dtype)
    return (gy if which in ("y", "both") else None), (gyd if which in ("ydot", "both") else None)


def _loss(outs, cots):
    return sum((o * c).sum() for o, c in zip(outs, cots) if c is not None)


@pytest.mark.parametrize("shape,groups", SHAPES)
@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("which", ["y", "ydot", "both"])
def test_matches_jvp_autograd_reference(shape, groups, affine, which):
    x, xd, w, b = _inputs(shape, affine)
    params = [x, xd] + ([w, b] if affine else [])
    y, yd = GroupNormDual.apply(x, xd, w, b, groups, EPS)
    y_ref, yd_ref = _reference(x, xd, w, b, groups)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(yd, yd_ref, rtol=0, atol=1e-12)
    cots = _cots(y, which)
    got = torch.autograd.grad(_loss((y, yd), cots), params, allow_unused=True)
    ref = torch.autograd.grad(_loss((y_ref, yd_ref), cots), params, allow_unused=True)
    for a, r in zip(got, ref):
        if r is None:
            assert a is None or a.abs().max() == 0
        else:
            torch.testing.assert_close(a, r, rtol=0, atol=1e-12)


@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("which", ["y", "ydot", "both"])
def test_gradcheck_and_double_backward_raises(affine, which):
    x, xd, w, b = _inputs((2, 6, 7, 5), affine)
    y0 = torch.empty(2, 6, 7, 5, dtype=torch.float64)
    cots = _cots(y0, which)
    params = (x, xd) + ((w, b) if affine else ())

    def f(*p):
        ww, bb = (p[2], p[3]) if affine else (None, None)
        y, yd = GroupNormDual.apply(p[0], p[1], ww, bb, 3, EPS)
        return _loss((y, yd), cots)

    def outs(*p):
        ww, bb = (p[2], p[3]) if affine else (None, None)
        return GroupNormDual.apply(p[0], p[1], ww, bb, 3, EPS)

    assert torch.autograd.gradcheck(f, params)
    assert torch.autograd.gradcheck(outs, params)
    y, yd = outs(*params)  # cotangents that depend on the inputs: the backward's outputs would need a graph
    (gx,) = torch.autograd.grad(_loss((y.square(), yd.square()), cots), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        gx.sum().backward()


def test_single_input_gradients():
    """Only some inputs need a gradient (the kernel path's masks)."""
    x, xd, w, b = _inputs((2, 6, 7, 5), True)
    y_ref, yd_ref = _reference(x, xd, w, b, 3)
    cots = _cots(y_ref, "both")
    for target in (x, xd, w, b):
        y, yd = GroupNormDual.apply(x, xd, w, b, 3, EPS)
        (got,) = torch.autograd.grad(_loss((y, yd), cots), [target])
        (ref,) = torch.autograd.grad(_loss((y_ref, yd_ref), cots), [target], retain_graph=True)
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)


def test_bias_without_weight_and_channels_last():
    x, xd, w, b = _inputs((2, 6, 7, 5), True)
    xc = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    y, yd = GroupNormDual.apply(xc, xd, None, b, 3, EPS)
    y_ref, yd_ref = _reference(x, xd, torch.ones(6, dtype=x.dtype), b, 3)  # contiguous, unit weight: the torch reference raises otherwise
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(yd, yd_ref, rtol=0, atol=1e-12)
    cots = _cots(y, "both")
    got = torch.autograd.grad(_loss((y, yd), cots), [xc, xd, b])
    ref = torch.autograd.grad(_loss((y_ref, yd_ref), cots), [x, xd, b])
    for a, r in zip(got, ref):
        torch.testing.assert_close(a, r, rtol=0, atol=1e-12)
