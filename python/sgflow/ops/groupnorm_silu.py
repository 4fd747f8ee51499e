"""Dual (primal + tangent) GroupNorm -> SiLU, and the fused GroupNorm -> SiLU -> Dropout -> Conv2d stage.

Math, per sample and group of ``n = (C / G) * prod(spatial)`` elements; ``x_dot`` is the tangent
direction and the affine parameters ``gamma`` (weight), ``beta`` (bias) carry no tangent::

    mu = mean(x),  var = mean((x - mu)^2),  r = (var + eps)^-1/2,  xh = (x - mu) r
    h = gamma xh + beta (per channel),  y = silu(h) = h sigmoid(h)
    mu_dot = mean(x_dot),  r_dot = -r^3 mean((x - mu)(x_dot - mu_dot))
    xh_dot = r (x_dot - mu_dot) + r_dot (x - mu)
           = r (x_dot - mu_dot) - xh mean(xh r (x_dot - mu_dot))
    h_dot = gamma xh_dot,  y_dot = silu'(h) h_dot,  silu'(h) = s (1 + h (1 - s)),  s = sigmoid(h)

Backward for cotangents ``(g_y, g_ydot)`` (with ``<.>`` the group mean, ``dd = x_dot - mu_dot``)::

    silu''(h) = s (1 - s) (2 + h (1 - 2 s))
    g_h = g_y silu'(h) + g_ydot silu''(h) h_dot,   g_hdot = g_ydot silu'(h)
    g_gamma = sum_{batch, spatial}(g_h xh + g_hdot xh_dot),   g_beta = sum_{batch, spatial} g_h
    a = gamma g_h,  c = gamma g_hdot
    g_xdot = r (c - <c> - xh <c xh>)
    g_x    = r (a - <a> - xh <a xh>)                                    # plain GroupNorm backward
           + r_dot (c - <c>) - xh (r^2 <c dd> + 3 r_dot <c xh>) - r^2 <c xh> dd   # second order

(the last line is the derivative of ``<c, xh_dot>`` with respect to ``x`` through ``r``, ``r_dot`` and
the centring).

Layout (see docs/DESIGN.md): this file holds the reference ``groupnorm_silu_dual_ref`` -> the
``GroupNormSiLUDual`` autograd Function -> functional API ``groupnorm_silu_dual``, and re-exports the rest
under its old names: the torch backend (``sgflow/ops/gn_silu_torch.py``), the registered
``sgflow::gn_silu_dual_*`` ops, ``ops_for`` and the argument checks (``sgflow/ops/gn_silu_library.py``),
and the fused GroupNorm -> SiLU -> Dropout -> Conv2d stage ``GNSiLUConvDual`` / ``gn_silu_conv_dual``
with ``make_dropout_mask`` / ``apply_dropout_mask`` (``sgflow/ops/gn_silu_conv.py``). Triton kernels live
in ``sgflow_kernels/groupnorm_silu.py`` and are imported lazily, so ``sgflow`` imports without triton; the
C++ CPU / CUDA kernels (backends ``cpp`` / ``cuda``) are csrc/, reached through ``sgflow.ops.cpp_ext``, also
loaded lazily. The ops are registered once, by ``gn_silu_library`` (the torch backend's, at its import) and
at the end of this module (the C++ ops, and on a CUDA machine the Triton ops).

Group statistics (``stats``) are one ``[4, B, G]`` tensor: ``mean, rstd, mean_dot, rstd_dot``, in fp32
for fp16/bf16/fp32 inputs and fp64 for fp64 inputs; all arithmetic runs in that dtype.

``CHUNK_ELEMENTS`` (the torch backend's chunk size) is read by the code from ``gn_silu_torch``; reading or
setting it here reads or sets it there.
"""
from __future__ import annotations

from sgflow._forwarding import forward_globals

import torch
from torch.autograd.function import once_differentiable

from sgflow.ops import gn_silu_torch as _gn_silu_torch
from sgflow.ops.backend import autocast_dual
# Re-exports: every name this module had before the split (issue 20) stays importable from here.
from sgflow.ops.gn_silu_conv import (  # noqa: F401
    GNSiLUConvDual,
    _conv_padding,
    apply_dropout_mask,
    gn_silu_conv_dual,
    make_dropout_mask,
)
from sgflow.ops.gn_silu_library import (  # noqa: F401
    _BWD_OUT_SCHEMA,
    _BWD_SCHEMA,
    _FWD_OUT_SCHEMA,
    _FWD_SCHEMA,
    OptTensor,
    Tensor,
    _bwd,
    _bwd_fake,
    _bwd_none,
    _bwd_out_fake,
    _check_param,
    _cpp_ops,
    _fwd,
    _fwd_autograd,
    _fwd_fake,
    _fwd_out_fake,
    _fwd_setup_context,
    _gn_bwd_out_torch_op,
    _gn_bwd_torch_op,
    _gn_fwd_out_torch_op,
    _gn_fwd_torch_op,
    _op_backend,
    _param_grad,
    _register_eagerly,
    _triton_ops,
    _validate,
    ops_for,
)
from sgflow.ops.gn_silu_torch import (  # noqa: F401
    _affine_cols,
    _gn_silu_dual_bwd_chunk,
    _gn_silu_dual_bwd_torch,
    _gn_silu_dual_fwd_chunk,
    _gn_silu_dual_fwd_torch,
    _sample_chunks,
)
from sgflow_kernels.dtypes import acc_dtype as _acc_dtype

