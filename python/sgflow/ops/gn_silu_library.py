"""The registered ops of the dual GroupNorm -> SiLU op (:mod:`sgflow.ops.groupnorm_silu`), the calls
through them, and the argument checks shared by its two functional APIs.

``sgflow::gn_silu_dual_{fwd,fwd_out,bwd,bwd_out}`` and their backends: ``..._torch`` custom ops (the torch
backend, :mod:`sgflow.ops.gn_silu_torch`), ``..._triton`` triton ops (registered on first use) and the C++
ops of ``sgflow._C`` (loaded on first use, through :mod:`sgflow.ops.cpp_ext`). Shapes, for every backend:
x, x_dot [B, C, *spatial]; weight, bias [C] or None; mask bool [B, C, *spatial] or None; stats [4, B, G];
``out`` (the ``_out`` variants) a contiguous [2B, C, *spatial] buffer. :func:`ops_for` names a backend's
ops, ``_fwd`` / ``_bwd`` call them; ``_validate`` / ``_check_param`` / ``_op_backend`` check the
functional APIs' arguments and pick the backend. Importing this module registers the torch-backend ops
(once, as any module is imported once); ``sgflow.ops.groupnorm_silu`` loads the C++ (and on CUDA the
Triton) ops at import.
"""
from __future__ import annotations

from typing import Optional

import torch

from sgflow.ops.backend import resolve_backend
from sgflow.ops.gn_silu_torch import _gn_silu_dual_bwd_torch, _gn_silu_dual_fwd_torch
from sgflow.ops.library import once as _once, register_loop_vmap
from sgflow_kernels.dtypes import acc_dtype as _acc_dtype

__all__ = ["ops_for"]


# ----------------------------------------------------------------------------------------------------
# registered ops: one torch.library op per kernel entry point and backend
# ----------------------------------------------------------------------------------------------------
# The same schemas as the C++ ops of csrc/sgflow_ops.cpp (``sgflow::gn_silu_dual_{fwd,fwd_out,bwd,bwd_out}``,
# CPU and CUDA kernels): the torch backend registers ``..._torch`` twins as custom ops, the Triton kernels
# ``..._triton`` twins as triton ops (registered on first use, so that sgflow imports without triton; at
# import on CUDA machines, see _register_eagerly).
# The fake (shape-only) implementations are shared by all three, and each non-mutating forward op gets
# an autograd formula (its backward op), so that every one of them is differentiable on its own and
# opaque to torch.compile. The `_out` variants write into a caller's stacked [2B, ...] buffer (the
# GN-SiLU-conv stage's convolution input); they mutate, so they have no autograd formula.
_FWD_SCHEMA = ("(Tensor x, Tensor x_dot, Tensor? weight, Tensor? bias, int num_groups, float eps, "
               "Tensor? mask=None, float drop_scale=1.0) -> (Tensor y, Tensor y_dot, Tensor stats)")
_FWD_OUT_SCHEMA = ("(Tensor x, Tensor x_dot, Tensor? weight, Tensor? bias, int num_groups, float eps, "
                   "Tensor? mask, float drop_scale, Tensor(a!) out) -> Tensor stats")
_BWD_SCHEMA = ("(Tensor x, Tensor x_dot, Tensor? weight, Tensor? bias, Tensor stats, Tensor? g_y, "
               "Tensor? g_y_dot, int num_groups, Tensor? mask=None, float drop_scale=1.0) "
               "-> (Tensor g_x, Tensor? g_x_dot, Tensor g_weight, Tensor g_bias)")
_BWD_OUT_SCHEMA = ("(Tensor x, Tensor x_dot, Tensor? weight, Tensor? bias, Tensor stats, Tensor? g_y, "
                   "Tensor? g_y_dot, int num_groups, Tensor? mask, float drop_scale, Tensor(a!) out) "
                   "-> (Tensor g_weight, Tensor g_bias)")


Tensor = torch.Tensor
OptTensor = Optional[torch.Tensor]


def _fwd_fake(x, x_dot, weight, bias, num_groups, eps, mask=None, drop_scale=1.0):
    stats = x.new_empty((4, x.shape[0], num_groups), dtype=_acc_dtype(x.dtype))
    return x.new_empty(x.shape), x.new_empty(x.shape), stats


