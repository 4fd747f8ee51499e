"""The dual layer norm of plain (or no) affine parameters, ``sgflow.normalization.LayerNormDual`` (issue 18:
PyTorch's layer-norm kernels for the primal, the tangent and the first-derivative terms instead of the
recomputed statistics formula): exact against autograd of the written-out formula in float64, double
backward, half precision, and the number of ATen ops it dispatches."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import sgflow
from sgflow.memory import count_aten_ops
from sgflow.normalization import LayerNormDual, normalize_dual


def _reference(x, xd, w, b, ns, eps):
    dims = tuple(range(x.dim() - len(ns), x.dim()))
    xh, xhd = normalize_dual(x, xd, dims, eps)
    if w is None:
        return xh, xhd
    return xh * w + b, xhd * w


@pytest.mark.parametrize("shape,ns,affine", [((5, 7, 12), (12,), False), ((5, 7, 12), (12,), True),
                                             ((4, 3, 5), (3, 5), True), ((6, 9), (9,), False), ((9,), (9,), True)])
@pytest.mark.parametrize("cotangents", ["both", "primal", "tangent"])
def test_layer_norm_dual_equals_autograd_of_the_formula_in_float64(shape, ns, affine, cotangents):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, dtype=torch.float64, generator=g) * 3 + 1).requires_grad_()
    xd = torch.randn(shape, dtype=torch.float64, generator=g).requires_grad_()
    w = (1 + 0.3 * torch.randn(ns, dtype=torch.float64, generator=g)).requires_grad_() if affine else None
    b = torch.randn(ns, dtype=torch.float64, generator=g).requires_grad_() if affine else None
    G, Gd = (torch.randn(shape, dtype=torch.float64, generator=g) for _ in range(2))
    cots = {"both": (G, Gd), "primal": (G, None), "tangent": (None, Gd)}[cotangents]
    ins = [x, xd] + ([w, b] if affine else [])
    got = LayerNormDual.apply(x, xd, w, b, ns, 1e-5)
    ref = _reference(x, xd, w, b, ns, 1e-5)
    for a, r in zip(got, ref):
        assert (a - r).abs().max() <= 1e-12 * r.abs().max()
    ga = torch.autograd.grad(sum((o * c).sum() for o, c in zip(got, cots) if c is not None), ins, allow_unused=True)
    gr = torch.autograd.grad(sum((o * c).sum() for o, c in zip(ref, cots) if c is not None), ins, allow_unused=True)
    for a, r in zip(ga, gr):
        if r is None:
            assert a is None or a.abs().max() == 0
        else:
            assert (a - r).abs().max() <= 1e-12 * max(1.0, r.abs().max())


def test_layer_norm_dual_double_backward():
    g = torch.Generator().manual_seed(1)
    x, xd = (torch.randn(3, 4, 6, dtype=torch.float64, generator=g).requires_grad_() for _ in range(2))
    w = (1 + 0.3 * torch.randn(6, dtype=torch.float64, generator=g)).requires_grad_()
    b = torch.randn(6, dtype=torch.float64, generator=g).requires_grad_()
    f = lambda x, xd, w, b: LayerNormDual.apply(x, xd, w, b, (6,), 1e-5)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, xd, w, b))
    assert torch.autograd.gradgradcheck(f, (x, xd, w, b))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dual_layer_norm_half_precision_computes_in_float32(dtype):
    g = torch.Generator().manual_seed(2)
    x, xd = (torch.randn(4, 5, 32, generator=g) for _ in range(2))
    w, b = 1 + 0.3 * torch.randn(32, generator=g), torch.randn(32, generator=g)
    out = F.layer_norm(sgflow.autodual.make_dual(x.to(dtype), xd.to(dtype)), (32,), w.to(dtype), b.to(dtype))
    y, yd = sgflow.autodual.primal(out), sgflow.autodual.tangent(out)
    assert y.dtype == dtype and yd.dtype == dtype
    yr, ydr = _reference(x.to(dtype).float(), xd.to(dtype).float(), w.to(dtype).float(), b.to(dtype).float(), (32,), 1e-5)
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    assert (y.float() - yr).abs().max() <= tol * yr.abs().max()
    assert (yd.float() - ydr).abs().max() <= tol * ydr.abs().max()


def test_dual_layer_norm_is_a_few_aten_ops_forward_and_backward():
    """Before (issue 18) the dual layer norm was the statistics formula recomputed in up to 8 row slices
    under autograd: ~20 ops forward and ~150 backward on a DiT block's norm."""
    x, xd = (torch.randn(16, 256, 128, dtype=torch.float64, requires_grad=True) for _ in range(2))
    fwd = count_aten_ops(lambda: F.layer_norm(sgflow.autodual.make_dual(x, xd), (128,), eps=1e-6))
    out = fwd["result"]
    assert fwd["by_op"]["aten.native_layer_norm.default"] == 1 and fwd["ops"] <= 4, fwd["by_op"]
    y, yd = sgflow.autodual.primal(out), sgflow.autodual.tangent(out)
    loss = (y * y).sum() + (yd * y).sum()
    bwd = count_aten_ops(lambda: loss.backward())
    assert bwd["by_op"]["aten.native_layer_norm_backward.default"] == 3 and bwd["ops"] <= 30, bwd["by_op"]
