r"""Normalisation layers and attention written from primitive differentiable ops.

Why: in torch 2.13 the reverse-over-forward (and double-backward) gradients of ``F.layer_norm``,
``F.batch_norm`` (training) and ``F.instance_norm`` are silently wrong (pytorch#196700, #196699: the
saved mean / inverse std carry no autograd history), ``F.group_norm``'s forward AD can raise on
strided tangents, and the fused kernels behind ``F.scaled_dot_product_attention`` have neither a
forward-AD formula nor a double backward. Written from mean / rsqrt / matmul / softmax, every
derivative of any order comes from the elementwise and reduction ops' own rules, which are right.
No reference in this project relies on PyTorch's higher-order formulas for normalisation layers.

Each function has the signature and semantics of its ``torch.nn.functional`` namesake and equals it
to round-off in the forward pass. Statistics are computed in float32 for float16 / bfloat16 inputs
and in the input dtype otherwise; results are cast back to the input dtype.

:func:`decomposed` routes the functional forms (and their ``torch.*`` aliases) to these functions
for the duration of a ``with`` block, so modules such as ``nn.LayerNorm``, ``nn.GroupNorm``,
``nn.BatchNorm2d``, ``nn.InstanceNorm2d``, ``nn.RMSNorm`` and ``nn.MultiheadAttention`` are covered
without touching the network.
"""
from __future__ import annotations

import inspect
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from sgflow.normalization import moments as _moments

