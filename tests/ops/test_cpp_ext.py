"""The C++ CPU kernels of dual GroupNorm -> SiLU (sgflow._C, csrc/): ops, backend choice, end to end.

References: the float64 explicit-formula reference ``groupnorm_silu_dual_ref`` (outputs; gradients by
autograd of ``<g_y, y> + <g_ydot, y_dot>``) and the torch backend (statistics, low precision). Every
instruction set the CPU supports (base / AVX2 / AVX-512 copies of the kernels) is checked. Skipped,
with the reason, where the extension is not built.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sgflow.ops import cpp_ext
from sgflow.ops.backend import resolve_backend
from sgflow.ops.groupnorm_silu import (
    _gn_silu_dual_bwd_torch,
    _gn_silu_dual_fwd_torch,
    gn_silu_conv_dual,
    groupnorm_silu_dual,
    groupnorm_silu_dual_ref,
    make_dropout_mask,
)
from sgflow.testing import rel_err

pytestmark = pytest.mark.skipif(not cpp_ext.available(), reason=f"C++ extension unavailable: {cpp_ext.reason()}")

EPS = 1e-5
OPS = torch.ops.sgflow if cpp_ext.available() else None

# (x shape, num_groups): odd channel counts and image sizes, batch 1, 1-D / 3-D / no spatial dims, groups
# of one channel and of all channels, and groups longer than the kernels' 256-element chunks.
CASES = [
    pytest.param((3, 63, 7, 5), 9, id="b3-c63-g9-7x5"),
    pytest.param((3, 63, 7, 5), 21, id="b3-c63-g21-7x5"),
    pytest.param((2, 63, 7, 5), 63, id="b2-c63-g63-7x5"),
    pytest.param((1, 63, 7, 5), 7, id="b1-c63-g7-7x5"),
    pytest.param((2, 12, 9), 3, id="b2-c12-g3-1d9"),
    pytest.param((2, 8, 3, 4, 5), 2, id="b2-c8-g2-3d3x4x5"),
    pytest.param((4, 12), 2, id="b4-c12-g2-nospatial"),
    pytest.param((2, 5, 3, 3), 1, id="b2-c5-g1-3x3"),
    pytest.param((2, 16, 33, 17), 4, id="b2-c16-g4-33x17"),
]


ISAS = cpp_ext._supported_isas()


@pytest.fixture(params=ISAS or ["none"])
def isa(request):
    """Run the test on one instruction-set copy of the kernels, restoring the default afterwards."""
    previous = cpp_ext.cpu_isa()
    cpp_ext.cpu_isa(request.param)
    yield request.param
    cpp_ext.cpu_isa(previous)


def _inputs(shape, G, dtype=torch.float64, seed=0, affine=True, mean=0.5, std=1.5):
    gen = torch.Generator().manual_seed(seed)
    C = shape[1]
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * std + mean).to(dtype)
    xd = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    gy = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    gyd = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    w = (1 + 0.5 * torch.randn(C, generator=gen, dtype=torch.float64)) if affine else None
    b = 0.3 * torch.randn(C, generator=gen, dtype=torch.float64) if affine else None
    pdt = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
    w = None if w is None else w.to(pdt)
    b = None if b is None else b.to(pdt)
    return x, xd, w, b, gy, gyd


def _reference(x, xd, w, b, G, gy, gyd, mask=None, scale=1.0):
    """float64 outputs and gradients (x, x_dot, weight, bias) of <gy, y> + <gyd, y_dot>."""
    leaves = [None if t is None else t.detach().double().requires_grad_() for t in (x, xd, w, b)]
    y, yd = groupnorm_silu_dual_ref(leaves[0], leaves[1], leaves[2], leaves[3], G, EPS)
    if mask is not None:
        y, yd = y * mask * scale, yd * mask * scale
    loss = 0
    if gy is not None:
        loss = loss + (y * gy.double()).sum()
    if gyd is not None:
        loss = loss + (yd * gyd.double()).sum()
    grads = torch.autograd.grad(loss, [t for t in leaves if t is not None], allow_unused=True)
    it = iter(grads)
    full = [None if t is None else next(it) for t in leaves]
    return y.detach(), yd.detach(), full


def _stats64(x, xd, G):
    return _gn_silu_dual_fwd_torch(x.double(), xd.double(), None, None, G, EPS)[2]


def _check_close(name, got, want, tol):
    err = rel_err(got, want)
    assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.0e}"


# ----------------------------------------------------------------------------------------------------
# the ops against the float64 reference and the torch backend
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("shape,G", CASES)
def test_fp64_matches_reference(isa, shape, G, masked):
    x, xd, w, b, gy, gyd = _inputs(shape, G)
    mask, scale = (make_dropout_mask(shape, 0.3, generator=torch.Generator().manual_seed(1)), 1 / 0.7) if masked \
        else (None, 1.0)
    y, yd, stats = OPS.gn_silu_dual_fwd(x, xd, w, b, G, EPS, mask, scale)
    assert stats.dtype == torch.float64 and stats.shape == (4, shape[0], G)
    assert y.dtype == yd.dtype == torch.float64 and y.is_contiguous() and yd.is_contiguous()
    y_r, yd_r, grads_r = _reference(x, xd, w, b, G, gy, gyd, mask, scale)
    _check_close("y", y, y_r, 1e-12)
    _check_close("y_dot", yd, yd_r, 1e-12)
    _check_close("stats", stats, _stats64(x, xd, G), 1e-12)
    g_x, g_xd, g_w, g_b = OPS.gn_silu_dual_bwd(x, xd, w, b, stats, gy, gyd, G, mask, scale)
    for name, got, want in zip(("g_x", "g_x_dot", "g_weight", "g_bias"), (g_x, g_xd, g_w, g_b), grads_r):
        assert (want == 0).all() or want.norm() > 0
        _check_close(name, got, want, 1e-12)


@pytest.mark.parametrize("which", ["g_y-only", "g_ydot-only", "none"])
def test_fp64_single_cotangent(isa, which):
    shape, G = (2, 12, 5, 3), 3
    x, xd, w, b, gy, gyd = _inputs(shape, G)
    gy = gy if which == "g_y-only" else None
    gyd = gyd if which == "g_ydot-only" else None
    stats = OPS.gn_silu_dual_fwd(x, xd, w, b, G, EPS)[2]
    g_x, g_xd, g_w, g_b = OPS.gn_silu_dual_bwd(x, xd, w, b, stats, gy, gyd, G)
    assert (g_xd is None) == (gyd is None)
    if which == "none":
        assert not g_x.any() and not g_w.any() and not g_b.any()
        return
    _, _, (r_x, r_xd, r_w, r_b) = _reference(x, xd, w, b, G, gy, gyd)
    _check_close("g_x", g_x, r_x, 1e-12)
    if gyd is not None:
        _check_close("g_x_dot", g_xd, r_xd, 1e-12)
    _check_close("g_weight", g_w, r_w, 1e-12)
    _check_close("g_bias", g_b, r_b, 1e-12)


def test_fp64_no_affine(isa):
    shape, G = (2, 12, 5, 3), 4
    x, xd, _, _, gy, gyd = _inputs(shape, G, affine=False)
    y, yd, stats = OPS.gn_silu_dual_fwd(x, xd, None, None, G, EPS)
    y_r, yd_r, (r_x, r_xd, _, _) = _reference(x, xd, None, None, G, gy, gyd)
    _check_close("y", y, y_r, 1e-12)
    _check_close("y_dot", yd, yd_r, 1e-12)
    g_x, g_xd, _, _ = OPS.gn_silu_dual_bwd(x, xd, None, None, stats, gy, gyd, G)
    _check_close("g_x", g_x, r_x, 1e-12)
    _check_close("g_x_dot", g_xd, r_xd, 1e-12)


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("shape,G", [CASES[0], CASES[4], CASES[8]])
def test_fp32_matches_torch_backend(isa, shape, G, masked):
    x, xd, w, b, gy, gyd = _inputs(shape, G, dtype=torch.float32)
    mask, scale = (make_dropout_mask(shape, 0.3, generator=torch.Generator().manual_seed(1)), 1 / 0.7) if masked \
        else (None, 1.0)
    ours = OPS.gn_silu_dual_fwd(x, xd, w, b, G, EPS, mask, scale)
    theirs = _gn_silu_dual_fwd_torch(x, xd, w, b, G, EPS, mask=mask, drop_scale=scale)
    for name, a, r in zip(("y", "y_dot", "stats"), ours, theirs):
        assert a.dtype == r.dtype == torch.float32, name
        _check_close(name, a, r, 1e-5)
    g_ours = OPS.gn_silu_dual_bwd(x, xd, w, b, ours[2], gy, gyd, G, mask, scale)
    g_theirs = _gn_silu_dual_bwd_torch(x, xd, w, b, theirs[2], gy, gyd, G, mask=mask, drop_scale=scale)
    for name, a, r in zip(("g_x", "g_x_dot", "g_weight", "g_bias"), g_ours, g_theirs):
        assert a.dtype == r.dtype == torch.float32, name
        _check_close(name, a, r, 1e-5)


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-2), (torch.float16, 2e-3)], ids=["bf16", "fp16"])
def test_low_precision_against_fp64_reference(isa, dtype, tol):
    """bf16 / fp16 in and out, fp32 statistics and arithmetic: outputs and input gradients are within
    their dtype's rounding of the float64 reference on the same (rounded) inputs; statistics and
    parameter gradients (fp32) much closer."""
    shape, G = (2, 32, 9, 7), 8
    x, xd, w, b, gy, gyd = _inputs(shape, G, dtype=dtype)
    y, yd, stats = OPS.gn_silu_dual_fwd(x, xd, w, b, G, EPS)
    assert y.dtype == yd.dtype == dtype and stats.dtype == torch.float32
    y_r, yd_r, (r_x, r_xd, r_w, r_b) = _reference(x, xd, w, b, G, gy, gyd)
    _check_close("y", y, y_r, tol)
    _check_close("y_dot", yd, yd_r, tol)
    _check_close("stats", stats, _stats64(x, xd, G), 1e-5)
    g_x, g_xd, g_w, g_b = OPS.gn_silu_dual_bwd(x, xd, w, b, stats, gy, gyd, G)
    assert g_x.dtype == g_xd.dtype == dtype and g_w.dtype == g_b.dtype == torch.float32
    _check_close("g_x", g_x, r_x, tol)
    _check_close("g_x_dot", g_xd, r_xd, tol)
    _check_close("g_weight", g_w, r_w, 1e-4)
    _check_close("g_bias", g_b, r_b, 1e-4)
    # and the torch backend, same dtype
    y_t, yd_t, _ = _gn_silu_dual_fwd_torch(x, xd, w, b, G, EPS)
    _check_close("y vs torch backend", y, y_t, tol)
    _check_close("y_dot vs torch backend", yd, yd_t, tol)


def test_fp32_statistics_when_mean_dwarfs_std(isa):
    """x = 1e4 + N(0, 1) in fp32: sums of x and x^2 would lose the variance entirely (x^2 ~ 1e8, fp32
    spacing 8 there); the kernels' shifted sums keep the statistics at fp32 precision."""
    shape, G = (2, 16, 16, 16), 4
    x, xd, w, b, gy, gyd = _inputs(shape, G, dtype=torch.float32, mean=1e4, std=1.0)
    y, yd, stats = OPS.gn_silu_dual_fwd(x, xd, w, b, G, EPS)
    ref = _stats64(x, xd, G)
    for k, name in enumerate(("mean", "rstd", "mean_dot", "rstd_dot")):
        _check_close(name, stats[k], ref[k], 1e-5)
    # What plain sums would give: the variance lost to cancellation.
    xg = x.reshape(2, G, -1)
    naive_var = (xg.square().mean(-1) - xg.mean(-1).square()).double()
    true_var = x.double().reshape(2, G, -1).var(-1, unbiased=False)
    assert rel_err(naive_var, true_var) > 0.1
    # The outputs are limited by the fp32 mean itself (spacing 1e-3 at 1e4, i.e. 5e-4 std of rounding),
    # as for the torch backend: both land within that of the float64 reference.
    y_r, yd_r, _ = _reference(x, xd, w, b, G, gy, gyd)
    y_t, yd_t, _ = _gn_silu_dual_fwd_torch(x, xd, w, b, G, EPS)
    for name, a, t, r in (("y", y, y_t, y_r), ("y_dot", yd, yd_t, yd_r)):
        _check_close(name, a, r, 2e-3)
        assert rel_err(a, r) <= 2 * rel_err(t, r) + 1e-6, name


