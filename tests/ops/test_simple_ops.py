"""Simple dual ops (conv2d, linear, silu, sinusoidal embedding, groupnorm) vs torch.func.jvp + autograd.

Every op is checked in float64 on CPU: the reference ``*_dual_ref`` and the functional API (autograd
Function) must give the JVP of the plain op, and the Function's backward must give the gradients of
<g, y> + <g_dot, y_dot> w.r.t. inputs, tangents and parameters, also when only one cotangent is used.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sgflow.ops.activation import silu_dual, silu_dual_ref
from sgflow.ops.conv import conv2d_dual, conv2d_dual_ref
from sgflow.ops.embedding import sinusoidal_embedding, sinusoidal_embedding_dual, sinusoidal_embedding_dual_ref
from sgflow.ops.groupnorm import groupnorm_dual, groupnorm_dual_ref
from sgflow.ops.linear import linear_dual, linear_dual_ref
from sgflow.testing import dual_grads, grad_errors, jvp_reference, rel_err

TOL = 1e-10
D = torch.float64


def _randn(*shape, gen):
    return torch.randn(*shape, generator=gen, dtype=D)


def _compare(plain, ref, dual, primals, tangents, params, drop=None):
    """plain(*primals, *params) vs ref / dual(*primals, *tangents, *params).

    ``drop``: None (both cotangents), "g" (primal output unused) or "g_dot" (tangent unused).
    """
    params = [p.detach().clone().requires_grad_(True) for p in params]
    y, y_dot, (g, g_dot), grads = jvp_reference(lambda *a: plain(*a, *params), primals, tangents, params)
    if drop == "g":
        g = torch.zeros_like(g)
    elif drop == "g_dot":
        g_dot = torch.zeros_like(g_dot)
    if drop is not None:
        _, _, _, grads = jvp_reference(lambda *a: plain(*a, *params), primals, tangents, params, cotangents=(g, g_dot))

    y_r, yd_r = ref(*primals, *tangents, *params)
    assert rel_err(y_r, y) <= TOL
    assert rel_err(yd_r, y_dot) <= TOL

    n = len(primals)

    def call(*a):
        out, out_dot = dual(*a[:n], *a[n:], *params)
        return out, out_dot

    if drop is None:
        y_d, yd_d, grads_d = dual_grads(call, primals, tangents, params, (g, g_dot))
    else:
        # Use only one output so the Function's backward receives None for the other.
        ps = [p.detach().clone().requires_grad_(True) for p in primals]
        ts = [t.detach().clone().requires_grad_(True) for t in tangents]
        y_d, yd_d = call(*ps, *ts)
        scalar = (yd_d * g_dot).sum() if drop == "g" else (y_d * g).sum()
        grads_d = list(torch.autograd.grad(scalar, [*ps, *ts, *params], allow_unused=True))
        y_d, yd_d = y_d.detach(), yd_d.detach()
    assert rel_err(y_d, y) <= TOL
    assert rel_err(yd_d, y_dot) <= TOL
    errs = grad_errors(grads_d, grads, [*primals, *tangents, *params])
    for i, err in errs.items():
        assert err <= TOL, f"grad {i}: rel err {err:.3g}"
    return max(errs.values())


CONV_CASES = [
    # (B, Cin, Cout, H, W, k, stride, padding, bias)
    pytest.param(2, 3, 5, 7, 5, 3, 1, 1, True, id="3x3-pad1-odd-7x5"),
    pytest.param(1, 4, 6, 8, 12, 3, 2, 1, True, id="3x3-stride2-8x12"),
    pytest.param(3, 5, 2, 7, 7, 3, 2, 1, False, id="3x3-stride2-nobias-odd"),
    pytest.param(2, 63, 7, 4, 3, 1, 1, 0, True, id="1x1-63ch"),
]


@pytest.mark.parametrize("b,cin,cout,h,w,k,stride,padding,bias", CONV_CASES)
@pytest.mark.parametrize("drop", [None, "g", "g_dot"], ids=["both", "tangent-only", "primal-only"])
def test_conv2d_dual(b, cin, cout, h, w, k, stride, padding, bias, drop):
    gen = torch.Generator().manual_seed(1)
    x, xd = _randn(b, cin, h, w, gen=gen), _randn(b, cin, h, w, gen=gen)
    weight = _randn(cout, cin, k, k, gen=gen) / math.sqrt(cin * k * k)
    params = [weight] + ([_randn(cout, gen=gen)] if bias else [])

    def plain(x_, *p):
        return F.conv2d(x_, p[0], p[1] if len(p) > 1 else None, stride=stride, padding=padding)

    def ref(x_, xd_, *p):
        return conv2d_dual_ref(x_, xd_, p[0], p[1] if len(p) > 1 else None, stride, padding)

    def dual(x_, xd_, *p):
        return conv2d_dual(x_, xd_, p[0], p[1] if len(p) > 1 else None, stride, padding)

    _compare(plain, ref, dual, [x], [xd], params, drop)


LINEAR_CASES = [
    pytest.param((5, 7), 3, True, id="2d-7to3"),
    pytest.param((2, 3, 6), 9, True, id="3d-6to9"),
    pytest.param((1, 4), 4, False, id="nobias-B1"),
]


@pytest.mark.parametrize("shape,dout,bias", LINEAR_CASES)
@pytest.mark.parametrize("drop", [None, "g", "g_dot"], ids=["both", "tangent-only", "primal-only"])
def test_linear_dual(shape, dout, bias, drop):
    gen = torch.Generator().manual_seed(2)
    x, xd = _randn(*shape, gen=gen), _randn(*shape, gen=gen)
    params = [_randn(dout, shape[-1], gen=gen)] + ([_randn(dout, gen=gen)] if bias else [])

    def plain(x_, *p):
        return F.linear(x_, *p)

    def ref(x_, xd_, *p):
        return linear_dual_ref(x_, xd_, *p)

    def dual(x_, xd_, *p):
        return linear_dual(x_, xd_, *p)

    _compare(plain, ref, dual, [x], [xd], params, drop)


@pytest.mark.parametrize("shape", [pytest.param((7,), id="1d"), pytest.param((2, 3, 5, 4), id="4d")])
@pytest.mark.parametrize("drop", [None, "g", "g_dot"], ids=["both", "tangent-only", "primal-only"])
def test_silu_dual(shape, drop):
    gen = torch.Generator().manual_seed(3)
    x, xd = 3 * _randn(*shape, gen=gen), _randn(*shape, gen=gen)
    _compare(F.silu, silu_dual_ref, silu_dual, [x], [xd], [], drop)


@pytest.mark.parametrize(
    "dim,max_period",
    [pytest.param(16, 10000, id="dim16"), pytest.param(7, 10000, id="odd-dim7"), pytest.param(64, 100, id="dim64-period100")],
)
@pytest.mark.parametrize("drop", [None, "g", "g_dot"], ids=["both", "tangent-only", "primal-only"])
def test_sinusoidal_embedding_dual(dim, max_period, drop):
    gen = torch.Generator().manual_seed(4)
    # Times in [0, 1] as the networks see them; the 1000x scale makes the top frequency fast.
    s = torch.rand(5, generator=gen, dtype=D)
    sd = _randn(5, gen=gen)

    def plain(s_):
        return sinusoidal_embedding(s_, dim, max_period)

    def ref(s_, sd_):
        return sinusoidal_embedding_dual_ref(s_, sd_, dim, max_period)

    def dual(s_, sd_):
        return sinusoidal_embedding_dual(s_, sd_, dim, max_period)

    _compare(plain, ref, dual, [s], [sd], [], drop)


def test_sinusoidal_embedding_convention():
    s = torch.tensor([0.0, 0.5], dtype=D)
    emb = sinusoidal_embedding(s, 8)
    assert emb.shape == (2, 8)
    assert torch.allclose(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4, dtype=D))
    # Lowest column: omega_0 = scale rad per unit time (default scale 1).
    assert torch.allclose(emb[1, 0], torch.cos(torch.tensor(0.5, dtype=D)))
    emb1000 = sinusoidal_embedding(s, 8, scale=1000.0)
    assert torch.allclose(emb1000[1, 0], torch.cos(torch.tensor(500.0, dtype=D)))


GN_CASES = [
    pytest.param(2, 6, 3, (7, 5), True, id="6ch-3groups-7x5"),
    pytest.param(3, 63, 7, (3, 4), True, id="63ch-7groups"),
    pytest.param(2, 8, 8, (5, 5), False, id="noaffine-instance"),
    pytest.param(2, 4, 1, (6,), True, id="1d-spatial-layernorm"),
]


@pytest.mark.parametrize("b,c,groups,spatial,affine", GN_CASES)
@pytest.mark.parametrize("drop", [None, "g", "g_dot"], ids=["both", "tangent-only", "primal-only"])
def test_groupnorm_dual(b, c, groups, spatial, affine, drop):
    gen = torch.Generator().manual_seed(5)
    x = 2 * _randn(b, c, *spatial, gen=gen) + 0.5
    xd = _randn(b, c, *spatial, gen=gen)
    params = [1 + 0.3 * _randn(c, gen=gen), 0.3 * _randn(c, gen=gen)] if affine else []

    def w_b(p):
        return (p[0], p[1]) if p else (None, None)

    def plain(x_, *p):
        return F.group_norm(x_, groups, *w_b(p), eps=1e-5)

    def ref(x_, xd_, *p):
        return groupnorm_dual_ref(x_, xd_, *w_b(p), groups)

    def dual(x_, xd_, *p):
        return groupnorm_dual(x_, xd_, *w_b(p), groups)

    _compare(plain, ref, dual, [x], [xd], params, drop)


def test_bad_inputs_raise():
    x = torch.randn(2, 3, 4, 4, dtype=D)
    w = torch.randn(5, 3, 3, 3, dtype=D)
    with pytest.raises(ValueError, match="x_dot has shape"):
        conv2d_dual(x, x[:1], w, None)
    with pytest.raises(ValueError, match="weight must have shape"):
        conv2d_dual(x, x, torch.randn(5, 4, 3, 3, dtype=D), None)
    with pytest.raises(ValueError, match="input features"):
        linear_dual(torch.randn(2, 3, dtype=D), torch.randn(2, 3, dtype=D), torch.randn(4, 5, dtype=D))
    with pytest.raises(ValueError, match="x_dot has shape"):
        silu_dual(x, x[0])
    with pytest.raises(ValueError, match="1-d tensor"):
        sinusoidal_embedding_dual(x, x, 8)
    with pytest.raises(ValueError, match="not divisible"):
        groupnorm_dual(x, x, None, None, 2)