__all__ = [
    "layer_norm",
    "group_norm",
    "batch_norm",
    "instance_norm",
    "rms_norm",
    "scaled_dot_product_attention",
    "decomposed",
    "DecomposedMode",
]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half / bfloat16 (their statistics would lose too many bits), else the dtype itself."""
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def _as_shape(normalized_shape) -> tuple[int, ...]:
    if isinstance(normalized_shape, int):
        return (normalized_shape,)
    return tuple(int(s) for s in normalized_shape)


def _channel_view(p: torch.Tensor, ndim: int) -> torch.Tensor:
    """Per-channel vector [C] -> [1, C, 1, ..., 1] for an input with ``ndim`` dims."""
    return p.reshape(1, -1, *([1] * (ndim - 2)))


def _affine(y: torch.Tensor, weight, bias) -> torch.Tensor:
    # Applied in the statistics dtype, before the cast back, like PyTorch's mixed-precision kernels.
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


def _verify_batch_size(size: Sequence[int]) -> None:
    # Same check (and message) as torch.nn.functional._verify_batch_size.
    if size[0] * math.prod(size[2:]) == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {torch.Size(size)}")


def layer_norm(
    input: torch.Tensor,
    normalized_shape,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    r"""Layer normalisation over the trailing ``normalized_shape`` dims, as :func:`F.layer_norm`.

        y = (x - mean(x)) * rsqrt(var(x) + eps) * weight + bias

    mean and (biased) var over the last ``len(normalized_shape)`` dims.

    Args:
        input: [*, *normalized_shape].
        normalized_shape: int or sequence of ints, the trailing shape normalised over.
        weight, bias: optional, of shape ``normalized_shape``.
        eps: added to the variance.

    Returns:
        Tensor of input's shape and dtype.
    """
    shape = _as_shape(normalized_shape)
    if len(shape) == 0:
        raise RuntimeError("layer_norm: expected normalized_shape to be at least 1-dimensional")
    if input.dim() < len(shape) or tuple(input.shape[input.dim() - len(shape):]) != shape:
        raise RuntimeError(
            f"layer_norm: given normalized_shape={list(shape)}, expected input with shape [*, "
            f"{', '.join(map(str, shape))}], but got input of size {list(input.shape)}"
        )
    dims = tuple(range(-len(shape), 0))
    _, centred, var = _moments(input.to(_stat_dtype(input.dtype)), dims)
    y = centred * torch.rsqrt(var + eps)
    return _affine(y, weight, bias).to(input.dtype)


def rms_norm(
    input: torch.Tensor,
    normalized_shape,
    weight: torch.Tensor | None = None,
    eps: float | None = None,
) -> torch.Tensor:
    r"""Root-mean-square normalisation, as :func:`F.rms_norm`.

        y = x * rsqrt(mean(x^2) + eps) * weight

    mean over the trailing ``normalized_shape`` dims. ``eps=None`` means the machine epsilon of the
    dtype the statistics are computed in (``torch.finfo(torch.float32).eps`` for half / bfloat16
    inputs, ``torch.finfo(input.dtype).eps`` otherwise), which is what PyTorch uses.

    Args:
        input: [*, *normalized_shape]. weight: optional, of shape ``normalized_shape``.

    Returns:
        Tensor of input's shape and dtype.
    """
    shape = _as_shape(normalized_shape)
    if len(shape) == 0 or input.dim() < len(shape) or tuple(input.shape[input.dim() - len(shape):]) != shape:
        raise RuntimeError(
            f"rms_norm: given normalized_shape={list(shape)}, expected input with shape [*, "
            f"{', '.join(map(str, shape))}], but got input of size {list(input.shape)}"
        )
    stat = _stat_dtype(input.dtype)
    if eps is None:
        eps = torch.finfo(stat).eps
    dims = tuple(range(-len(shape), 0))
    xs = input.to(stat)
    y = xs * torch.rsqrt(xs.square().mean(dims, keepdim=True) + eps)
    return _affine(y, weight, None).to(input.dtype)


def group_norm(
    input: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    r"""Group normalisation, as :func:`F.group_norm`.

    x: [N, C, *spatial], channels split into ``num_groups`` contiguous groups; per sample and group

        y = (x - mean_g(x)) * rsqrt(var_g(x) + eps) * weight[c] + bias[c]

    with mean and (biased) var over the group's channels and all spatial positions.

    Args:
        input: [N, C, *]. num_groups: divides C. weight, bias: optional [C].

    Returns:
        Tensor of input's shape and dtype.
    """
    if input.dim() < 2:
        raise RuntimeError(f"Expected at least 2 dimensions for input tensor but received {input.dim()}")
    n, c = input.shape[0], input.shape[1]
    if num_groups <= 0 or c % num_groups:
        raise RuntimeError(
            f"Expected number of channels in input to be divisible by num_groups, but got input of shape "
            f"{list(input.shape)} and num_groups={num_groups}"
        )
    _verify_batch_size([n * c // num_groups, num_groups, *input.shape[2:]])
    per_group = (c // num_groups) * math.prod(input.shape[2:])
    xs = input.to(_stat_dtype(input.dtype)).reshape(n, num_groups, per_group)
    _, centred, var = _moments(xs, (2,))
    y = (centred * torch.rsqrt(var + eps)).reshape(input.shape)
    w = None if weight is None else _channel_view(weight, input.dim())
    b = None if bias is None else _channel_view(bias, input.dim())
    return _affine(y, w, b).to(input.dtype)


@torch.no_grad()
def _update_running(running: torch.Tensor | None, batch_stat: torch.Tensor, momentum: float) -> None:
    """running <- (1 - momentum) * running + momentum * batch_stat, in place (running's dtype)."""
    if running is None:
        return
    new = running.to(batch_stat.dtype) * (1.0 - momentum) + batch_stat.detach() * momentum
    running.copy_(new)


def _with_running_stats(xs: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor, eps: float):
    """(x - running_mean) * rsqrt(running_var + eps), the [C] statistics broadcast over [N, C, *]."""
    mean = _channel_view(running_mean.to(xs.dtype), xs.dim())
    var = _channel_view(running_var.to(xs.dtype), xs.dim())
    return (xs - mean) * torch.rsqrt(var + eps)


def _channel_affine(y: torch.Tensor, weight, bias, dtype: torch.dtype) -> torch.Tensor:
    """y * weight + bias with [C] parameters broadcast over [N, C, *], cast to ``dtype``."""
    w = None if weight is None else _channel_view(weight, y.dim())
    b = None if bias is None else _channel_view(bias, y.dim())
    return _affine(y, w, b).to(dtype)


def batch_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> torch.Tensor:
    r"""Batch normalisation, as :func:`F.batch_norm`.

    x: [N, C, *]. Training: per channel, mean and biased var over the batch and spatial dims,

        y = (x - mean) * rsqrt(var + eps) * weight + bias,

    and, when given, the running statistics are updated in place without a graph:
    ``running_mean <- (1 - momentum) running_mean + momentum mean``,
    ``running_var <- (1 - momentum) running_var + momentum var * n / (n - 1)`` (unbiased; n values per
    channel). Evaluation: the running statistics replace mean and var.

    Args:
        input: [N, C, *]. running_mean, running_var: [C] or None (required when not training).
        weight, bias: optional [C].

    Returns:
        Tensor of input's shape and dtype.
    """
    if input.dim() < 2:
        raise ValueError(f"batch_norm: expected input of shape [N, C, *], got {list(input.shape)}")
    stat = _stat_dtype(input.dtype)
    xs = input.to(stat)
    if training:
        _verify_batch_size(list(input.shape))
        dims = (0, *range(2, input.dim()))
        mean, centred, var = _moments(xs, dims)
        n = input.numel() // input.shape[1]
        _update_running(running_mean, mean.flatten(), momentum)
        _update_running(running_var, var.flatten() * (n / (n - 1)), momentum)
        y = centred * torch.rsqrt(var + eps)
    else:
        if running_mean is None or running_var is None:
            raise RuntimeError("batch_norm: running_mean and running_var must be defined in evaluation mode")
        y = _with_running_stats(xs, running_mean, running_var, eps)
    return _channel_affine(y, weight, bias, input.dtype)


def instance_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None = None,
    running_var: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> torch.Tensor:
    r"""Instance normalisation, as :func:`F.instance_norm`.

    x: [N, C, *spatial]. With ``use_input_stats``: per sample and channel, mean and biased var over
    the spatial dims, y = (x - mean) * rsqrt(var + eps) * weight + bias, and the running statistics
    (when given) are updated in place as PyTorch does, with the batch average of the per-instance
    statistics: ``running_mean <- (1 - m) running_mean + m mean_N(mean)``,
    ``running_var <- (1 - m) running_var + m mean_N(var * n / (n - 1))`` (n spatial positions).
    Without: the running statistics [C] replace mean and var.

    Returns:
        Tensor of input's shape and dtype.
    """
    if input.dim() < 3:
        raise ValueError(f"instance_norm: expected input of shape [N, C, *spatial], got {list(input.shape)}")
    stat = _stat_dtype(input.dtype)
    xs = input.to(stat)
    if use_input_stats:
        n = math.prod(input.shape[2:])
        if n == 1:
            raise ValueError(f"Expected more than 1 spatial element when training, got input size {input.shape}")
        dims = tuple(range(2, input.dim()))
        mean, centred, var = _moments(xs, dims)
        # PyTorch runs batch_norm on [1, N*C, *] with the running stats repeated N times, then
        # averages them over N: the batch mean of the per-instance updates.
        _update_running(running_mean, mean.flatten(1).mean(0), momentum)
        _update_running(running_var, (var.flatten(1) * (n / (n - 1))).mean(0), momentum)
        y = centred * torch.rsqrt(var + eps)
    else:
        if running_mean is None or running_var is None:
            raise RuntimeError("instance_norm: expected running_mean and running_var to be defined when use_input_stats is false")
        y = _with_running_stats(xs, running_mean, running_var, eps)
    return _channel_affine(y, weight, bias, input.dtype)


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    r"""Softmax attention, as :func:`F.scaled_dot_product_attention` (its math backend).

        out = dropout(softmax(scale * q k^T + bias)) v

    q: [*, Hq, L, E], k: [*, Hk, S, E], v: [*, Hk, S, Ev] (batch dims broadcast); scale defaults to
    1 / sqrt(E). ``attn_mask``: bool (True: the key takes part; False adds -inf) or float (added),
    broadcastable to [*, Hq, L, S]. ``is_causal``: query i sees keys j <= i (top-left aligned
    lower-triangular mask; no ``attn_mask`` allowed with it). A row whose keys are all masked gives 0
    (PyTorch's safe softmax), not NaN. ``dropout_p`` > 0 drops attention weights (always, as in
    PyTorch: the function has no training flag). ``enable_gqa``: Hq a multiple of Hk; each k / v head
    serves Hq / Hk consecutive query heads (``repeat_interleave`` over the head dim).

    Returns:
        [*, Hq, L, Ev] in query's dtype (scores and softmax in float32 for half / bfloat16).
    """
    if is_causal and attn_mask is not None:
        raise RuntimeError("_scaled_dot_product_attention: Explicit attn_mask should not be set when is_causal=True")
    if enable_gqa:
        hq, hk, hv = query.size(-3), key.size(-3), value.size(-3)
        if hq % hk or hq % hv:
            raise RuntimeError(
                f"scaled_dot_product_attention: with enable_gqa the number of query heads ({hq}) must be a "
                f"multiple of the key ({hk}) and value ({hv}) heads"
            )
        key = key.repeat_interleave(hq // hk, dim=-3)
        value = value.repeat_interleave(hq // hv, dim=-3)
    stat = _stat_dtype(query.dtype)
    q, k, v = query.to(stat), key.to(stat), value.to(stat)
    if scale is None:
        scale = 1.0 / math.sqrt(query.size(-1))
    scores = (q @ k.transpose(-2, -1)) * scale
    neg_inf = torch.tensor(float("-inf"), dtype=stat, device=scores.device)
    if is_causal:
        length, source = query.size(-2), key.size(-2)
        keep = torch.ones(length, source, dtype=torch.bool, device=scores.device).tril()
        scores = torch.where(keep, scores, neg_inf)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = torch.where(attn_mask, scores, neg_inf)
        else:
            scores = scores + attn_mask.to(stat)
    # Safe softmax: rows with every key masked give 0. They are filled with 0 before the softmax so
    # that no NaN enters the graph (its backward would spread NaN into the scores' gradient).
    dead = torch.isneginf(scores).all(dim=-1, keepdim=True)
    scores = scores.masked_fill(dead, 0.0)
    weights = torch.softmax(scores, dim=-1).masked_fill(dead, 0.0)
    if dropout_p > 0.0:
        weights = torch.dropout(weights, dropout_p, True)
    return (weights @ v).to(query.dtype)


# ---------------------------------------------------------------------------------------------------
# Routing: a TorchFunctionMode.


def _torch_layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5, cudnn_enable=True):
    # torch.layer_norm (aten schema argument order).
    return layer_norm(input, normalized_shape, weight, bias, eps)


def _torch_group_norm(input, num_groups, weight=None, bias=None, eps=1e-5, cudnn_enabled=True):
    return group_norm(input, num_groups, weight, bias, eps)


def _torch_batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps, cudnn_enabled=True):
    return batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)