def _fwd_out_fake(x, x_dot, weight, bias, num_groups, eps, mask, drop_scale, out):
    return x.new_empty((4, x.shape[0], num_groups), dtype=_acc_dtype(x.dtype))


def _bwd_fake(x, x_dot, weight, bias, stats, g_y, g_y_dot, num_groups, mask=None, drop_scale=1.0):
    C, acc = x.shape[1], _acc_dtype(x.dtype)
    g_xd = x.new_empty(x.shape) if g_y_dot is not None else None
    return x.new_empty(x.shape), g_xd, x.new_empty((C,), dtype=acc), x.new_empty((C,), dtype=acc)


def _bwd_out_fake(x, x_dot, weight, bias, stats, g_y, g_y_dot, num_groups, mask, drop_scale, out):
    C, acc = x.shape[1], _acc_dtype(x.dtype)
    return x.new_empty((C,), dtype=acc), x.new_empty((C,), dtype=acc)


def _fwd_setup_context(ctx, inputs, output):
    x, x_dot, weight, bias, num_groups, _eps, mask, drop_scale = inputs
    ctx.save_for_backward(x, x_dot, weight, bias, output[2], mask)
    ctx.num_groups, ctx.drop_scale = num_groups, drop_scale


def _fwd_autograd(bwd_op):
    """The autograd formula of a forward op: its backward op (gradients of x, x_dot, weight, bias)."""

    def backward(ctx, g_y, g_ydot, _g_stats):
        x, x_dot, weight, bias, stats, mask = ctx.saved_tensors
        g_x, g_xd, g_w, g_b = bwd_op(x, x_dot, weight, bias, stats, g_y, g_ydot, ctx.num_groups, mask,
                                     ctx.drop_scale)
        need = ctx.needs_input_grad
        return (g_x if need[0] else None, g_xd if need[1] else None, _param_grad(g_w, weight, need[2]),
                _param_grad(g_b, bias, need[3]), None, None, None, None)

    return backward


@torch.library.custom_op("sgflow::gn_silu_dual_fwd_torch", mutates_args=(), schema=_FWD_SCHEMA)
def _gn_fwd_torch_op(x, x_dot, weight, bias, num_groups, eps, mask=None, drop_scale=1.0):
    return _gn_silu_dual_fwd_torch(x, x_dot, weight, bias, num_groups, eps, mask=mask, drop_scale=drop_scale)


@torch.library.custom_op("sgflow::gn_silu_dual_fwd_out_torch", mutates_args=("out",), schema=_FWD_OUT_SCHEMA)
def _gn_fwd_out_torch_op(x, x_dot, weight, bias, num_groups, eps, mask, drop_scale, out):
    return _gn_silu_dual_fwd_torch(x, x_dot, weight, bias, num_groups, eps, mask=mask, drop_scale=drop_scale,
                                   out=out)[2]


@torch.library.custom_op("sgflow::gn_silu_dual_bwd_torch", mutates_args=(), schema=_BWD_SCHEMA)
def _gn_bwd_torch_op(x, x_dot, weight, bias, stats, g_y, g_y_dot, num_groups, mask=None, drop_scale=1.0):
    return _gn_silu_dual_bwd_torch(x, x_dot, weight, bias, stats, g_y, g_y_dot, num_groups, mask=mask,
                                   drop_scale=drop_scale)


@torch.library.custom_op("sgflow::gn_silu_dual_bwd_out_torch", mutates_args=("out",), schema=_BWD_OUT_SCHEMA)
def _gn_bwd_out_torch_op(x, x_dot, weight, bias, stats, g_y, g_y_dot, num_groups, mask, drop_scale, out):
    return _gn_silu_dual_bwd_torch(x, x_dot, weight, bias, stats, g_y, g_y_dot, num_groups, mask=mask,
                                   drop_scale=drop_scale, out=out)[2:]


for _op, _fake in ((_gn_fwd_torch_op, _fwd_fake), (_gn_fwd_out_torch_op, _fwd_out_fake),
                   (_gn_bwd_torch_op, _bwd_fake), (_gn_bwd_out_torch_op, _bwd_out_fake)):
    _op.register_fake(_fake)
_gn_fwd_torch_op.register_autograd(_fwd_autograd(torch.ops.sgflow.gn_silu_dual_bwd_torch),
                                   setup_context=_fwd_setup_context)
for _op in (_gn_fwd_torch_op, _gn_bwd_torch_op):
    register_loop_vmap(_op)


