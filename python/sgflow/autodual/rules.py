r"""Dual rules: for one op ``y = op(x, ...)`` on DualTensors, ``(y, y_dot = J_op x_dot)``.

Each rule has the signature ``rule(func, args, kwargs) -> result`` (DualTensors where the result has
a tangent) and is registered for the torch functions / tensor methods it covers. The tangents are
computed with ordinary differentiable tensor ops, so autograd records both streams and the
parameter gradient flows through the tangent (reverse over forward). See
:mod:`sgflow.autodual.tensor` for the dispatch and the list of rule kinds.

Why hand-written rules at all: PyTorch's forward AD is missing for the fused SDPA kernels, raises on
strided tangents in group_norm, and its reverse-over-forward gradients of layer_norm, batch_norm
and instance_norm are wrong in torch 2.13 (pytorch/pytorch#196700, #196699). So the normalisation layers are
written here from their statistics, with the tangent formula

    x̂ = (x - μ) r,  r = (var + eps)^(-1/2),  x̂_dot = r (x_dot - mean(x_dot) - x̂ mean(x̂ x_dot))

(means over the normalised elements), computed in float32 for half/bf16 inputs; conv and linear
run primal and tangent as two calls sharing the weight, with no stacked copy of either stream (the
weight gradient is two accumulated products; one product over the stacked rows in half precision,
rounded once); SDPA and hand-written
``softmax(q k^T) v`` go to the dual attention op (O(N) memory per row) and dropout draws one mask for
both streams.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from sgflow.autodual.tensor import (
    DerivedValue,
    DualTensor,
    call_flat,
    dual_leaves,
    fail,
    make_dual,
    note_rule,
    primal,
    register,
    tangent,
    unwrap_primals,
    wrap_outputs,
)

_T = torch.Tensor


_nullctx = contextlib.nullcontext


def _fns(names, *spaces):
    out = []
    for n in names:
        for s in spaces:
            f = getattr(s, n, None)
            if f is not None:
                out.append(f)
    return out


def _getters(names):
    out = []
    for n in names:
        d = getattr(_T, n, None)
        if d is not None and hasattr(d, "__get__"):
            out.append(d.__get__)
    return out


def _bind(args, kwargs, names, defaults):
    """Positional + keyword arguments of a functional call as one dict (defaults filled in)."""
    bound = dict(defaults)
    bound.update(zip(names, args))
    bound.update(kwargs)
    return bound


def _tangent_or_zeros(x):
    t = tangent(x)
    return torch.zeros_like(primal(x)) if t is None else t


def _low_precision(x):
    return x.dtype in (torch.float16, torch.bfloat16)


class _RecomputeOp(torch.autograd.Function):
    """``fn(*tensors)`` run without a graph; backward recomputes it with one and differentiates.

    Op-level recomputation for the dual formulas of elementwise and normalisation ops: autograd of
    the written-out formula would keep every intermediate (a dozen activation-sized tensors for a
    tanh-GELU tangent or a layer norm); this keeps only the op's inputs, as the primal op does.
    Second derivatives (the gradient through the tangent) come from autograd of the formula.

    ``rows``: the positions of the inputs whose rows (dim 0) ``fn`` maps to the same rows of every
    output, independently of the other rows (a layer norm's input and tangent; not its weight).
    Backward then recomputes and differentiates ``ROW_SLICES`` slices of rows one after the other, so
    the formula's intermediates are live for one slice at a time (they were the peak of a step whose
    blocks are recomputed in row slices); the other inputs' gradients are summed over the slices.
    """

    @staticmethod
    def forward(ctx, fn, rows, *tensors):
        ctx.fn = fn
        dt = next(t for t in tensors if isinstance(t, torch.Tensor)).device.type
        ctx.autocast = (dt, torch.is_autocast_enabled(dt), torch.get_autocast_dtype(dt))
        ctx.save_for_backward(*[t if isinstance(t, torch.Tensor) else None for t in tensors])
        ctx.others = [None if isinstance(t, torch.Tensor) else t for t in tensors]
        with torch.no_grad():
            outs = fn(*tensors)
        n = tensors[rows[0]].shape[0] if rows else 0
        ok = n > 1 and all(isinstance(o, torch.Tensor) and o.dim() >= 1 and o.shape[0] == n for o in outs)
        ctx.rows = tuple(rows) if ok else ()
        return outs

    @staticmethod
    def backward(ctx, *grads):
        saved = ctx.saved_tensors
        need = ctx.needs_input_grad[2:]
        if not ctx.rows:
            return (None, None, *_recompute_grads(ctx, saved, need, grads))
        n = saved[ctx.rows[0]].shape[0]
        chunks = max(1, min(ROW_SLICES, n, saved[ctx.rows[0]].numel() // ROW_SLICE_MIN_NUMEL))
        if chunks == 1:
            return (None, None, *_recompute_grads(ctx, saved, need, grads))
        shared = [None if s is None or i in ctx.rows else s.detach().requires_grad_(need[i])
                  for i, s in enumerate(saved)]
        res = [None] * len(saved)
        bounds = [n * j // chunks for j in range(chunks + 1)]
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            part = [s.narrow(0, lo, hi - lo) if i in ctx.rows else shared[i] if s is not None else None
                    for i, s in enumerate(saved)]
            got = _recompute_grads(ctx, part, need, [None if g is None else g.narrow(0, lo, hi - lo) for g in grads],
                                   leaves=shared)
            for i, g in enumerate(got):
                if g is None:
                    continue
                if i in ctx.rows:
                    if res[i] is None:
                        res[i] = g.new_zeros(saved[i].shape)
                    res[i][lo:hi] = g
                else:
                    res[i] = g if res[i] is None else res[i] + g
        return (None, None, *res)


# _RecomputeOp's backward over row slices: at most this many, of at least this many elements each.
ROW_SLICES = 8
ROW_SLICE_MIN_NUMEL = 2**17


def _recompute_grads(ctx, saved, need, grads, leaves=None):
    """Gradients of ``ctx.fn``'s outputs (cotangents ``grads``) w.r.t. its tensor inputs ``saved``,
    recomputed with a graph; ``leaves``: inputs already made leaves (shared by several row slices)."""
    inputs = [o if s is None else leaves[i] if leaves is not None and leaves[i] is not None
              else s.detach().requires_grad_(need[i])
              for i, (s, o) in enumerate(zip(saved, ctx.others))]
    device_type, on, dtype = ctx.autocast
    with torch.enable_grad(), torch.autocast(device_type, dtype=dtype, enabled=on):
        outs = ctx.fn(*inputs)
    wrt = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]
    pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
    got = iter(torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True)
               if pairs and wrt else [None] * len(wrt))
    return [next(got) if isinstance(x, torch.Tensor) and x.requires_grad else None for x in inputs]


def recompute_op(fn, *inputs, rows=()):
    """``fn(*inputs) -> tuple of tensors`` keeping only ``inputs`` for backward (see _RecomputeOp;
    ``rows``: positions of the inputs ``fn`` treats row by row)."""
    if not torch.is_grad_enabled() or not any(isinstance(t, torch.Tensor) and t.requires_grad for t in inputs):
        return fn(*inputs)
    return _RecomputeOp.apply(fn, tuple(rows), *inputs)


# ---------------------------------------------------------------------------------------------
# Metadata, errors, non-differentiable ops


def meta(func, args, kwargs):
    """Shape/dtype/device queries: answered by the primal, no tangent. A lazy node answers the ones its
    storage-less wrapper knows itself, without being materialised (a dropout mask drawn from
    ``h.shape``, ``h.device`` must not break the fusion of ``h`` into a following op)."""
    from sgflow.autodual.attention import LazyDual

    if args and isinstance(args[0], LazyDual) and args[0]._cache is None and func in _LAZY_SAFE_META:
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)
    return func(*unwrap_primals(args), **unwrap_primals(kwargs))


def nondiff(func, args, kwargs):
    """Ops whose output carries no tangent (constant in x): computed on the primals. Comparisons and
    other values derived from a dual tensor come back as :class:`DerivedValue` (Python control flow on
    them raises, see there)."""
    out = func(*unwrap_primals(args), **unwrap_primals(kwargs))
    name = getattr(func, "__name__", "")
    if name in _DERIVED_NAMES and isinstance(out, torch.Tensor) and type(out) is torch.Tensor:
        return out.as_subclass(DerivedValue)
    return out


def inplace_error(func, args, kwargs):
    raise fail(
        func,
        "in-place op on a tensor that carries a tangent (the dual forward keeps primal and tangent as two "
        "tensors and cannot update both in place)",
        "Write it out of place (e.g. `x = x + y` instead of `x += y`, `F.silu(x)` instead of `inplace=True`)",
    )


def control_flow_error(func, args, kwargs):
    raise fail(
        func,
        "Python control flow or a Python number taken from a tensor that carries a tangent (the value "
        "would drop its tangent, and a branch on it can differ when the block is recomputed in backward)",
        "Compute on tensors (torch.where, masks as weights) or move the check outside the model's forward",
    )


# ---------------------------------------------------------------------------------------------
# Linear ops: the tangent is the same op applied to the tangents


_METADATA_ARG_OPS = {"view_as", "expand_as", "reshape_as", "type_as"}


def linear(func, args, kwargs):
    """``y_dot = op(x_dot)`` for ops linear in their tensor data (zeros for data without tangent)."""
    out = func(*unwrap_primals(args), **unwrap_primals(kwargs))
    flat, spec, idx = dual_leaves(args, kwargs)
    name = getattr(func, "__name__", "")
    first_tensor = next((i for i, a in enumerate(flat) if isinstance(a, torch.Tensor)), None)
    tflat = []
    for i, a in enumerate(flat):
        if isinstance(a, DualTensor):
            tflat.append(a._tangent if (name not in _METADATA_ARG_OPS or i == first_tensor) else a._primal)
        elif isinstance(a, torch.Tensor) and a.is_floating_point() and not (name in _METADATA_ARG_OPS and i != first_tensor):
            tflat.append(torch.zeros_like(a))
        else:
            tflat.append(a)
    if name == "view":
        # The tangent can be strided differently from the primal (a product-rule sum, a transpose):
        # reshape gives the same values where view would refuse.
        a, k = _unflatten(tflat, spec)
        if len(a) > 1 and isinstance(a[1], torch.dtype) or "dtype" in k:
            return wrap_outputs(out, None)
        t = a[0].reshape(*a[1:], **k) if a[1:] else a[0]
    else:
        t = call_flat(func, tflat, spec)
    return wrap_outputs(out, t)


def _unflatten(flat, spec):
    from torch.utils._pytree import tree_unflatten

    return tree_unflatten(flat, spec)


def _fit(t, shape):
    """A tangent broadcast to the output's shape, materialised (later views need real strides)."""
    if t.shape == shape:
        return t
    return t.expand(shape).contiguous()


