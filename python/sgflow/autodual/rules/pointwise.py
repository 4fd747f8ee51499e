r"""Pointwise nonlinear ops with explicit derivatives: ``_PointwiseDual`` (saves x and x_dot; f' and f''
recomputed in chunks, see ``POINTWISE_CHUNK``, read from this module), the ``_SPECS`` of silu, exp, log,
sin, cos, tanh, sigmoid, sqrt, rsqrt, relu, square, gelu, and their rule (silu of a lazy GroupNorm goes to
the GroupNorm+SiLU fusion)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from sgflow.autodual.rules.fallback import forward_ad
from sgflow.autodual.rules.fusions import _gn_silu
from sgflow.autodual.tensor import DualTensor, make_dual


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


def _flat(t):
    return t.reshape(-1)


class _PointwiseDual(torch.autograd.Function):
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

    @staticmethod
    def backward(ctx, g, g_dot):
        x, x_dot = ctx.saved_tensors
        spec, extra = ctx.spec, ctx.extra
        need_x, need_xd = ctx.needs_input_grad[:2]
        xf, xdf = _flat(x), _flat(x_dot)
        gf = None if g is None else _flat(g)
        gdf = None if g_dot is None else _flat(g_dot)
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
                dxf = dx.view(-1)
                for lo, hi in _chunks(x, POINTWISE_D2_CHUNKS):
                    ys = None if yf is None else yf[lo:hi]
                    dxf[lo:hi].add_(spec.d2(xf[lo:hi], ys, extra).mul_(gdf[lo:hi]).mul_(xdf[lo:hi]))
            return dx, dxd, None, None
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
        return dx, dxd, None, None


class _Spec:
    """f, f', f'' of an elementwise op (``extra``: its non-tensor arguments); ``jvp(x, y, extra, v)``,
    where given: ``f'(x) v`` as one ATen op (PyTorch's own backward kernel of f), instead of ``d1``'s
    chain of small ops per chunk."""

    def __init__(self, f, d1, d2, needs_y=False, jvp=None):
        self.f, self.d1, self.d2, self.needs_y, self.jvp = f, d1, d2, needs_y, jvp


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_A = 0.044715


def _gelu_tanh_parts(x):
    u1 = _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_A * x * x)
    th = torch.tanh(_SQRT_2_OVER_PI * (x + _GELU_A * x * x * x))
    return th, u1


def _gelu_d1(x, y, approx):
    if approx == "tanh":
        th, u1 = _gelu_tanh_parts(x)
        return 0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * u1
    return 0.5 * (1.0 + torch.erf(x * (1.0 / math.sqrt(2.0)))) + x * torch.exp(-0.5 * x * x) * (1.0 / math.sqrt(2.0 * math.pi))


def _gelu_d2(x, y, approx):
    if approx == "tanh":
        # f'' = (1 - th^2) (u' - x th u'^2 + x u''/2),  u = c (x + a x^3); x u''/2 = 3 c a x^2 = u' - c.
        # In place on three chunk-sized buffers (it was a dozen temporaries): f'' = (1 - th^2)(2u' - c - x th u'^2).
        c = _SQRT_2_OVER_PI
        u1 = x * x
        th = torch.mul(u1, _GELU_A).add_(1.0).mul_(x).mul_(c).tanh_()
        u1.mul_(3.0 * c * _GELU_A).add_(c)
        w = torch.mul(th, x).mul_(u1).mul_(u1).neg_().add_(u1, alpha=2.0).sub_(c)
        return w.mul_(th.mul_(th).neg_().add_(1.0))
    return torch.exp(-0.5 * x * x) * (1.0 / math.sqrt(2.0 * math.pi)) * (2.0 - x * x)


def _sig_d1(x, y, e):
    return y * (1.0 - y)


def _silu_d1(x, y, e):
    s = torch.sigmoid(x)
    return s * (1.0 + x * (1.0 - s))


def _silu_d2(x, y, e):
    s = torch.sigmoid(x)
    return s * (1.0 - s) * (2.0 + x * (1.0 - 2.0 * s))


_aten = torch.ops.aten

_SPECS = {
    "silu": _Spec(lambda x, e: F.silu(x), _silu_d1, _silu_d2, jvp=lambda x, y, e, v: _aten.silu_backward(v, x)),
    "exp": _Spec(lambda x, e: torch.exp(x), lambda x, y, e: torch.exp(x), lambda x, y, e: torch.exp(x)),
    "log": _Spec(lambda x, e: torch.log(x), lambda x, y, e: 1.0 / x, lambda x, y, e: -1.0 / (x * x)),
    "sin": _Spec(lambda x, e: torch.sin(x), lambda x, y, e: torch.cos(x), lambda x, y, e: -torch.sin(x)),
    "cos": _Spec(lambda x, e: torch.cos(x), lambda x, y, e: -torch.sin(x), lambda x, y, e: -torch.cos(x)),
    "tanh": _Spec(lambda x, e: torch.tanh(x), lambda x, y, e: 1.0 - y * y, lambda x, y, e: -2.0 * y * (1.0 - y * y), True,
                  jvp=lambda x, y, e, v: _aten.tanh_backward(v, y)),
    "sigmoid": _Spec(lambda x, e: torch.sigmoid(x), _sig_d1, lambda x, y, e: y * (1.0 - y) * (1.0 - 2.0 * y), True,
                     jvp=lambda x, y, e, v: _aten.sigmoid_backward(v, y)),
    "sqrt": _Spec(lambda x, e: torch.sqrt(x), lambda x, y, e: 0.5 / y, lambda x, y, e: -0.25 / (y * y * y), True),
    "rsqrt": _Spec(lambda x, e: torch.rsqrt(x), lambda x, y, e: -0.5 * y * y * y, lambda x, y, e: 0.75 * y.pow(5), True),
    "relu": _Spec(lambda x, e: torch.relu(x), lambda x, y, e: (x > 0).to(x.dtype), lambda x, y, e: torch.zeros_like(x)),
    "square": _Spec(lambda x, e: x * x, lambda x, y, e: 2.0 * x, lambda x, y, e: torch.full_like(x, 2.0)),
    "gelu": _Spec(lambda x, approx: F.gelu(x, approximate=approx), _gelu_d1, _gelu_d2,
                  jvp=lambda x, y, approx, v: _aten.gelu_backward(v, x, approximate=approx)),
}


def _pointwise_rule(spec_name):
    spec = _SPECS[spec_name]

    def rule(func, args, kwargs):
        x = args[0]
        kwargs = {k: v for k, v in kwargs.items() if not (k == "inplace" and v is False)}  # nn.SiLU passes it
        if spec_name == "silu" and not kwargs and (len(args) == 1 or args[1] is False):
            fused = _gn_silu(x)
            if fused is not None:
                return fused
        if not isinstance(x, DualTensor) or any(isinstance(a, torch.Tensor) for a in list(args[1:]) + list(kwargs.values())):
            return forward_ad(func, args, kwargs)
        extra = None
        if spec_name == "gelu":
            extra = kwargs.get("approximate", args[1] if len(args) > 1 else "none")
        elif len(args) > 1 and not (len(args) == 2 and args[1] is False and spec_name in ("silu", "relu")) or kwargs:
            return forward_ad(func, args, kwargs)
        xp, xt = x._primal, x._tangent
        if torch.is_autocast_enabled(xp.device.type):
            return forward_ad(func, args, kwargs)
        y, yt = _PointwiseDual.apply(xp, xt.to(xp.dtype), spec, extra)
        return make_dual(y, yt)

    return rule