__all__ = [
    "groupnorm_silu_dual_ref",
    "GroupNormSiLUDual",
    "GNSiLUConvDual",
    "groupnorm_silu_dual",
    "gn_silu_conv_dual",
    "make_dropout_mask",
    "apply_dropout_mask",
]


# ----------------------------------------------------------------------------------------------------
# 1. reference
# ----------------------------------------------------------------------------------------------------
def groupnorm_silu_dual_ref(
    x: torch.Tensor,
    x_dot: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    num_groups: int,
    eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference dual GroupNorm -> SiLU by the explicit formulas of the module docstring.

    Plain differentiable PyTorch (no forward-AD), used as the readable specification.

    Args:
        x, x_dot: [B, C, *spatial]. weight, bias: [C] or None. ``C % num_groups == 0``.

    Returns:
        (y, y_dot), each [B, C, *spatial] in x's dtype (computed in fp32 for fp16/bf16).
    """
    B, C = x.shape[:2]
    G = num_groups
    acc = _acc_dtype(x.dtype)
    xg = x.to(acc).reshape(B, G, -1)
    xdg = x_dot.to(acc).reshape(B, G, -1)
    mu = xg.mean(-1, keepdim=True)
    d = xg - mu
    r = torch.rsqrt(d.square().mean(-1, keepdim=True) + eps)
    xh = (d * r).reshape(B, C, -1)
    mu_dot = xdg.mean(-1, keepdim=True)
    u = r * (xdg - mu_dot)  # r (x_dot - mu_dot)
    xh_dot = (u - (d * r) * (d * r * u).mean(-1, keepdim=True)).reshape(B, C, -1)
    gamma = weight.to(acc).view(1, C, 1) if weight is not None else torch.ones((), dtype=acc, device=x.device)
    beta = bias.to(acc).view(1, C, 1) if bias is not None else torch.zeros((), dtype=acc, device=x.device)
    h = gamma * xh + beta
    h_dot = gamma * xh_dot
    s = torch.sigmoid(h)
    y = h * s
    y_dot = s * (1 + h * (1 - s)) * h_dot
    return y.to(x.dtype).reshape(x.shape), y_dot.to(x.dtype).reshape(x.shape)


# ----------------------------------------------------------------------------------------------------
# 2. GroupNorm -> SiLU Function
# ----------------------------------------------------------------------------------------------------
class GroupNormSiLUDual(torch.autograd.Function):
    """(x, x_dot, weight, bias, num_groups, eps, backend) -> (y, y_dot, stats): dual silu(group_norm(x)),
    y and y_dot [B, C, *spatial], stats [4, B, G] (not differentiable) by the backend's registered ops.

    Saves x, x_dot, weight, bias and the statistics; backward recomputes everything else.
    Both outputs are fresh tensors (not views), so they may be modified in place downstream.
    ``torch.func.vmap`` runs through it (the ops' vmap rules loop over the vmapped dim).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x, x_dot, weight, bias, num_groups: int, eps: float, backend: str):
        return _fwd(backend, x, x_dot, weight, bias, num_groups, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, x_dot, weight, bias, num_groups, _eps, backend = inputs
        ctx.save_for_backward(x, x_dot, weight, bias, output[2])
        ctx.mark_non_differentiable(output[2])
        ctx.num_groups = num_groups
        ctx.backend = backend
        # Let backward see which output actually received a gradient (skip the tangent terms if not).
        ctx.set_materialize_grads(False)

    @staticmethod
    @once_differentiable  # the group statistics are saved without a graph
    def backward(ctx, g_y, g_ydot, _g_stats):
        x, x_dot, weight, bias, stats = ctx.saved_tensors
        if g_y is None and g_ydot is None:
            return (None,) * 7
        g_x, g_xd, g_w, g_b = _bwd(ctx.backend, x, x_dot, weight, bias, stats, g_y, g_ydot, ctx.num_groups)
        need = ctx.needs_input_grad
        return (
            g_x if need[0] else None,
            g_xd if need[1] else None,
            _param_grad(g_w, weight, need[2]),
            _param_grad(g_b, bias, need[3]),
            None, None, None,
        )


# ----------------------------------------------------------------------------------------------------
# 3. functional API (the GN-SiLU-conv stage's: sgflow/ops/gn_silu_conv.py)
# ----------------------------------------------------------------------------------------------------
@autocast_dual
def groupnorm_silu_dual(
    x: torch.Tensor,
    x_dot: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    num_groups: int,
    eps: float = 1e-5,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """y = silu(group_norm(x, num_groups, weight, bias, eps)) and its JVP y_dot in direction x_dot.

    Args:
        x, x_dot: [B, C, *spatial] (any number of spatial dims, including none), same dtype/device.
        weight, bias: [C] or None; x's dtype, or float32 with float16/bfloat16 x. No tangent.
        num_groups: G, must divide C.
        backend: "torch" | "triton" | "cpp" (C++ CPU kernels) | "cuda" (CUDA kernels of sgflow._C) |
            None (automatic, see sgflow.ops.backend).

    Returns:
        (y, y_dot), each [B, C, *spatial] in x's dtype; differentiable w.r.t. x, x_dot, weight, bias.
    """
    _validate(x, x_dot, weight, bias, num_groups)
    be = _op_backend(x, backend)
    return GroupNormSiLUDual.apply(x, x_dot, weight, bias, num_groups, float(eps), be)[:2]


# The torch backend's tunable, by the module whose code reads it: reading or setting it on this module
# reads or sets it there (a plain re-export would be a copy that the code never reads once replaced).
forward_globals(__name__, {"CHUNK_ELEMENTS": _gn_silu_torch})


_register_eagerly()
