"""The dual product with a broadcast factor (``sgflow.ops.scale``):
``(x, x_dot, s, s_dot) -> (x s, x_dot s + x s_dot)``.

Reference: ``torch.func.jvp`` of ``x * s`` in float64 for (y, y_dot), and autograd of ``<g, y> + <g_dot, y_dot>``
through it for the four gradients; both backends (the C++ kernel, skipped with the reason where the extension is
not built, and the ATen path), float64 and float32, odd sizes. Then the dual engine's rule on an adaLN block:
the same gradients as the product rule and the jvp reference, the fused op in use.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import sgflow
from sgflow.decompose import decomposed
from sgflow.ops import cpp_ext
from sgflow.ops import scale as sc
from sgflow.testing import rel_err

# (x shape, s shape): a DiT's gate [B, N, C] x [B, 1, C]; channels first [B, C, H, W] x [B, C, 1, 1]; a factor
# shared by the batch (Bs = 1, fewer dims than x); batch 1; a per-sample scalar; channels spanning two dims.
CASES = {
    "tokens-b3-n7-c5": ((3, 7, 5), (3, 1, 5)),
    "chw-b2-c63-7x5": ((2, 63, 7, 5), (2, 63, 1, 1)),
    "shared-chw-c63-7x5": ((3, 63, 7, 5), (1, 63, 1, 1)),
    "shared-1d-c6": ((4, 9, 6), (6,)),
    "batch1": ((1, 9, 4), (1, 1, 4)),
    "per-sample-scalar": ((5, 3, 4), (5, 1, 1)),
    "two-channel-dims": ((2, 3, 4, 5), (2, 1, 4, 5)),
    "empty-batch-shared": ((0, 7, 5), (1, 1, 5)),
}

BACKENDS = ["cpp", "torch"]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    if request.param == "cpp" and not cpp_ext.available():
        pytest.skip(f"C++ extension unavailable: {cpp_ext.reason()}")
    monkeypatch.setattr(sc, "CPP_KERNELS", request.param == "cpp")
    return request.param


def _inputs(xs, ss, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x, x_dot, gy, gyd = (torch.randn(xs, generator=g, dtype=torch.float64) for _ in range(4))
    s, s_dot = (torch.randn(ss, generator=g, dtype=torch.float64) for _ in range(2))
    return [t.to(dtype) for t in (x, x_dot, s, s_dot)], [gy.to(dtype), gyd.to(dtype)]


def _reference(x, x_dot, s, s_dot, gy, gyd):
    ins = [t.detach().double().requires_grad_() for t in (x, x_dot, s, s_dot)]
    y, y_dot = torch.func.jvp(lambda a, b: a * b, (ins[0], ins[2]), (ins[1], ins[3]))
    grads = torch.autograd.grad((y * gy.double()).sum() + (y_dot * gyd.double()).sum(), ins)
    return [y.detach(), y_dot.detach(), *grads]


def _ours(x, x_dot, s, s_dot, gy, gyd):
    ins = [t.detach().clone().requires_grad_() for t in (x, x_dot, s, s_dot)]
    y, y_dot = sc.scale_dual(*ins)
    grads = torch.autograd.grad((y * gy).sum() + (y_dot * gyd).sum(), ins)
    return [y.detach(), y_dot.detach(), *grads]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)], ids=["fp64", "fp32"])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_matches_jvp_reference(case, dtype, tol, backend):
    xs, ss = CASES[case]
    ins, cot = _inputs(xs, ss, dtype, seed=len(case))
    got = _ours(*ins, *cot)
    want = _reference(*ins, *cot)
    names = ["y", "y_dot", "dx", "dx_dot", "ds", "ds_dot"]
    for name, a, b in zip(names, got, want):
        assert a.shape == b.shape and a.dtype == dtype, (name, a.shape, b.shape, a.dtype)
        assert rel_err(a, b) < tol, (name, rel_err(a, b))


def test_cpp_kernel_is_used_on_cpu(monkeypatch):
    """On CPU float32 the C++ op runs each way (not the ATen path); on strided x the ATen path does, correctly."""
    if not cpp_ext.available():
        pytest.skip(f"C++ extension unavailable: {cpp_ext.reason()}")
    calls = []
    for name in ("scale_dual_fwd", "scale_dual_bwd"):
        op = getattr(torch.ops.sgflow, name)
        monkeypatch.setattr(torch.ops.sgflow, name, lambda *a, _op=op, _n=name: calls.append(_n) or _op(*a),
                            raising=False)
    ins, cot = _inputs((3, 7, 5), (3, 1, 5), torch.float32, seed=3)
    _ours(*ins, *cot)
    assert calls == ["scale_dual_fwd", "scale_dual_bwd"]
    calls.clear()
    x, x_dot, s, s_dot = ins
    strided = [x.mT.contiguous().mT, x_dot, s, s_dot]  # [3, 7, 5] with transposed strides
    got = _ours(*strided, *cot)
    assert calls == []
    for a, b in zip(got, _reference(*strided, *cot)):
        assert rel_err(a, b) < 1e-5


@pytest.mark.parametrize("threads", [1, 2])
def test_cpp_kernel_threads_agree(threads):
    """Threaded over the batch, the shared factor's sums added over samples: the same numbers on 1 and 2 threads."""
    if not cpp_ext.available():
        pytest.skip(f"C++ extension unavailable: {cpp_ext.reason()}")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ins, cot = _inputs((5, 63, 7, 5), (1, 63, 1, 1), torch.float64, seed=4)
        got = _ours(*ins, *cot)
    finally:
        torch.set_num_threads(before)
    for a, b in zip(got, _reference(*ins, *cot)):
        assert rel_err(a, b) < 1e-12