def affine(positions):
    """Rule for ops affine in the arguments at ``positions`` (add, sub, where, masked_fill, pad):
    the tangent is the op with tangents there and zeros for every other data value."""

    def rule(func, args, kwargs):
        out = func(*unwrap_primals(args), **unwrap_primals(kwargs))
        ref = next(a for a in list(args) + list(kwargs.values()) if isinstance(a, DualTensor))
        zero = torch.zeros((), dtype=ref._tangent.dtype, device=ref._tangent.device)
        targs = list(args)
        tkw = dict(kwargs)
        for pos in positions:
            if isinstance(pos, int):
                if pos < len(targs):
                    a = targs[pos]
                    targs[pos] = a._tangent if isinstance(a, DualTensor) else (zero if pos == 0 else 0)
            elif pos in tkw:
                a = tkw[pos]
                tkw[pos] = a._tangent if isinstance(a, DualTensor) else 0
        targs = [primal(a) for a in targs]
        tkw = {k: primal(v) for k, v in tkw.items()}
        t = func(*targs, **tkw)
        return wrap_outputs(out, _fit(t, out.shape))

    return rule


# ---------------------------------------------------------------------------------------------
# Multilinear ops: product rule


_MATMULS = {torch.bmm, torch.matmul, _T.bmm, _T.matmul, _T.__matmul__}
_SCALE_OPS = {torch.mul, _T.mul, _T.__mul__, _T.__rmul__}


