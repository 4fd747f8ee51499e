r"""Dual elementwise op with explicit derivatives: ``(x, x_dot) -> (f(x), f'(x) x_dot)``.

Shapes: ``x, x_dot`` of any one shape; ``y, y_dot`` of x's shape. ``spec`` gives f and its
derivatives (``extra``: the op's non-tensor arguments, e.g. GELU's ``approximate``):
``spec.f(x, extra)``, ``spec.d1(x, y, extra) = f'(x)``, ``spec.d2(x, y, extra) = f''(x)``
(``y = f(x)``, passed where ``spec.needs_y``, else None), and ``spec.jvp(x, y, extra, v) = f'(x) v``
as one ATen op, or None (the dual engine's ``_Spec`` in sgflow.autodual.rules.pointwise).

Forward
-------
    y = f(x),        y_dot = f'(x) x_dot

Backward
--------
Cotangents ``G``, ``Gd`` (either may be None):

    dx     = G f'(x) + Gd x_dot f''(x)
    dx_dot = Gd f'(x)

Saved: x and x_dot only. f' and f'' are recomputed from x over flat chunks of
``POINTWISE_CHUNK[device type]`` elements (``POINTWISE_D2_CHUNKS`` times that for the f'' term where
``spec.jvp`` does the f' terms in one op), never kept as the autograd graph of the derivative formula:
the formulas' temporaries (half a dozen for tanh-GELU) cost a chunk each instead of an activation each.

On CPU, float32/float64, tanh-GELU and SiLU run as one C++ kernel each way where ``sgflow._C`` is built
(``torch.ops.sgflow.pointwise_dual_{fwd,bwd}``, csrc/pointwise_dual_cpu_kernels.h: every factor of f, f',
f'' computed once per element, one pass over the tensors): a DiT MLP's GELU at [16, 256, 512], one
thread, forward 7.6 -> 2.3 ms, backward 2 x 3.9 ms plus the f'' chunks -> 2.1 ms.

Module layout (see docs/DESIGN.md): :class:`PointwiseDual` (applied by the dual engine's elementwise
rule, sgflow.autodual.rules.pointwise, with the specs of silu, exp, log, sin, cos, tanh, sigmoid, sqrt,
rsqrt, relu, square, gelu); kernels in csrc/ (C++).
"""
from __future__ import annotations

import torch

__all__ = ["PointwiseDual", "pointwise_dual_values", "pointwise_dual_grads", "pointwise_dual_grads_into",
           "POINTWISE_CHUNK", "POINTWISE_D2_CHUNKS", "CPP_KERNELS"]


# Elements per chunk of the pointwise duals' elementwise work: the derivative formulas' temporaries
# (half a dozen for tanh-GELU) then cost a chunk each instead of an activation each (on a DiT MLP they
# set the training step's peak). Large on CUDA, where one pass per op is what matters.
POINTWISE_CHUNK = {"cpu": 1 << 16, "cuda": 1 << 24}


# Where f'(x) v is one op (``_Spec.jvp``), only the f'' term of backward runs in chunks, this many times
# larger: its temporaries alone (three for tanh-GELU, written in place) use the chunk's budget.
POINTWISE_D2_CHUNKS = 4


def _chunks(x, scale=1):
    n = x.numel()
    step = scale * POINTWISE_CHUNK.get(x.device.type, POINTWISE_CHUNK["cuda"])
    return [(i, min(n, i + step)) for i in range(0, n, step)] or [(0, 0)]


def _chunk_size(x, scale=1):
    return max(1, scale * POINTWISE_CHUNK.get(x.device.type, POINTWISE_CHUNK["cuda"]))


def _flat(t):
    return t.reshape(-1)


# Use the C++ kernels where they apply (False: always the ATen path, e.g. to test it).
CPP_KERNELS = True


def _cpp_kind(spec, extra, *tensors):
    """The C++ kernel's kind for this op and these tensors, or None (ATen path): CPU float32/float64
    tensors of one dtype, an op the kernels know (``spec.cpp(extra)``), ``sgflow._C`` built."""
    cpp = getattr(spec, "cpp", None)
    kind = cpp(extra) if cpp is not None and CPP_KERNELS else None
    from sgflow.ops import cpp_ext

    return kind if kind is not None and cpp_ext.cpu_kernels_apply(*tensors) else None


class PointwiseDual(torch.autograd.Function):
    """``(x, x_dot) -> (f(x), f'(x) x_dot)`` for an elementwise f, saving only x and x_dot.

    Backward with cotangents (g, g_dot): ``dx = g f'(x) + g_dot x_dot f''(x)``, ``dx_dot = g_dot f'(x)``,
    with f' and f'' recomputed from x chunk by chunk (see POINTWISE_CHUNK), never as the autograd
    graph of the derivative formula.
    """

    @staticmethod
    def forward(ctx, x, x_dot, spec, extra):
        ctx.spec, ctx.extra = spec, extra
        ctx.save_for_backward(x, x_dot)
        ctx.set_materialize_grads(False)
        return pointwise_dual_values(x, x_dot, spec, extra)

    @staticmethod
    def backward(ctx, g, g_dot):
        x, x_dot = ctx.saved_tensors
        dx, dxd = pointwise_dual_grads(x, x_dot, g, g_dot, ctx.spec, ctx.extra, *ctx.needs_input_grad[:2])
        return dx, dxd, None, None