def test_gradcheck_and_gradgradcheck(backend):
    """Exact derivatives in float64; twice differentiable (under create_graph the ATen formulas run)."""
    ins, _ = _inputs((2, 5, 3), (2, 1, 3), torch.float64, seed=5)
    ins = [t.requires_grad_() for t in ins]
    assert torch.autograd.gradcheck(sc.scale_dual, ins)
    assert torch.autograd.gradgradcheck(sc.scale_dual, ins)


@pytest.mark.parametrize("xs,ss,want", [
    ((16, 256, 128), (16, 1, 128), sc.ScaleView(16, 256, 128, 1, 16)),
    ((2, 63, 7, 5), (2, 63, 1, 1), sc.ScaleView(2, 1, 63, 35, 2)),
    ((4, 9, 6), (6,), sc.ScaleView(4, 9, 6, 1, 1)),
    ((3, 4), (3, 1), sc.ScaleView(3, 4, 1, 1, 3)),
    ((2, 3, 4, 5), (2, 3, 1, 5), None),   # channels not consecutive
    ((2, 3, 4), (2, 3, 4), None),         # same shape: nothing broadcasts
    ((2, 3, 4), (2, 2, 4), None),         # a dim neither 1 nor x's
    ((2, 3, 4), (3, 2, 3, 4), None),      # more dims than x
    ((2, 3, 4), (5, 1, 4), None),         # a batch dim neither 1 nor B
], ids=["dit-gate", "chw", "shared-1d", "2d", "split-channels", "same-shape", "bad-dim", "more-dims", "bad-batch"])
def test_scale_fits(xs, ss, want):
    assert sc.scale_fits(xs, ss) == want


@pytest.mark.parametrize("change,error,match", [
    (lambda a: (a[0], a[1][:, :3], a[2], a[3]), ValueError, r"x_dot has shape \(3, 3, 5\) but x has shape \(3, 7, 5\)"),
    (lambda a: (a[0], a[1], a[2], a[3][:, :, :2]), ValueError, r"s_dot has shape \(3, 1, 2\) but s has shape"),
    (lambda a: (a[0], a[1], a[2].float(), a[3].float()), TypeError,
     "x and s must share one floating dtype, got torch.float64 and torch.float32"),
    (lambda a: (a[0], a[1], a[2].expand(3, 7, 5), a[3].expand(3, 7, 5)), ValueError,
     r"s \(3, 7, 5\) is not a per-sample, per-channel factor of x \(3, 7, 5\)"),
    (lambda a: (a[0], a[1], 2.0, a[3]), TypeError, "s must be a tensor"),
    (lambda a: (a[0], a[1].float(), a[2], a[3]), TypeError,
     "x_dot has dtype torch.float32 but x has dtype torch.float64"),
], ids=["x_dot-shape", "s_dot-shape", "dtype", "not-broadcast", "not-tensor", "x_dot-dtype"])
def test_bad_input_is_named(change, error, match):
    ins, _ = _inputs((3, 7, 5), (3, 1, 5), torch.float64, seed=6)
    with pytest.raises(error, match=match):
        sc.scale_dual(*change(ins))


