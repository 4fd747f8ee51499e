r"""Normalisation layers (group, layer, RMS, batch, instance norm) from their statistics.

PyTorch's forward AD raises on strided tangents in group_norm, and its reverse-over-forward gradients of
layer_norm, batch_norm and instance_norm are wrong in torch 2.13 (pytorch/pytorch#196700, #196699). So
the normalisation layers are written here from their statistics, with the tangent formula

    x̂ = (x - μ) r,  r = (var + eps)^(-1/2),  x̂_dot = r (x_dot - mean(x_dot) - x̂ mean(x̂ x_dot))

(means over the normalised elements), computed in float32 for half/bf16 inputs, as one recomputed op
(``recompute_op``). A GroupNorm with plain affine parameters is a lazy node (a SiLU that follows takes
the fused GroupNorm+SiLU op, see :mod:`sgflow.autodual.rules.fusions`), else the ``GroupNormDual`` op.
"""
from __future__ import annotations

import torch

from sgflow.autodual.rules.common import _bind, _low_precision, recompute_op
from sgflow.autodual.tensor import DualTensor, fail, make_dual, primal, tangent
from sgflow.normalization import LayerNormDual, normalize_dual


# ---------------------------------------------------------------------------------------------
# Normalisation layers: statistics and their tangents written out (see module doc)


def _normalize(x, xd, dims, eps, rms=False):
    """(x̂, x̂_dot) over ``dims`` (fp32 for half/bf16): :func:`sgflow.normalization.normalize_dual`."""
    acc = torch.float32 if _low_precision(x) else x.dtype
    return normalize_dual(x.to(acc), xd.to(acc), dims, eps, rms=rms)


def _norm_dual(x, w, b, affine_shape, normalize, rows=True):
    """y = x̂ w + b and its tangent, x̂ from ``normalize(xp, xt) -> (x̂, x̂_dot)`` (fp32 for half/bf16),
    as one recomputed op (only x, x_dot, w, b and their tangents are kept for backward).

    ``w``, ``b`` may be None, plain tensors or DualTensors (adaptive norms that compute their affine
    parameters from the inputs); they broadcast through ``affine_shape``. ``rows``: whether samples
    (dim 0) are normalised each on its own (not a batch norm in training). Under autocast the output is
    fp32, as PyTorch's autocast runs the norms; otherwise it has x's dtype.
    """
    xp = x._primal
    out_dtype = torch.float32 if torch.is_autocast_enabled(xp.device.type) else xp.dtype
    wt, bt = tangent(w), tangent(b)

    def both(xp, xt, wp, wt, bp, bt):
        with torch.autocast(xp.device.type, enabled=False):
            xh, xhd = normalize(xp, xt)
            y, yd = xh, xhd
            if wp is not None:
                wr = wp.to(xh.dtype).reshape(affine_shape)
                y, yd = y * wr, yd * wr
                if wt is not None:
                    yd = yd + xh * wt.to(xh.dtype).reshape(affine_shape)
            if bp is not None:
                y = y + bp.to(xh.dtype).reshape(affine_shape)
                if bt is not None:
                    yd = yd + bt.to(xh.dtype).reshape(affine_shape)
            return y.to(out_dtype), yd.to(out_dtype)

    y, yd = recompute_op(both, xp, x._tangent, primal(w), wt, primal(b), bt, rows=(0, 1) if rows and xp.dim() > 1 else ())
    return make_dual(y, yd)


def _require_dual_input(func, x, args, kwargs):
    if not isinstance(x, DualTensor):
        # Only the affine parameters carry a tangent: the same formulas with a zero input tangent.
        return make_dual(x, torch.zeros_like(x))
    return x


def _group_norm_rule(func, args, kwargs):
    b = _bind(args, kwargs, ("input", "num_groups", "weight", "bias", "eps"), {"weight": None, "bias": None, "eps": 1e-5})
    x = _require_dual_input(func, b["input"], args, kwargs)
    g, w, bias, eps = b["num_groups"], b["weight"], b["bias"], b["eps"]
    xp, xt = x._primal, x._tangent
    n, c = xp.shape[:2]
    if c % g:
        raise fail(func, f"{c} channels do not split into {g} groups")
    if not isinstance(w, DualTensor) and not isinstance(bias, DualTensor):
        # Lazy: when SiLU follows, the fused GroupNorm+SiLU dual op runs instead (C++ on CPU, Triton on
        # GPU, statistics in fp32); any other use materialises the plain dual GroupNorm below.
        from sgflow.autodual.attention import LazyDual, frozen

        x = frozen(x)  # what the node was made from, whatever an in-place op does to the input later
        return LazyDual(tuple(xp.shape), xp, "gn", {"x": x, "w": w, "b": bias, "g": g, "eps": eps},
                        lambda: _group_norm_eager(x, w, bias, g, eps))
    return _group_norm_general(x, w, bias, g, eps)


def _group_norm_eager(x, w, bias, g, eps):
    """Dual GroupNorm with plain affine parameters: the GroupNormDual op (PyTorch's group-norm kernels
    and a closed-form second-order term; saves x, x_dot and w only), in fp32 for half/bf16 inputs and
    under autocast."""
    from sgflow.ops.groupnorm import GroupNormDual

    xp, xt = x._primal, x._tangent
    autocast = torch.is_autocast_enabled(xp.device.type)
    acc = torch.float32 if _low_precision(xp) or autocast else xp.dtype
    with torch.autocast(xp.device.type, enabled=False):
        y, yd = GroupNormDual.apply(
            xp.to(acc), xt.to(acc), None if w is None else w.to(acc), None if bias is None else bias.to(acc), g, eps
        )
    out_dtype = torch.float32 if autocast else xp.dtype
    return make_dual(y.to(out_dtype), yd.to(out_dtype))


