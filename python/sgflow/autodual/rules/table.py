r"""The rule tables: which torch functions and tensor methods take which rule (``_install``, run on
import), and ``classify`` for functions without a registered rule (in-place names, ``__iter__``, else
the forward-AD fallback). This module imports the rule modules; none of them imports it."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from sgflow.autodual.rules.common import _T, _fns, _getters
from sgflow.autodual.rules.conv_linear import _CONV_NDIM, _conv_rule, _linear_rule
from sgflow.autodual.rules.fallback import forward_ad
from sgflow.autodual.rules.fusions import _dropout_mask_rule, _dropout_rule, gn_silu_resample, resampled
from sgflow.autodual.rules.norms import (
    _batch_norm_rule,
    _group_norm_rule,
    _instance_norm_rule,
    _layer_norm_rule,
    _rms_norm_rule,
)
from sgflow.autodual.rules.pointwise import _SPECS, _pointwise_rule
from sgflow.autodual.rules.products import (
    _addcmul_rule,
    _log_softmax_rule,
    _pow_rule,
    _softmax_rule,
    divide,
    product,
)
from sgflow.autodual.rules.sdpa import _sdpa_rule
from sgflow.autodual.rules.structural import affine, control_flow_error, inplace, inplace_error, linear, meta, nondiff
from sgflow.autodual.tensor import make_dual, register


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
    register([F.interpolate, F.avg_pool2d], "linear")(_resample_rule)
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


def _resample_rule(func, args, kwargs):
    """F.interpolate / F.avg_pool2d: kept lazy for a fused GroupNorm -> SiLU -> resample -> conv stage, else by an
    integer factor the dual resampling op, else linear."""
    out = gn_silu_resample(func, args, kwargs)
    return resampled(func, args, kwargs) if out is None else out


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
    if name == "__setitem__":
        return inplace_error, "error"
    if _inplace_name(name):
        return inplace, "in-place"
    if func is _T.__iter__:
        return _iter_rule, "linear"
    return forward_ad, "forward-ad"


_install()