# ----------------------------------------------------------------------------------------------------
# layouts, out buffers, threads, edge cases
# ----------------------------------------------------------------------------------------------------
def _all_outputs(x, xd, w, b, gy, gyd, G, mask=None, scale=1.0):
    y, yd, stats = OPS.gn_silu_dual_fwd(x, xd, w, b, G, EPS, mask, scale)
    return (y, yd, stats) + tuple(OPS.gn_silu_dual_bwd(x, xd, w, b, stats, gy, gyd, G, mask, scale))


@pytest.mark.parametrize("layout", ["channels_last", "transposed", "strided"])
def test_any_strides_give_the_contiguous_result(layout):
    shape, G = (3, 63, 7, 5), 9
    x, xd, w, b, gy, gyd = _inputs(shape, G, dtype=torch.float32)
    mask = make_dropout_mask(shape, 0.2, generator=torch.Generator().manual_seed(2))
    want = _all_outputs(x, xd, w, b, gy, gyd, G, mask, 1.25)

    def relayout(t):
        if layout == "channels_last":
            return t.contiguous(memory_format=torch.channels_last)
        if layout == "transposed":  # same values, spatial dims stored transposed
            return t.transpose(2, 3).contiguous().transpose(2, 3)
        return torch.stack([t, torch.zeros_like(t)], dim=-1)[..., 0]  # every other element

    args = [relayout(t) for t in (x, xd)]
    assert not args[0].is_contiguous()
    got = _all_outputs(*args, w, b, relayout(gy), relayout(gyd), G, relayout(mask), 1.25)
    for k, (a, r) in enumerate(zip(got, want)):
        assert a.is_contiguous(), k
        assert torch.equal(a, r), k


