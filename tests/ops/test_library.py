"""The registered ``sgflow::`` ops (torch.library): every op is opchecked, the forward ops are
differentiable on their own (their autograd formula is the backward op), and ``torch.func`` composes
with the autograd Functions built on them (vmap, grad).

``torch.library.opcheck`` tests the schema (no aliasing or mutation beyond ``out``), the fake (shape-only)
implementation against the real one, the autograd registration, and AOT dispatch with dynamic shapes
(what torch.compile does with the op). A test below lists the ops in the ``sgflow`` namespace, so that
an op registered later without samples here fails instead of going unchecked.
"""
import os

import pytest
import torch

from sgflow.ops import attention as att
from sgflow.ops import cpp_ext
from sgflow.ops import groupnorm_silu as gs
from sgflow.ops.backend import triton_available
from sgflow.ops.groupnorm_silu import make_dropout_mask

OPS = torch.ops.sgflow
EPS = 1e-5
G = 3
SHAPE = (2, 12, 5, 3)  # odd spatial size, 4 channels per group
ATT = dict(q=(2, 3, 7, 5), k=(2, 3, 9, 5), v=(2, 3, 9, 6))  # Nq != Nk, D != Dv

needs_cpp = pytest.mark.skipif(not cpp_ext.available(), reason=f"sgflow._C unavailable: {cpp_ext.reason()}")
needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not importable")
on_gpu = torch.cuda.is_available()
interpreting = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _gn_inputs(dtype=torch.float64, grad=False, device="cpu"):
    g = _gen(0)
    x = (torch.randn(SHAPE, generator=g, dtype=torch.float64) * 1.3 + 0.4).to(dtype)
    xd = torch.randn(SHAPE, generator=g, dtype=torch.float64).to(dtype)
    w = (1 + 0.3 * torch.randn(SHAPE[1], generator=g, dtype=torch.float64)).to(dtype)
    b = (0.2 * torch.randn(SHAPE[1], generator=g, dtype=torch.float64)).to(dtype)
    gy = torch.randn(SHAPE, generator=g, dtype=torch.float64).to(dtype)
    gyd = torch.randn(SHAPE, generator=g, dtype=torch.float64).to(dtype)
    x, xd, w, b, gy, gyd = (t.to(device) for t in (x, xd, w, b, gy, gyd))
    if grad:
        for t in (x, xd, w, b):
            t.requires_grad_()
    return x, xd, w, b, gy, gyd


def _att_inputs(dtype=torch.float64, grad=False, device="cpu"):
    g = _gen(1)
    ts = [torch.randn(ATT[n], generator=g, dtype=torch.float64).to(dtype).to(device) for n in "qkvqkv"]
    if grad:
        for t in ts:
            t.requires_grad_()
    return ts


def _gn_samples(suffix, device="cpu", with_out=True):
    """(op name, args) samples of the four GN-SiLU ops of one backend (suffix "", "_torch", "_triton")."""
    x, xd, w, b, gy, gyd = _gn_inputs(device=device)
    xg, xdg, wg, bg, _, _ = _gn_inputs(grad=True, device=device)
    x32, xd32, w32, b32, gy32, gyd32 = _gn_inputs(torch.float32, device=device)
    mask = make_dropout_mask(SHAPE, 0.3, generator=_gen(2)).to(device)
    fwd = getattr(OPS, f"gn_silu_dual_fwd{suffix}")
    stats = fwd(x, xd, w, b, G, EPS)[2]
    stats32 = fwd(x32, xd32, w32, b32, G, EPS)[2]
    xb, xdb, gyb, gydb = (t.bfloat16() for t in (x32, xd32, gy32, gyd32))
    stats_b = fwd(xb, xdb, w32, b32, G, EPS)[2]
    out = lambda dt: torch.empty((2 * SHAPE[0], *SHAPE[1:]), dtype=dt, device=device)  # noqa: E731
    samples = [
        (f"gn_silu_dual_fwd{suffix}", (xg, xdg, wg, bg, G, EPS)),  # autograd: the backward op
        (f"gn_silu_dual_fwd{suffix}", (xg, xdg, None, None, G, EPS, mask, 1 / 0.7)),
        (f"gn_silu_dual_fwd{suffix}", (x32, xd32, w32, b32, G, EPS)),
        (f"gn_silu_dual_fwd{suffix}", (xb, xdb, w32, b32, G, EPS)),  # fp32 statistics and parameter grads
        (f"gn_silu_dual_bwd{suffix}", (xb, xdb, w32, b32, stats_b, gyb, gydb, G)),
        (f"gn_silu_dual_bwd{suffix}", (x, xd, w, b, stats, gy, gyd, G)),
        (f"gn_silu_dual_bwd{suffix}", (x, xd, w, b, stats, gy, None, G, mask, 1 / 0.7)),
        (f"gn_silu_dual_bwd{suffix}", (x32, xd32, None, None, stats32, None, gyd32, G)),
    ]
    if with_out:
        samples += [(f"gn_silu_dual_fwd_out{suffix}", (x, xd, w, b, G, EPS, mask, 1 / 0.7, out(x.dtype)))]
        if suffix != "_triton":
            samples += [(f"gn_silu_dual_bwd_out{suffix}", (x, xd, w, b, stats, gy, gyd, G, mask, 1 / 0.7, out(x.dtype)))]
    return samples