@_once
def _triton_ops():
    """Register the Triton launchers as ``sgflow::gn_silu_dual_{fwd,fwd_out,bwd}_triton`` (on first use).

    ``triton_op`` infers its schema from annotations (it ignores ``schema=`` in torch 2.13; the module
    aliases ``Tensor``/``OptTensor`` keep them resolvable under postponed annotations) and cannot
    return None: ``gn_silu_dual_bwd_triton`` returns an empty ``g_x_dot`` when ``g_y_dot`` is None, which
    :func:`_bwd` maps back to None.
    """
    from sgflow_kernels import groupnorm_silu as K

    @torch.library.triton_op("sgflow::gn_silu_dual_fwd_triton", mutates_args=())
    def fwd(x: Tensor, x_dot: Tensor, weight: OptTensor, bias: OptTensor, num_groups: int, eps: float,
            mask: OptTensor = None, drop_scale: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
        return K.groupnorm_silu_dual_fwd(x, x_dot, weight, bias, num_groups, eps, mask=mask, drop_scale=drop_scale)

    @torch.library.triton_op("sgflow::gn_silu_dual_fwd_out_triton", mutates_args=("out",))
    def fwd_out(x: Tensor, x_dot: Tensor, weight: OptTensor, bias: OptTensor, num_groups: int, eps: float,
                mask: OptTensor, drop_scale: float, out: Tensor) -> Tensor:
        return K.groupnorm_silu_dual_fwd(x, x_dot, weight, bias, num_groups, eps, mask=mask, drop_scale=drop_scale,
                                         out=out)[2]

    @torch.library.triton_op("sgflow::gn_silu_dual_bwd_triton", mutates_args=())
    def bwd(x: Tensor, x_dot: Tensor, weight: OptTensor, bias: OptTensor, stats: Tensor, g_y: OptTensor,
            g_y_dot: OptTensor, num_groups: int, mask: OptTensor = None,
            drop_scale: float = 1.0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        g_x, g_xd, g_w, g_b = K.groupnorm_silu_dual_bwd(x, x_dot, weight, bias, stats, g_y, g_y_dot, num_groups,
                                                        mask=mask, drop_scale=drop_scale)
        return g_x, (g_xd if g_xd is not None else x.new_empty(0)), g_w, g_b

    fwd.register_autograd(_fwd_autograd(_bwd_none(torch.ops.sgflow.gn_silu_dual_bwd_triton)),
                          setup_context=_fwd_setup_context)
    register_loop_vmap(fwd)
    register_loop_vmap(bwd)
    return torch.ops.sgflow


def _bwd_none(op):
    """A Triton backward op with None for the empty ``g_x_dot`` it returns when ``g_y_dot`` is None."""

    def call(x, x_dot, weight, bias, stats, g_y, g_ydot, *rest):
        g_x, g_xd, g_w, g_b = op(x, x_dot, weight, bias, stats, g_y, g_ydot, *rest)
        return g_x, (g_xd if g_ydot is not None else None), g_w, g_b

    return call


@_once
def _cpp_ops():
    """The C++ ops of sgflow._C (loaded on first use; cpp_ext adds their fakes and autograd formula)."""
    from sgflow.ops import cpp_ext

    if cpp_ext.load() is None:
        raise RuntimeError(cpp_ext.reason())
    return torch.ops.sgflow


def _register_eagerly() -> None:
    """Load the C++ ops (30 ms) and, on a CUDA machine, the Triton ops at import: a first registration
    inside a torch.compile trace is a graph break (dynamo does not trace torch.library registration)."""
    from sgflow.ops import cpp_ext
    from sgflow.ops.backend import triton_available

    cpp_ext.load()
    if torch.cuda.is_available() and triton_available():
        _triton_ops()


def ops_for(backend: str):
    """``(fwd, fwd_out, bwd, bwd_out)``: the registered ops of one backend (``bwd_out`` None for Triton,
    whose kernels are not checked on a GPU for writing over their own inputs)."""
    if backend in ("cpp", "cuda"):
        ns = _cpp_ops()
        return ns.gn_silu_dual_fwd, ns.gn_silu_dual_fwd_out, ns.gn_silu_dual_bwd, ns.gn_silu_dual_bwd_out
    if backend == "triton":
        ns = _triton_ops()
        return ns.gn_silu_dual_fwd_triton, ns.gn_silu_dual_fwd_out_triton, _bwd_none(ns.gn_silu_dual_bwd_triton), None
    ns = torch.ops.sgflow
    return ns.gn_silu_dual_fwd_torch, ns.gn_silu_dual_fwd_out_torch, ns.gn_silu_dual_bwd_torch, ns.gn_silu_dual_bwd_out_torch


def _fwd(backend, x, x_dot, weight, bias, num_groups, eps, mask=None, drop_scale=1.0, out=None):
    """(y, y_dot, stats) by the registered ops of ``backend``; with ``out`` ([2B, ...], contiguous) y and
    y_dot are its halves."""
    fwd, fwd_out, _, _ = ops_for(backend)
    if out is None:
        return fwd(x, x_dot, weight, bias, num_groups, eps, mask, drop_scale)
    stats = fwd_out(x, x_dot, weight, bias, num_groups, eps, mask, drop_scale, out)
    B = x.shape[0]
    return out[:B], out[B:], stats


def _bwd(backend, x, x_dot, weight, bias, stats, g_y, g_ydot, num_groups, mask=None, drop_scale=1.0, out=None):
    """(g_x, g_xdot, g_weight, g_bias); ``out``: see :func:`_gn_silu_dual_bwd_torch`, ignored by Triton."""
    _, _, bwd, bwd_out = ops_for(backend)
    if out is None or bwd_out is None:
        return bwd(x, x_dot, weight, bias, stats, g_y, g_ydot, num_groups, mask, drop_scale)
    g_w, g_b = bwd_out(x, x_dot, weight, bias, stats, g_y, g_ydot, num_groups, mask, drop_scale, out)
    B = x.shape[0]
    return out[:B], (out[B:] if g_ydot is not None else None), g_w, g_b


def _param_grad(g: torch.Tensor, p: torch.Tensor | None, needed: bool):
    return g.to(p.dtype) if (p is not None and needed) else None


# ----------------------------------------------------------------------------------------------------
# argument checks and backend of the functional APIs (groupnorm_silu_dual, gn_silu_conv_dual)
# ----------------------------------------------------------------------------------------------------
def _check_param(name: str, p: torch.Tensor | None, shape: tuple, x: torch.Tensor, same_dtype: bool):
    if p is None:
        return
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"{name} must be a tensor or None, got {type(p).__name__}")
    if tuple(p.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(p.shape)}")
    if p.device != x.device:
        raise ValueError(f"{name} is on {p.device} but x is on {x.device}")
    if same_dtype:
        if p.dtype != x.dtype:
            raise TypeError(f"{name} dtype {p.dtype} does not match x dtype {x.dtype}")
    elif p.dtype != x.dtype and not (p.dtype == torch.float32 and x.dtype in (torch.float16, torch.bfloat16)):
        raise TypeError(
            f"{name} dtype {p.dtype} does not match x dtype {x.dtype} "
            "(float32 parameters are allowed with float16/bfloat16 inputs)"
        )


def _validate(x, x_dot, weight, bias, num_groups):
    for name, t in (("x", x), ("x_dot", x_dot)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if x.dim() < 2:
        raise ValueError(f"x must have shape [B, C, *spatial], got {tuple(x.shape)}")
    if x_dot.shape != x.shape:
        raise ValueError(f"x_dot shape {tuple(x_dot.shape)} does not match x shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    if x_dot.dtype != x.dtype:
        raise TypeError(f"x_dot dtype {x_dot.dtype} does not match x dtype {x.dtype}")
    if x_dot.device != x.device:
        raise ValueError(f"x_dot is on {x_dot.device} but x is on {x.device}")
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups <= 0:
        raise ValueError(f"num_groups must be a positive int, got {num_groups!r}")
    C = x.shape[1]
    if C % num_groups != 0:
        raise ValueError(f"number of channels C={C} is not divisible by num_groups={num_groups}")
    _check_param("weight", weight, (C,), x, same_dtype=False)
    _check_param("bias", bias, (C,), x, same_dtype=False)


def _op_backend(x: torch.Tensor, backend: str | None) -> str:
    # "torch" | "triton" | "cpp" (C++ CPU kernels) | "cuda" (CUDA kernels of sgflow._C); automatic:
    # the C++ kernels on CPU where built (measured faster, see sgflow.ops.backend), Triton on CUDA.
    return resolve_backend(x, backend, op="gn_silu")
