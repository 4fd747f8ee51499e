"""The C++ CPU kernels of the dual tanh-GELU and SiLU (``torch.ops.sgflow.pointwise_dual_{fwd,bwd}``,
csrc/pointwise_dual_cpu_kernels.h), as the dual engine's elementwise rule uses them.

Reference: ``torch.func.jvp`` of the op in float64 for (y, y_dot), and autograd of
``<g, y> + <g_dot, y_dot>`` through it for the gradients. Every instruction set the CPU supports.
Skipped, with the reason, where the extension is not built.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import sgflow
from sgflow.memory import count_aten_ops
from sgflow.ops import cpp_ext
from sgflow.testing import rel_err

pytestmark = pytest.mark.skipif(not cpp_ext.available(), reason=f"C++ extension unavailable: {cpp_ext.reason()}")


@pytest.fixture(params=cpp_ext._supported_isas() or ["none"])
def isa(request):
    previous = cpp_ext.cpu_isa()
    cpp_ext.cpu_isa(request.param)
    yield request.param
    cpp_ext.cpu_isa(previous)


FNS = {"gelu_tanh": lambda a: F.gelu(a, approximate="tanh"), "silu": F.silu}


def _reference(kind, x, x_dot, g, g_dot):
    xr, xdr = x.double().requires_grad_(), x_dot.double().requires_grad_()
    y, y_dot = torch.func.jvp(FNS[kind], (xr,), (xdr,))
    loss = 0
    if g is not None:
        loss = loss + (y * g.double()).sum()
    if g_dot is not None:
        loss = loss + (y_dot * g_dot.double()).sum()
    dx, dxd = torch.autograd.grad(loss, (xr, xdr), allow_unused=True, materialize_grads=True)
    return y.detach(), y_dot.detach(), dx, dxd


def _inputs(shape, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    # Wide range: tanh saturating both ways, the sigmoid's tails, values near 0.
    return [(torch.randn(shape, generator=gen, dtype=torch.float64) * 4).to(dtype) for _ in range(4)]


@pytest.mark.parametrize("kind", ["gelu_tanh", "silu"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)], ids=["fp64", "fp32"])
@pytest.mark.parametrize("shape", [(7, 5), (3, 63, 7, 5), (1,), (40003,)], ids=["7x5", "3x63x7x5", "one", "40003"])
def test_kernels_match_reference(isa, kind, dtype, tol, shape):
    x, x_dot, g, g_dot = _inputs(shape, dtype, seed=10 * len(shape) + (kind == "silu"))
    y, y_dot = torch.ops.sgflow.pointwise_dual_fwd(x, x_dot, kind)
    dx, dxd = torch.ops.sgflow.pointwise_dual_bwd(x, x_dot, g, g_dot, kind)
    ry, ryd, rdx, rdxd = _reference(kind, x, x_dot, g, g_dot)
    for name, a, r in (("y", y, ry), ("y_dot", y_dot, ryd), ("dx", dx, rdx), ("dx_dot", dxd, rdxd)):
        assert a.dtype == dtype and a.shape == x.shape, name
        assert rel_err(a.double(), r) < tol, (name, rel_err(a.double(), r))


@pytest.mark.parametrize("kind", ["gelu_tanh", "silu"])
@pytest.mark.parametrize("which", ["g_only", "g_dot_only", "neither"])
def test_backward_with_one_cotangent(isa, kind, which):
    x, x_dot, g, g_dot = _inputs((5, 9), torch.float64, seed=3)
    g = None if which in ("g_dot_only", "neither") else g
    g_dot = None if which in ("g_only", "neither") else g_dot
    dx, dxd = torch.ops.sgflow.pointwise_dual_bwd(x, x_dot, g, g_dot, kind)
    assert (dxd is None) == (g_dot is None)
    if which == "neither":
        assert dx.abs().max() == 0
        return
    _, _, rdx, rdxd = _reference(kind, x, x_dot, g, g_dot)
    assert rel_err(dx, rdx) < 1e-12
    if dxd is not None:
        assert rel_err(dxd, rdxd) < 1e-12


def test_strided_inputs_and_bad_arguments():
    x, x_dot, g, g_dot = _inputs((6, 8), torch.float64, seed=5)
    y, y_dot = torch.ops.sgflow.pointwise_dual_fwd(x.t(), x_dot.t(), "silu")
    ry, ryd, _, _ = _reference("silu", x.t(), x_dot.t(), g.t(), g_dot.t())
    assert y.is_contiguous() and rel_err(y, ry) < 1e-12 and rel_err(y_dot, ryd) < 1e-12
    with pytest.raises(RuntimeError, match="unknown kind 'relu'"):
        torch.ops.sgflow.pointwise_dual_fwd(x, x_dot, "relu")
    with pytest.raises(RuntimeError, match="float32 or float64"):
        torch.ops.sgflow.pointwise_dual_fwd(x.half(), x_dot.half(), "silu")
    with pytest.raises(RuntimeError, match="x_dot must match x"):
        torch.ops.sgflow.pointwise_dual_fwd(x, x_dot[:3], "silu")


def _values(out):
    return sgflow.autodual.primal(out), sgflow.autodual.tangent(out)


@pytest.mark.parametrize("name,fn", [("gelu_tanh", FNS["gelu_tanh"]), ("silu", F.silu)])
def test_dual_rule_runs_one_kernel_each_way(name, fn):
    """Through the dual engine (make_dual -> F.gelu / F.silu, a lazy node computed on first use): the forward
    is one C++ op, the backward one; the values and gradients are those of the ATen path
    (sgflow.ops.pointwise.CPP_KERNELS off)."""
    import sgflow.ops.pointwise as pointwise_op

    x, x_dot, g, g_dot = _inputs((4, 33), torch.float64, seed=7)
    results = {}
    for cpp in (True, False):
        pointwise_op.CPP_KERNELS = cpp
        try:
            xa, xda = x.clone().requires_grad_(), x_dot.clone().requires_grad_()
            fwd = count_aten_ops(lambda: _values(fn(sgflow.autodual.make_dual(xa, xda))))
            y, y_dot = fwd["result"]
            loss = (y * g).sum() + (y_dot * g_dot).sum()
            bwd = count_aten_ops(lambda: torch.autograd.grad(loss, (xa, xda)))
            results[cpp] = (y, y_dot, *bwd["result"])
            if cpp:
                assert fwd["by_op"].get("sgflow.pointwise_dual_fwd.default") == 1, fwd["by_op"]
                assert bwd["by_op"].get("sgflow.pointwise_dual_bwd.default") == 1, bwd["by_op"]
        finally:
            pointwise_op.CPP_KERNELS = True
    for a, b in zip(results[True], results[False]):
        assert rel_err(a, b) < 1e-12


@pytest.mark.parametrize("kind", ["gelu_tanh", "silu"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_inplace_backward_writes_the_gradients_over_the_cotangents(isa, kind, dtype):
    """``pointwise_dual_bwd_`` (g, g_dot overwritten with dx, dx_dot) = the out-of-place op, bit for bit, on
    every instruction set; x may be strided; non-contiguous cotangents are refused."""
    x, x_dot, g, g_dot = _inputs((3, 63, 7, 5), dtype, seed=17)
    xs, xds = x.transpose(1, 3), x_dot.transpose(1, 3)  # strided x: the kernel reads it in g's element order
    dx, dxd = torch.ops.sgflow.pointwise_dual_bwd(xs, xds, g.transpose(1, 3), g_dot.transpose(1, 3), kind)
    gi, gdi = g.transpose(1, 3).contiguous(), g_dot.transpose(1, 3).contiguous()
    torch.ops.sgflow.pointwise_dual_bwd_(xs, xds, gi, gdi, kind)
    assert torch.equal(gi, dx) and torch.equal(gdi, dxd)
    with pytest.raises(RuntimeError, match="must be contiguous"):
        torch.ops.sgflow.pointwise_dual_bwd_(xs, xds, g.transpose(1, 3), g_dot.transpose(1, 3), kind)