def _group_norm_general(x, w, bias, g, eps):
    """Dual GroupNorm whose affine parameters carry tangents (computed from the inputs)."""
    xp = x._primal
    n, c = xp.shape[:2]

    def normalize(xp, xt):  # on a slice of the rows in backward: its own leading size
        xh, xhd = _normalize(xp.reshape(xp.shape[0], g, -1), xt.reshape(xt.shape[0], g, -1), (2,), eps)
        return xh.reshape(xp.shape), xhd.reshape(xp.shape)

    return _norm_dual(x, w, bias, (1, c) + (1,) * (xp.dim() - 2), normalize)


def _normalized_shape(ns):
    return (ns,) if isinstance(ns, int) else tuple(ns)


def _layer_norm_rule(func, args, kwargs):
    b = _bind(args, kwargs, ("input", "normalized_shape", "weight", "bias", "eps"), {"weight": None, "bias": None, "eps": 1e-5})
    x = _require_dual_input(func, b["input"], args, kwargs)
    shape = _normalized_shape(b["normalized_shape"])
    dims = tuple(range(x._primal.dim() - len(shape), x._primal.dim()))
    eps = b["eps"]
    w, bias = b["weight"], b["bias"]
    if not isinstance(w, DualTensor) and not isinstance(bias, DualTensor):
        return _layer_norm_plain_affine(x, w, bias, shape, eps)
    return _norm_dual(x, w, bias, shape, lambda xp, xt: _normalize(xp, xt, dims, eps), rows=0 not in dims)


def _layer_norm_plain_affine(x, w, bias, shape, eps):
    """Dual layer norm with plain (or no) affine parameters: the ``LayerNormDual`` op (PyTorch's layer-norm
    kernels for the primal, the tangent and every first-derivative term; two ops forward), in fp32 for
    half/bf16 inputs and under autocast (output fp32 under autocast, as PyTorch's autocast runs it)."""
    xp, xt = x._primal, x._tangent
    autocast = torch.is_autocast_enabled(xp.device.type)
    acc = torch.float32 if _low_precision(xp) or autocast else xp.dtype
    with torch.autocast(xp.device.type, enabled=False):
        y, yd = LayerNormDual.apply(xp.to(acc), xt.to(acc), None if w is None else w.to(acc),
                                    None if bias is None else bias.to(acc), shape, eps)
    out_dtype = torch.float32 if autocast else xp.dtype
    return make_dual(y.to(out_dtype), yd.to(out_dtype))


def _rms_norm_rule(func, args, kwargs):
    b = _bind(args, kwargs, ("input", "normalized_shape", "weight", "eps"), {"weight": None, "eps": None})
    x = _require_dual_input(func, b["input"], args, kwargs)
    shape = _normalized_shape(b["normalized_shape"])
    xp = x._primal
    eps = b["eps"] if b["eps"] is not None else torch.finfo(xp.dtype).eps
    dims = tuple(range(xp.dim() - len(shape), xp.dim()))
    return _norm_dual(x, b["weight"], None, shape, lambda xp, xt: _normalize(xp, xt, dims, eps, rms=True),
                      rows=0 not in dims)


def _batch_norm_rule(func, args, kwargs):
    b = _bind(
        args, kwargs,
        ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"),
        {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5},
    )
    x = _require_dual_input(func, b["input"], args, kwargs)
    xp = x._primal
    c = xp.shape[1]
    shape = (1, c) + (1,) * (xp.dim() - 2)
    rm, rv, eps = b["running_mean"], b["running_var"], b["eps"]
    dims = (0,) + tuple(range(2, xp.dim()))
    if b["training"] or rm is None:
        if b["training"] and rm is not None:
            with torch.no_grad():  # running statistics from the primal, as PyTorch updates them
                m = b["momentum"] if b["momentum"] is not None else 0.1
                xs = xp.float() if _low_precision(xp) else xp
                rm.mul_(1 - m).add_(xs.mean(dims).to(rm.dtype), alpha=m)
                rv.mul_(1 - m).add_(xs.var(dims, unbiased=xp.numel() // c > 1).to(rv.dtype), alpha=m)
        return _norm_dual(x, b["weight"], b["bias"], shape, lambda xp, xt: _normalize(xp, xt, dims, eps), rows=False)

    def normalize(xp, xt):  # eval: an affine map with the running statistics
        acc = torch.float32 if _low_precision(xp) else xp.dtype
        r = torch.rsqrt(rv.to(acc).reshape(shape) + eps)
        return (xp.to(acc) - rm.to(acc).reshape(shape)) * r, xt.to(acc) * r

    return _norm_dual(x, b["weight"], b["bias"], shape, normalize)


def _instance_norm_rule(func, args, kwargs):
    b = _bind(
        args, kwargs,
        ("input", "running_mean", "running_var", "weight", "bias", "use_input_stats", "momentum", "eps"),
        {"running_mean": None, "running_var": None, "weight": None, "bias": None, "use_input_stats": True,
         "momentum": 0.1, "eps": 1e-5},
    )
    if not b["use_input_stats"] or b["running_mean"] is not None:
        raise fail(func, "instance_norm with running statistics has no dual rule", "Use track_running_stats=False")
    x = _require_dual_input(func, b["input"], args, kwargs)
    xp = x._primal
    dims, eps = tuple(range(2, xp.dim())), b["eps"]
    return _norm_dual(x, b["weight"], b["bias"], (1, xp.shape[1]) + (1,) * (xp.dim() - 2),
                      lambda xp, xt: _normalize(xp, xt, dims, eps))