def test_out_buffers_including_in_place_over_the_cotangents():
    """The *_out ops write into a stacked [2B, ...] buffer; the backward's may hold g_y, g_ydot
    themselves (GNSiLUConvDual passes the conv's input gradient): same values as the plain ops."""
    shape, G = (3, 63, 7, 5), 9
    B = shape[0]
    x, xd, w, b, gy, gyd = _inputs(shape, G, dtype=torch.float32)
    mask = make_dropout_mask(shape, 0.2, generator=torch.Generator().manual_seed(2))
    y, yd, stats = OPS.gn_silu_dual_fwd(x, xd, w, b, G, EPS, mask, 1.25)
    out = torch.full((2 * B, *shape[1:]), float("nan"))
    stats2 = OPS.gn_silu_dual_fwd_out(x, xd, w, b, G, EPS, mask, 1.25, out)
    assert torch.equal(out[:B], y) and torch.equal(out[B:], yd) and torch.equal(stats2, stats)
    g_x, g_xd, g_w, g_b = OPS.gn_silu_dual_bwd(x, xd, w, b, stats, gy, gyd, G, mask, 1.25)
    g_act = torch.cat([gy, gyd])
    g_w2, g_b2 = OPS.gn_silu_dual_bwd_out(x, xd, w, b, stats, g_act[:B], g_act[B:], G, mask, 1.25, g_act)
    assert torch.equal(g_act[:B], g_x) and torch.equal(g_act[B:], g_xd)
    assert torch.equal(g_w2, g_w) and torch.equal(g_b2, g_b)
    # the Python wrappers return the halves of out
    yy, yyd, _ = cpp_ext.gn_silu_dual_fwd(x, xd, w, b, G, EPS, mask=mask, drop_scale=1.25, out=out)
    assert yy.data_ptr() == out.data_ptr() and torch.equal(yyd, yd)


