"""Triton kernels of the dual GroupNorm -> SiLU op (sgflow_kernels/groupnorm_silu.py).

CPU: run through Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py), fp32/fp64 only,
small shapes. GPU (skipped without CUDA): fp32/fp16/bf16 at U-Net sizes against float64 references.
The launchers are compared with the torch-backend helpers (themselves checked against torch.func.jvp
in tests/ops/test_groupnorm_silu.py) and, through the public API, with torch.func.jvp directly.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sgflow.ops.backend import triton_available, triton_interpreting
from sgflow.testing import dual_grads, jvp_reference, rel_err

CUDA = torch.cuda.is_available()
TRITON_OK = triton_available() and (CUDA or triton_interpreting())
pytestmark = pytest.mark.skipif(not TRITON_OK, reason="triton needs CUDA or TRITON_INTERPRET=1")
DEVICE = "cuda" if CUDA else "cpu"
EPS = 1e-5
TOL = {torch.float64: 1e-10, torch.float32: 1e-4}

if TRITON_OK:
    from sgflow_kernels.groupnorm_silu import (
        _pick_config,
        groupnorm_silu_dual_bwd,
        groupnorm_silu_dual_fwd,
    )
from sgflow.ops.groupnorm_silu import (  # noqa: E402
    _gn_silu_dual_bwd_torch,
    _gn_silu_dual_fwd_torch,
    gn_silu_conv_dual,
    groupnorm_silu_dual,
    make_dropout_mask,
)


def _inputs(shape, seed=0, device=DEVICE, dtype=torch.float64, offset=0.5):
    gen = torch.Generator().manual_seed(seed)
    C = shape[1]
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 1.5 + offset
    xd = torch.randn(shape, generator=gen, dtype=torch.float64)
    w = 1 + 0.5 * torch.randn(C, generator=gen, dtype=torch.float64)
    b = 0.3 * torch.randn(C, generator=gen, dtype=torch.float64)
    gy = torch.randn(shape, generator=gen, dtype=torch.float64)
    gyd = torch.randn(shape, generator=gen, dtype=torch.float64)
    return [t.to(device=device, dtype=dtype) for t in (x, xd, w, b, gy, gyd)]


# (shape, G, block_c, block_s): None blocks = launcher heuristics (one tile at these sizes); explicit
# small blocks force the looped multi-sweep path with ragged channel and spatial edges.
FP64_FP32 = [(torch.float64, "fp64"), (torch.float32, "fp32")]


def _with_dtypes(cases, dtypes):
    return [pytest.param(*c.values, d, id=f"{c.id}-{n}") for c in cases for d, n in dtypes]


ONE_TILE_CASES = [
    pytest.param((3, 63, 7, 5), 7, None, None, id="b3-c63-g7-7x5-onetile"),
    pytest.param((3, 63, 7, 5), 9, None, None, id="b3-c63-g9-7x5-onetile"),
    pytest.param((2, 6, 3, 3), 6, None, None, id="b2-c6-g6-3x3-instance"),
]
# The interpreter runs the tile loops in Python: keep the looped cases at ~2x2 tiles per group and
# run them in fp64 only (the looped code is dtype-generic), plus one fp32 case.
LOOP_CASES = [
    pytest.param((1, 63, 7, 5), 9, 4, 32, id="b1-c63-g9-7x5-loop4x32"),
    pytest.param((2, 12, 3, 4, 5), 3, 2, 32, id="b2-c12-g3-3d-loop2x32"),
    pytest.param((1, 32, 4, 4), 8, 2, 16, id="b1-c32-g8-4x4-loop2x16"),
]
KERNEL_CASES = (_with_dtypes(ONE_TILE_CASES, FP64_FP32) + _with_dtypes(LOOP_CASES, FP64_FP32[:1])
                + _with_dtypes(LOOP_CASES[:1], FP64_FP32[1:]))


@pytest.mark.parametrize("shape,G,bc,bs,dtype", KERNEL_CASES)
def test_launchers_match_torch_helpers(shape, G, bc, bs, dtype):
    x, xd, w, b, gy, gyd = _inputs(shape, dtype=dtype)
    tol = TOL[dtype]
    y, yd, st = groupnorm_silu_dual_fwd(x, xd, w, b, G, EPS, block_c=bc, block_s=bs)
    y_r, yd_r, st_r = _gn_silu_dual_fwd_torch(x.double(), xd.double(), w.double(), b.double(), G, EPS)
    assert y.dtype == dtype and st.shape == (4, shape[0], G)
    assert st.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    for name, a, r in [("y", y, y_r), ("y_dot", yd, yd_r)] + [(f"stats{i}", st[i], st_r[i]) for i in range(4)]:
        assert rel_err(a, r) < tol, name
    for cot in [(gy, gyd), (gy, None), (None, gyd)]:
        got = groupnorm_silu_dual_bwd(x, xd, w, b, st, *cot, G, block_c=bc, block_s=bs)
        ref = _gn_silu_dual_bwd_torch(x.double(), xd.double(), w.double(), b.double(), st_r,
                                      *[None if c is None else c.double() for c in cot], G)
        for name, a, r in zip(["g_x", "g_xdot", "g_weight", "g_bias"], got, ref):
            assert (a is None) == (r is None), name
            if a is not None:
                assert rel_err(a, r) < tol, (name, cot[0] is None, cot[1] is None)


@pytest.mark.parametrize("bc,bs", [(None, None), (2, 8)], ids=["onetile", "loop"])
def test_dropout_mask_fused(bc, bs):
    shape, G, p = (2, 12, 5, 3), 3, 0.3
    x, xd, w, b, gy, gyd = _inputs(shape)
    mask = make_dropout_mask(shape, p, device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(3))
    scale = 1 / (1 - p)
    y, yd, st = groupnorm_silu_dual_fwd(x, xd, w, b, G, EPS, mask=mask, drop_scale=scale, block_c=bc, block_s=bs)
    y_r, yd_r, st_r = _gn_silu_dual_fwd_torch(x, xd, w, b, G, EPS, mask=mask, drop_scale=scale)
    assert rel_err(y, y_r) < 1e-13 and rel_err(yd, yd_r) < 1e-13
    assert torch.all(y[~mask] == 0) and torch.all(yd[~mask] == 0)
    got = groupnorm_silu_dual_bwd(x, xd, w, b, st, gy, gyd, G, mask=mask, drop_scale=scale, block_c=bc, block_s=bs)
    ref = _gn_silu_dual_bwd_torch(x, xd, w, b, st_r, gy, gyd, G, mask=mask, drop_scale=scale)
    for name, a, r in zip(["g_x", "g_xdot", "g_weight", "g_bias"], got, ref):
        assert rel_err(a, r) < 1e-13, name


def test_stacked_output_buffer():
    """out=[2B, ...]: primal in the first B, tangent in the last B (what the stage's conv consumes)."""
    shape, G = (3, 12, 4, 5), 4
    x, xd, w, b, _, _ = _inputs(shape)
    out = torch.full((6, 12, 4, 5), float("nan"), dtype=x.dtype, device=DEVICE)
    y, yd, _ = groupnorm_silu_dual_fwd(x, xd, w, b, G, EPS, out=out)
    y_r, yd_r, _ = groupnorm_silu_dual_fwd(x, xd, w, b, G, EPS)
    assert y.data_ptr() == out.data_ptr() and yd.data_ptr() == out[3:].data_ptr()
    assert torch.equal(out[:3], y_r) and torch.equal(out[3:], yd_r)


def test_fp32_large_mean_is_stable():
    """Two-pass (centred) variance: a large common offset must not destroy fp32 accuracy."""
    shape, G = (2, 16, 6, 6), 4
    x, xd, w, b, gy, gyd = _inputs(shape, dtype=torch.float32, offset=300.0)
    for bc, bs in [(None, None), (2, 8)]:
        y, yd, st = groupnorm_silu_dual_fwd(x, xd, w, b, G, EPS, block_c=bc, block_s=bs)
        y_r, yd_r, st_r = _gn_silu_dual_fwd_torch(x.double(), xd.double(), w.double(), b.double(), G, EPS)
        assert rel_err(y, y_r) < 1e-3 and rel_err(yd, yd_r) < 1e-3
        assert rel_err(st[1], st_r[1]) < 1e-4  # rstd


def test_non_contiguous_inputs():
    shape, G = (2, 12, 5, 4), 3
    x, xd, w, b, _, _ = _inputs(shape)
    xt, xdt = x.transpose(2, 3).contiguous().transpose(2, 3), xd.transpose(2, 3).contiguous().transpose(2, 3)
    assert not xt.is_contiguous()
    y, yd = groupnorm_silu_dual(xt, xdt, w, b, G, backend="triton")
    y_r, yd_r = groupnorm_silu_dual(x, xd, w, b, G, backend="torch")
    assert rel_err(y, y_r) < 1e-13 and rel_err(yd, yd_r) < 1e-13


def test_pick_config():
    for cg, s in [(1, 1), (9, 35), (4, 1024), (8, 1024), (8, 4096), (63, 5), (2, 65536)]:
        for max_tile, ept in [(8192, 16), (4096, 8)]:
            bc, bs, one, nw = _pick_config(cg, s, max_tile, ept, None, None)
            assert bc * bs <= max(max_tile, bs) and bc & (bc - 1) == 0 and bs & (bs - 1) == 0
            assert one == (bc >= cg and bs >= s)
            assert nw in (1, 2, 4, 8, 16)
    assert _pick_config(8, 1024, 8192, 16, None, None)[2]  # C=256, G=32, 32x32: one tile forward


# ----------------------------------------------------------------------------------------------------
# GPU (skipped without CUDA)
# ----------------------------------------------------------------------------------------------------
gpu = pytest.mark.skipif(not CUDA, reason="needs CUDA")
GPU_TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
GPU_DTYPES = [pytest.param(d, id=str(d).split(".")[-1]) for d in GPU_TOL]


@pytest.fixture
def no_tf32():
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def _gpu_compare(ref_fn, dual_fn, x, xd, params64, dtype, params_dtype=None):
    """Dual op in ``dtype`` vs the float64 jvp reference on the same rounded inputs; returns errors."""
    pdt = params_dtype or dtype
    x64, xd64 = x.to(dtype).double(), xd.to(dtype).double()
    p64 = [p.to(pdt).double().requires_grad_() for p in params64]
    y, yd, (g, gd), grads = jvp_reference(ref_fn(*p64), [x64], [xd64], p64)
    pl = [p.to(pdt).detach().requires_grad_() for p in params64]
    y2, yd2, grads2 = dual_grads(dual_fn(*pl), [x64.to(dtype)], [xd64.to(dtype)], pl, (g.to(dtype), gd.to(dtype)))
    return [rel_err(y2, y), rel_err(yd2, yd)] + [rel_err(a, r) for a, r in zip(grads2, grads)]


@gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("shape,G", [
    pytest.param((8, 256, 32, 32), 32, id="b8-c256-g32-32x32"),
    pytest.param((8, 128, 16, 16), 32, id="b8-c128-g32-16x16"),
    pytest.param((4, 256, 32, 32), 8, id="b4-c256-g8-32x32-looped"),
    pytest.param((3, 63, 7, 5), 9, id="b3-c63-g9-7x5"),
])
def test_gpu_groupnorm_silu(shape, G, dtype):
    x, xd, w, b, _, _ = _inputs(shape, device="cuda")
    ref = lambda w, b: (lambda x: F.silu(F.group_norm(x, G, w, b, EPS)))  # noqa: E731
    dual = lambda w, b: (lambda x, xd: groupnorm_silu_dual(x, xd, w, b, G, EPS, backend="triton"))  # noqa: E731
    errs = _gpu_compare(ref, dual, x, xd, [w, b], dtype)
    assert max(errs) < GPU_TOL[dtype], errs
    if dtype != torch.float32:  # fp32 affine parameters with low-precision activations
        errs = _gpu_compare(ref, dual, x, xd, [w, b], dtype, params_dtype=torch.float32)
        assert max(errs) < GPU_TOL[dtype], errs


@gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("dropout", [False, True], ids=["nodrop", "dropout"])
def test_gpu_stage(dtype, dropout, no_tf32):
    shape, G, cout = (8, 128, 16, 16), 32, 128
    x, xd, w, b, _, _ = _inputs(shape, device="cuda")
    gen = torch.Generator("cuda").manual_seed(0)
    cw = torch.randn(cout, 128, 3, 3, device="cuda", dtype=torch.float64, generator=gen) / (128 * 9) ** 0.5
    cb = torch.randn(cout, device="cuda", dtype=torch.float64, generator=gen)
    p = 0.1 if dropout else 0.0
    mask = make_dropout_mask(shape, p, device="cuda", generator=gen) if dropout else None

    def ref(w, b, cw, cb):
        def fn(x):
            a = F.silu(F.group_norm(x, G, w, b, EPS))
            return F.conv2d(a * mask / (1 - p) if dropout else a, cw, cb, padding=1)
        return fn

    kw = dict(dropout_p=p, training=True, dropout_mask=mask) if dropout else {}
    dual = lambda w, b, cw, cb: (lambda x, xd: gn_silu_conv_dual(x, xd, w, b, G, cw, cb, 1, EPS,  # noqa: E731
                                                                 backend="triton", **kw))
    errs = _gpu_compare(ref, dual, x, xd, [w, b, cw, cb], dtype)
    assert max(errs) < GPU_TOL[dtype], errs


@gpu
def test_gpu_triton_matches_torch_backend_fp32_and_is_deterministic():
    shape, G = (16, 256, 16, 16), 32
    x, xd, w, b, gy, gyd = _inputs(shape, device="cuda", dtype=torch.float32)
    y, yd, st = groupnorm_silu_dual_fwd(x, xd, w, b, G, EPS)
    y2, yd2, st2 = groupnorm_silu_dual_fwd(x, xd, w, b, G, EPS)
    assert torch.equal(y, y2) and torch.equal(yd, yd2) and torch.equal(st, st2)
    y_r, yd_r, st_r = _gn_silu_dual_fwd_torch(x, xd, w, b, G, EPS)
    assert rel_err(y, y_r) < 1e-5 and rel_err(yd, yd_r) < 1e-5
    got = groupnorm_silu_dual_bwd(x, xd, w, b, st, gy, gyd, G)
    ref = _gn_silu_dual_bwd_torch(x, xd, w, b, st_r, gy, gyd, G)
    for a, r in zip(got, ref):
        assert rel_err(a, r) < 1e-5
