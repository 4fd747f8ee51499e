r"""Pointwise nonlinear ops with explicit derivatives: the ``_SPECS`` of silu, exp, log, sin, cos, tanh,
sigmoid, sqrt, rsqrt, relu, square, gelu, and their rule, which applies ``PointwiseDual`` of
:mod:`sgflow.ops.pointwise` (saves x and x_dot; f' and f'' recomputed in chunks, see its
``POINTWISE_CHUNK``, read there); silu of a lazy GroupNorm goes to the GroupNorm+SiLU fusion."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from sgflow.autodual.rules.fallback import forward_ad
from sgflow.autodual.rules import fusions
from sgflow.autodual.rules.fusions import _gn_silu, pointwise_lazy
from sgflow.autodual.tensor import DualTensor, make_dual
from sgflow.ops.pointwise import PointwiseDual


class _Spec:
    """f, f', f'' of an elementwise op (``extra``: its non-tensor arguments); ``jvp(x, y, extra, v)``,
    where given: ``f'(x) v`` as one ATen op (PyTorch's own backward kernel of f), instead of ``d1``'s
    chain of small ops per chunk."""

    def __init__(self, f, d1, d2, needs_y=False, jvp=None, cpp=None):
        self.f, self.d1, self.d2, self.needs_y, self.jvp = f, d1, d2, needs_y, jvp
        self.cpp = cpp  # cpp(extra): the C++ kernel's kind ("gelu_tanh", "silu") or None (sgflow.ops.pointwise)


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
        # In place on three chunk-sized buffers (it was a dozen temporaries), 13 ops:
        # f'' = (th^2 - 1)(x th u'^2 - 2u' + c).
        c = _SQRT_2_OVER_PI
        u1 = x * x
        th = torch.addcmul(x, x, u1, value=_GELU_A).mul_(c).tanh_()
        u1.mul_(3.0 * c * _GELU_A).add_(c)
        w = torch.mul(x, th).mul_(u1).mul_(u1).sub_(u1, alpha=2.0).add_(c)
        return w.mul_(th.mul_(th).sub_(1.0))
    # f'' = phi(x) (2 - x^2), phi the standard normal density: 6 ops, two buffers.
    k = 1.0 / math.sqrt(2.0 * math.pi)
    s = x * x
    e = torch.mul(s, -0.5).exp_()
    return e.mul_(s.mul_(-k).add_(2.0 * k))


def _sig_d1(x, y, e):
    return y * (1.0 - y)


def _silu_d1(x, y, e):
    s = torch.sigmoid(x)
    return s * (1.0 + x * (1.0 - s))


def _silu_d2(x, y, e):
    # f'' = s (1 - s) (2 + x (1 - 2 s)), s = sigmoid(x): 6 ops (sigmoid_backward: q s (1 - s) in one).
    s = torch.sigmoid(x)
    return _aten.sigmoid_backward(torch.mul(s, -2.0).add_(1.0).mul_(x).add_(2.0), s)


_aten = torch.ops.aten

_SPECS = {
    "silu": _Spec(lambda x, e: F.silu(x), _silu_d1, _silu_d2, jvp=lambda x, y, e, v: _aten.silu_backward(v, x),
                  cpp=lambda e: "silu"),
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
                  jvp=lambda x, y, approx, v: _aten.gelu_backward(v, x, approximate=approx),
                  cpp=lambda approx: "gelu_tanh" if approx == "tanh" else None),
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
        if spec_name in fusions.LAZY_POINTWISE:
            node = fusions.gn_modulate_act(x, spec, extra)  # modulated GroupNorm -> activation (-> conv)
            if node is not None:
                return node
        xp, xt = x._primal, x._tangent
        if torch.is_autocast_enabled(xp.device.type):
            return forward_ad(func, args, kwargs)
        xt = xt.to(xp.dtype)
        if spec_name in fusions.LAZY_POINTWISE:  # (an in-place SiLU took forward_ad above: it has kwargs)
            return pointwise_lazy(xp, xt, spec, extra)
        return make_dual(*PointwiseDual.apply(xp, xt, spec, extra))

    return rule