def _einsum_form(eq: str):
    """'scores' for '<b>id,<b>jd-><b>ij', 'apply' for '<b>ij,<b>jd-><b>id', else None."""
    eq = eq.replace(" ", "")
    if "->" not in eq or "." in eq:
        return None
    ins, out = eq.split("->")
    ops = ins.split(",")
    if len(ops) != 2 or len(ops[0]) != len(ops[1]) or len(ops[0]) < 3 or len(set(ops[0])) != len(ops[0]):
        return None
    a, b = ops
    batch = a[:-2]
    if b[:-2] != batch or out[:-2] != batch or len(out) != len(a):
        return None
    i, x = a[-2], a[-1]
    if b[-1] == x and b[-2] not in (i, x) and out[-2:] == i + b[-2]:
        return "scores"
    if b[-2] == x and b[-1] not in (i, x) and out[-2:] == i + b[-1]:
        return "apply"
    return None


def _noted(result, kind):
    if result is not None:
        note_rule(kind)
    return result


def _lazy_attention(func, args, kwargs):
    """The hand-written attention pattern (see sgflow.autodual.attention), or None."""
    from sgflow.autodual import attention as la

    if kwargs:
        return None
    if func in _SCALE_OPS and len(args) == 2:
        a, b = args
        if la._is_lazy(a, "scores") and isinstance(b, (int, float)):
            return la.scale_node(a, float(b))
        if la._is_lazy(b, "scores") and isinstance(a, (int, float)):
            return la.scale_node(b, float(a))
        return None
    if func is torch.einsum:
        eq, ops = args[0], list(args[1]) if len(args) == 2 and isinstance(args[1], (list, tuple)) else list(args[1:])
        form = _einsum_form(eq) if isinstance(eq, str) and len(ops) == 2 else None
        if form == "apply" and la._is_lazy(ops[0], "probs"):
            return _noted(la.probs_matmul(ops[0], ops[1]), "rule:attention (softmax(q k^T) v, fused op)")
        if form == "scores" and all(isinstance(o, torch.Tensor) for o in ops):
            return la.scores_node(func, args, kwargs, ops[0], ops[1], lambda: product(func, args, kwargs, lazy=False))
        return None
    if func in _MATMULS and len(args) == 2:
        a, b = args
        if la._is_lazy(a, "probs") and isinstance(b, torch.Tensor):
            return _noted(la.probs_matmul(a, b), "rule:attention (softmax(q k^T) v, fused op)")
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and primal(b).dim() >= 3:
            k = b.mT  # the transposed operand as keys (a linear op on the dual, a view)
            return la.scores_node(func, args, kwargs, a, k, lambda: product(func, args, kwargs, lazy=False))
    return None


def product(func, args, kwargs, lazy=True):
    """``y_dot = sum_i op(x_1, .., x_i_dot, .., x_n)`` for ops linear in each tensor argument."""
    if lazy:
        r = _lazy_attention(func, args, kwargs)
        if r is not None:
            return r
    flat, spec, idx = dual_leaves(args, kwargs)
    pflat = [primal(a) for a in flat]
    out = call_flat(func, pflat, spec)
    t = None
    for i in idx:
        f = list(pflat)
        f[i] = flat[i]._tangent
        term = call_flat(func, f, spec)
        t = term if t is None else t + term
    return wrap_outputs(out, _fit(t, out.shape))


def _addcmul_rule(func, args, kwargs):
    """input + value * t1 * t2: affine in input, bilinear in (t1, t2)."""
    b = _bind(args, kwargs, ("input", "tensor1", "tensor2"), {"value": 1})
    x, t1, t2, value = b["input"], b["tensor1"], b["tensor2"], b["value"]
    if isinstance(value, torch.Tensor):
        return forward_ad(func, args, kwargs)
    out = torch.addcmul(primal(x), primal(t1), primal(t2), value=value)
    t = tangent(x)
    for a, other in ((t1, t2), (t2, t1)):
        if isinstance(a, DualTensor):
            term = a._tangent * primal(other) * value
            t = term if t is None else t + term
    return wrap_outputs(out, _fit(t, out.shape))


def divide(func, args, kwargs):
    """a / b: y_dot = (a_dot - y b_dot) / b (``__rtruediv__(b, a)`` is a / b with swapped roles)."""
    if kwargs.get("rounding_mode") is not None:
        return nondiff(func, args, kwargs)
    if func is not _T.__rtruediv__ and len(args) == 2 and isinstance(args[1], (int, float)) and not kwargs:
        from sgflow.autodual import attention as la

        if la._is_lazy(args[0], "scores"):
            return la.scale_node(args[0], 1.0 / float(args[1]))
    swapped = func is _T.__rtruediv__
    a, b = (args[1], args[0]) if swapped else (args[0], args[1])
    out = func(*unwrap_primals(args), **unwrap_primals(kwargs))
    pa, pb = primal(a), primal(b)
    t = None
    if isinstance(a, DualTensor):
        t = a._tangent / pb
    if isinstance(b, DualTensor):
        term = -out * b._tangent / pb
        t = term if t is None else t + term
    return wrap_outputs(out, _fit(t, out.shape))


# ---------------------------------------------------------------------------------------------
# Pointwise nonlinear ops with explicit derivatives


def _pow_rule(func, args, kwargs):
    base, expo = args[0], args[1] if len(args) > 1 else kwargs.get("exponent")
    if func is _T.__rpow__ or isinstance(expo, DualTensor) or not isinstance(base, DualTensor):
        return forward_ad(func, args, kwargs)
    out = func(*unwrap_primals(args), **unwrap_primals(kwargs))
    x = base._primal
    e = primal(expo)
    return wrap_outputs(out, e * x.pow(e - 1) * base._tangent)


def _softmax_dim(args, kwargs):
    dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
    return dim