def test_fp16_out_buffer():
    shape, G = (2, 12, 5, 3), 3
    x, xd, w, b, gy, gyd = _inputs(shape, G, dtype=torch.float16)
    y, yd, stats = OPS.gn_silu_dual_fwd(x, xd, w, b, G, EPS)
    out = torch.empty((4, *shape[1:]), dtype=torch.float16)
    OPS.gn_silu_dual_fwd_out(x, xd, w, b, G, EPS, None, 1.0, out)
    assert torch.equal(out[:2], y) and torch.equal(out[2:], yd)
    g_x, g_xd, _, _ = OPS.gn_silu_dual_bwd(x, xd, w, b, stats, gy, gyd, G)
    g_act = torch.cat([gy, gyd])
    OPS.gn_silu_dual_bwd_out(x, xd, w, b, stats, g_act[:2], g_act[2:], G, None, 1.0, g_act)
    assert torch.equal(g_act[:2], g_x) and torch.equal(g_act[2:], g_xd)


def test_results_do_not_depend_on_the_number_of_threads():
    shape, G = (4, 32, 12, 12), 8
    x, xd, w, b, gy, gyd = _inputs(shape, G, dtype=torch.float32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _all_outputs(x, xd, w, b, gy, gyd, G)
        torch.set_num_threads(max(2, threads))
        many = _all_outputs(x, xd, w, b, gy, gyd, G)
    finally:
        torch.set_num_threads(threads)
    for k, (a, r) in enumerate(zip(one, many)):
        assert torch.equal(a, r), k


def test_instruction_sets_agree():
    if len(ISAS) < 2:
        pytest.skip(f"only {ISAS} supported here")
    shape, G = (2, 16, 33, 17), 4
    x, xd, w, b, gy, gyd = _inputs(shape, G, dtype=torch.float32)
    previous = cpp_ext.cpu_isa()
    try:
        results = {}
        for name in ISAS:
            cpp_ext.cpu_isa(name)
            results[name] = _all_outputs(x, xd, w, b, gy, gyd, G)
    finally:
        cpp_ext.cpu_isa(previous)
    first = results[ISAS[0]]
    for name in ISAS[1:]:
        for k, (a, r) in enumerate(zip(results[name], first)):
            _check_close(f"{name} output {k}", a, r, 1e-6)


def test_empty_batch():
    x = torch.randn(0, 8, 4, 4)
    y, yd, stats = OPS.gn_silu_dual_fwd(x, x, None, None, 2, EPS)
    assert y.shape == x.shape and stats.shape == (4, 0, 2)
    g_x, g_xd, g_w, g_b = OPS.gn_silu_dual_bwd(x, x, None, None, stats, x, x, 2)
    assert g_x.shape == x.shape and g_w.shape == (8,) and not g_w.any()


def test_bad_arguments_raise_clear_errors():
    x = torch.randn(2, 12, 3, 3)
    with pytest.raises(RuntimeError, match="not divisible by num_groups"):
        OPS.gn_silu_dual_fwd(x, x, None, None, 5, EPS)
    with pytest.raises(RuntimeError, match="x_dot shape"):
        OPS.gn_silu_dual_fwd(x, x[:1], None, None, 3, EPS)
    with pytest.raises(RuntimeError, match="weight must have shape"):
        OPS.gn_silu_dual_fwd(x, x, torch.ones(5), None, 3, EPS)
    with pytest.raises(RuntimeError, match="mask must be a bool tensor"):
        OPS.gn_silu_dual_fwd(x, x, None, None, 3, EPS, torch.ones_like(x), 1.0)
    with pytest.raises(RuntimeError, match="out must have shape"):
        OPS.gn_silu_dual_fwd_out(x, x, None, None, 3, EPS, None, 1.0, torch.empty_like(x))
    with pytest.raises(RuntimeError, match="stats must have shape"):
        OPS.gn_silu_dual_bwd(x, x, None, None, torch.empty(4, 2, 4), x, None, 3)
    with pytest.raises(RuntimeError, match="float32, float64, bfloat16 or float16"):
        OPS.gn_silu_dual_fwd(x.long(), x.long(), None, None, 3, EPS)


# ----------------------------------------------------------------------------------------------------
# opcheck: schemas, fake (meta) implementations, tracing
# ----------------------------------------------------------------------------------------------------
def _opcheck_samples():
    shape, G = (2, 12, 5, 3), 3
    x, xd, w, b, gy, gyd = _inputs(shape, G, dtype=torch.float32)
    mask = make_dropout_mask(shape, 0.3, generator=torch.Generator().manual_seed(0))
    stats = OPS.gn_silu_dual_fwd(x, xd, w, b, G, EPS)[2]
    x64, xd64, w64, b64, gy64, gyd64 = _inputs(shape, G)
    stats64 = OPS.gn_silu_dual_fwd(x64, xd64, w64, b64, G, EPS)[2]
    xb, xdb = x.bfloat16(), xd.bfloat16()
    out = lambda: torch.empty((4, *shape[1:]))  # noqa: E731
    return [
        ("gn_silu_dual_fwd", (x, xd, w, b, G, EPS)),
        ("gn_silu_dual_fwd", (x, xd, None, None, G, EPS, mask, 1 / 0.7)),
        ("gn_silu_dual_fwd", (x64, xd64, w64, b64, G, EPS)),
        ("gn_silu_dual_fwd", (xb, xdb, w, b, G, EPS)),
        ("gn_silu_dual_fwd_out", (x, xd, w, b, G, EPS, mask, 1 / 0.7, out())),
        ("gn_silu_dual_bwd", (x, xd, w, b, stats, gy, gyd, G)),
        ("gn_silu_dual_bwd", (x, xd, w, b, stats, gy, None, G, mask, 1 / 0.7)),
        ("gn_silu_dual_bwd", (x, xd, None, None, stats, None, gyd, G)),
        ("gn_silu_dual_bwd", (x64, xd64, w64, b64, stats64, gy64, gyd64, G)),
        ("gn_silu_dual_bwd_out", (x, xd, w, b, stats, gy, gyd, G, mask, 1 / 0.7, out())),
    ]


@pytest.mark.parametrize("k", range(10))
def test_opcheck(k):
    """Schema (aliasing, mutation of `out` only), fake tensors, and AOT dispatch (functionalisation of
    the *_out ops) for every op. The inputs need no gradient: autograd is the business of the
    autograd Functions that call these ops, so the autograd-registration check holds trivially."""
    name, args = _opcheck_samples()[k]
    torch.library.opcheck(getattr(OPS, name).default, args)


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 12, 5, 3, dtype=torch.bfloat16)
        y, yd, stats = OPS.gn_silu_dual_fwd(x, x, None, None, 3, EPS)
        assert y.shape == x.shape and y.dtype == torch.bfloat16 and stats.dtype == torch.float32
        g_x, g_xd, g_w, _ = OPS.gn_silu_dual_bwd(x, x, None, None, stats, x, None, 3)
        assert g_xd is None and g_w.shape == (12,) and g_w.dtype == torch.float32