def _att_samples(suffix, device="cpu"):
    fwd = getattr(OPS, f"attention_dual_fwd{suffix}")
    ins = _att_inputs(device=device)
    o, od, lse, mu = fwd(*ins, 0.7)
    g = _gen(3)
    go, god = (torch.randn(o.shape, generator=g, dtype=o.dtype).to(device) for _ in range(2))
    # q, k, v (and their tangents) as strided views of one [B, N, 3, H, D] projection, as a transformer block
    # splits its qkv: the op's outputs must have the strides its fake says (inductor checks them).
    b_, h_, n_, d_ = ATT["q"]
    qkv = [t.reshape(b_, n_, 3, h_, d_).permute(2, 0, 3, 1, 4).unbind(0)
           for t in (torch.randn(b_, n_, 3 * h_ * d_, generator=g, dtype=torch.float64).to(device) for _ in range(2))]
    strided = (*qkv[0], *qkv[1])
    so, sod, slse, smu = fwd(*strided, 0.7)
    sgo, sgod = (torch.randn(so.shape, generator=g, dtype=so.dtype).to(device) for _ in range(2))
    return [
        (f"attention_dual_fwd{suffix}", strided + (0.7,)),
        (f"attention_dual_bwd{suffix}", (*strided, so, sod, slse, smu, sgo, sgod, 0.7)),
        (f"attention_dual_fwd{suffix}", (*_att_inputs(grad=True, device=device), 0.7)),
        (f"attention_dual_fwd{suffix}", (*_att_inputs(torch.float32, device=device), 0.5)),
        (f"attention_dual_bwd{suffix}", (*ins, o, od, lse, mu, go, god, 0.7)),
        (f"attention_dual_bwd{suffix}", (*ins, o, od, lse, mu, go, None, 0.7)),
    ]


TORCH_SAMPLES = _gn_samples("_torch") + _att_samples("_torch")


def _ids(samples):
    return [f"{name}-{i}" for i, (name, _) in enumerate(samples)]


@pytest.mark.parametrize("name,args", TORCH_SAMPLES, ids=_ids(TORCH_SAMPLES))
def test_opcheck_torch_ops(name, args):
    torch.library.opcheck(getattr(OPS, name).default, args)


@needs_cpp
@pytest.mark.parametrize("k", range(2))
def test_opcheck_cpp_forward_with_autograd(k):
    """The C++ forward's autograd formula (registered from Python): opcheck with inputs that need gradients
    (tests/ops/test_cpp_ext.py opchecks the C++ ops' other cases)."""
    cpp_ext.load()
    name, args = _gn_samples("")[k]
    torch.library.opcheck(getattr(OPS, name).default, args)