def _softmax_rule(func, args, kwargs, lazy=True):
    dim = _softmax_dim(args, kwargs)
    if dim is None or not isinstance(args[0], DualTensor):
        return forward_ad(func, args, kwargs)
    from sgflow.autodual import attention as la

    x = args[0]
    if lazy and la._is_lazy(x, "scores") and dim in (-1, len(x._lazy_shape) - 1) and kwargs.get("dtype") is None and (
            func is _T.softmax or len(args) <= 2 or args[2] is None or func is F.softmax and (len(args) < 4 or args[3] is None)):
        # Materialising the probabilities (any use other than `@ v`) evaluates the scores eagerly.
        return la.softmax_node(x, lambda: _softmax_rule(func, args, kwargs, lazy=False))
    pa, pk = tuple(args[1:]), dict(kwargs)  # dims and dtypes only: the closure must hold no tensor

    def both(xp, xt):
        y = func(xp, *pa, **pk)
        xd = xt.to(y.dtype)
        return y, y * (xd - (y * xd).sum(dim, keepdim=True))

    return make_dual(*recompute_op(both, args[0]._primal, args[0]._tangent))


def _log_softmax_rule(func, args, kwargs):
    dim = _softmax_dim(args, kwargs)
    if dim is None or not isinstance(args[0], DualTensor):
        return forward_ad(func, args, kwargs)
    pa, pk = tuple(args[1:]), dict(kwargs)  # dims and dtypes only: the closure must hold no tensor

    def both(xp, xt):
        y = func(xp, *pa, **pk)
        xd = xt.to(y.dtype)
        return y, xd - (y.exp() * xd).sum(dim, keepdim=True)

    return make_dual(*recompute_op(both, args[0]._primal, args[0]._tangent))


def _dropout_rule(func, args, kwargs):
    """One Bernoulli mask for primal and tangent (the recomputation replays it: RNG state restored)."""
    b = _bind(args, kwargs, ("input", "p", "training", "inplace"), {"p": 0.5, "training": True, "inplace": False})
    x, p, training = b["input"], float(b["p"]), b["training"]
    if b["inplace"]:
        return inplace_error(func, args, kwargs)
    if not training or p == 0.0:
        return x
    from sgflow.autodual.attention import LazyDual

    if (func is F.dropout and 0.0 < p < 1.0 and isinstance(x, LazyDual) and x._cache is None
            and x._kind == "gn_silu" and x._parts["p"] == 0.0):
        return _gn_silu_dropout(x, p)
    xp = x._primal
    if p >= 1.0:
        return make_dual(torch.zeros_like(xp), torch.zeros_like(x._tangent))
    if func is F.dropout or func is torch.dropout:
        shape = xp.shape
    else:  # dropout1d/2d/3d: one draw per (sample, channel)
        nsp = {F.dropout1d: 1, F.dropout2d: 2, F.dropout3d: 3}[func]
        batched = xp.dim() == nsp + 2
        shape = (xp.shape[: 2] if batched else xp.shape[:1]) + (1,) * nsp
    mask = torch.empty(shape, dtype=xp.dtype, device=xp.device).bernoulli_(1.0 - p).div_(1.0 - p)
    return make_dual(xp * mask, x._tangent * mask)


# ---------------------------------------------------------------------------------------------
# Conv / linear: primal and tangent as two calls on one weight


_CONV_NDIM = {}
for _n, _d in (("conv1d", 1), ("conv2d", 2), ("conv3d", 3), ("conv_transpose1d", 1), ("conv_transpose2d", 2), ("conv_transpose3d", 3)):
    _f = getattr(torch, _n, None) or getattr(F, _n)
    _CONV_NDIM[_f] = _d
    _CONV_NDIM[getattr(F, _n)] = _d


class _DualConv(torch.autograd.Function):
    r"""``(x, x_dot, W, b) -> (conv(x, W) + b, conv(x_dot, W))``: two convolutions sharing W.

    Saves x and x_dot (usually alive anyway as the previous op's outputs). Not one convolution over the
    stacked ``[x; x_dot]``: the stacked input copy (and, in backward, the stacked cotangents and inputs)
    are extra activation-sized buffers at a recomputed block's peak, and two calls measured 5-10% faster
    on CPU (benchmarks/NOTES.md). Backward: one ``convolution_backward`` per stream, ``dW`` summed; in
    half precision one call over the stacked rows, so that ``dW`` is rounded once. ``conf``: (stride,
    padding, dilation, transposed, output_padding, groups), normalised to lists.
    """

    @staticmethod
    def forward(ctx, x, x_dot, weight, bias, conf):
        ctx.conf = conf
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, x_dot, weight)
        ctx.set_materialize_grads(False)
        return (torch.ops.aten.convolution(x, weight, bias, *conf),
                torch.ops.aten.convolution(x_dot, weight, None, *conf))

    @staticmethod
    def backward(ctx, g, g_dot):
        x, x_dot, weight = ctx.saved_tensors
        need_x, need_xd, need_w, need_b = ctx.needs_input_grad[:4]
        n = x.shape[0]
        gx = gxd = gw = None
        if g is not None and g_dot is not None and x.dtype in (torch.float16, torch.bfloat16):
            gin, gw, _ = torch.ops.aten.convolution_backward(
                torch.cat([g, g_dot]), torch.cat([x, x_dot]), weight, None, *ctx.conf, [need_x or need_xd, need_w, False])
            gx, gxd = (None, None) if gin is None else gin.split(n)
        else:
            grads_in = []
            for grad, inp, need_in in ((g, x, need_x), (g_dot, x_dot, need_xd)):
                gin = None
                if grad is not None:
                    gin, gw_part, _ = torch.ops.aten.convolution_backward(
                        grad, inp, weight, None, *ctx.conf, [need_in, need_w, False])
                    if gw_part is not None:
                        gw = gw_part if gw is None else gw.add_(gw_part)
                grads_in.append(gin)
            gx, gxd = grads_in
        gb = None
        if ctx.has_bias and need_b and g is not None:
            gb = g.sum([0] + list(range(2, g.dim())))
        return gx, gxd, gw, gb, None