# ----------------------------------------------------------------------------------------------------
# through the autograd Functions and the backend choice
# ----------------------------------------------------------------------------------------------------
def _grads_of(fn, tensors):
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in tensors]
    y, yd = fn(*leaves)
    gen = torch.Generator().manual_seed(9)
    gy, gyd = torch.randn(y.shape, generator=gen).to(y.dtype), torch.randn(yd.shape, generator=gen).to(y.dtype)
    (y * gy).sum().add((yd * gyd).sum()).backward()
    return [y.detach(), yd.detach()] + [None if t is None else t.grad for t in leaves]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)], ids=["fp64", "fp32"])
def test_groupnorm_silu_dual_cpp_equals_torch(dtype, tol):
    shape, G = (3, 63, 7, 5), 21
    x, xd, w, b, _, _ = _inputs(shape, G, dtype=dtype)
    got = _grads_of(lambda *t: groupnorm_silu_dual(*t, G, EPS, backend="cpp"), (x, xd, w, b))
    want = _grads_of(lambda *t: groupnorm_silu_dual(*t, G, EPS, backend="torch"), (x, xd, w, b))
    for k, (a, r) in enumerate(zip(got, want)):
        assert a.dtype == r.dtype
        _check_close(f"output/grad {k}", a, r, tol)