def _torch_instance_norm(input, weight, bias, running_mean, running_var, use_input_stats, momentum, eps, cudnn_enabled=True):
    return instance_norm(input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps)


_MHA_SIGNATURE = inspect.signature(F.multi_head_attention_forward)


def _multi_head_attention_forward(*args, **kwargs):
    """``F.multi_head_attention_forward`` always taking its explicit (``need_weights=True``) branch.

    Its ``need_weights=False`` branch calls ``F.scaled_dot_product_attention`` from inside a function
    the mode has already intercepted, where the mode is inactive (PyTorch disables a mode while its
    handler runs), so the fused kernel would run undecomposed. The explicit branch computes the same
    output from baddbmm / softmax / dropout / bmm; the weights are dropped again when not asked for.
    """
    bound = _MHA_SIGNATURE.bind(*args, **kwargs)
    wanted = bound.arguments.get("need_weights", True)
    bound.arguments["need_weights"] = True
    out, weights = F.multi_head_attention_forward(*bound.args, **bound.kwargs)
    return out, (weights if wanted else None)


def _routes() -> dict:
    table = {
        F.layer_norm: layer_norm,
        F.group_norm: group_norm,
        F.batch_norm: batch_norm,
        F.instance_norm: instance_norm,
        F.rms_norm: rms_norm,
        F.scaled_dot_product_attention: scaled_dot_product_attention,
        F.multi_head_attention_forward: _multi_head_attention_forward,
        torch.layer_norm: _torch_layer_norm,
        torch.group_norm: _torch_group_norm,
        torch.batch_norm: _torch_batch_norm,
        torch.instance_norm: _torch_instance_norm,
        torch.rms_norm: rms_norm,  # same argument order as F.rms_norm
    }
    return table