class _DualLinear(torch.autograd.Function):
    """``(x, x_dot, W, b) -> (x W^T + b, x_dot W^T)`` as two products sharing W; saves x and x_dot.
    Not one product over the stacked rows ``[x; x_dot]``: the stacked copy of the input is an extra
    activation-sized buffer at the recomputed block's peak (16 MiB of the token-attention MLP's 138), and
    keeps the primal half of the output alive as long as the tangent half; two calls measured 10-20%
    faster on CPU too (benchmarks/NOTES.md). Backward: ``dx = g W``, ``dx_dot = g_dot W`` and ``dW = g^T x +
    g_dot^T x_dot`` (one product over the stacked rows in half precision: rounded once)."""

    @staticmethod
    def forward(ctx, x, x_dot, weight, bias):
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, x_dot, weight)
        ctx.set_materialize_grads(False)
        return F.linear(x, weight, bias), F.linear(x_dot, weight)

    @staticmethod
    def backward(ctx, g, g_dot):
        x, x_dot, weight = ctx.saved_tensors
        need_x, need_xd, need_w, need_b = ctx.needs_input_grad
        if g is None and g_dot is None:
            return None, None, None, None
        n = x.shape[0]
        dout, din = weight.shape
        gx = gxd = gw = gb = None
        low = x.dtype in (torch.float16, torch.bfloat16)
        if need_x and g is not None:
            gx = g @ weight
        if need_xd and g_dot is not None:
            gxd = g_dot @ weight
        if need_w:
            if g is not None and g_dot is not None and low:
                # One product over the stacked rows: dW rounded once to half precision.
                gw = torch.cat([g, g_dot]).reshape(-1, dout).t() @ torch.cat([x, x_dot]).reshape(-1, din)
            else:
                # fp32/fp64: two products accumulated in place, without the stacked copies (memory at
                # the backward peak of a recomputed block).
                for gg, xx in ((g, x), (g_dot, x_dot)):
                    if gg is None:
                        continue
                    term_a, term_b = gg.reshape(-1, dout).t(), xx.reshape(-1, din)
                    gw = term_a @ term_b if gw is None else gw.addmm_(term_a, term_b)
        if ctx.has_bias and need_b and g is not None:
            gb = g.reshape(-1, dout).sum(0)
        return gx, gxd, gw, gb


def _autocast_args(device_type, *tensors):
    """Autocast semantics for the stacked conv/linear: cast to the autocast dtype, run with it off."""
    if not torch.is_autocast_enabled(device_type):
        return tensors, False
    dt = torch.get_autocast_dtype(device_type)
    return tuple(None if t is None else t.to(dt) for t in tensors), True


def _ntuple(v, n):
    return list(v) if isinstance(v, (tuple, list)) else [v] * n