@pytest.mark.parametrize("dropout", [False, True], ids=["nodrop", "dropout"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)], ids=["fp64", "fp32"])
def test_gn_silu_conv_dual_cpp_equals_torch(dtype, tol, dropout):
    shape, G = (3, 63, 7, 5), 9
    x, xd, w, b, _, _ = _inputs(shape, G, dtype=dtype)
    gen = torch.Generator().manual_seed(4)
    cw = (torch.randn(10, 63, 3, 3, generator=gen, dtype=torch.float64) / 24).to(dtype)
    cb = torch.randn(10, generator=gen, dtype=torch.float64).to(dtype)
    kw = dict(dropout_p=0.3, training=True, dropout_mask=make_dropout_mask(shape, 0.3, generator=gen)) if dropout else {}

    def stage(backend):
        return lambda *t: gn_silu_conv_dual(t[0], t[1], t[2], t[3], G, t[4], t[5], 1, EPS, backend=backend, **kw)

    got = _grads_of(stage("cpp"), (x, xd, w, b, cw, cb))
    want = _grads_of(stage("torch"), (x, xd, w, b, cw, cb))
    for k, (a, r) in enumerate(zip(got, want)):
        _check_close(f"output/grad {k}", a, r, tol)


def test_backend_choice(monkeypatch):
    x = torch.randn(2, 8, 3, 3)
    monkeypatch.delenv("SGFLOW_BACKEND", raising=False)
    assert resolve_backend(x, None, op="gn_silu") == "cpp"  # measured faster: the CPU default
    assert resolve_backend(x, None) == "torch"  # ops without a C++ kernel keep theirs
    assert resolve_backend(x, "cpp", op="gn_silu") == "cpp"
    assert resolve_backend(x, "cpp", op="attention") == "cpp"
    assert resolve_backend(x, None, op="attention") == "cpp"  # narrow heads only: test_attention_auto_choice
    assert resolve_backend(x, "cpp", op="layer_norm") == "torch"  # an op without a C++ kernel: torch
    monkeypatch.setenv("SGFLOW_BACKEND", "cpp")
    assert resolve_backend(x, None, op="gn_silu") == "cpp"
    with pytest.raises(RuntimeError, match="needs CPU tensors"):
        resolve_backend(torch.empty(2, 8, device="meta"), None, op="gn_silu")
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        resolve_backend(x, "cuda", op="gn_silu")


@pytest.mark.parametrize("dtype,head,backend,wide,expect", [
    (torch.float32, 8, None, True, "cpu"),      # narrow heads: the C++ vector kernel, measured faster
    (torch.float64, 3, None, True, "cpu"),
    (torch.float32, 16, None, True, "cpu"),     # wider ones: the C++ op's BLAS tiles (where a BLAS was found)
    (torch.float32, 16, None, False, "torch"),  # ... switched off: MKL's batched products beat the vector kernel
    (torch.float32, 16, "cpp", False, "cpu"),   # asked for: the C++ op at any width
    (torch.bfloat16, 8, None, True, "torch"),   # the C++ op is f32 / f64 only
    (torch.bfloat16, 8, "cpp", True, "torch"),
    (torch.float32, 8, "torch", True, "torch"),
], ids=["f32-h8-auto", "f64-h3-auto", "f32-h16-auto", "f32-h16-auto-no-wide", "f32-h16-cpp", "bf16-auto", "bf16-cpp",
        "f32-h8-torch"])