def _pointwise_samples():
    g = torch.Generator().manual_seed(21)
    x, xd, gy, gyd = (torch.randn(3, 7, 5, generator=g, dtype=torch.float64) for _ in range(4))
    return [("pointwise_dual_fwd", (x, xd, "gelu_tanh")), ("pointwise_dual_fwd", (x.mT, xd.mT, "silu")),
            ("pointwise_dual_bwd", (x, xd, gy, gyd, "gelu_tanh")), ("pointwise_dual_bwd", (x, xd, gy, None, "silu")),
            ("pointwise_dual_bwd", (x.float(), xd.float(), None, gyd.float(), "silu")),
            ("pointwise_dual_bwd_", (x, xd, gy.clone(), gyd.clone(), "gelu_tanh")),
            ("pointwise_dual_bwd_", (x.mT, xd.mT, gy.mT.contiguous(), gyd.mT.contiguous(), "silu"))]


@needs_cpp
@pytest.mark.parametrize("k", range(7))
def test_opcheck_cpp_pointwise_ops(k):
    """The C++ dual GELU / SiLU ops (sgflow.ops.pointwise; no autograd formula of their own: PointwiseDual
    is the Function): schema and fake implementation."""
    cpp_ext.load()
    name, args = _pointwise_samples()[k]
    torch.library.opcheck(getattr(OPS, name).default, args)


def _scale_samples():
    g = torch.Generator().manual_seed(23)
    x, xd, gy, gyd = (torch.randn(3, 1, 7, 5, generator=g, dtype=torch.float64) for _ in range(4))
    s, sd = (torch.randn(3, 7, generator=g, dtype=torch.float64) for _ in range(2))
    xc, xcd = (torch.randn(2, 1, 6, 4, generator=g) for _ in range(2))
    sc, scd = (torch.randn(1, 6, generator=g) for _ in range(2))
    return [("scale_dual_fwd", (x, xd, s, sd)), ("scale_dual_fwd", (xc, xcd.mT.contiguous().mT, sc, scd)),
            ("scale_dual_bwd", (x, xd, s, sd, gy, gyd)), ("scale_dual_bwd", (xc, xcd, sc, scd, xcd * 2, xc * 3))]


@needs_cpp
@pytest.mark.parametrize("k", range(4))
def test_opcheck_cpp_scale_ops(k):
    """The C++ dual products with a broadcast factor (sgflow.ops.scale; ScaleDual is the Function): schema and fake
    implementation, a shared factor and strided tangents included."""
    cpp_ext.load()
    name, args = _scale_samples()[k]
    torch.library.opcheck(getattr(OPS, name).default, args)


@needs_cpp
@pytest.mark.parametrize("k", range(6))
def test_opcheck_cpp_attention_ops(k):
    """The C++ dual attention ops (sgflow.ops.attention, backend "cpp"): schema, fake implementation (strided
    inputs included) and the forward's autograd formula (its backward op)."""
    cpp_ext.load()
    name, args = _att_samples("_cpu")[k]
    torch.library.opcheck(getattr(OPS, name).default, args)


@needs_triton
def test_opcheck_triton_ops():
    """Triton ops: schema and autograd registration everywhere; on a GPU also fake tensors and AOT dispatch.
    Under the CPU interpreter the fake check cannot run: it launches the kernel on fake tensors, whose
    storage the interpreter copies to the host ("Attempted to set the storage of a tensor on device
    'meta'"), so those two checks are GPU-only."""
    if not (on_gpu or interpreting):
        pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1")
    gs._triton_ops()
    att._triton_ops()
    device = "cuda" if on_gpu else "cpu"
    utils = ("test_schema", "test_autograd_registration") + (() if not on_gpu else ("test_faketensor", "test_aot_dispatch_dynamic"))
    for name, args in _gn_samples("_triton", device) + _att_samples("_triton", device):
        torch.library.opcheck(getattr(OPS, name).default, args, test_utils=utils)