def _conv_conf(func, w, rest, kw):
    """(stride, padding, dilation, transposed, output_padding, groups) for aten.convolution, or None
    where the call uses string padding that is not symmetric ('same' with an even kernel)."""
    nd = _CONV_NDIM[func]
    transposed = "transpose" in func.__name__
    names = ("stride", "padding", "output_padding", "groups", "dilation") if transposed else ("stride", "padding", "dilation", "groups")
    b = _bind(rest, kw, names, {"stride": 1, "padding": 0, "dilation": 1, "groups": 1, "output_padding": 0})
    stride, dilation = _ntuple(b["stride"], nd), _ntuple(b["dilation"], nd)
    pad = b["padding"]
    if isinstance(pad, str):
        if pad == "valid":
            pad = 0
        else:  # 'same' (stride 1): total padding d (k - 1) per dim, symmetric only when even
            total = [d * (k - 1) for d, k in zip(dilation, w.shape[2:])]
            if any(t % 2 for t in total):
                return None
            pad = [t // 2 for t in total]
    return (stride, _ntuple(pad, nd), dilation, transposed, _ntuple(b["output_padding"], nd), int(b["groups"]))


def _conv_rule(func, args, kwargs):
    names = ("input", "weight", "bias")
    x = args[0] if args else kwargs["input"]
    w = args[1] if len(args) > 1 else kwargs["weight"]
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    rest = list(args[3:])
    kw = {k: v for k, v in kwargs.items() if k not in names}
    if isinstance(x, DualTensor) and not isinstance(w, DualTensor) and not isinstance(bias, DualTensor):
        conf = _conv_conf(func, w, rest, kw)
        if conf is not None and _CONV_NDIM[func] == 2:
            fused = _gn_silu_conv(x, w, bias, conf)
            if fused is not None:
                return fused
        if conf is not None and x._primal.dim() == _CONV_NDIM[func] + 2:
            xp = x._primal
            (xp, xt, w, bias), autocast = _autocast_args(xp.device.type, xp, x._tangent.to(xp.dtype), w, bias)
            with torch.autocast(xp.device.type, enabled=False) if autocast else _nullctx():
                return make_dual(*_DualConv.apply(xp, xt, w, bias, conf))
    # A weight or bias computed from the inputs (hypernetworks): product rule over (x, w), bias tangent added.
    out = func(primal(x), primal(w), primal(bias), *rest, **kw)
    t = None
    if isinstance(x, DualTensor):
        t = func(x._tangent, primal(w), None, *rest, **kw)
    if isinstance(w, DualTensor):
        term = func(primal(x), w._tangent, None, *rest, **kw)
        t = term if t is None else t + term
    if isinstance(bias, DualTensor):
        term = bias._tangent.reshape(-1, *([1] * _CONV_NDIM[func]))
        t = term.expand(out.shape) if t is None else t + term
    return wrap_outputs(out, _fit(t, out.shape))


def _linear_rule(func, args, kwargs):
    b = _bind(args, kwargs, ("input", "weight", "bias"), {"bias": None})
    x, w, bias = b["input"], b["weight"], b["bias"]
    if isinstance(x, DualTensor) and not isinstance(w, DualTensor) and not isinstance(bias, DualTensor) and x._primal.dim() >= 2:
        xp = x._primal
        (xp, xt, w, bias), autocast = _autocast_args(xp.device.type, xp, x._tangent.to(xp.dtype), w, bias)
        with torch.autocast(xp.device.type, enabled=False) if autocast else _nullctx():
            return make_dual(*_DualLinear.apply(xp, xt, w, bias))
    out = func(primal(x), primal(w), primal(bias))
    t = None
    if isinstance(x, DualTensor):
        t = func(x._tangent, primal(w))
    if isinstance(w, DualTensor):
        term = func(primal(x), w._tangent)
        t = term if t is None else t + term
    if isinstance(bias, DualTensor):
        t = bias._tangent.expand(out.shape) if t is None else t + bias._tangent
    return wrap_outputs(out, _fit(t, out.shape))


# ---------------------------------------------------------------------------------------------
# Normalisation layers: statistics and their tangents written out (see module doc)


def _normalize(x, xd, dims, eps, rms=False):
    """(x̂, x̂_dot) over ``dims`` (fp32 for half/bf16), per the module-doc formula."""
    acc = torch.float32 if _low_precision(x) else x.dtype
    x, xd = x.to(acc), xd.to(acc)
    if rms:
        r = torch.rsqrt(x.square().mean(dims, keepdim=True) + eps)
        xh = x * r
        xhd = r * (xd - xh * (xh * xd).mean(dims, keepdim=True))
        return xh, xhd
    mu = x.mean(dims, keepdim=True)
    xc = x - mu
    r = torch.rsqrt(xc.square().mean(dims, keepdim=True) + eps)
    xh = xc * r
    xhd = r * (xd - xd.mean(dims, keepdim=True) - xh * (xh * xd).mean(dims, keepdim=True))
    return xh, xhd


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
        from sgflow.autodual.attention import LazyDual

        return LazyDual(tuple(xp.shape), xp, "gn", {"x": x, "w": w, "b": bias, "g": g, "eps": eps},
                        lambda: _group_norm_eager(x, w, bias, g, eps))
    return _group_norm_general(x, w, bias, g, eps)


def _group_norm_eager(x, w, bias, g, eps):
    """Dual GroupNorm with plain affine parameters: the GroupNormDual op (explicit backward, saves x,
    x_dot and the [B, G] statistics only), in fp32 for half/bf16 inputs and under autocast."""
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
    return _norm_dual(x, b["weight"], b["bias"], shape, lambda xp, xt: _normalize(xp, xt, dims, eps), rows=0 not in dims)


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


# ---------------------------------------------------------------------------------------------
# Attention


def _sdpa_rule(func, args, kwargs):
    b = _bind(
        args, kwargs,
        ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"),
        {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False},
    )
    q, k, v = b["query"], b["key"], b["value"]
    plain = b["attn_mask"] is None and not b["dropout_p"] and not b["is_causal"]
    same_heads = primal(q).shape[:-2] == primal(k).shape[:-2] == primal(v).shape[:-2]
    if plain and same_heads and primal(q).dim() >= 3:
        from sgflow.ops.attention import attention_dual

        qp = primal(q)
        lead = qp.shape[:-2]

        def four(t):
            return t.reshape(-1, 1, *t.shape[-2:]) if t.dim() != 4 else t

        parts = [four(primal(a)) for a in (q, k, v)] + [four(_tangent_or_zeros(a)) for a in (q, k, v)]
        o, od = attention_dual(*parts, scale=b["scale"])
        return make_dual(o.reshape(*lead, *o.shape[-2:]), od.reshape(*lead, *od.shape[-2:]))
    # Masks, causal, dropout or grouped heads: the math form, each op through its own rule.
    from sgflow.decompose import scaled_dot_product_attention as sdpa_math

    return sdpa_math(q, k, v, attn_mask=b["attn_mask"], dropout_p=b["dropout_p"], is_causal=b["is_causal"],
                     scale=b["scale"], enable_gqa=b["enable_gqa"])


# ---------------------------------------------------------------------------------------------
# Fallback: PyTorch's forward AD for this one op


def forward_ad(func, args, kwargs):
    """``torch.func.jvp`` of this op alone, with the norms and SDPA decomposed inside it."""
    flat, spec, idx = dual_leaves(args, kwargs)
    pflat = [primal(a) for a in flat]

    def f(*ps):
        fl = list(pflat)
        for i, p in zip(idx, ps):
            fl[i] = p
        return call_flat(func, fl, spec)

    try:
        from sgflow.decompose import decomposed
    except ImportError:  # pragma: no cover - decompose ships with sgflow
        import contextlib

        decomposed = contextlib.nullcontext
    try:
        with decomposed():
            out, t = torch.func.jvp(f, tuple(pflat[i] for i in idx), tuple(flat[i]._tangent for i in idx))
    except (RuntimeError, NotImplementedError) as e:
        msg = str(e)
        if "return only tensors" in msg:
            return _no_tensor_result(func, pflat, spec)
        if "forward AD" in msg or "forward-mode" in msg or "jvp" in msg.lower() or "not implemented" in msg.lower():
            raise fail(
                func,
                f"no sgflow dual rule, and PyTorch's forward AD fails on it ({msg.splitlines()[0]})",
                "Register one with sgflow.autodual.register_rule, or compute this op outside the model",
            ) from e
        raise
    return wrap_outputs(out, t)


def _no_tensor_result(func, pflat, spec):
    """An op whose result holds no floating tensor (a Python number, a device): nothing to carry."""
    res = call_flat(func, pflat, spec)
    if any(isinstance(r, torch.Tensor) and r.is_floating_point() for r in _leaves(res)):
        raise fail(func, "returns tensors inside a structure forward AD cannot follow")
    return res


def _leaves(x):
    from torch.utils._pytree import tree_flatten

    return tree_flatten(x)[0]


# ---------------------------------------------------------------------------------------------
# Tables

_META_NAMES = [
    "size", "dim", "numel", "nelement", "ndimension", "stride", "is_contiguous", "is_floating_point", "is_complex",
    "element_size", "data_ptr", "storage_offset", "get_device", "__len__", "__format__", "untyped_storage",
    "is_signed", "is_inference", "__dir__", "__sizeof__", "__reduce_ex__", "is_pinned", "is_shared", "dim_order",
    "has_names", "__contains__", "equal", "register_hook", "retain_grad",
]
_META_GETTERS = [
    "shape", "dtype", "device", "ndim", "is_cuda", "is_cpu", "is_meta", "layout", "requires_grad", "is_leaf", "grad_fn",
    "names", "is_sparse", "is_quantized", "is_mps", "is_xpu", "itemsize", "nbytes", "grad", "_version", "output_nr",
    "is_nested", "_base", "is_mkldnn", "is_xla",
]
# Metadata a lazy node's wrapper holds itself (shape, dtype and device are those of its result).
_LAZY_SAFE_META = frozenset(_getters(["shape", "dtype", "device", "ndim", "is_cuda", "is_cpu", "layout", "itemsize"])
                            + _fns(["size", "dim", "numel", "nelement", "ndimension", "is_floating_point",
                                    "is_complex", "element_size", "get_device", "__len__"], _T))
_CONTROL_FLOW = ["__bool__", "item", "tolist", "__int__", "__float__", "__index__", "__complex__", "numpy", "__array__", "__nonzero__"]
_NONDIFF_NAMES = [
    "zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like", "randint_like",
    "new_zeros", "new_ones", "new_empty", "new_full", "new_tensor", "detach", "sign", "sgn", "floor", "ceil", "round",
    "trunc", "fix", "argmax", "argmin", "argsort", "eq", "ne", "lt", "gt", "le", "ge", "greater", "less",
    "greater_equal", "less_equal", "not_equal", "__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__", "isnan",
    "isinf", "isfinite", "isposinf", "isneginf", "isclose", "allclose", "logical_not", "logical_and", "logical_or",
    "logical_xor", "bernoulli", "multinomial", "nonzero", "any", "all", "bucketize", "searchsorted", "floor_divide",
    "__floordiv__", "__rfloordiv__", "long", "int", "bool", "byte", "short", "char", "count_nonzero", "signbit",
    "__and__", "__or__", "__xor__", "__invert__", "bitwise_and", "bitwise_or", "bitwise_not", "__hash__",
]
# Non-differentiable ops whose results are still *values* of the dual tensor (branching on them would
# take a branch by the primal's value): returned as DerivedValue.
_DERIVED_NAMES = {
    "sign", "sgn", "floor", "ceil", "round", "trunc", "fix", "argmax", "argmin", "argsort", "eq", "ne", "lt", "gt",
    "le", "ge", "greater", "less", "greater_equal", "less_equal", "not_equal", "__eq__", "__ne__", "__lt__", "__le__",
    "__gt__", "__ge__", "isnan", "isinf", "isfinite", "isposinf", "isneginf", "isclose", "logical_not", "any", "all",
    "nonzero", "count_nonzero", "signbit", "long", "int", "bool",
}
_LINEAR_NAMES = [
    "view", "reshape", "permute", "transpose", "t", "flatten", "unflatten", "squeeze", "unsqueeze", "expand", "repeat",
    "repeat_interleave", "narrow", "select", "__getitem__", "chunk", "split", "tensor_split", "hsplit", "vsplit",
    "unbind", "movedim", "moveaxis", "swapaxes", "swapdims", "contiguous", "clone", "flip", "fliplr", "flipud", "roll",
    "rot90", "diagonal", "diag", "diag_embed", "sum", "mean", "nansum", "neg", "negative", "__neg__", "__pos__",
    "positive", "cumsum", "to", "float", "double", "half", "bfloat16", "cpu", "cuda", "tile", "triu", "tril",
    "index_select", "gather", "take_along_dim", "cat", "concat", "concatenate", "stack", "hstack", "vstack", "dstack",
    "column_stack", "atleast_1d", "atleast_2d", "atleast_3d", "unfold", "trace", "ravel", "view_as", "expand_as",
    "reshape_as", "type_as", "real", "resolve_conj", "resolve_neg", "broadcast_to", "alias", "as_strided",
    "unsafe_chunk", "unsafe_split", "split_with_sizes", "narrow_copy", "pixel_shuffle", "pixel_unshuffle",
    "channel_shuffle", "type",
]
_F_LINEAR = [
    "interpolate", "upsample", "upsample_nearest", "upsample_bilinear", "avg_pool1d", "avg_pool2d", "avg_pool3d",
    "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "pixel_shuffle", "pixel_unshuffle", "fold",
    "unfold", "channel_shuffle",
]
_PRODUCT_NAMES = [
    "mul", "multiply", "__mul__", "__rmul__", "matmul", "__matmul__", "__rmatmul__", "bmm", "mm", "mv", "einsum",
    "outer", "ger", "dot", "vdot", "inner", "kron", "tensordot", "cross", "vecdot",
]
_ADD_NAMES = ["add", "__add__", "__radd__", "sub", "subtract", "__sub__", "__rsub__", "rsub"]
_DIV_NAMES = ["div", "divide", "true_divide", "__truediv__", "__rtruediv__", "__div__"]


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


def _gn_silu(x):
    """silu(group_norm(...)) of a lazy GroupNorm node: a lazy GroupNorm+SiLU node (a conv that follows
    takes the fused GroupNorm -> SiLU -> conv stage; any other use runs the fused GroupNorm+SiLU op);
    None for any other input."""
    from sgflow.autodual.attention import LazyDual

    if not (isinstance(x, LazyDual) and x._cache is None and x._kind == "gn"):
        return None
    parts = dict(x._parts, p=0.0)
    note_rule("rule:group_norm+silu (fused op)")
    return LazyDual(x._lazy_shape, x._like, "gn_silu", parts, lambda: _gn_silu_eager(parts))


def _gn_silu_eager(parts):
    from sgflow.ops.groupnorm_silu import groupnorm_silu_dual

    src = parts["x"]
    y, yd = groupnorm_silu_dual(src._primal, src._tangent.to(src._primal.dtype), parts["w"], parts["b"], parts["g"],
                                float(parts["eps"]))
    return make_dual(y, yd)


def _gn_silu_dropout(x, p):
    """Dropout of a lazy GroupNorm+SiLU node, kept lazy so that a following conv fuses all four."""
    from sgflow.autodual.attention import LazyDual

    parts = dict(x._parts, p=p)
    mat = x._materialize

    def materialize():
        # Unfused: the GroupNorm+SiLU op, then this module's dropout rule (one mask for both streams).
        return _dropout_rule(F.dropout, (mat(), p, True), {})

    return LazyDual(x._lazy_shape, x._like, "gn_silu", parts, materialize)


def _dropout_mask_rule(func, args, kwargs):
    """sgflow.ops.apply_dropout_mask(h, mask, p): on a lazy GroupNorm+SiLU node it stays lazy, carrying the
    mask, so that a following conv runs the fused stage with it; otherwise a product with the constant
    multiplier mask / (1 - p) (the same mask for both streams)."""
    from sgflow.autodual.attention import LazyDual

    b = _bind(args, kwargs, ("h", "mask", "p"), {})
    h, mask, p = b["h"], b["mask"], float(b["p"])
    if isinstance(mask, DualTensor):
        raise fail(func, "the dropout mask must not depend on the dual inputs")
    if (isinstance(h, LazyDual) and h._cache is None and h._kind == "gn_silu" and h._parts["p"] == 0
            and mask.dtype == torch.bool and tuple(mask.shape) == tuple(h._lazy_shape) and 0.0 < p < 1.0):
        parts = dict(h._parts, p=p, mask=mask)
        mat = h._materialize

        def materialize():
            return _dropout_mask_rule(func, (mat(), mask, p), {})

        return LazyDual(h._lazy_shape, h._like, "gn_silu", parts, materialize)
    if not isinstance(h, DualTensor):
        return func(h, mask, p)
    hp = h._primal
    y = func(hp, mask, p)
    m = mask.to(hp.dtype) * (1.0 / (1.0 - p))
    return make_dual(y, h._tangent.to(hp.dtype) * m)


def _gn_silu_conv(x, w, bias, conf):
    """The GroupNorm -> SiLU -> (Dropout) -> Conv2d stage as the fused dual op (saves only the stage
    input, its tangent and the group statistics), or None where the conv does not fit it."""
    from sgflow.autodual.attention import LazyDual

    if not (isinstance(x, LazyDual) and x._cache is None and x._kind == "gn_silu"):
        return None
    stride, pad, dilation, transposed, _, groups = conf
    if transposed or groups != 1 or any(v != 1 for v in stride) or any(v != 1 for v in dilation) or w.dim() != 4:
        return None
    parts = x._parts
    src = parts["x"]
    xp = src._primal
    if xp.dim() != 4 or (w.dtype != xp.dtype and not torch.is_autocast_enabled(xp.device.type)):
        return None
    from sgflow.ops.groupnorm_silu import gn_silu_conv_dual

    y, yd = gn_silu_conv_dual(xp, src._tangent.to(xp.dtype), parts["w"], parts["b"], parts["g"], w, bias,
                              tuple(pad), eps=float(parts["eps"]), dropout_p=float(parts["p"]),
                              training=parts["p"] > 0, dropout_mask=parts.get("mask"))
    note_rule("rule:group_norm+silu+conv (fused stage op)")
    return make_dual(y, yd)


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


def _install():
    spaces = (torch, _T, torch.special, torch.linalg)
    register(_fns(_META_NAMES, torch, _T) + _getters(_META_GETTERS) + [torch.is_tensor, torch.numel], "meta")(meta)
    register(_fns(_CONTROL_FLOW, _T), "error")(control_flow_error)
    register(_fns(_NONDIFF_NAMES, torch, _T) + _getters(["data"]), "nondiff")(nondiff)
    register(_fns(_LINEAR_NAMES, torch, _T) + _fns(_F_LINEAR, F) + _getters(["T", "mT", "H", "mH"]), "linear")(linear)
    register(_fns(_PRODUCT_NAMES, *spaces), "product")(product)
    register(_fns(_ADD_NAMES, torch, _T), "affine")(affine((0, 1, "other", "input")))
    register(_fns(["where"], torch, _T), "affine")(affine((1, 2, "input", "other")))
    register(_fns(["masked_fill"], torch, _T), "affine")(affine((0, 2, "value")))
    register([F.pad, getattr(torch._C._nn, "pad", None)], "affine")(affine((0, 3, "value")))
    register(_fns(_DIV_NAMES, torch, _T), "divide")(divide)
    register(_fns(["addcmul"], torch, _T), "product")(_addcmul_rule)
    for name in _SPECS:
        register(_fns([name], torch, _T, torch.special) + _fns([name], F) + [getattr(torch._C._nn, name, None)],
                 "pointwise")(_pointwise_rule(name))
    register(_fns(["pow", "__pow__", "__rpow__", "float_power"], torch, _T), "pointwise")(_pow_rule)
    register([F.softmax, torch.softmax, _T.softmax, torch.special.softmax], "rule:softmax")(_softmax_rule)
    register([F.log_softmax, torch.log_softmax, _T.log_softmax, torch.special.log_softmax], "rule:softmax")(_log_softmax_rule)
    register([F.dropout, F.dropout1d, F.dropout2d, F.dropout3d], "rule:dropout")(_dropout_rule)
    from sgflow.ops.groupnorm_silu import apply_dropout_mask

    register([apply_dropout_mask], "rule:dropout")(_dropout_mask_rule)
    register(list(_CONV_NDIM), "rule:conv-stacked")(_conv_rule)
    register([F.linear, torch._C._nn.linear], "rule:linear-stacked")(_linear_rule)
    register([F.group_norm, torch.group_norm], "rule:group_norm")(_group_norm_rule)
    register([F.layer_norm, torch.layer_norm], "rule:layer_norm")(_layer_norm_rule)
    register([getattr(F, "rms_norm", None), getattr(torch, "rms_norm", None)], "rule:rms_norm")(_rms_norm_rule)
    register([F.batch_norm, torch.batch_norm], "rule:batch_norm")(_batch_norm_rule)
    register([F.instance_norm, torch.instance_norm], "rule:instance_norm")(_instance_norm_rule)
    register([F.scaled_dot_product_attention], "rule:attention")(_sdpa_rule)


def _inplace_name(name: str) -> bool:
    if name.startswith("__i") and name.endswith("__") and name not in ("__index__", "__init__", "__iter__"):
        return True
    return name.endswith("_") and not name.endswith("__") and not name.startswith("_")


def _iter_rule(func, args, kwargs):
    x = args[0]
    return iter([make_dual(p, t) for p, t in zip(x._primal.unbind(0), x._tangent.unbind(0))])


def classify(func):
    """(rule, kind) for a function without a registered rule."""
    name = getattr(func, "__name__", "")
    if name == "__setitem__" or _inplace_name(name):
        return inplace_error, "error"
    if func is _T.__iter__:
        return _iter_rule, "linear"
    return forward_ad, "forward-ad"


_install()