def test_attention_auto_choice(monkeypatch, dtype, head, backend, wide, expect):
    """Which dual-attention op runs on CPU (seen by the profiler), and that it gives the torch backend's values."""
    from sgflow.ops import attention as att
    from sgflow.ops.attention import attention_dual

    if head > att._CPP_MAX_HEAD_DIM and wide and backend is None and not cpp_ext.blas_available():
        expect = "torch"  # no BLAS found: wide heads stay on the torch backend
    monkeypatch.setattr(att, "CPP_WIDE_HEADS", wide)
    monkeypatch.delenv("SGFLOW_BACKEND", raising=False)
    gen = torch.Generator().manual_seed(0)
    q, k, v, qd, kd, vd = (torch.randn(2, 3, 7, head, generator=gen).to(dtype) for _ in range(6))
    with torch.profiler.profile() as prof:
        o, od = attention_dual(q, k, v, qd, kd, vd, backend=backend)
    ran = {e.name for e in prof.events() if e.name.startswith("sgflow::attention_dual_fwd")}
    assert ran == {f"sgflow::attention_dual_fwd_{expect}"}
    o_t, od_t = attention_dual(q, k, v, qd, kd, vd, backend="torch")
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    assert torch.allclose(o, o_t, atol=tol, rtol=tol) and torch.allclose(od, od_t, atol=tol, rtol=tol)


def test_unavailable_extension_gives_reason_and_torch_default(monkeypatch):
    monkeypatch.setattr(cpp_ext, "_load", lambda: (None, "sgflow._C is not built (test)"))
    monkeypatch.delenv("SGFLOW_BACKEND", raising=False)
    x = torch.randn(2, 8, 3, 3)
    assert not cpp_ext.available() and cpp_ext.reason() == "sgflow._C is not built (test)"
    assert resolve_backend(x, None, op="gn_silu") == "torch"
    with pytest.raises(RuntimeError, match=r"needs the C\+\+ extension sgflow._C: sgflow._C is not built \(test\)"):
        resolve_backend(x, "cpp", op="gn_silu")


def test_env_backend_reaches_the_kernels(monkeypatch):
    """SGFLOW_BACKEND=cpp: the op called is the C++ op itself (seen by the profiler), forward and backward."""
    monkeypatch.setenv("SGFLOW_BACKEND", "cpp")
    x, xd, w, b, _, _ = _inputs((2, 8, 3, 3), 2, dtype=torch.float32)
    x.requires_grad_()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        y, yd = groupnorm_silu_dual(x, xd, w, b, 2)
        (y.sum() + yd.sum()).backward()
    names = {e.name for e in prof.events()}
    assert {"sgflow::gn_silu_dual_fwd", "sgflow::gn_silu_dual_bwd"} <= names, sorted(n for n in names if "sgflow" in n)
    assert not any(n.endswith("_torch") for n in names if n.startswith("sgflow::"))
    assert torch.allclose(y, F.silu(F.group_norm(x, 2, w, b, EPS)), atol=1e-6)


# ----------------------------------------------------------------------------------------------------
# CUDA kernels (where a GPU and an sgflow._C built with CUDA exist)
# ----------------------------------------------------------------------------------------------------
needs_cuda_kernels = pytest.mark.skipif(
    not (torch.cuda.is_available() and cpp_ext.available() and cpp_ext.cuda_available()),
    reason="needs a GPU and sgflow._C built with its CUDA kernels")

# Groups of 8192 elements fit the shared-memory cache; (1, 64, 128, 128) with G=1 is one group of 1M
# elements, which takes the uncached kernels (two reads, recomputation in the backward).
CUDA_CASES = CASES[:1] + CASES[4:9] + [pytest.param((2, 256, 32, 32), 32, id="b2-c256-g32-32x32"),
                                       pytest.param((1, 64, 128, 128), 1, id="b1-c64-g1-128x128")]