_ROUTES = _routes()


class DecomposedMode(TorchFunctionMode):
    """Torch-function mode sending the normalisation / attention functionals to this module.

    PyTorch pops a mode while its ``__torch_function__`` runs, so the decompositions' own torch calls
    (and every passed-through call) do not come back here: no recursion.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        impl = _ROUTES.get(func)
        if impl is None:
            return func(*args, **(kwargs or {}))
        return impl(*args, **(kwargs or {}))


def decomposed() -> DecomposedMode:
    """Context manager: inside ``with decomposed():`` these calls use the decompositions above:

    ``F.layer_norm``, ``F.group_norm``, ``F.batch_norm``, ``F.instance_norm``, ``F.rms_norm``,
    ``F.scaled_dot_product_attention`` and ``torch.layer_norm``, ``torch.group_norm``,
    ``torch.batch_norm``, ``torch.instance_norm``, ``torch.rms_norm``; ``F.multi_head_attention_forward``
    (``nn.MultiheadAttention``) takes its explicit softmax branch. Everything else passes through
    unchanged. Modules call the functional forms, so ``nn.LayerNorm``, ``nn.GroupNorm``,
    ``nn.BatchNorm*d``, ``nn.InstanceNorm*d``, ``nn.RMSNorm`` and ``nn.MultiheadAttention`` are
    covered. Not covered: ``torch.native_*_norm`` and ``torch.ops.aten.*`` calls (they bypass
    torch-function modes), and the C++ fast paths of transformer modules, which PyTorch already skips
    while any torch-function mode is active.
    """
    return DecomposedMode()
