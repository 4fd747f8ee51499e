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

Modules, by kind (none imports :mod:`~sgflow.autodual.rules.table`, which imports them all and installs
the tables; importing this package does that):

- ``common``: helpers (``_bind``, ``_fns``, ``_getters``, ``_fit``, ...) and, imported from
  :mod:`sgflow.ops.recompute`, the op-level recomputation ``recompute_op`` / ``_RecomputeOp`` (its row
  slices: ``ROW_SLICES``, ``ROW_SLICE_MIN_NUMEL``);
- ``structural``: ``meta``, ``nondiff``, ``inplace``, ``inplace_error``, ``control_flow_error``, ``linear``, ``affine``;
- ``products``: ``product`` (mul, matmul, einsum; lazy attention), addcmul, ``divide``, pow, softmax;
- ``fusions``: dropout and the GroupNorm+SiLU(+Dropout)(+Conv) fusions;
- ``conv_linear``: the conv / linear rules (their Functions ``DualConv``, ``DualLinear``: :mod:`sgflow.ops.conv_linear`);
- ``norms``: group / layer / RMS / batch / instance norm;
- ``sdpa``: ``F.scaled_dot_product_attention``;
- ``pointwise``: the ``_SPECS`` of the elementwise ops and their rule (its Function ``PointwiseDual``
  and chunk sizes ``POINTWISE_CHUNK``, ``POINTWISE_D2_CHUNKS``: :mod:`sgflow.ops.pointwise`);
- ``fallback``: ``forward_ad``, PyTorch's forward AD for one op;
- ``table``: the name tables, ``_install``, ``classify``.

Every name the single-module ``rules`` had is re-exported here (``_RecomputeOp``, ``_DualConv``,
``_DualLinear``, ``_PointwiseDual``: the Functions of :mod:`sgflow.ops` under their old names). The
tunables ``ROW_SLICES``, ``ROW_SLICE_MIN_NUMEL`` (:mod:`sgflow.ops.recompute`), ``POINTWISE_CHUNK`` and
``POINTWISE_D2_CHUNKS`` (:mod:`sgflow.ops.pointwise`) are read by the code from the module that defines
them; reading or setting one on this package (``rules.ROW_SLICES = 4``, ``monkeypatch.setattr(rules, ...)``)
reads or sets it there. The rule submodules do not carry them (setting one there would be a no-op).
"""
from __future__ import annotations

from sgflow._forwarding import forward_globals

from sgflow.autodual.rules import (  # noqa: F401 - the submodules, by kind
    common,
    conv_linear,
    fallback,
    fusions,
    norms,
    pointwise,
    products,
    sdpa,
    structural,
    table,
)
from sgflow.autodual.rules.common import (  # noqa: F401
    _T,
    _bind,
    _fit,
    _fns,
    _getters,
    _low_precision,
    _nullctx,
    _recompute_grads,
    _RecomputeOp,
    _tangent_or_zeros,
    recompute_op,
)
from sgflow.autodual.rules.conv_linear import (  # noqa: F401
    _CONV_NDIM,
    _autocast_args,
    _conv_conf,
    _conv_rule,
    _linear_rule,
    _ntuple,
)
from sgflow.autodual.rules.fallback import _leaves, _no_tensor_result, forward_ad  # noqa: F401
from sgflow.autodual.rules.fusions import (  # noqa: F401
    _dropout_mask_rule,
    _dropout_rule,
    _gn_silu,
    _gn_silu_conv,
    _gn_silu_dropout,
    _gn_silu_eager,
)
from sgflow.autodual.rules.norms import (  # noqa: F401
    _batch_norm_rule,
    _group_norm_eager,
    _group_norm_general,
    _group_norm_rule,
    _instance_norm_rule,
    _layer_norm_rule,
    _norm_dual,
    _normalize,
    _normalized_shape,
    _require_dual_input,
    _rms_norm_rule,
)
from sgflow.autodual.rules.pointwise import (  # noqa: F401
    _GELU_A,
    _SPECS,
    _SQRT_2_OVER_PI,
    _aten,
    _gelu_d1,
    _gelu_d2,
    _gelu_tanh_parts,
    _pointwise_rule,
    _sig_d1,
    _silu_d1,
    _silu_d2,
    _Spec,
)
from sgflow.autodual.rules.products import (  # noqa: F401
    _MATMULS,
    _SCALE_OPS,
    _addcmul_rule,
    _einsum_form,
    _lazy_attention,
    _log_softmax_rule,
    _noted,
    _pow_rule,
    _softmax_dim,
    _softmax_rule,
    divide,
    product,
)
from sgflow.autodual.rules.sdpa import _sdpa_rule  # noqa: F401
from sgflow.autodual.rules.structural import (  # noqa: F401
    _DERIVED_NAMES,
    _LAZY_SAFE_META,
    _METADATA_ARG_OPS,
    affine,
    control_flow_error,
    inplace,
    inplace_error,
    linear,
    meta,
    nondiff,
)
from sgflow.autodual.rules.table import (  # noqa: F401
    _ADD_NAMES,
    _CONTROL_FLOW,
    _DIV_NAMES,
    _F_LINEAR,
    _LINEAR_NAMES,
    _META_GETTERS,
    _META_NAMES,
    _NONDIFF_NAMES,
    _PRODUCT_NAMES,
    _inplace_name,
    _install,
    _iter_rule,
    classify,
)
from sgflow.ops import pointwise as _ops_pointwise, recompute as _ops_recompute
from sgflow.ops.conv_linear import DualConv as _DualConv, DualLinear as _DualLinear  # noqa: F401 - old names
from sgflow.ops.pointwise import PointwiseDual as _PointwiseDual, _chunks, _flat  # noqa: F401 - old names
from sgflow.autodual.tensor import (  # noqa: F401 - as the single-module rules had them
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

# The tunables, by the module whose code reads them (sgflow.ops): reading or setting one on this package
# reads or sets it there (a plain re-export would be a copy that the code never reads).
_TUNABLES = {
    "ROW_SLICES": _ops_recompute,
    "ROW_SLICE_MIN_NUMEL": _ops_recompute,
    "POINTWISE_CHUNK": _ops_pointwise,
    "POINTWISE_D2_CHUNKS": _ops_pointwise,
}


forward_globals(__name__, _TUNABLES)