class _AdaLNBlock(nn.Module):
    """A DiT block's adaLN part: ``x + gate * mlp(norm(x) * (1 + scale) + shift)``, gate/scale/shift from c."""

    def __init__(self, width=5, cond=3):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        self.ada = nn.Linear(cond, 3 * width)
        self.mlp = nn.Sequential(nn.Linear(width, 7), nn.GELU(approximate="tanh"), nn.Linear(7, width))

    def forward(self, x, c):
        shift, scale, gate = self.ada(c).chunk(3, dim=1)
        h = self.norm(x) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)
        return x + gate.unsqueeze(1) * self.mlp(h)


def _engine_step(block, fused, monkeypatch):
    from sgflow.autodual.rules import products

    monkeypatch.setattr(products, "FUSED_SCALE", fused)
    g = torch.Generator().manual_seed(11)
    x, x_dot = (torch.randn(3, 7, 5, generator=g, dtype=torch.float64).requires_grad_() for _ in range(2))
    c, c_dot = (torch.randn(3, 3, generator=g, dtype=torch.float64).requires_grad_() for _ in range(2))
    with sgflow.autodual.dual_context():
        y = block(sgflow.autodual.make_dual(x * 1.0, x_dot * 1.0), sgflow.autodual.make_dual(c * 1.0, c_dot * 1.0))
        yp, yt = sgflow.autodual.primal(y), sgflow.autodual.tangent(y)
    gy = torch.linspace(-1, 1, yp.numel(), dtype=torch.float64).view(yp.shape)
    grads = torch.autograd.grad((yp * gy).sum() + (yt * gy.flip(0)).sum(), [x, x_dot, c, c_dot, *block.parameters()])
    return [yp, yt, *grads]


def _block_reference(block):
    g = torch.Generator().manual_seed(11)
    x, x_dot = (torch.randn(3, 7, 5, generator=g, dtype=torch.float64).requires_grad_() for _ in range(2))
    c, c_dot = (torch.randn(3, 3, generator=g, dtype=torch.float64).requires_grad_() for _ in range(2))
    with decomposed():  # torch's LayerNorm has wrong reverse-over-forward gradients (sgflow.decompose)
        y, yt = torch.func.jvp(block, (x * 1.0, c * 1.0), (x_dot * 1.0, c_dot * 1.0))
    gy = torch.linspace(-1, 1, y.numel(), dtype=torch.float64).view(y.shape)
    grads = torch.autograd.grad((y * gy).sum() + (yt * gy.flip(0)).sum(), [x, x_dot, c, c_dot, *block.parameters()])
    return [y, yt, *grads]


def test_engine_runs_adaln_products_fused(monkeypatch):
    """Through the dual engine the scale and the gate of an adaLN block run as ScaleDual (2 per call), with the
    product rule's values and gradients and the jvp reference's (float64)."""
    count = [0]
    forward = sc.ScaleDual.forward

    def counted(ctx, *a):
        count[0] += 1
        return forward(ctx, *a)

    torch.manual_seed(12)
    block = _AdaLNBlock().double()
    monkeypatch.setattr(sc.ScaleDual, "forward", staticmethod(counted))
    fused = _engine_step(block, True, monkeypatch)
    assert count[0] == 2
    plain = _engine_step(block, False, monkeypatch)
    assert count[0] == 2
    for a, b, r in zip(fused, plain, _block_reference(block)):
        assert rel_err(a, r) < 1e-12 and rel_err(b, r) < 1e-12


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU"))]


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_equals_eager(device):
    """``torch.compile`` (aot_eager on CPU, inductor on a GPU) of the op with its backward = eager, float32; under
    the compiler the ATen path runs (the C++ op is left to eager)."""
    ins, cot = _inputs((3, 7, 5), (3, 1, 5), torch.float32, seed=13)
    ins = [t.to(device) for t in ins]
    cot = [t.to(device) for t in cot]

    def step(x, x_dot, s, s_dot):
        y, y_dot = sc.scale_dual(x, x_dot, s, s_dot)
        return (y * cot[0]).sum() + (y_dot * cot[1]).sum()

    compiled = torch.compile(step, backend="inductor" if device == "cuda" else "aot_eager", fullgraph=True)
    results = []
    for fn in (step, compiled):
        leaves = [t.detach().clone().requires_grad_() for t in ins]
        loss = fn(*leaves)
        results.append([loss.detach(), *torch.autograd.grad(loss, leaves)])
    for a, b in zip(*results):
        assert rel_err(a, b) < 1e-5
