"""Resampling by an integer factor (``sgflow.ops.resample``) and the fused GroupNorm -> SiLU -> resample -> conv
stage (``gn_silu_conv_dual(..., resample=...)``, a U-Net up / down block's ``conv(resample(silu(norm(x))))``) with
the dual engine's fusion into it.

References: ``F.interpolate`` / ``F.avg_pool2d`` and their autograd for the primitives; ``torch.func.jvp`` of the
plain stage in float64 and autograd through it for the fused op.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sgflow
import sgflow.autodual.rules.table as table
from sgflow.memory import saved_tensor_bytes
from sgflow.ops.groupnorm_silu import gn_silu_conv_dual
from sgflow.ops.resample import avg_pool_ref, block_sum, repeat, resample, resample_backward, upsample_nearest_ref
from sgflow.testing import rel_err

# (N, C, H, W), factor
SHAPES = {"7x5-s2": ((2, 3, 7, 5), 2), "batch1-c63-s3": ((1, 63, 2, 3), 3), "1x1-s2": ((3, 4, 1, 1), 2)}
POOL_SHAPES = {"14x10-s2": ((2, 3, 14, 10), 2), "batch1-c63-s3": ((1, 63, 6, 9), 3), "2x2-s2": ((3, 4, 2, 2), 2)}


@pytest.mark.parametrize("case", list(SHAPES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["fp64", "fp32", "bf16"])
def test_repeat_is_nearest_upsampling_bit_for_bit(case, dtype):
    shape, s = SHAPES[case]
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    y = repeat(x, s)
    assert y.is_contiguous() and torch.equal(y, upsample_nearest_ref(x, s))


@pytest.mark.parametrize("case", list(POOL_SHAPES))
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-14), (torch.float32, 1e-6)], ids=["fp64", "fp32"])
def test_block_sum_is_average_pooling_times_s2(case, dtype, tol):
    shape, s = POOL_SHAPES[case]
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = avg_pool_ref(x, s) * (s * s)
    assert rel_err(block_sum(x.to(dtype), s).double(), ref) < tol
    assert rel_err(resample(x.to(dtype), ("avg", s)).double(), avg_pool_ref(x, s)) < tol


@pytest.mark.parametrize("mode,shapes", [("nearest", SHAPES), ("avg", POOL_SHAPES)])
def test_resample_backward_is_the_adjoint(mode, shapes):
    """resample_backward(g) = the autograd gradient of F.interpolate / F.avg_pool2d (float64)."""
    for shape, s in shapes.values():
        x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
        ref_fn = upsample_nearest_ref if mode == "nearest" else avg_pool_ref
        y = ref_fn(x, s)
        g = torch.randn_like(y)
        (gx,) = torch.autograd.grad(y, x, g)
        assert rel_err(resample_backward(g, (mode, s)), gx) < 1e-14


def _stage_inputs(shape, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    n, c, h, w = shape
    vals = [torch.randn(*shape, generator=g, dtype=torch.float64) * 2 + 0.5, torch.randn(*shape, generator=g, dtype=torch.float64),
            1 + 0.2 * torch.randn(c, generator=g, dtype=torch.float64), 0.2 * torch.randn(c, generator=g, dtype=torch.float64),
            0.2 * torch.randn(5, c, 3, 3, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)]
    return [v.to(dtype).requires_grad_() for v in vals]


def _plain_stage(x, gw, gb, cw, cb, groups, spec):
    h = F.silu(F.group_norm(x, groups, gw, gb, 1e-5))
    h = upsample_nearest_ref(h, spec[1]) if spec[0] == "nearest" else avg_pool_ref(h, spec[1])
    return F.conv2d(h, cw, cb, padding=1)


STAGES = {"up2-b2c6-7x5": ((2, 6, 7, 5), 3, ("nearest", 2)), "up3-batch1-c63": ((1, 63, 3, 2), 7, ("nearest", 3)),
          "down2-b3c4-8x6": ((3, 4, 8, 6), 2, ("avg", 2)), "down3-b2c6-9x6": ((2, 6, 9, 6), 3, ("avg", 3))}


@pytest.mark.parametrize("case", list(STAGES))
@pytest.mark.parametrize("which", ["both", "tangent"])
@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)], ids=["fp64", "fp32"])
def test_fused_stage_with_resampling_matches_jvp_reference(case, which, backend, dtype, tol):
    """(y, y_dot) and the gradients of x, x_dot, GroupNorm's affine and the conv's weight and bias against the
    jvp of the plain stage (float64), for cotangents on both outputs or on the tangent only (SGFlow's case)."""
    if backend == "cpp":
        from sgflow.ops import cpp_ext

        if not cpp_ext.available():
            pytest.skip(f"sgflow._C not built: {cpp_ext.reason()}")
    shape, groups, spec = STAGES[case]
    ref_in = _stage_inputs(shape, 3, torch.float64)
    x, xd, gw, gb, cw, cb = ref_in
    y_ref, yd_ref = torch.func.jvp(lambda a: _plain_stage(a, gw, gb, cw, cb, groups, spec), (x,), (xd,))
    g = torch.Generator().manual_seed(4)
    gy, gyd = torch.randn(y_ref.shape, generator=g, dtype=torch.float64), torch.randn(y_ref.shape, generator=g, dtype=torch.float64)
    use_y = which == "both"
    ref_loss = (yd_ref * gyd).sum() + ((y_ref * gy).sum() if use_y else 0)
    ref_grads = [torch.zeros_like(v) if d is None else d
                 for v, d in zip(ref_in, torch.autograd.grad(ref_loss, ref_in, allow_unused=True))]
    ins = _stage_inputs(shape, 3, dtype)
    y, yd = gn_silu_conv_dual(ins[0], ins[1], ins[2], ins[3], groups, ins[4], ins[5], 1, eps=1e-5, resample=spec,
                              backend=backend)
    loss = (yd * gyd.to(dtype)).sum() + ((y * gy.to(dtype)).sum() if use_y else 0)
    grads = [torch.zeros_like(v) if d is None else d for v, d in zip(ins, torch.autograd.grad(loss, ins, allow_unused=True))]
    assert rel_err(y.double(), y_ref) < tol and rel_err(yd.double(), yd_ref) < tol
    for name, a, b in zip(("x", "x_dot", "gn_w", "gn_b", "conv_w", "conv_b"), grads, ref_grads):
        assert rel_err(a.double(), b) < tol, name


def test_gradcheck_with_resampling():
    x, xd, gw, gb, cw, cb = _stage_inputs((1, 4, 4, 2), 5, torch.float64)
    for spec in (("nearest", 2), ("avg", 2)):
        assert torch.autograd.gradcheck(
            lambda *a: gn_silu_conv_dual(a[0], a[1], a[2], a[3], 2, a[4], a[5], 1, resample=spec), (x, xd, gw, gb, cw, cb))


@pytest.mark.parametrize("resample_arg,match", [
    (("bilinear", 2), "resample must be None"), (("nearest", 0), "integer >= 1"), (("nearest", 2.0), "integer >= 1"),
    (("avg", 3), "divisible by 3"), ("nearest", "resample must be None")])
def test_bad_resample_is_named(resample_arg, match):
    x, xd, gw, gb, cw, cb = _stage_inputs((2, 4, 4, 4), 6, torch.float64)
    with pytest.raises(ValueError, match=match):
        gn_silu_conv_dual(x, xd, gw, gb, 2, cw, cb, 1, resample=resample_arg)


class _ResampleBlock(nn.Module):
    """A U-Net up / down block's first stage, written as EDM / diffusers write it."""

    def __init__(self, how):
        super().__init__()
        self.norm, self.conv, self.how = nn.GroupNorm(2, 6), nn.Conv2d(6, 5, 3, padding=1), how

    def forward(self, h):
        a = F.silu(self.norm(h))
        if self.how == "up":
            a = F.interpolate(a, scale_factor=2, mode="nearest")
        elif self.how == "up-float":
            a = F.interpolate(a, scale_factor=2.0)
        elif self.how == "down":
            a = F.avg_pool2d(a, 2)
        elif self.how == "down-module":
            a = nn.AvgPool2d(kernel_size=2, stride=2)(a)
        elif self.how == "bilinear":
            a = F.interpolate(a, scale_factor=2, mode="bilinear", align_corners=False)
        return self.conv(a)


def _engine(block, fused):
    g = torch.Generator().manual_seed(7)
    h, h_dot = (torch.randn(2, 6, 8, 6, generator=g, dtype=torch.float64).requires_grad_() for _ in range(2))
    before = table.gn_silu_resample
    if not fused:
        table.gn_silu_resample = lambda *a: None
    out = {}
    try:
        def step():
            y = block(sgflow.autodual.make_dual(h * 1.0, h_dot * 1.0))
            out["y"] = (sgflow.autodual.primal(y), sgflow.autodual.tangent(y))
            # Fixed cotangents (a product with a constant saves the constant only: both variants alike).
            gy = torch.linspace(-1, 1, out["y"][0].numel(), dtype=torch.float64).view(out["y"][0].shape)
            return (out["y"][0] * gy).sum() + (out["y"][1] * gy.flip(0)).sum()

        saved = saved_tensor_bytes(step)
        grads = torch.autograd.grad(saved["loss"], [h, h_dot, *block.parameters()])
    finally:
        table.gn_silu_resample = before
    return [*out["y"], *grads], saved["bytes"]


def _reference(block):
    """What :func:`_engine` returns, by torch.func.jvp of the block and autograd through it (same inputs, float64)."""
    g = torch.Generator().manual_seed(7)
    h, h_dot = (torch.randn(2, 6, 8, 6, generator=g, dtype=torch.float64).requires_grad_() for _ in range(2))
    y, yd = torch.func.jvp(block, (h * 1.0,), (h_dot * 1.0,))
    gy = torch.linspace(-1, 1, y.numel(), dtype=torch.float64).view(y.shape)
    return [y, yd, *torch.autograd.grad((y * gy).sum() + (yd * gy.flip(0)).sum(), [h, h_dot, *block.parameters()])]


@pytest.mark.parametrize("how", ["up", "up-float", "down", "down-module"])
def test_engine_fuses_the_resampling_into_the_stage(how):
    """Through the dual engine, GroupNorm -> SiLU -> resample -> conv runs as the fused stage: values and
    gradients equal the unfused engine's and the jvp reference (float64), and it saves the stage's input pair only:
    apart, the conv keeps the resampled activation pair."""
    torch.manual_seed(8)
    block = _ResampleBlock(how).double()
    fused, fused_bytes = _engine(block, True)
    plain, plain_bytes = _engine(block, False)
    ref = _reference(block)
    for a, b, r in zip(fused, plain, ref):
        assert rel_err(a, r) < 1e-10 and rel_err(b, r) < 1e-10
    pair = 2 * 2 * 6 * 8 * 6 * 8  # float64 [2, 6, 8, 6] pair
    expected = 4 * pair if how.startswith("up") else pair // 4
    assert plain_bytes - fused_bytes == expected, (plain_bytes, fused_bytes)


def test_engine_leaves_other_resampling_unfused():
    """Bilinear interpolation is not a resampling the stage takes: the ops apart, equal to the reference."""
    torch.manual_seed(9)
    block = _ResampleBlock("bilinear").double()
    fused, fused_bytes = _engine(block, True)
    plain, plain_bytes = _engine(block, False)
    assert fused_bytes == plain_bytes
    for a, b in zip(fused, plain):
        assert torch.equal(a, b)


class _ComputedResample(nn.Module):
    """Resampling of a computed dual tensor (ADM's / diffusers' ``Upsample``: interpolate, then conv)."""

    def __init__(self, how):
        super().__init__()
        self.conv0, self.conv1, self.how = nn.Conv2d(6, 4, 3, padding=1), nn.Conv2d(4, 5, 3, padding=1), how

    def forward(self, h):
        a = self.conv0(h)
        if self.how == "up":
            a = F.interpolate(a, scale_factor=2.0, mode="nearest")
        elif self.how == "up-module":
            a = nn.Upsample(scale_factor=3)(a)
        elif self.how == "down":
            a = F.avg_pool2d(a, kernel_size=2)
        return self.conv1(a * torch.sigmoid(a))


@pytest.mark.parametrize("how,calls", [("up", 1), ("up-module", 1), ("down", 1)])
def test_engine_resamples_computed_dual_tensors_as_one_op(how, calls, monkeypatch):
    """F.interpolate (nearest, integer factor) / F.avg_pool2d of a computed dual tensor runs as ResampleDual (both
    streams, nothing saved): values and gradients equal the jvp reference (float64)."""
    from sgflow.ops.resample import ResampleDual

    count = [0]
    forward = ResampleDual.forward

    def counted(ctx, *a):
        count[0] += 1
        return forward(ctx, *a)

    monkeypatch.setattr(ResampleDual, "forward", staticmethod(counted))
    torch.manual_seed(10)
    block = _ComputedResample(how).double()
    got, _ = _engine(block, True)
    ref = _reference(block)
    assert count[0] == calls
    for a, r in zip(got, ref):
        assert rel_err(a, r) < 1e-10