@needs_cuda_kernels
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("shape,G", CUDA_CASES)
def test_cuda_fp64_matches_reference(shape, G, masked):
    x, xd, w, b, gy, gyd = _inputs(shape, G)
    mask, scale = (make_dropout_mask(shape, 0.3, generator=torch.Generator().manual_seed(1)), 1 / 0.7) if masked \
        else (None, 1.0)
    y_r, yd_r, grads_r = _reference(x, xd, w, b, G, gy, gyd, mask, scale)
    cu = [None if t is None else t.cuda() for t in (x, xd, w, b, gy, gyd, mask)]
    y, yd, stats = OPS.gn_silu_dual_fwd(cu[0], cu[1], cu[2], cu[3], G, EPS, cu[6], scale)
    _check_close("y", y.cpu(), y_r, 1e-12)
    _check_close("y_dot", yd.cpu(), yd_r, 1e-12)
    _check_close("stats", stats.cpu(), _stats64(x, xd, G), 1e-12)
    got = OPS.gn_silu_dual_bwd(cu[0], cu[1], cu[2], cu[3], stats, cu[4], cu[5], G, cu[6], scale)
    for name, a, r in zip(("g_x", "g_x_dot", "g_weight", "g_bias"), got, grads_r):
        _check_close(name, a.cpu(), r, 1e-12)


@needs_cuda_kernels
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)],
                         ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shape,G", [CUDA_CASES[0], CUDA_CASES[6], CUDA_CASES[7]])
def test_cuda_matches_cpu_kernels_and_torch_backend(shape, G, dtype, tol):
    x, xd, w, b, gy, gyd = _inputs(shape, G, dtype=dtype)
    want = _all_outputs(x, xd, w, b, gy, gyd, G)  # the C++ CPU kernels (fp32 arithmetic for all three)
    cu = [t.cuda() for t in (x, xd, w, b, gy, gyd)]
    got = _all_outputs(*cu, G)
    for k, (a, r) in enumerate(zip(got, want)):
        assert a.dtype == r.dtype and a.device.type == "cuda", k
        _check_close(f"output {k}", a.cpu(), r, tol if k in (0, 1, 3, 4) else 1e-4)
    y_t, yd_t, _ = _gn_silu_dual_fwd_torch(*cu[:4], G, EPS)
    _check_close("y vs torch backend", got[0], y_t, tol)
    _check_close("y_dot vs torch backend", got[1], yd_t, tol)


@needs_cuda_kernels
def test_cuda_out_buffers_in_place_and_deterministic():
    shape, G = (3, 63, 7, 5), 9
    B = shape[0]
    x, xd, w, b, gy, gyd = (t.cuda() for t in _inputs(shape, G, dtype=torch.float32))
    y, yd, stats = OPS.gn_silu_dual_fwd(x, xd, w, b, G, EPS)
    out = torch.empty((2 * B, *shape[1:]), device="cuda")
    assert torch.equal(OPS.gn_silu_dual_fwd_out(x, xd, w, b, G, EPS, None, 1.0, out), stats)
    assert torch.equal(out[:B], y) and torch.equal(out[B:], yd)
    g_x, g_xd, g_w, g_b = OPS.gn_silu_dual_bwd(x, xd, w, b, stats, gy, gyd, G)
    g_act = torch.cat([gy, gyd])
    g_w2, g_b2 = OPS.gn_silu_dual_bwd_out(x, xd, w, b, stats, g_act[:B], g_act[B:], G, None, 1.0, g_act)
    assert torch.equal(g_act[:B], g_x) and torch.equal(g_act[B:], g_xd)
    assert torch.equal(g_w2, g_w) and torch.equal(g_b2, g_b)  # no atomics: bitwise reproducible


@needs_cuda_kernels
def test_cuda_opcheck_and_stage():
    shape, G = (2, 12, 5, 3), 3
    x, xd, w, b, gy, gyd = (t.cuda() for t in _inputs(shape, G, dtype=torch.float32))
    stats = OPS.gn_silu_dual_fwd(x, xd, w, b, G, EPS)[2]
    torch.library.opcheck(OPS.gn_silu_dual_fwd.default, (x, xd, w, b, G, EPS))
    torch.library.opcheck(OPS.gn_silu_dual_bwd.default, (x, xd, w, b, stats, gy, gyd, G))
    gen = torch.Generator().manual_seed(4)
    cw = (torch.randn(5, 12, 3, 3, generator=gen) / 10).cuda()
    cb = torch.randn(5, generator=gen).cuda()

    def stage(backend):
        return lambda *t: gn_silu_conv_dual(t[0], t[1], t[2], t[3], G, t[4], t[5], 1, EPS, backend=backend)

    got = _grads_of(stage("cuda"), (x, xd, w, b, cw, cb))
    want = _grads_of(stage("torch"), (x, xd, w, b, cw, cb))
    for k, (a, r) in enumerate(zip(got, want)):
        _check_close(f"output/grad {k}", a, r, 1e-5)
