"""Dual GroupNorm -> SiLU op and the fused GroupNorm -> SiLU -> Dropout -> Conv2d stage.

References are float64 ``torch.func.jvp`` of the plain PyTorch composition plus autograd of
``<g, y> + <g_dot, y_dot>`` (sgflow.testing). Triton-kernel specific tests (looped tiles, stats,
GPU dtypes) live in tests/kernels/test_groupnorm_silu_triton.py; here the Triton backend is exercised
through the public API on a few small cases (CPU: TRITON_INTERPRET=1, see tests/conftest.py).
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from sgflow.ops.backend import triton_available, triton_interpreting
from sgflow.ops.groupnorm_silu import (
    GNSiLUConvDual,
    GroupNormSiLUDual,
    gn_silu_conv_dual,
    groupnorm_silu_dual,
    groupnorm_silu_dual_ref,
    make_dropout_mask,
)
from sgflow.testing import dual_grads, jvp_reference, rel_err

EPS = 1e-5
TOL = {torch.float64: 1e-10, torch.float32: 1e-4}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_OK = triton_available() and (torch.cuda.is_available() or triton_interpreting())
needs_triton = pytest.mark.skipif(not TRITON_OK, reason="triton needs CUDA or TRITON_INTERPRET=1")

# (x shape, num_groups)
GN_CASES = [
    pytest.param((3, 63, 7, 5), 7, id="b3-c63-g7-7x5"),
    pytest.param((3, 63, 7, 5), 9, id="b3-c63-g9-7x5"),
    pytest.param((2, 32, 4, 4), 8, id="b2-c32-g8-4x4"),
    pytest.param((2, 12, 9), 3, id="b2-c12-g3-1d9"),
    pytest.param((2, 8, 3, 4, 5), 2, id="b2-c8-g2-3d3x4x5"),
    pytest.param((4, 12), 2, id="b4-c12-g2-nospatial"),  # n=2 would make y_dot ~ 0 (ill-conditioned)
    pytest.param((2, 5, 3, 3), 1, id="b2-c5-g1-3x3"),
    pytest.param((2, 6, 3, 2), 6, id="b2-c6-g6-3x2"),
]
# Cases the (slow, interpreted) Triton backend runs through the public API.
GN_TRITON_CASES = [GN_CASES[0], GN_CASES[1], GN_CASES[3], GN_CASES[4]]

# (x shape, num_groups, Cout, kernel size, padding)
STAGE_CASES = [
    pytest.param((3, 63, 7, 5), 7, 10, 3, 1, id="b3-c63-g7-7x5-k3p1"),
    pytest.param((2, 32, 4, 4), 8, 16, 3, 1, id="b2-c32-g8-4x4-k3p1"),
    pytest.param((2, 12, 6, 5), 3, 5, 1, 0, id="b2-c12-g3-6x5-k1p0"),
    pytest.param((2, 8, 5, 5), 4, 3, 3, 0, id="b2-c8-g4-5x5-k3p0"),
]


def _inputs(shape, num_groups, seed=0, device="cpu", affine=True):
    """float64 x (non-zero mean), x_dot, gamma ~ 1, beta ~ 0."""
    gen = torch.Generator().manual_seed(seed)
    C = shape[1]
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 1.5 + 0.5
    xd = torch.randn(shape, generator=gen, dtype=torch.float64)
    w = 1 + 0.5 * torch.randn(C, generator=gen, dtype=torch.float64) if affine else None
    b = 0.3 * torch.randn(C, generator=gen, dtype=torch.float64) if affine else None
    to = (lambda t: None if t is None else t.to(device))
    return to(x), to(xd), to(w), to(b)


def _conv_params(cout, cin, k, seed=1, device="cpu", bias=True):
    gen = torch.Generator().manual_seed(seed)
    cw = torch.randn(cout, cin, k, k, generator=gen, dtype=torch.float64) / (cin * k * k) ** 0.5
    cb = torch.randn(cout, generator=gen, dtype=torch.float64) if bias else None
    return cw.to(device), (cb.to(device) if cb is not None else None)


def compare_dual(ref_factory, dual_factory, x, xd, params, dtype, tol, names=None):
    """Compare a dual op in ``dtype`` against the float64 jvp reference on the same rounded inputs.

    ``ref_factory(*params64)`` / ``dual_factory(*params)`` return functions of (x) / (x, x_dot); the
    ``params`` (float64, None allowed) are closed over and differentiated. Returns the error dict.
    """
    x64, xd64 = x.to(dtype).double(), xd.to(dtype).double()
    p64 = [None if p is None else p.to(dtype).double().requires_grad_(True) for p in params]
    y, yd, (g, gd), grads = jvp_reference(ref_factory(*p64), [x64], [xd64], [p for p in p64 if p is not None])
    pl = [None if p is None else p.to(dtype).detach().requires_grad_(True) for p in params]
    y2, yd2, grads2 = dual_grads(dual_factory(*pl), [x64.to(dtype)], [xd64.to(dtype)],
                                 [p for p in pl if p is not None], (g.to(dtype), gd.to(dtype)))
    assert y2.dtype == dtype and yd2.dtype == dtype
    names = names or ["x", "x_dot"] + [f"p{i}" for i in range(len(grads) - 2)]
    errs = {"y": rel_err(y2, y), "y_dot": rel_err(yd2, yd)}
    for name, a, b in zip(names, grads2, grads):
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.dtype == dtype, name
            errs["grad_" + name] = rel_err(a, b)
    bad = {k: v for k, v in errs.items() if not v < tol}
    assert not bad, f"errors above {tol}: {bad} (all: {errs})"
    return errs


def _gn_ref(G):
    return lambda w, b: (lambda x: F.silu(F.group_norm(x, G, w, b, EPS)))


# ----------------------------------------------------------------------------------------------------
# GroupNorm -> SiLU
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,G", GN_CASES)
def test_ref_matches_jvp(shape, G):
    x, xd, w, b = _inputs(shape, G)
    compare_dual(_gn_ref(G), lambda w, b: (lambda x, xd: groupnorm_silu_dual_ref(x, xd, w, b, G, EPS)),
                 x, xd, [w, b], torch.float64, TOL[torch.float64], ["x", "x_dot", "weight", "bias"])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("shape,G", GN_CASES)
def test_torch_backend_matches_jvp(shape, G, dtype):
    x, xd, w, b = _inputs(shape, G)
    compare_dual(_gn_ref(G), lambda w, b: (lambda x, xd: groupnorm_silu_dual(x, xd, w, b, G, EPS, backend="torch")),
                 x, xd, [w, b], dtype, TOL[dtype], ["x", "x_dot", "weight", "bias"])


@pytest.mark.parametrize("samples_per_chunk", [1, 2], ids=["chunk1", "chunk2"])
def test_torch_backend_chunked_over_samples_matches_jvp(monkeypatch, samples_per_chunk):
    """The torch backend splits the batch into chunks of whole samples (bounded temporaries): forcing
    one and two samples per chunk (the last chunk shorter, B=5) must not change any output or gradient."""
    import sgflow.ops.groupnorm_silu as gns

    shape, G = (5, 63, 7, 5), 7
    per_sample = 63 * 7 * 5
    monkeypatch.setitem(gns.CHUNK_ELEMENTS, "cpu", samples_per_chunk * per_sample + per_sample // 2)
    x, xd, w, b = _inputs(shape, G)
    assert len(gns._sample_chunks(x)) == -(-5 // samples_per_chunk)
    compare_dual(_gn_ref(G), lambda w, b: (lambda x, xd: groupnorm_silu_dual(x, xd, w, b, G, EPS, backend="torch")),
                 x, xd, [w, b], torch.float64, TOL[torch.float64], ["x", "x_dot", "weight", "bias"])
    gen = torch.Generator().manual_seed(3)
    mask = make_dropout_mask(shape, 0.3, generator=gen)
    cw, cb = _conv_params(4, 63, 3)
    compare_dual(_stage_ref(G, 1, mask=mask, p=0.3), _stage_dual(G, 1, "torch", dropout_mask=mask, dropout_p=0.3, training=True),
                 x, xd, [w, b, cw, cb], torch.float64, TOL[torch.float64], STAGE_NAMES)


def test_torch_backend_temporaries_stay_within_a_few_chunks(monkeypatch):
    """What chunking is for: with 8 chunks, the forward holds its two outputs plus about a chunk's worth of
    temporaries per elementwise step, the backward likewise (the unchunked code held ~10 activations more)."""
    import sgflow.ops.groupnorm_silu as gns
    from sgflow.memory import peak_tensor_bytes

    B, C, H, W, G = 16, 32, 8, 8, 8
    monkeypatch.setitem(gns.CHUNK_ELEMENTS, "cpu", 2 * C * H * W)
    gen = torch.Generator().manual_seed(5)
    x, xd, gy, gyd = (torch.randn(B, C, H, W, generator=gen) for _ in range(4))
    w, b = torch.randn(C, generator=gen), torch.randn(C, generator=gen)
    activation = x.numel() * x.element_size()
    fwd = peak_tensor_bytes(lambda: gns._gn_silu_dual_fwd_torch(x, xd, w, b, G, EPS))
    stats = fwd["result"][2]
    bwd = peak_tensor_bytes(lambda: gns._gn_silu_dual_bwd_torch(x, xd, w, b, stats, gy, gyd, G))
    assert 2 * activation <= fwd["peak_bytes"] <= 3.5 * activation, fwd["peak_bytes"] / activation
    assert 2 * activation <= bwd["peak_bytes"] <= 4.0 * activation, bwd["peak_bytes"] / activation


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("shape,G", GN_TRITON_CASES)
def test_triton_backend_matches_jvp(shape, G, dtype):
    x, xd, w, b = _inputs(shape, G, device=DEVICE)
    compare_dual(_gn_ref(G), lambda w, b: (lambda x, xd: groupnorm_silu_dual(x, xd, w, b, G, EPS, backend="triton")),
                 x, xd, [w, b], dtype, TOL[dtype], ["x", "x_dot", "weight", "bias"])


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_no_affine(backend):
    shape, G = (2, 12, 5, 3), 4
    x, xd, _, _ = _inputs(shape, G, device=DEVICE if backend == "triton" else "cpu")
    compare_dual(lambda: (lambda x: F.silu(F.group_norm(x, G, None, None, EPS))),
                 lambda: (lambda x, xd: groupnorm_silu_dual(x, xd, None, None, G, EPS, backend=backend)),
                 x, xd, [], torch.float64, TOL[torch.float64])


@pytest.mark.parametrize("which", ["y-only", "ydot-only"])
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_single_output_gradient(backend, which):
    """Backward with one cotangent None (the Function does not materialise zeros)."""
    shape, G = (2, 12, 5, 3), 3
    dev = DEVICE if backend == "triton" else "cpu"
    x, xd, w, b = _inputs(shape, G, device=dev)
    leaves = [t.clone().requires_grad_(True) for t in (x, xd, w, b)]
    y, yd = groupnorm_silu_dual(*leaves, G, EPS, backend=backend)
    out = y if which == "y-only" else yd
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, g, allow_unused=True)
    ref_leaves = [t.clone().requires_grad_(True) for t in (x, xd, w, b)]
    y_r, yd_r = torch.func.jvp(lambda x: F.silu(F.group_norm(x, G, ref_leaves[2], ref_leaves[3], EPS)),
                               (ref_leaves[0],), (ref_leaves[1],))
    out_r = y_r if which == "y-only" else yd_r
    ref = torch.autograd.grad(out_r, ref_leaves, g, allow_unused=True)
    for name, a, r in zip(["x", "x_dot", "weight", "bias"], grads, ref):
        if r is None or (r == 0).all():
            assert a is None or (a == 0).all(), name
        else:
            assert rel_err(a, r) < 1e-10, name


def test_bf16_torch_backend_stats_in_fp32():
    """Low precision inputs: statistics/arithmetic in fp32, outputs and grads back in the input dtype."""
    shape, G = (2, 16, 6, 6), 4
    x, xd, w, b = _inputs(shape, G)
    xb, xdb = x.bfloat16(), xd.bfloat16()
    y, yd = groupnorm_silu_dual(xb, xdb, w.float(), b.float(), G, EPS, backend="torch")
    assert y.dtype == yd.dtype == torch.bfloat16
    y_r, yd_r = groupnorm_silu_dual_ref(xb.double(), xdb.double(), w, b, G, EPS)
    assert rel_err(y, y_r) < 1e-2 and rel_err(yd, yd_r) < 1e-2
    from sgflow.ops.groupnorm_silu import _gn_silu_dual_fwd_torch

    _, _, stats = _gn_silu_dual_fwd_torch(xb, xdb, w.float(), b.float(), G, EPS)
    assert stats.dtype == torch.float32 and stats.shape == (4, 2, G)
    # The values, not just the dtype: float64 statistics of the same bf16 inputs (see the module doc of
    # sgflow.ops.groupnorm_silu). fp32 accumulation over 144 elements errs ~1e-7; a bf16 computation
    # (or bf16 rounding of the results) errs ~1e-3.
    xg, xdg = xb.double().reshape(2, G, -1), xdb.double().reshape(2, G, -1)
    mean, mean_dot = xg.mean(-1), xdg.mean(-1)
    d = xg - mean[..., None]
    rstd = torch.rsqrt(d.square().mean(-1) + EPS)
    rstd_dot = -rstd.pow(3) * (d * (xdg - mean_dot[..., None])).mean(-1)
    for i, (name, want) in enumerate(zip(("mean", "rstd", "mean_dot", "rstd_dot"), (mean, rstd, mean_dot, rstd_dot))):
        assert rel_err(stats[i], want) < 1e-5, (name, rel_err(stats[i], want))
    leaves = [xb.clone().requires_grad_(), xdb.clone().requires_grad_(), w.float().requires_grad_(),
              b.float().requires_grad_()]
    y, yd = groupnorm_silu_dual(*leaves, G, EPS, backend="torch")
    gx, gxd, gw, gb = torch.autograd.grad((y.float().sum() + yd.float().square().sum()), leaves)
    assert gx.dtype == gxd.dtype == torch.bfloat16 and gw.dtype == gb.dtype == torch.float32


def test_gradcheck_groupnorm_silu_torch():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 3, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    xd = torch.randn(2, 4, 3, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    w = (1 + 0.3 * torch.randn(4, generator=gen, dtype=torch.float64)).requires_grad_()
    b = (0.3 * torch.randn(4, generator=gen, dtype=torch.float64)).requires_grad_()
    fn = lambda x, xd, w, b: GroupNormSiLUDual.apply(x, xd, w, b, 2, EPS, "torch")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, xd, w, b), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_outputs_are_not_views():
    x, xd, w, b = _inputs((2, 4, 3, 3), 2)
    y, yd = groupnorm_silu_dual(x.requires_grad_(), xd, w, b, 2, backend="torch")
    assert y._base is None and yd._base is None
    y.add_(1.0)  # in-place use downstream is allowed


# ----------------------------------------------------------------------------------------------------
# GroupNorm -> SiLU -> Dropout -> Conv2d stage
# ----------------------------------------------------------------------------------------------------
def _stage_ref(G, pad, mask=None, p=0.0):
    def factory(w, b, cw, cb):
        def fn(x):
            a = F.silu(F.group_norm(x, G, w, b, EPS))
            if mask is not None:
                a = a * mask / (1 - p)
            return F.conv2d(a, cw, cb, padding=pad)
        return fn
    return factory


def _stage_dual(G, pad, backend, **kw):
    return lambda w, b, cw, cb: (lambda x, xd: gn_silu_conv_dual(x, xd, w, b, G, cw, cb, pad, EPS,
                                                                 backend=backend, **kw))


STAGE_NAMES = ["x", "x_dot", "gn_weight", "gn_bias", "conv_weight", "conv_bias"]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("shape,G,cout,k,pad", STAGE_CASES)
def test_stage_torch_matches_jvp(shape, G, cout, k, pad, dtype):
    x, xd, w, b = _inputs(shape, G)
    cw, cb = _conv_params(cout, shape[1], k)
    compare_dual(_stage_ref(G, pad), _stage_dual(G, pad, "torch"), x, xd, [w, b, cw, cb], dtype, TOL[dtype],
                 STAGE_NAMES)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("shape,G,cout,k,pad", STAGE_CASES[:2])
def test_stage_triton_matches_jvp(shape, G, cout, k, pad, dtype):
    x, xd, w, b = _inputs(shape, G, device=DEVICE)
    cw, cb = _conv_params(cout, shape[1], k, device=DEVICE)
    compare_dual(_stage_ref(G, pad), _stage_dual(G, pad, "triton"), x, xd, [w, b, cw, cb], dtype, TOL[dtype],
                 STAGE_NAMES)


def test_stage_no_conv_bias():
    shape, G, cout, k, pad = (2, 12, 6, 5), 3, 5, 3, 1
    x, xd, w, b = _inputs(shape, G)
    cw, _ = _conv_params(cout, shape[1], k)
    compare_dual(lambda w, b, cw: _stage_ref(G, pad)(w, b, cw, None),
                 lambda w, b, cw: _stage_dual(G, pad, "torch")(w, b, cw, None),
                 x, xd, [w, b, cw], torch.float64, TOL[torch.float64], STAGE_NAMES[:5])


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_stage_dropout_matches_jvp_with_same_mask(backend):
    shape, G, cout, k, pad, p = (3, 63, 7, 5), 7, 10, 3, 1, 0.3
    dev = DEVICE if backend == "triton" else "cpu"
    x, xd, w, b = _inputs(shape, G, device=dev)
    cw, cb = _conv_params(cout, shape[1], k, device=dev)
    mask = make_dropout_mask(shape, p, device=dev, generator=torch.Generator(dev).manual_seed(7))
    assert 0.5 < mask.float().mean().item() < 0.9
    compare_dual(_stage_ref(G, pad, mask, p),
                 _stage_dual(G, pad, backend, dropout_p=p, training=True, dropout_mask=mask),
                 x, xd, [w, b, cw, cb], torch.float64, TOL[torch.float64], STAGE_NAMES)


def test_stage_dropout_generator_reproducible_and_shared():
    shape, G, p = (2, 8, 5, 5), 4, 0.4
    x, xd, w, b = _inputs(shape, G)
    cw, cb = _conv_params(3, 8, 3)
    run = lambda **kw: gn_silu_conv_dual(x, xd, w, b, G, cw, cb, 1, EPS, dropout_p=p, training=True,  # noqa: E731
                                         backend="torch", **kw)
    y1, yd1 = run(generator=torch.Generator().manual_seed(11))
    y2, yd2 = run(generator=torch.Generator().manual_seed(11))
    mask = make_dropout_mask(shape, p, generator=torch.Generator().manual_seed(11))
    y3, yd3 = run(dropout_mask=mask)
    assert torch.equal(y1, y2) and torch.equal(yd1, yd2)
    assert torch.equal(y1, y3) and torch.equal(yd1, yd3)
    # The tangent is the JVP of the primal with the SAME mask (shared by both streams).
    _, yd_ref = torch.func.jvp(_stage_ref(G, 1, mask, p)(w, b, cw, cb), (x,), (xd,))
    assert rel_err(yd1, yd_ref) < 1e-12
    y4, _ = run(generator=torch.Generator().manual_seed(12))
    assert not torch.equal(y1, y4)


@pytest.mark.parametrize("which", ["y-only", "ydot-only"])
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_stage_single_output_gradient(backend, which):
    """Only one half of the stacked conv output gets a gradient: conv backward on that half only."""
    shape, G, cout = (2, 12, 5, 4), 3, 4
    dev = DEVICE if backend == "triton" else "cpu"
    x, xd, w, b = _inputs(shape, G, device=dev)
    cw, cb = _conv_params(cout, 12, 3, device=dev)
    leaves = [t.clone().requires_grad_(True) for t in (x, xd, w, b, cw, cb)]
    ref_leaves = [t.clone().requires_grad_(True) for t in (x, xd, w, b, cw, cb)]
    outs = gn_silu_conv_dual(leaves[0], leaves[1], leaves[2], leaves[3], G, leaves[4], leaves[5], 1,
                             backend=backend)
    outs_r = torch.func.jvp(_stage_ref(G, 1)(*ref_leaves[2:]), (ref_leaves[0],), (ref_leaves[1],))
    k = 0 if which == "y-only" else 1
    g = torch.randn_like(outs[k])
    grads = torch.autograd.grad(outs[k], leaves, g, allow_unused=True)
    ref = torch.autograd.grad(outs_r[k], ref_leaves, g, allow_unused=True)
    for name, a, r in zip(STAGE_NAMES, grads, ref):
        if r is None or (r == 0).all():
            assert a is None or (a == 0).all(), name
        else:
            assert rel_err(a, r) < 1e-10, name


def test_stage_dropout_inactive_in_eval():
    shape, G = (2, 8, 5, 5), 4
    x, xd, w, b = _inputs(shape, G)
    cw, cb = _conv_params(3, 8, 3)
    y0, yd0 = gn_silu_conv_dual(x, xd, w, b, G, cw, cb, 1, backend="torch")
    y1, yd1 = gn_silu_conv_dual(x, xd, w, b, G, cw, cb, 1, dropout_p=0.5, training=False, backend="torch")
    assert torch.equal(y0, y1) and torch.equal(yd0, yd1)


@pytest.mark.parametrize("dropout", [False, True], ids=["nodrop", "dropout"])
def test_gradcheck_stage_torch(dropout):
    gen = torch.Generator().manual_seed(5)
    kw = dict(generator=gen, dtype=torch.float64)
    x = torch.randn(2, 4, 4, 3, **kw).requires_grad_()
    xd = torch.randn(2, 4, 4, 3, **kw).requires_grad_()
    w = (1 + 0.3 * torch.randn(4, **kw)).requires_grad_()
    b = (0.3 * torch.randn(4, **kw)).requires_grad_()
    cw = (0.3 * torch.randn(3, 4, 3, 3, **kw)).requires_grad_()
    cb = torch.randn(3, **kw).requires_grad_()
    mask = make_dropout_mask(x.shape, 0.3, generator=torch.Generator().manual_seed(2)) if dropout else None
    scale = 1 / 0.7 if dropout else 1.0
    fn = lambda *a: GNSiLUConvDual.apply(*a, 2, EPS, (1, 1), mask, scale, "torch")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, xd, w, b, cw, cb), eps=1e-6, atol=1e-7, rtol=1e-5)


def _saved_bytes(fn):
    """Bytes of all tensors autograd saves while running fn (deduplicated by storage)."""
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(storages.values()), out


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("dropout", [False, True], ids=["nodrop", "dropout"])
def test_stage_saves_only_inputs_stats_and_mask(dropout, backend):
    shape, G, cout = (2, 16, 8, 8), 4, 8
    dev = DEVICE if backend == "triton" else "cpu"
    x, xd, w, b = [t.float().requires_grad_() for t in _inputs(shape, G, device=dev)]
    cw, cb = [t.float().requires_grad_() for t in _conv_params(cout, 16, 3, device=dev)]
    kw = dict(dropout_p=0.2, training=True, generator=torch.Generator(dev).manual_seed(0)) if dropout else {}
    nbytes, (y, yd) = _saved_bytes(lambda: gn_silu_conv_dual(x, xd, w, b, G, cw, cb, 1, backend=backend, **kw))
    stats = 4 * shape[0] * G * 4
    mask = x.numel() if dropout else 0  # bool
    inputs = sum(t.numel() * t.element_size() for t in (x, xd, w, b, cw, cb))
    assert nbytes <= inputs + stats + mask
    assert nbytes < inputs * 1.1 + stats + mask
    (y.sum() + yd.square().sum()).backward()  # what was saved is enough for backward
    assert x.grad is not None and cw.grad is not None


def test_groupnorm_silu_saves_only_inputs_and_stats():
    x, xd, w, b = [t.requires_grad_() for t in _inputs((2, 16, 8, 8), 4)]
    nbytes, _ = _saved_bytes(lambda: groupnorm_silu_dual(x, xd, w, b, 4, backend="torch"))
    inputs = sum(t.numel() * t.element_size() for t in (x, xd, w, b))
    assert nbytes <= inputs + 4 * 2 * 4 * 8


def test_stage_padding_forms():
    x, xd, w, b = _inputs((2, 8, 5, 4), 4)
    cw, cb = _conv_params(3, 8, 3)
    y1, yd1 = gn_silu_conv_dual(x, xd, w, b, 4, cw, cb, 1, backend="torch")
    y2, yd2 = gn_silu_conv_dual(x, xd, w, b, 4, cw, cb, "same", backend="torch")
    y3, _ = gn_silu_conv_dual(x, xd, w, b, 4, cw, cb, (1, 1), backend="torch")
    y4, _ = gn_silu_conv_dual(x, xd, w, b, 4, cw, cb, "valid", backend="torch")
    assert torch.equal(y1, y2) and torch.equal(yd1, yd2) and torch.equal(y1, y3)
    assert y4.shape == (2, 3, 3, 2)


# ----------------------------------------------------------------------------------------------------
# input validation
# ----------------------------------------------------------------------------------------------------
def _bad_gn_calls():
    x, xd, w, b = _inputs((2, 6, 3, 3), 3)
    return [
        pytest.param(lambda: groupnorm_silu_dual(x, xd[:, :3], w, b, 3), ValueError, "does not match x shape",
                     id="xdot-shape"),
        pytest.param(lambda: groupnorm_silu_dual(x, xd, w, b, 4), ValueError, "not divisible", id="groups"),
        pytest.param(lambda: groupnorm_silu_dual(x, xd, w, b, 0), ValueError, "positive int", id="groups0"),
        pytest.param(lambda: groupnorm_silu_dual(x, xd.float(), w, b, 3), TypeError, "dtype", id="xdot-dtype"),
        pytest.param(lambda: groupnorm_silu_dual(x, xd.to("meta"), w, b, 3), ValueError, "is on",
                     id="xdot-device"),
        pytest.param(lambda: groupnorm_silu_dual(x, xd, w[:5], b, 3), ValueError, "weight must have shape",
                     id="weight-shape"),
        pytest.param(lambda: groupnorm_silu_dual(x, xd, w.float(), b, 3), TypeError, "weight dtype",
                     id="weight-dtype"),
        pytest.param(lambda: groupnorm_silu_dual(x, xd, w, b.to("meta"), 3), ValueError, "bias is on",
                     id="bias-device"),
        pytest.param(lambda: groupnorm_silu_dual(x[:, :, 0, 0].sum(1), xd[:, :, 0, 0].sum(1), None, None, 1),
                     ValueError, r"\[B, C, \*spatial\]", id="x-1d"),
        pytest.param(lambda: groupnorm_silu_dual(x.long(), xd.long(), None, None, 3), TypeError,
                     "floating-point", id="x-int"),
        pytest.param(lambda: groupnorm_silu_dual(x, xd, w, b, 3, backend="nope"), ValueError, "unknown sgflow",
                     id="backend"),
    ]


@pytest.mark.parametrize("call,exc,match", _bad_gn_calls())
def test_groupnorm_silu_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def _bad_stage_calls():
    x, xd, w, b = _inputs((2, 6, 3, 3), 3)
    cw, cb = _conv_params(4, 6, 3)
    mask = torch.ones(x.shape, dtype=torch.bool)
    return [
        pytest.param(lambda: gn_silu_conv_dual(x, xd, w, b, 3, cw[:, :5], cb, 1), ValueError, "conv_weight must",
                     id="conv-cin"),
        pytest.param(lambda: gn_silu_conv_dual(x, xd, w, b, 3, cw.float(), cb, 1), TypeError, "conv_weight dtype",
                     id="conv-dtype"),
        pytest.param(lambda: gn_silu_conv_dual(x, xd, w, b, 3, cw, cb[:3], 1), ValueError, "conv_bias must",
                     id="conv-bias-shape"),
        pytest.param(lambda: gn_silu_conv_dual(x[..., 0], xd[..., 0], w, b, 3, cw, cb, 1), ValueError,
                     r"\[B, C, H, W\]", id="x-3d"),
        pytest.param(lambda: gn_silu_conv_dual(x, xd, w, b, 3, cw, cb, 1, dropout_p=1.5), ValueError,
                     "dropout_p", id="dropout-p"),
        pytest.param(lambda: gn_silu_conv_dual(x, xd, w, b, 3, cw, cb, 1, dropout_mask=mask), ValueError,
                     "inactive", id="mask-inactive"),
        pytest.param(lambda: gn_silu_conv_dual(x, xd, w, b, 3, cw, cb, 1, dropout_p=0.1, training=True,
                                               dropout_mask=mask.float()), ValueError, "bool tensor",
                     id="mask-dtype"),
        pytest.param(lambda: gn_silu_conv_dual(x, xd, w, b, 3, cw, cb, "bogus"), ValueError, "padding",
                     id="padding"),
        pytest.param(lambda: gn_silu_conv_dual(x, xd, w, b, 4, cw, cb, 1), ValueError, "not divisible",
                     id="groups"),
    ]


@pytest.mark.parametrize("call,exc,match", _bad_stage_calls())
def test_stage_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_imports_and_runs_without_triton():
    """sgflow must not need triton: block the import and use the torch backend."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from sgflow.ops.groupnorm_silu import groupnorm_silu_dual, gn_silu_conv_dual\n"
        "x = torch.randn(2, 4, 3, 3)\n"
        "y, yd = groupnorm_silu_dual(x, x, None, None, 2)\n"
        "y, yd = gn_silu_conv_dual(x, x, None, None, 2, torch.randn(3, 4, 3, 3), None, 1)\n"
        "assert 'sgflow_kernels.groupnorm_silu' not in sys.modules\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "SGFLOW_BACKEND"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr


def test_double_backward_raises_instead_of_being_wrong():
    """The group statistics are saved without a graph: a second derivative must raise, not be wrong."""
    from sgflow.ops.groupnorm import GroupNormDual

    torch.manual_seed(0)
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    xd = torch.randn_like(x)
    w = torch.randn(4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    cw = torch.randn(3, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    ops = {
        "GroupNormDual": lambda: GroupNormDual.apply(x, xd, w, b, 2, 1e-5),
        "groupnorm_silu_dual": lambda: groupnorm_silu_dual(x, xd, w, b, 2, backend="torch"),
        "gn_silu_conv_dual": lambda: gn_silu_conv_dual(x, xd, w, b, 2, cw, None, 1, backend="torch"),
    }
    for name, op in ops.items():
        y, y_dot = op()
        (g,) = torch.autograd.grad((y.square().sum() + y_dot.square().sum()), x, create_graph=True)
        with pytest.raises(RuntimeError, match="differentiate twice"):
            g.sum().backward()