def pointwise_dual_values(x, x_dot, spec, extra):
    """``(f(x), f'(x) x_dot)``: the forward of :class:`PointwiseDual` without its autograd node (the C++
    kernel where it applies; also what a fused consumer recomputes in its backward)."""
    kind = _cpp_kind(spec, extra, x, x_dot) if not (torch.is_grad_enabled() and x.requires_grad) else None
    if kind is not None:  # y and y_dot in one pass (C++)
        return torch.ops.sgflow.pointwise_dual_fwd(x, x_dot, kind)
    y = spec.f(x, extra)
    if spec.jvp is not None:  # f'(x) x_dot as one op (no temporaries, no chunks)
        return y, spec.jvp(x, y, extra, x_dot)
    yf = _flat(y) if y.is_contiguous() else _flat(y.contiguous())
    xf, xdf = _flat(x), _flat(x_dot)
    y_dot = torch.empty(x.shape, dtype=y.dtype, device=x.device)
    ydf = y_dot.view(-1)
    for lo, hi in _chunks(x):
        torch.mul(spec.d1(xf[lo:hi], yf[lo:hi], extra), xdf[lo:hi], out=ydf[lo:hi])
    return y, y_dot


def pointwise_dual_grads_into(x, x_dot, g, g_dot, spec, extra) -> bool:
    """``(dx, dx_dot)`` written over the contiguous cotangents ``g``, ``g_dot`` by the C++ kernel, where it
    applies (True; both given, grad mode off, not traced), else nothing done (False). Saves a consumer's
    backward two activation-sized buffers (:class:`sgflow.ops.conv_linear.PointwiseLinearDual`)."""
    if (g is None or g_dot is None or torch.is_grad_enabled() or torch.compiler.is_compiling()
            or not (g.is_contiguous() and g_dot.is_contiguous())):
        return False
    kind = _cpp_kind(spec, extra, x, x_dot, g, g_dot)
    if kind is None:
        return False
    torch.ops.sgflow.pointwise_dual_bwd_(x, x_dot, g, g_dot, kind)
    return True


def pointwise_dual_grads(x, x_dot, g, g_dot, spec, extra, need_x=True, need_xd=True):
    """``(dx, dx_dot)`` of :class:`PointwiseDual` (module doc) for cotangents ``g``, ``g_dot`` (either may be
    None; a gradient not needed or identically zero is None)."""
    kind = None if torch.is_grad_enabled() else _cpp_kind(spec, extra, x, x_dot, g, g_dot)
    if kind is not None:  # both gradients in one pass (C++); not twice differentiable, hence grad mode off
        dx, dxd = torch.ops.sgflow.pointwise_dual_bwd(x, x_dot, g, g_dot, kind)
        return dx if need_x else None, dxd if need_xd else None
    if spec.jvp is not None:
        # The first-derivative terms as one op each; only g_dot x_dot f''(x) runs in chunks.
        y = spec.f(x, extra) if spec.needs_y else None
        dxd = spec.jvp(x, y, extra, g_dot) if need_xd and g_dot is not None else None
        dx = None
        if need_x and g is not None:
            dx = spec.jvp(x, y, extra, g)
        if need_x and g_dot is not None:
            if dx is None:
                dx = torch.zeros(x.shape, dtype=x.dtype, device=x.device)
            elif not dx.is_contiguous():
                dx = dx.contiguous()
            yf = None if y is None else _flat(y if y.is_contiguous() else y.contiguous())
            xf, xdf, gdf = _flat(x), _flat(x_dot), _flat(g_dot)
            # The chunks' views by one ``split`` per tensor (a slice per chunk and tensor was a third
            # of the f'' term's ops).
            step = _chunk_size(x, POINTWISE_D2_CHUNKS)
            parts = [t.split(step) if t.numel() > step else (t,) for t in (dx.view(-1), xf, gdf, xdf)]
            ys = [None] * len(parts[0]) if yf is None else (yf.split(step) if yf.numel() > step else (yf,))
            for out, xs, gds, xds, yc in zip(*parts, ys):
                out.addcmul_(spec.d2(xs, yc, extra).mul_(gds), xds)
        return dx, dxd
    xf, xdf = _flat(x), _flat(x_dot)
    gf = None if g is None else _flat(g)
    gdf = None if g_dot is None else _flat(g_dot)
    dx = torch.zeros(x.shape, dtype=x.dtype, device=x.device) if need_x and (g is not None or g_dot is not None) else None
    dxd = torch.empty(x.shape, dtype=x.dtype, device=x.device) if need_xd and g_dot is not None else None
    for lo, hi in _chunks(x):
        xs = xf[lo:hi]
        ys = spec.f(xs, extra) if spec.needs_y else None
        d1 = spec.d1(xs, ys, extra)
        if dx is not None:
            out = dx.view(-1)[lo:hi]
            if gf is not None:
                out.add_(gf[lo:hi] * d1)
            if gdf is not None:
                out.add_(spec.d2(xs, ys, extra).mul_(gdf[lo:hi]).mul_(xdf[lo:hi]))
        if dxd is not None:
            torch.mul(gdf[lo:hi], d1, out=dxd.view(-1)[lo:hi])
    return dx, dxd