def test_every_sgflow_op_is_opchecked_here():
    """All ops of the sgflow namespace (after loading the C++ and Triton ones) have samples in this file."""
    if cpp_ext.available():
        cpp_ext.load()
    if triton_available() and (on_gpu or interpreting):
        gs._triton_ops()
        att._triton_ops()
    registered = {n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("sgflow::")}
    registered -= {"_cpu_isa", "_attention_blas"}  # introspection (tests/ops/test_cpp_ext.py, test_attention.py)
    sampled = {name for name, _ in TORCH_SAMPLES}
    if cpp_ext.available():
        sampled |= {name for name, _ in _gn_samples("") + _pointwise_samples() + _scale_samples() + _att_samples("_cpu")}
    if triton_available() and (on_gpu or interpreting):
        sampled |= {name for name, _ in _gn_samples("_triton") + _att_samples("_triton")}
    assert registered >= {"gn_silu_dual_fwd_torch", "attention_dual_bwd_torch"}
    assert registered <= sampled, f"registered sgflow ops without opcheck samples: {sorted(registered - sampled)}"


# ------------------------------------------------------------------------------------------------
# The forward ops are differentiable on their own: gradcheck through the op (float64).

def test_gradcheck_through_registered_gn_silu_forward_op():
    x, xd, w, b, _, _ = _gn_inputs(grad=True)
    fn = lambda *a: OPS.gn_silu_dual_fwd_torch(*a, G, EPS)[:2]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, xd, w, b), eps=1e-6, atol=1e-7)


def test_gradcheck_through_registered_attention_forward_op():
    ins = _att_inputs(grad=True)
    fn = lambda *a: OPS.attention_dual_fwd_torch(*a, 0.7)[:2]  # noqa: E731
    assert torch.autograd.gradcheck(fn, tuple(ins), eps=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------------
# torch.func over the functional API: vmap equals a loop, per-sample gradients equal autograd's.

GN_BACKENDS = ["torch", pytest.param("cpp", marks=needs_cpp)]


@pytest.mark.parametrize("backend", GN_BACKENDS)
def test_vmap_groupnorm_silu_dual_equals_loop(backend):
    g = _gen(4)
    x = torch.randn(3, *SHAPE, generator=g, dtype=torch.float64)  # vmapped dim 3, then [B, C, H, W]
    xd = torch.randn(x.shape, generator=g, dtype=torch.float64)
    w = 1 + 0.3 * torch.randn(SHAPE[1], generator=g, dtype=torch.float64)
    f = lambda x, xd: gs.groupnorm_silu_dual(x, xd, w, None, G, backend=backend)  # noqa: E731
    y, yd = torch.func.vmap(f)(x, xd)
    for i in range(3):
        yi, ydi = f(x[i], xd[i])
        torch.testing.assert_close(y[i], yi, rtol=0, atol=0)
        torch.testing.assert_close(yd[i], ydi, rtol=0, atol=0)
    # Per-slice gradients of a scalar through both outputs (backward op under vmap).
    loss = lambda x, xd: sum(t.square().sum() for t in f(x, xd))  # noqa: E731
    gx = torch.func.vmap(torch.func.grad(loss))(x, xd)
    for i in range(3):
        xi = x[i].clone().requires_grad_()
        torch.testing.assert_close(gx[i], torch.autograd.grad(loss(xi, xd[i]), xi)[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpp", marks=needs_cpp)])
def test_vmap_attention_dual_equals_loop(backend):
    g = _gen(5)
    ins = [torch.randn(2, *ATT[n], generator=g, dtype=torch.float64) for n in "qkvqkv"]
    f = lambda *a: att.attention_dual(*a, backend=backend)  # noqa: E731
    o, od = torch.func.vmap(f)(*ins)
    for i in range(2):
        oi, odi = f(*(t[i] for t in ins))
        torch.testing.assert_close(o[i], oi, rtol=0, atol=0)
        torch.testing.assert_close(od[i], odi, rtol=0, atol=0)
    loss = lambda q, *rest: sum(t.square().sum() for t in f(q, *rest))  # noqa: E731
    gq = torch.func.vmap(torch.func.grad(loss))(*ins)
    for i in range(2):
        qi = ins[0][i].clone().requires_grad_()
        ref = torch.autograd.grad(loss(qi, *(t[i] for t in ins[1:])), qi)[0]
        torch.testing.assert_close(gq[i], ref, rtol=1e-12, atol=1e-12)
