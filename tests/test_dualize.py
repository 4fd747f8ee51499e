"""Acceptance tests of issue 9: ``sgflow.dualize`` — the fused SGFlow path through a model's own forward.

1. Rules, one op at a time: output, tangent and the gradients of <g, y> + <g_dot, y_dot> with respect to
   primal inputs, tangents and parameters against ``torch.func.jvp`` + autograd in float64 (norms and SDPA
   through ``sgflow.decompose``, whose higher-order derivatives come from primitive ops), and the rule
   each op took.
2. Networks: fused (dualized) vs reference SGFlow gradients, finite-difference audits, float32.
3. User-side features: adapters and hooks get their gradients, state_dict, patches removed, deepcopy.
4. Bad input raises ``sgflow.DualizeError`` naming op and module path; closure parameters are seen.
5. Dropout replay, train/eval, autocast bf16 with fp32 statistics.
6. ``report()``.

Every comparison asserts that the reference is non-trivial (non-zero tangent, non-zero gradients).
"""
from __future__ import annotations

import copy
import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import sgflow
import sgflow.ops.attention as ops_attention
import testnets
from sgflow.autodual import as_dual_model, dual_call
from sgflow.decompose import decomposed
from sgflow.testing import dual_grads, grad_errors, jvp_reference, rel_err
from audit_checks import audit_network

D64 = torch.float64
F32 = torch.float32
BF16 = torch.bfloat16
SEED = 2026

# Relative tolerance of a dual op against the float64 reference, by the dtype the dual op ran in
# (the reference is evaluated on the same values, rounded to that dtype first).
OP_TOL = {D64: 1e-10, F32: 1e-4}
OP_DTYPES = [pytest.param(D64, id="f64"), pytest.param(F32, id="f32")]


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------------
# 1. Rules, one op at a time
# ---------------------------------------------------------------------------------------------------
#
# A case builder takes a seeded generator and returns (fn, primals, params): ``fn(*primals, *params)``
# is the op under test; the primals get random tangents, the params (plain tensors closed over by the
# op: weights, biases, plain operands) get gradients only. Everything is drawn in float64.


def _r(gen, *shape, lo=None, scale=1.0):
    """Seeded float64 draw: normal * scale, or uniform in [lo, lo + 1) when ``lo`` is given."""
    if lo is not None:
        return lo + torch.rand(*shape, generator=gen, dtype=D64)
    return scale * torch.randn(*shape, generator=gen, dtype=D64)


def _mask(gen, *shape, p=0.6):
    return torch.rand(*shape, generator=gen) < p


def _conv(func, x_shape, w_shape, bias=True, **kw):
    """``func(x, w, b, **kw)`` with a plain (non-dual) weight and bias; x carries the tangent."""
    transposed = "transpose" in func.__name__
    out_channels = w_shape[1] * kw.get("groups", 1) if transposed else w_shape[0]

    def build(gen):
        x = _r(gen, *x_shape)
        w = _r(gen, *w_shape, scale=0.3)
        if bias:
            return (lambda x, w, b: func(x, w, b, **kw)), [x], [w, _r(gen, out_channels)]
        return (lambda x, w: func(x, w, None, **kw)), [x], [w]

    return build


def _conv_dual_weight(gen):
    # A hypernetwork-style conv: the weight is computed from the inputs (carries a tangent).
    x = _r(gen, 3, 6, 7, 5)
    w = _r(gen, 4, 6, 3, 3, scale=0.3)
    b = _r(gen, 4)
    return (lambda x, w, b: F.conv2d(x, w, b, padding=1)), [x, w], [b]


def _linear(x_shape, out, bias=True):
    def build(gen):
        x = _r(gen, *x_shape)
        w = _r(gen, out, x_shape[-1], scale=0.3)
        if bias:
            return (lambda x, w, b: F.linear(x, w, b)), [x], [w, _r(gen, out)]
        return (lambda x, w: F.linear(x, w)), [x], [w]

    return build


def _gn(silu: bool, affine=True, shape=(3, 63, 7, 5), groups=9):
    def build(gen):
        x = _r(gen, *shape, scale=1.5) + 0.5
        c = shape[1]
        if affine:
            w, b = 1 + _r(gen, c, scale=0.3), _r(gen, c, scale=0.3)

            def fn(x, w, b):
                y = F.group_norm(x, groups, w, b, eps=1e-5)
                return F.silu(y) if silu else y

            return fn, [x], [w, b]

        def fn(x):
            y = F.group_norm(x, groups, eps=1e-6)
            return F.silu(y) if silu else y

        return fn, [x], []

    return build


def _gn_scale_shift_silu(gen):
    # ADM: GroupNorm, then x * (1 + scale) + shift from the embedding, then SiLU (not the fused pattern).
    x = _r(gen, 3, 63, 7, 5)
    scale, shift = _r(gen, 3, 63, scale=0.3), _r(gen, 3, 63, scale=0.3)
    w, b = 1 + _r(gen, 63, scale=0.2), _r(gen, 63, scale=0.2)

    def fn(x, scale, shift, w, b):
        h = F.group_norm(x, 9, w, b)
        return F.silu(h * (1 + scale[..., None, None]) + shift[..., None, None])

    return fn, [x, scale, shift], [w, b]


def _gn_dual_weight(gen):
    x = _r(gen, 3, 63, 7, 5)
    w, b = 1 + _r(gen, 63, scale=0.3), _r(gen, 63, scale=0.3)
    return (lambda x, w, b: F.group_norm(x, 7, w, b)), [x, w, b], []


def _ln(affine=True, shape=(3, 7, 63), nshape=(63,)):
    def build(gen):
        x = _r(gen, *shape) + 0.3
        if affine:
            w, b = 1 + _r(gen, *nshape, scale=0.3), _r(gen, *nshape, scale=0.3)
            return (lambda x, w, b: F.layer_norm(x, nshape, w, b, eps=1e-5)), [x], [w, b]
        return (lambda x: F.layer_norm(x, nshape, eps=1e-6)), [x], []

    return build


def _ln_adaln(gen):
    # DiT: modulate(LayerNorm(x) without affine, shift, scale) with shift / scale computed from the inputs.
    x = _r(gen, 3, 7, 63)
    shift, scale = _r(gen, 3, 63, scale=0.3), _r(gen, 3, 63, scale=0.3)

    def fn(x, shift, scale):
        return F.layer_norm(x, (63,), eps=1e-6) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)

    return fn, [x, shift, scale], []


def _bn(mode):
    def build(gen):
        x = _r(gen, 3, 6, 7, 5, scale=1.3) + 0.4
        w, b = 1 + _r(gen, 6, scale=0.3), _r(gen, 6, scale=0.3)
        if mode == "train":
            return (lambda x, w, b: F.batch_norm(x, None, None, w, b, training=True)), [x], [w, b]
        if mode == "train-running":
            # Fresh running statistics at every call (both paths update them in place).
            def fn(x, w, b):
                rm = torch.zeros(6, dtype=x.dtype)
                rv = torch.ones(6, dtype=x.dtype)
                return F.batch_norm(x, rm, rv, w, b, training=True, momentum=0.2)

            return fn, [x], [w, b]
        rm, rv = _r(gen, 6, scale=0.2), _r(gen, 6, lo=0.5)
        return (lambda x, w, b: F.batch_norm(x, rm.to(x.dtype), rv.to(x.dtype), w, b, training=False)), [x], [w, b]

    return build


def _instance_norm(gen):
    x = _r(gen, 3, 6, 7, 5)
    w, b = 1 + _r(gen, 6, scale=0.3), _r(gen, 6, scale=0.3)
    return (lambda x, w, b: F.instance_norm(x, weight=w, bias=b)), [x], [w, b]


def _rms(weight=True):
    def build(gen):
        x = _r(gen, 3, 7, 63) + 0.2
        if weight:
            w = 1 + _r(gen, 63, scale=0.3)
            return (lambda x, w: F.rms_norm(x, (63,), w, eps=1e-6)), [x], [w]
        return (lambda x: F.rms_norm(x, (63,))), [x], []

    return build


def _sdpa(q_shape, kv_len, mask=None, causal=False, scale=None):
    def build(gen):
        *lead, nq, d = q_shape
        q = _r(gen, *q_shape)
        k, v = _r(gen, *lead, kv_len, d), _r(gen, *lead, kv_len, d)
        m = None
        if mask == "bool":
            m = _mask(gen, nq, kv_len)
            m[:, 0] = True
        elif mask == "dead-row":
            m = _mask(gen, nq, kv_len)
            m[:, 0] = True
            m[1] = False  # query 1 sees no key: PyTorch's safe softmax gives 0
        def fn(q, k, v):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=causal, scale=scale)

        return fn, [q, k, v], []

    return build


def _qkv(gen, lead=(3,), nq=7, nk=5, d=8):
    return [_r(gen, *lead, nq, d), _r(gen, *lead, nk, d), _r(gen, *lead, nk, d)]


def _attn_bmm(gen):
    def fn(q, k, v):
        s = torch.bmm(q, k.transpose(1, 2)) * (q.shape[-1] ** -0.5)
        return torch.bmm(s.softmax(-1), v)

    return fn, _qkv(gen), []


def _attn_einsum(gen):
    def fn(q, k, v):
        w = torch.einsum("nqc,nkc->nqk", q, k / math.sqrt(q.shape[-1])).softmax(dim=2)
        return torch.einsum("nqk,nkc->nqc", w, v)

    return fn, _qkv(gen), []


def _attn_matmul(lead):
    def build(gen):
        def fn(q, k, v):
            return torch.softmax(q @ k.mT * 0.4, -1) @ v

        return fn, _qkv(gen, lead=lead), []

    return build


def _attn_scores_reused(gen):
    # The scores feed the softmax AND another op: still correct (the node is materialised for the other use).
    def fn(q, k, v):
        s = torch.bmm(q, k.transpose(1, 2)) * 0.5
        return torch.bmm(s.softmax(-1), v) + s.mean(-1, keepdim=True)

    return fn, _qkv(gen), []


def _attn_scores_used_first(gen):
    def fn(q, k, v):
        s = torch.bmm(q, k.transpose(1, 2)) * 0.5
        m = s.sum(-1, keepdim=True)
        return torch.bmm(s.softmax(-1), v) * m

    return fn, _qkv(gen), []


def _attn_probs_reused(gen):
    # The attention weights feed the value product AND another op (e.g. an attention-entropy term).
    def fn(q, k, v):
        p = (torch.bmm(q, k.transpose(1, 2)) * 0.5).softmax(-1)
        return torch.bmm(p, v) + p.square().sum(-1, keepdim=True)

    return fn, _qkv(gen), []


def _attn_probs_returned(gen):
    # The attention weights themselves are the output (no value product at all).
    def fn(q, k):
        p = (torch.bmm(q, k.transpose(1, 2)) * 0.5).softmax(-1)
        return p * 2.0

    return fn, _qkv(gen)[:2], []


def _unary(op, lo=None, shape=(3, 7, 5)):
    def build(gen):
        return op, [_r(gen, *shape, lo=lo)], []

    return build


def _binary(op, lo_b=None, plain_b=False, a_shape=(3, 7, 5), b_shape=(3, 7, 5)):
    def build(gen):
        a, b = _r(gen, *a_shape), _r(gen, *b_shape, lo=lo_b)
        if plain_b:
            return op, [a], [b]
        return op, [a, b], []

    return build


def _where(both_dual):
    def build(gen):
        m = _mask(gen, 3, 7, 5)
        a, b = _r(gen, 3, 7, 5), _r(gen, 7, 5)
        fn = lambda a, b: torch.where(m, a, b)  # noqa: E731
        return (fn, [a, b], []) if both_dual else (fn, [a], [b])

    return build


def _masked_fill(gen):
    m = _mask(gen, 3, 1, 5)
    return (lambda a: a.masked_fill(m, 0.7) * 2.0), [_r(gen, 3, 7, 5)], []


def _addcmul_edm(gen):
    # EDM: torch.addcmul(shift, norm(x), scale + 1), every operand carrying a tangent.
    shift, x, scale = _r(gen, 3, 6, 1, 1), _r(gen, 3, 6, 7, 5), _r(gen, 3, 6, 1, 1)
    return (lambda s, x, c: torch.addcmul(s, x, c + 1)), [shift, x, scale], []


def _addcmul_plain(gen):
    a, b, p = _r(gen, 3, 7, 5), _r(gen, 3, 7, 5), _r(gen, 7, 5)
    return (lambda a, b, p: torch.addcmul(a, b, p, value=0.5)), [a, b], [p]


def _fallback(op):
    def build(gen):
        return (lambda x: op(x) * 1.5), [_r(gen, 3, 7, 5, scale=0.8)], []

    return build


# Masked / causal SDPA: the SDPA rule, written out as math (each op through its own rule), no fused op.
MATH_SDPA = "rule:attention (math)"

OP_CASES = [
    # conv / conv_transpose: stacked primal + tangent convolution
    pytest.param(_conv(F.conv1d, (3, 63, 11), (21, 63, 3), stride=2, padding=1, dilation=2), "rule:conv-stacked",
                 id="conv1d-63ch-s2-p1-d2"),
    pytest.param(_conv(F.conv1d, (1, 63, 9), (9, 21, 3), bias=False, groups=3), "rule:conv-stacked",
                 id="conv1d-b1-groups3-nobias"),
    pytest.param(_conv(F.conv2d, (3, 63, 7, 5), (16, 63, 3, 3), padding=1), "rule:conv-stacked", id="conv2d-63ch-7x5"),
    pytest.param(_conv(F.conv2d, (3, 63, 7, 5), (18, 7, 3, 3), bias=False, stride=2, padding=2, dilation=2, groups=9),
                 "rule:conv-stacked", id="conv2d-s2-d2-groups9-nobias"),
    pytest.param(_conv(F.conv2d, (1, 6, 7, 5), (4, 6, 3, 3), padding="same"), "rule:conv-stacked", id="conv2d-same-odd-k3"),
    pytest.param(_conv(F.conv2d, (3, 6, 7, 5), (4, 6, 4, 2), padding="same"), "rule:conv-stacked", id="conv2d-same-even-k4x2"),
    pytest.param(_conv(F.conv2d, (3, 6, 7, 5), (4, 6, 3, 2), padding="valid", stride=(2, 1)), "rule:conv-stacked",
                 id="conv2d-valid"),
    pytest.param(_conv_dual_weight, "rule:conv-stacked", id="conv2d-dual-weight"),
    pytest.param(_conv(F.conv3d, (1, 4, 5, 4, 3), (6, 4, 3, 3, 3), padding=1, stride=(1, 2, 1)), "rule:conv-stacked",
                 id="conv3d"),
    pytest.param(_conv(F.conv_transpose2d, (3, 63, 4, 3), (63, 8, 3, 3), stride=2, padding=1, output_padding=1),
                 "rule:conv-stacked", id="conv_transpose2d-s2-p1-op1"),
    pytest.param(_conv(F.conv_transpose2d, (1, 9, 5, 4), (9, 4, 3, 3), bias=False, groups=3, dilation=2),
                 "rule:conv-stacked", id="conv_transpose2d-groups3-d2-nobias"),
    # linear
    pytest.param(_linear((63,), 10), "rule:linear-stacked", id="linear-1d"),
    pytest.param(_linear((3, 63), 10), "rule:linear-stacked", id="linear-2d"),
    pytest.param(_linear((3, 7, 63), 10, bias=False), "rule:linear-stacked", id="linear-3d-nobias"),
    pytest.param(_linear((1, 5), 4), "rule:linear-stacked", id="linear-b1"),
    # normalisation layers
    pytest.param(_gn(silu=True), "rule:group_norm+silu (fused op)", id="group_norm+silu-fused"),
    pytest.param(_gn(silu=False), "rule:group_norm", id="group_norm-alone"),
    pytest.param(_gn(silu=False, affine=False, shape=(1, 63, 11), groups=7), "rule:group_norm", id="group_norm-b1-1d-noaffine"),
    pytest.param(_gn(silu=True, affine=False, shape=(1, 63, 7, 5), groups=63), "rule:group_norm+silu (fused op)",
                 id="group_norm+silu-b1-noaffine"),
    pytest.param(_gn_scale_shift_silu, "rule:group_norm", id="group_norm-scale-shift-silu"),
    pytest.param(_gn_dual_weight, "rule:group_norm", id="group_norm-dual-weight"),
    pytest.param(_ln(), "rule:layer_norm", id="layer_norm-affine"),
    pytest.param(_ln(affine=False, shape=(3, 4, 7, 5), nshape=(7, 5)), "rule:layer_norm", id="layer_norm-noaffine-2dims"),
    pytest.param(_ln_adaln, "rule:layer_norm", id="layer_norm-adaLN"),
    pytest.param(_bn("train"), "rule:batch_norm", id="batch_norm-train"),
    pytest.param(_bn("train-running"), "rule:batch_norm", id="batch_norm-train-running-stats"),
    pytest.param(_bn("eval"), "rule:batch_norm", id="batch_norm-eval"),
    pytest.param(_instance_norm, "rule:instance_norm", id="instance_norm"),
    pytest.param(_rms(), "rule:rms_norm", id="rms_norm-weight"),
    pytest.param(_rms(weight=False), "rule:rms_norm", id="rms_norm-noweight-default-eps"),
    # attention
    pytest.param(_sdpa((3, 2, 7, 8), 5), "rule:attention", id="sdpa-4d"),
    pytest.param(_sdpa((1, 7, 8), 7, scale=0.3), "rule:attention", id="sdpa-3d-b1-scale"),
    pytest.param(_sdpa((3, 2, 7, 8), 5, mask="bool"), MATH_SDPA, id="sdpa-bool-mask"),
    pytest.param(_sdpa((3, 7, 8), 5, mask="dead-row"), MATH_SDPA, id="sdpa-bool-mask-dead-row"),
    pytest.param(_sdpa((1, 2, 6, 8), 6, causal=True), MATH_SDPA, id="sdpa-causal"),
    pytest.param(_attn_bmm, "rule:attention", id="attn-bmm-softmax-bmm"),
    pytest.param(_attn_einsum, "rule:attention", id="attn-einsum-softmax-einsum"),
    pytest.param(_attn_matmul((3,)), "rule:attention", id="attn-matmul-3d"),
    pytest.param(_attn_matmul((3, 2)), "rule:attention", id="attn-matmul-4d"),
    pytest.param(_attn_scores_reused, None, id="attn-partial-scores-reused"),
    pytest.param(_attn_scores_used_first, None, id="attn-partial-scores-used-first"),
    pytest.param(_attn_probs_reused, None, id="attn-partial-probs-reused"),
    pytest.param(_attn_probs_returned, None, id="attn-partial-probs-returned"),
    # softmax
    pytest.param(_unary(lambda x: F.softmax(x, dim=1)), "rule:softmax", id="softmax-dim1"),
    pytest.param(_unary(lambda x: x.softmax(-1)), "rule:softmax", id="softmax-method"),
    pytest.param(_unary(lambda x: F.log_softmax(x, -1)), "rule:softmax", id="log_softmax"),
    # pointwise
    pytest.param(_unary(F.silu), "pointwise", id="silu"),
    pytest.param(_unary(lambda x: F.silu(x, inplace=False)), "pointwise", id="silu-inplace-false"),
    pytest.param(_unary(F.gelu), "pointwise", id="gelu"),
    pytest.param(_unary(lambda x: F.gelu(x, approximate="tanh")), "pointwise", id="gelu-tanh"),
    pytest.param(_unary(torch.tanh), "pointwise", id="tanh"),
    pytest.param(_unary(torch.sigmoid), "pointwise", id="sigmoid"),
    pytest.param(_unary(torch.exp), "pointwise", id="exp"),
    pytest.param(_unary(torch.log, lo=0.5), "pointwise", id="log"),
    pytest.param(_unary(torch.sin), "pointwise", id="sin"),
    pytest.param(_unary(lambda x: x.cos()), "pointwise", id="cos"),
    pytest.param(_unary(torch.sqrt, lo=0.5), "pointwise", id="sqrt"),
    pytest.param(_unary(torch.rsqrt, lo=0.5), "pointwise", id="rsqrt"),
    pytest.param(_unary(F.relu), "pointwise", id="relu"),
    pytest.param(_unary(torch.square), "pointwise", id="square"),
    pytest.param(_unary(lambda x: x.pow(3)), "pointwise", id="pow-3"),
    pytest.param(_unary(lambda x: x ** 2.5, lo=0.5), "pointwise", id="pow-2.5"),
    # products, affine and linear ops
    pytest.param(_binary(lambda a, b: a / b, lo_b=0.8), "divide", id="div-both-dual"),
    pytest.param(_unary(lambda b: 2.0 / b, lo=0.8), "divide", id="rdiv-scalar"),
    pytest.param(_binary(lambda a, b: a * b, b_shape=(1, 7, 1)), "rule:mul by a broadcast factor (fused dual product)",
                 id="mul-broadcast-both-dual"),
    pytest.param(_binary(lambda a, b: b * a, b_shape=(3, 1, 1)), "rule:mul by a broadcast factor (fused dual product)",
                 id="mul-per-sample-factor-first"),
    pytest.param(_binary(lambda a, b: a * b), "product", id="mul-same-shape-both-dual"),
    pytest.param(_binary(lambda a, b: a * b, a_shape=(3, 4, 7, 5), b_shape=(3, 4, 1, 5)), "product", id="mul-split-channels-both-dual"),
    pytest.param(_binary(lambda a, p: a + p, plain_b=True, a_shape=(3, 6, 1, 1), b_shape=(3, 6, 7, 5)), "affine",
                 id="add-broadcast-dual-BC11-plain-BCHW"),
    pytest.param(_binary(lambda a, b: 1.0 - a - b, b_shape=(7, 5)), "affine", id="rsub-sub-both-dual"),
    pytest.param(_binary(lambda a, p: a @ p, plain_b=True, a_shape=(3, 7, 5), b_shape=(5, 4)), "product",
                 id="matmul-plain-weight"),
    pytest.param(_where(True), "affine", id="where-both-dual"),
    pytest.param(_where(False), "affine", id="where-plain-other"),
    pytest.param(_masked_fill, "affine", id="masked_fill"),
    pytest.param(_unary(lambda x: F.pad(x, (1, 2, 0, 1), value=0.5)), "affine", id="pad-constant"),
    pytest.param(_unary(lambda x: F.pad(x, (1, 2, 2, 1), mode="reflect"), shape=(3, 2, 7, 5)), "affine", id="pad-reflect"),
    pytest.param(_unary(lambda x: F.interpolate(x, scale_factor=2, mode="nearest"), shape=(3, 2, 7, 5)), "linear",
                 id="interpolate-nearest"),
    pytest.param(_unary(lambda x: F.interpolate(x, size=(9, 6), mode="bilinear", align_corners=False), shape=(3, 2, 7, 5)),
                 "linear", id="interpolate-bilinear"),
    pytest.param(_unary(lambda x: F.avg_pool2d(x, 2), shape=(3, 2, 7, 5)), "linear", id="avg_pool2d-k2"),
    pytest.param(_unary(lambda x: F.avg_pool2d(x, 3, stride=1, padding=1), shape=(1, 2, 7, 5)), "linear", id="avg_pool2d-k3-p1"),
    pytest.param(_binary(lambda a, p: torch.cat([a, p], dim=1), plain_b=True, b_shape=(3, 2, 5)), "linear", id="cat-with-plain"),
    pytest.param(_binary(lambda a, p: torch.stack([p, a], dim=-1), plain_b=True), "linear", id="stack-with-plain"),
    pytest.param(_addcmul_edm, "product", id="addcmul-all-dual"),
    pytest.param(_addcmul_plain, "product", id="addcmul-value-plain-tensor2"),
    # no sgflow rule: PyTorch's forward AD for that one op
    pytest.param(_fallback(torch.erf), "forward-ad", id="fallback-erf"),
    pytest.param(_fallback(torch.atan), "forward-ad", id="fallback-atan"),
]


def _reference_fn(fn, params):
    def ref(*primals):
        with decomposed():  # norms / SDPA from primitives: their higher derivatives are right
            return fn(*primals, *params)

    return ref


class _CountAttention:
    """Stands in for sgflow.ops.attention.attention_dual and counts its calls."""

    def __init__(self):
        self.calls = 0
        self.inner = ops_attention.attention_dual

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.inner(*args, **kwargs)


def _round(ts, dtype):
    """The values representable in ``dtype``, as float64 leaves (the reference runs on exactly these)."""
    return [t.detach().to(dtype).to(D64) for t in ts]


def _run_op(build, dtype):
    """(reference, dual, rows): output, tangent and gradients of both, and the rules the dual path took."""
    gen = torch.Generator().manual_seed(SEED)
    fn, primals, params = build(gen)
    tangents = [_r(gen, *p.shape) for p in primals]
    primals, tangents, params = _round(primals, dtype), _round(tangents, dtype), _round(params, dtype)
    params64 = [p.clone().requires_grad_(True) for p in params]
    y_ref, yd_ref, (g, g_dot), grads_ref = jvp_reference(_reference_fn(fn, params64), primals, tangents, params64, seed=SEED)
    with torch.no_grad():
        y_torch = fn(*primals, *params)  # PyTorch's own op, as the user's forward computes it

    params_dt = [p.to(dtype).requires_grad_(True) for p in params]
    rows: dict = {}
    n = len(primals)

    def dual_fn(*args):
        return dual_call(lambda *ps: fn(*ps, *params_dt), args[:n], args[n:], (), rows)

    try:
        y, yd, grads = dual_grads(dual_fn, [p.to(dtype) for p in primals], [t.to(dtype) for t in tangents], params_dt,
                                  (g.to(dtype), g_dot.to(dtype)))
    except RecursionError:
        pytest.fail("the dual forward recursed without end (RecursionError)")
    like = [*primals, *tangents, *params]
    names = [f"primal{i}" for i in range(n)] + [f"tangent{i}" for i in range(n)] + [f"param{i}" for i in range(len(params))]
    return dict(y=y_ref, yd=yd_ref, grads=grads_ref, y_torch=y_torch, like=like, names=names), dict(y=y, yd=yd, grads=grads), rows


@pytest.mark.parametrize("dtype", OP_DTYPES)
@pytest.mark.parametrize("build,kind", OP_CASES)
def test_rule_matches_jvp_reference(build, kind, dtype, monkeypatch):
    counter = _CountAttention()
    monkeypatch.setattr(ops_attention, "attention_dual", counter)
    ref, got, rows = _run_op(build, dtype)
    tol = OP_TOL[dtype]

    # Non-trivial reference: a non-zero tangent, and every input, tangent and parameter matters.
    assert ref["yd"].abs().max() > 0
    zero = [nm for nm, gr in zip(ref["names"], ref["grads"]) if gr is None or not gr.abs().max() > 0]
    assert zero == [], f"reference gradients identically zero: {zero}"

    assert got["y"].dtype == dtype and got["yd"].dtype == dtype
    assert rel_err(ref["y"], ref["y_torch"]) <= 1e-12, "the reference's decomposition differs from PyTorch's op"
    assert rel_err(got["y"], ref["y"]) <= tol, "primal"
    assert rel_err(got["yd"], ref["yd"]) <= tol, "tangent"
    errors = grad_errors(got["grads"], ref["grads"], ref["like"], ref["names"])
    bad = {k: v for k, v in errors.items() if not v <= tol}
    assert bad == {}, f"gradient errors above {tol:g}: {bad}"

    # The op took the rule it is meant to take.
    kinds = set(rows.values())
    if kind == "rule:attention":
        assert any(k.startswith("rule:attention") for k in kinds), rows
        assert counter.calls == 1, f"the dual attention op ran {counter.calls} times, expected once: {rows}"
        assert "forward-ad" not in kinds, f"unexpected fallback to forward AD: {rows}"
    elif kind == MATH_SDPA:
        assert "rule:attention" in kinds and "forward-ad" not in kinds, rows
    elif kind is not None:
        assert kind in kinds, rows
        if kind != "forward-ad":
            assert "forward-ad" not in kinds, f"unexpected fallback to forward AD: {rows}"


def test_batch_norm_train_updates_running_stats_like_pytorch():
    """The dual batch-norm rule updates running statistics from the primal, as F.batch_norm does."""
    gen = torch.Generator().manual_seed(SEED)
    x, xd = _r(gen, 3, 6, 7, 5) + 0.3, _r(gen, 3, 6, 7, 5)
    bn_dual = nn.BatchNorm2d(6, momentum=0.3).double().train()
    bn_torch = copy.deepcopy(bn_dual)
    y, yd = dual_call(bn_dual, (x,), (xd,))
    with torch.no_grad():
        y_torch = bn_torch(x)
    assert rel_err(y, y_torch) <= 1e-12
    assert yd.abs().max() > 0
    assert not torch.equal(bn_dual.running_mean, torch.zeros(6, dtype=D64))
    assert rel_err(bn_dual.running_mean, bn_torch.running_mean) <= 1e-12
    assert rel_err(bn_dual.running_var, bn_torch.running_var) <= 1e-12
    assert int(bn_dual.num_batches_tracked) == int(bn_torch.num_batches_tracked) == 1


class _Fallbacks(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 5)
        self.act = _ErfAtan()

    def forward(self, t, u, x):
        return self.act(self.lin(x) * (1 + t[:, None]))


class _ErfAtan(nn.Module):
    def forward(self, h):
        return torch.erf(h) + torch.atan(h)


def test_fallback_ops_listed_in_report_and_correct():
    torch.manual_seed(SEED)
    model = _Fallbacks().double()
    dual = sgflow.dualize(model)
    gen = torch.Generator().manual_seed(SEED)
    t, u, x = _r(gen, 3, lo=0.0) * 0.5, _r(gen, 3, lo=0.0) * 0.5 + 0.5, _r(gen, 3, 5)
    report = dual.report(t, u, x)
    fallbacks = report.fallbacks()
    assert ("act", "torch.erf") in fallbacks and ("act", "torch.atan") in fallbacks, fallbacks
    assert all(path == "act" for path, _ in fallbacks), fallbacks
    assert report.kinds()["forward-ad"] == len(fallbacks)
    # ... and the fallback's tangent and gradients are right through a whole loss.
    _assert_fused_equals_reference(dual, model, gen_batch((3, 5), seed=SEED), 1e-10)


# ---------------------------------------------------------------------------------------------------
# 2. Networks: fused (dualized) vs reference gradients
# ---------------------------------------------------------------------------------------------------


def gen_batch(shape, seed, both_terms=False):
    """x1 and explicit noise / t / u / split (float64) for a batch of ``shape``; rows 0 / 1 take terms 1 / 2."""
    g = torch.Generator().manual_seed(seed)
    n = shape[0]
    x1 = torch.randn(shape, dtype=D64, generator=g)
    noise = torch.randn(shape, dtype=D64, generator=g)
    t = torch.rand(n, dtype=D64, generator=g) * 0.7
    u = torch.clamp(t + 0.1 + torch.rand(n, dtype=D64, generator=g) * 0.5, max=1.0)
    kw = dict(noise=noise, t=t, u=u)
    if both_terms:
        kw["both_terms"] = True
    else:
        split = torch.rand(n, generator=g) < 0.5
        split[0] = True
        if n > 1:
            split[1] = False
        kw["split"] = split
    return x1, kw


def _params(model):
    return [p for p in model.parameters() if p.requires_grad]


def _flat(grads, like):
    return torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for g, p in zip(grads, like)])


def _assert_fused_equals_reference(fused_model, model, batch, tol, extra_params=()):
    """fused_loss(fused_model) vs sgflow_loss(model): loss, terms, the full gradient vector (``tol``
    relative) and a non-zero reference gradient for every parameter tensor (and every ``extra_params``)."""
    x1, kw = batch
    params = _params(model) + list(extra_params)
    names = [n for n, p in model.named_parameters() if p.requires_grad] + [f"extra{i}" for i in range(len(extra_params))]
    loss_ref, info_ref = sgflow.sgflow_loss(model, x1, **kw)
    g_ref = torch.autograd.grad(loss_ref, params, allow_unused=True)
    loss_f, info_f = sgflow.fused_loss(fused_model, x1, **kw)
    g_f = torch.autograd.grad(loss_f, params, allow_unused=True)
    zero = [n for n, g in zip(names, g_ref) if g is None or not g.abs().max() > 0]
    assert zero == [], f"reference gradient identically zero for {zero}"
    missing = [n for n, g in zip(names, g_f) if g is None]
    assert missing == [], f"fused path gave no gradient to {missing}"
    assert rel_err(loss_f, loss_ref) <= tol
    for key in ("term1", "term2"):
        assert rel_err(info_f[key], info_ref[key]) <= tol, key
    err = rel_err(_flat(g_f, params), _flat(g_ref, params))
    assert err <= tol, f"fused vs reference gradient: {err:.3e}"
    per_tensor = {n: rel_err(a, b) for n, a, b in zip(names, g_f, g_ref)}
    worst = max(per_tensor, key=per_tensor.get)
    assert per_tensor[worst] <= 1e3 * tol, (worst, per_tensor[worst])
    return err, g_ref


def _sgflow_nn(config, shape, **kw):
    from sgflow.nn import build_model

    return build_model(config, shape, **kw)


# (builder of the float64 model, batch shape, through sgflow.dualize() explicitly, both_terms)
NETWORKS = [
    pytest.param(lambda: testnets.build("adm", (3, 8, 8)), (3, 3, 8, 8), False, False, id="adm-3x8x8-b3"),
    pytest.param(lambda: testnets.build("edm", (3, 8, 8)), (3, 3, 8, 8), False, True, id="edm-3x8x8-b3-both-terms"),
    pytest.param(lambda: testnets.build("dit", (3, 8, 8)), (3, 3, 8, 8), False, False, id="dit-3x8x8-b3"),
    pytest.param(lambda: testnets.build("mlp", (5,)), (3, 5), False, False, id="attnmlp-d5-b3"),
    pytest.param(lambda: testnets.build("mlp", (5,), n_tokens=8), (1, 5), False, True, id="attnmlp-d5-b1-both-terms"),
    pytest.param(lambda: _sgflow_nn("tiny", (3, 7, 5), zero_init=False), (3, 3, 7, 5), True, False, id="sgflow-tiny-unet-7x5-b3"),
    pytest.param(lambda: _sgflow_nn("mlp", (5,)), (3, 5), True, False, id="sgflow-mlp-d5-b3"),
]


@pytest.mark.parametrize("make,shape,explicit,both_terms", NETWORKS)
def test_network_fused_equals_reference_float64(make, shape, explicit, both_terms, monkeypatch):
    torch.manual_seed(SEED)
    model = make().double()
    assert not hasattr(model, "dual_forward")  # sgflow.nn's networks too: one forward each
    # Through sgflow.dualize(model), or fused_loss dualizing a plain model itself.
    fused_model = sgflow.dualize(model) if explicit else model
    batch = gen_batch(shape, seed=11, both_terms=both_terms)
    err, _ = _assert_fused_equals_reference(fused_model, model, batch, 1e-10)
    dual = fused_model if explicit else as_dual_model(model)
    assert isinstance(dual, sgflow.DualizedModel) and dual.blocks, "no recomputed blocks were chosen"
    assert dual.last_report is not None and dual.last_report.rows
    print(f"fused vs reference: {err:.2e}")


@pytest.mark.parametrize("make,shape", [
    pytest.param(lambda: testnets.build("adm", (3, 8, 8)), (3, 3, 8, 8), id="adm"),
    pytest.param(lambda: _sgflow_nn("tiny", (3, 7, 5), zero_init=False), (3, 3, 7, 5), id="sgflow-tiny-unet-7x5"),
])
def test_selective_save_matmul_equals_reference_float64(make, shape):
    """save="matmul" (selective checkpointing keeps the convolution outputs) through the fused
    GroupNorm-SiLU-conv stage with a conv bias: the cached convolution output must not be mutated by the
    bias add (it was: 'Tensor cached during selective activation checkpoint has been mutated')."""
    torch.manual_seed(SEED)
    model = make().double()
    fused_model = sgflow.dualize(model, save="matmul")
    batch = gen_batch(shape, seed=13, both_terms=False)
    _assert_fused_equals_reference(fused_model, model, batch, 1e-10)
    assert any("fused stage" in kind for kind in fused_model.last_report.rows.values()), "the stage rule did not run"


@pytest.mark.parametrize("blocks", ["auto", "none"])
def test_sgflow_nn_dropout_stage_fuses_and_equals_reference(blocks):
    """sgflow.nn's stage draws its own dropout mask and applies it with sgflow.ops.apply_dropout_mask:
    dualized, GroupNorm -> SiLU -> mask -> Conv2d runs as ONE fused stage op with that mask (before, the
    mask product and the conv's stacked input were kept for backward), and the gradients equal the
    reference in train mode (the same masks on both paths, replayed in recomputed blocks)."""
    torch.manual_seed(SEED)
    model = _sgflow_nn("tiny", (3, 8, 8), dropout=0.3, zero_init=False).double().train()
    fused_model = sgflow.dualize(model, blocks=blocks)
    batch = gen_batch((3, 3, 8, 8), seed=14, both_terms=False)
    x1, kw = batch
    torch.manual_seed(123)
    loss_ref, _ = sgflow.sgflow_loss(model, x1, **kw)
    params = list(model.parameters())
    g_ref = torch.autograd.grad(loss_ref, params)
    torch.manual_seed(123)
    loss_f, _ = sgflow.fused_loss(fused_model, x1, **kw)
    g_f = torch.autograd.grad(loss_f, params)
    assert rel_err(loss_f, loss_ref) < 1e-10
    assert rel_err(_flat(g_f, params), _flat(g_ref, params)) < 1e-10
    rows = fused_model.last_report.rows
    stage2 = {path: kind for (path, op), kind in rows.items() if path.endswith("stage2.conv")}
    assert stage2 and all("fused stage" in k for k in stage2.values()), stage2


AUDITED = [
    pytest.param(lambda: testnets.build("adm", (3, 8, 8)), (3, 3, 8, 8), id="adm"),
    pytest.param(lambda: testnets.build("dit", (3, 8, 8)), (3, 3, 8, 8), id="dit"),
    pytest.param(lambda: sgflow.dualize(_sgflow_nn("tiny", (3, 7, 5), zero_init=False)), (3, 3, 7, 5), id="sgflow-tiny-unet-7x5"),
]


@pytest.mark.parametrize("make,shape", AUDITED)
def test_network_audit_against_finite_differences(make, shape):
    torch.manual_seed(SEED)
    model = make()
    x1 = torch.randn(shape, generator=torch.Generator().manual_seed(12), dtype=D64)
    audit_network(model, x1)


@pytest.mark.parametrize("make,shape", [
    pytest.param(lambda: testnets.build("adm", (3, 8, 8)), (3, 3, 8, 8), id="adm"),
    pytest.param(lambda: testnets.build("dit", (3, 8, 8)), (3, 3, 8, 8), id="dit"),
    pytest.param(lambda: testnets.build("edm", (3, 8, 8)), (1, 3, 8, 8), id="edm-b1"),
])
def test_network_float32_fused_tracks_float64_reference(make, shape):
    torch.manual_seed(SEED)
    model64 = make().double()
    model32 = copy.deepcopy(model64).float()
    x1, kw = gen_batch(shape, seed=13)
    # The float64 reference runs on the float32-representable batch and weights.
    x1 = x1.float().double()
    kw = {k: (v.float().double() if v.is_floating_point() else v) for k, v in kw.items()}
    with torch.no_grad():
        for p in model64.parameters():
            p.copy_(p.float().double())
    loss64, _ = sgflow.sgflow_loss(model64, x1, **kw)
    g64 = _flat(torch.autograd.grad(loss64, _params(model64)), _params(model64))
    kw32 = {k: (v.float() if v.is_floating_point() else v) for k, v in kw.items()}
    loss32, _ = sgflow.fused_loss(model32, x1.float(), **kw32)
    g32 = _flat(torch.autograd.grad(loss32, _params(model32)), _params(model32))
    assert loss32.dtype == F32 and g32.dtype == F32
    assert g64.abs().max() > 0
    err = rel_err(g32, g64)
    print(f"float32 fused vs float64 reference: {err:.2e}")
    assert err <= 1e-4
    assert rel_err(loss32, loss64) <= 1e-4


def test_fused_meanflow_on_plain_testnet_equals_meanflow_loss():
    torch.manual_seed(SEED)
    model = testnets.build("mlp", (5,)).double()
    x1, kw = gen_batch((3, 5), seed=14)
    kw.pop("split")
    params = _params(model)
    loss_ref, _ = sgflow.meanflow_loss(model, x1, **kw)
    g_ref = torch.autograd.grad(loss_ref, params)
    loss_f, _ = sgflow.fused_meanflow_loss(model, x1, **kw)
    g_f = torch.autograd.grad(loss_f, params)
    assert isinstance(as_dual_model(model), sgflow.DualizedModel)
    assert all(g.abs().max() > 0 for g in g_ref)
    assert rel_err(loss_f, loss_ref) <= 1e-10
    assert rel_err(_flat(g_f, params), _flat(g_ref, params)) <= 1e-10


# ---------------------------------------------------------------------------------------------------
# 3. User-side features: adapters, hooks, state_dict, patches, deepcopy
# ---------------------------------------------------------------------------------------------------


class LoRALinear(nn.Module):
    """A LoRA-style adapter living in forward: base(x) + scale * B(A(x))."""

    def __init__(self, base: nn.Linear, rank: int = 2, scale: float = 0.5):
        super().__init__()
        self.base = base
        self.A = nn.Linear(base.in_features, rank, bias=False)
        self.B = nn.Linear(rank, base.out_features, bias=False)
        nn.init.normal_(self.B.weight, std=0.2)  # non-zero so that A gets a gradient too
        self.scale = scale

    def forward(self, x):
        return self.base(x) + self.B(self.A(x)) * self.scale


def _dit_with_adapter_and_hooks():
    torch.manual_seed(SEED)
    model = testnets.build("dit", (3, 8, 8))
    model.blocks[0].attn.qkv = LoRALinear(model.blocks[0].attn.qkv)
    model = model.double()
    hook_scale = nn.Parameter(torch.tensor(0.3, dtype=D64))
    outside = nn.Linear(32, 32).double()  # a module that is not part of the network
    # Inside a recomputed block (blocks.1 is one): the hook runs in the block's recomputation too.
    model.blocks[1].mlp.register_forward_hook(lambda mod, args, out: out + hook_scale * out.mean(dim=-1, keepdim=True))
    # On a recomputed block itself, with a parameter of the outside module.
    model.blocks[0].register_forward_hook(lambda mod, args, out: out + 0.1 * torch.tanh(outside(out)))
    return model, [hook_scale, *outside.parameters()]


def test_lora_adapter_and_forward_hooks_get_reference_gradients():
    model, extra = _dit_with_adapter_and_hooks()
    dual = sgflow.dualize(model, blocks="all")  # the hooked and adapted blocks are recomputed
    assert "blocks.0" in dual.blocks and "blocks.1" in dual.blocks, dual.blocks
    lora = dict(model.named_parameters())
    assert "blocks.0.attn.qkv.A.weight" in lora and "blocks.0.attn.qkv.B.weight" in lora
    _, g_ref = _assert_fused_equals_reference(dual, model, gen_batch((3, 3, 8, 8), seed=15), 1e-10, extra_params=extra)
    assert all(g.abs().max() > 0 for g in g_ref[-len(extra):])


def test_state_dict_keys_are_the_models_under_module_prefix():
    torch.manual_seed(SEED)
    model = testnets.build("adm", (3, 8, 8))
    dual = sgflow.dualize(model)
    assert list(dual.state_dict()) == [f"module.{k}" for k in model.state_dict()]
    assert [n for n, _ in dual.named_parameters()] == [f"module.{n}" for n, _ in model.named_parameters()]
    # The plain model is unchanged by being dualized through fused_loss (the cache is not a submodule).
    keys = list(model.state_dict())
    sgflow.fused_loss(model, torch.randn(1, 3, 8, 8))
    assert list(model.state_dict()) == keys


def _patched_modules(model):
    return [name for name, m in model.named_modules() if "forward" in m.__dict__]


def test_patches_removed_deepcopy_works_and_dualized_once():
    torch.manual_seed(SEED)
    model = testnets.build("edm", (3, 8, 8)).double()
    assert _patched_modules(model) == []
    x1, kw = gen_batch((3, 3, 8, 8), seed=16)
    loss, _ = sgflow.fused_loss(model, x1, **kw)
    assert _patched_modules(model) == []
    loss.backward()  # the recomputation in backward runs the original forwards
    assert _patched_modules(model) == []
    assert all(p.grad is not None for p in model.parameters())

    dual = as_dual_model(model)
    assert dual is as_dual_model(model)
    assert model.__dict__["_sgflow_dualized"] is dual
    sgflow.fused_loss(model, x1, **kw)
    assert as_dual_model(model) is dual, "the model was dualized again"
    assert "_sgflow_dualized" not in dict(model.named_modules())

    clone = copy.deepcopy(model)
    assert _patched_modules(clone) == []
    t, u = kw["t"], kw["u"]
    with torch.no_grad():
        assert torch.equal(clone(t, u, x1), model(t, u, x1))
    clone_dual = as_dual_model(clone)
    assert clone_dual.module is clone and clone_dual is not dual
    l_clone, _ = sgflow.fused_loss(clone, x1, **kw)
    l_orig, _ = sgflow.fused_loss(model, x1, **kw)
    assert rel_err(l_clone, l_orig) <= 1e-14


def test_patches_removed_after_a_dualize_error():
    model = _ErrorNet("iadd-view").double()
    with pytest.raises(sgflow.DualizeError):
        sgflow.fused_loss(model, torch.randn(3, 4, dtype=D64))
    assert _patched_modules(model) == []
    assert model(torch.zeros(3, dtype=D64), torch.ones(3, dtype=D64), torch.randn(3, 4, dtype=D64)).shape == (3, 4)


# ---------------------------------------------------------------------------------------------------
# 4. Bad input: sgflow.DualizeError naming the op and the module path
# ---------------------------------------------------------------------------------------------------


class _NoJVP(torch.autograd.Function):
    """A custom autograd.Function with a backward and no jvp (so no forward AD)."""

    @staticmethod
    def forward(ctx, x):
        return x * 2.0

    @staticmethod
    def backward(ctx, g):
        return g * 2.0


class _ErrorBlock(nn.Module):
    def __init__(self, mode):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.mode = mode

    def forward(self, h):
        h = self.lin(h)
        if self.mode == "iadd-view":
            v = h[:, :2]
            h += 1.0
            h = h + v.sum(1, keepdim=True)
        elif self.mode == "view-iadd":
            h[:, :2] += 1.0
        elif self.mode == "copy":
            h.copy_(h.detach())
        elif self.mode == "if-compare":
            if h.sum() > 0:
                h = h * 2.0
        elif self.mode == "if-tensor":
            if h.sum():
                h = h * 2.0
        elif self.mode == "item":
            h = h * h.abs().max().item()
        elif self.mode == "custom-function-no-jvp":
            h = _NoJVP.apply(h)
        elif self.mode == "cdist-no-forward-ad":
            h = h * torch.cdist(h.unsqueeze(1), h.unsqueeze(1) + 1.0).reshape(-1, 1)
        return torch.tanh(h)


class _ErrorNet(nn.Module):
    def __init__(self, mode):
        super().__init__()
        self.inp = nn.Linear(4, 4)
        self.blocks = nn.ModuleList([nn.Identity(), _ErrorBlock(mode)])

    def forward(self, t, u, x):
        h = self.inp(x) * (1 + t[:, None])
        for block in self.blocks:
            h = block(h)
        return h


@pytest.mark.parametrize("mode,op", [
    pytest.param("iadd-view", r"(__iadd__|add_).*shares its storage", id="x+=y-with-a-view-of-x"),
    pytest.param("view-iadd", r"(__iadd__|add_|__setitem__)", id="view+=y"),
    pytest.param("copy", r"copy_", id="x.copy_"),
    pytest.param("if-compare", r"(__bool__|__gt__|\bgt\b)", id="if-h.sum()>0"),
    pytest.param("if-tensor", r"__bool__", id="if-h.sum()"),
    pytest.param("item", r"item", id="item"),
    pytest.param("custom-function-no-jvp", r"(_NoJVP|apply)", id="custom-autograd-function-without-jvp"),
    pytest.param("cdist-no-forward-ad", r"cdist", id="op-without-forward-ad"),
])
def test_bad_input_raises_dualize_error_naming_op_and_module(mode, op):
    model = _ErrorNet(mode).double()
    assert "blocks.1" in sgflow.dualize(model).blocks
    x1, kw = gen_batch((3, 4), seed=17)
    with pytest.raises(sgflow.DualizeError) as info:
        loss, _ = sgflow.fused_loss(model, x1, **kw)
        loss.backward()
    msg = str(info.value)
    assert "'blocks.1'" in msg, msg
    assert re.search(op, msg), msg
    assert _patched_modules(model) == []


def _fused_vs_reference(model, dual, shape, seed):
    """fused_loss(dual) against sgflow_loss(model) (torch.func.jvp) on a float64 batch: (relative error of
    the loss, largest relative error of a parameter's gradient)."""
    x1, kw = gen_batch(shape, seed=seed)
    params = list(model.parameters())
    loss_ref, _ = sgflow.sgflow_loss(model, x1, **kw)
    g_ref = torch.autograd.grad(loss_ref, params)
    loss, _ = sgflow.fused_loss(dual, x1, **kw)
    g = torch.autograd.grad(loss, params)
    return rel_err(loss, loss_ref), max(rel_err(a, b) for a, b in zip(g, g_ref))


@pytest.mark.parametrize("blocks", [["blocks.0.mlp.act"], ["blocks.0.mlp.fc1", "blocks.1.mlp.act"], ["blocks.0.mlp"], "all"],
                         ids=["act-alone", "fc1-and-act-apart", "mlp", "all"])
def test_activation_recomputed_by_its_linear_across_block_boundaries(blocks):
    """A DiT MLP's GELU is a lazy node that fc2 recomputes (PointwiseLinearDual). With the GELU module itself
    recomputed, or its input's linear layer in another recomputed block, the node crosses a checkpoint:
    loss and gradients still equal the torch.func.jvp reference (float64)."""
    torch.manual_seed(0)
    model = testnets.build("dit", (3, 8, 8), depth=2, hidden_size=32, patch_size=2).double()
    dual = sgflow.dualize(model, blocks=blocks)
    err_loss, err_grad = _fused_vs_reference(model, dual, (4, 3, 8, 8), seed=1)
    assert err_loss < 1e-10 and err_grad < 1e-10


class _InplaceBlock(nn.Module):
    """In-place ops users write: ``x += y``, ``x *= s``, ``x.mul_(s)``, ``F.silu(x, inplace=True)``,
    ``nn.ReLU(inplace=True)``, and a second Python reference to the tensor taken before the op."""

    def __init__(self, mutate_input=False):
        super().__init__()
        self.l1, self.l2 = nn.Linear(6, 6), nn.Linear(6, 6)
        self.act = nn.ReLU(inplace=True)
        self.mutate_input = mutate_input

    def forward(self, h):
        if self.mutate_input:
            h += 1.0
        y = F.silu(self.l1(h), inplace=True)
        y *= 1.5
        y += h
        kept = [y]
        y.mul_(0.5)
        out = self.act(self.l2(kept[0])) + y
        return out.clamp_(-2.0, 2.0)


class _InplaceNet(nn.Module):
    def __init__(self, mutate_input=False):
        super().__init__()
        self.inp, self.out = nn.Linear(4, 6), nn.Linear(6, 4)
        self.blocks = nn.ModuleList([_InplaceBlock(), _InplaceBlock(mutate_input)])

    def forward(self, t, u, x):
        h = self.inp(x) * (1 + t[:, None]) + u[:, None]
        for block in self.blocks:
            h = block(h)
        return self.out(h)


@pytest.mark.parametrize("blocks", ["none", "all", "auto"])
def test_inplace_ops_on_dual_tensors_equal_the_reference(blocks):
    """In-place ops on tensors carrying a tangent (a DualizeError before): the out-of-place op swapped into
    the tensor object (sgflow.autodual.rules.inplace), so the second reference sees the new values as with
    an in-place op. Loss and gradients = the torch.func.jvp reference (float64), with the blocks
    recomputed or not."""
    torch.manual_seed(0)
    model = _InplaceNet().double()
    dual = sgflow.dualize(model, blocks=blocks)
    loss_err, grad_err = _fused_vs_reference(model, dual, (7, 4), seed=17)
    assert loss_err <= 1e-12 and grad_err <= 1e-10, (loss_err, grad_err)
    assert dual.last_report.kinds().get("in-place", 0) >= 5, dual.last_report  # +=, *=, mul_, clamp_, silu, relu


def test_a_block_changing_its_dual_input_in_place_is_not_recomputed():
    """``h += 1`` on a block's dual input changes the caller's tensor when the block runs whole. Recomputed
    (checkpointed), the block gets DualTensors of its own, so the caller's would keep the old values:
    ``blocks="auto"`` never chooses it (the profile sees the input's primal replaced), and naming it in
    ``blocks`` raises (the checkpoint's input is shared with the block's DualTensor, or the block's inputs
    were replaced)."""
    torch.manual_seed(0)
    model = _InplaceNet(mutate_input=True).double()
    dual = sgflow.dualize(model, budget=0.01)
    _, grad_err = _fused_vs_reference(model, dual, (7, 4), seed=17)
    assert "blocks.1" not in dual.blocks and {c.path: c for c in dual.plan.costs}["blocks.1"].mutates_inputs
    assert grad_err <= 1e-10
    x1, kw = gen_batch((7, 4), seed=17)
    with pytest.raises(sgflow.DualizeError, match=r"blocks\.1.*in[- ]place"):
        sgflow.fused_loss(sgflow.dualize(model, blocks=["blocks.1"]), x1, **kw)


class _PendingNodeNet(nn.Module):
    """An in-place op on the input of a lazy node not computed yet (a GroupNorm awaiting its SiLU; attention
    scores awaiting their softmax)."""

    def __init__(self, mode):
        super().__init__()
        self.lin, self.gn, self.mode = nn.Linear(8, 8), nn.GroupNorm(2, 8), mode

    def forward(self, t, u, x):
        h = self.lin(x) * (1 + t[:, None]) + u[:, None]
        if self.mode == "groupnorm":
            h4 = h[:, :, None, None] * 1.0
            y = self.gn(h4)
            h4 += 1.0
            return self.lin(F.silu(y)[:, :, 0, 0] + h4[:, :, 0, 0])
        q = h.view(-1, 2, 4) * 1.0
        scores = q @ (2 * h).view(-1, 2, 4).transpose(-1, -2)
        q += 1.0
        return self.lin((scores.softmax(-1) @ q).reshape(-1, 8))


@pytest.mark.parametrize("mode", ["groupnorm", "scores"])
def test_inplace_on_the_input_of_a_pending_lazy_node_raises(mode):
    """A lazy node keeps DualTensors of its own for its inputs (``attention.frozen``), which share their
    storage, so the in-place op refuses as for any tensor sharing its storage. Without them the node,
    computed after the op, read the input's swapped-in new values, where an eager forward's GroupNorm /
    scores come before the op: silently wrong."""
    model = _PendingNodeNet(mode).double()
    x1, kw = gen_batch((5, 8), seed=3)
    with pytest.raises(sgflow.DualizeError, match=r"add_.*shares its storage"):
        sgflow.fused_loss(sgflow.dualize(model, blocks="none"), x1, **kw)


class _LazyInplaceNet(nn.Module):
    """In-place ops next to lazy nodes (found in review: both were silently wrong, loss off by 30-100%).
    ``scores``: softmax of pending scores, then ``scores.mul_`` (the probabilities, computed later, read the
    new scores). ``gn-query``: a pending GroupNorm used as the query of pending scores, then ``q += 1`` (the
    scores, computed later, read the new query). ``oop=True``: the same written out of place (the reference:
    torch.func.jvp refuses neither, but these are the values an eager forward computes)."""

    def __init__(self, mode, oop=False):
        super().__init__()
        self.lin, self.lin2, self.gn, self.mode, self.oop = nn.Linear(8, 8), nn.Linear(8, 8), nn.GroupNorm(2, 4), mode, oop

    def forward(self, t, u, x):
        h = self.lin(x) * (1 + t[:, None]) + u[:, None]
        if self.mode == "scores":
            q = h.view(-1, 2, 4) * 1.0
            scores = q @ (2 * h).view(-1, 2, 4).transpose(-1, -2)
            p = scores.softmax(-1)
            if self.oop:
                scores = scores * 3.0
            else:
                scores.mul_(3.0)
            return self.lin2(((p * 2.0) @ q).reshape(-1, 8))
        h3 = h.view(-1, 4, 2) * 1.0
        q = self.gn(h3)
        scores = q @ (h3 * 2).transpose(-1, -2)
        if self.oop:
            q = q + 1.0
        else:
            q += 1.0
        return self.lin2((scores.softmax(-1) @ (h3 * 3)).reshape(-1, 8) + q.reshape(-1, 8))


@pytest.mark.parametrize("mode", ["scores", "gn-query"])
def test_inplace_next_to_lazy_nodes_gives_the_out_of_place_values(mode):
    """Lazy nodes hold nodes / DualTensors of their own for their inputs (``attention.frozen``)."""
    torch.manual_seed(0)
    model, twin = _LazyInplaceNet(mode).double(), _LazyInplaceNet(mode, oop=True).double()
    twin.load_state_dict(model.state_dict())
    x1, kw = gen_batch((5, 8), seed=3)
    loss_ref, _ = sgflow.sgflow_loss(twin, x1, **kw)
    g_ref = torch.autograd.grad(loss_ref, list(twin.parameters()), allow_unused=True)
    for blocks in ("none", "auto"):
        loss, _ = sgflow.fused_loss(sgflow.dualize(model, blocks=blocks), x1, **kw)
        g = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
        assert rel_err(loss, loss_ref) <= 1e-12, blocks
        assert [a is None for a in g] == [b is None for b in g_ref], blocks  # the GroupNorm is unused in "scores"
        assert max(rel_err(a, b) for a, b in zip(g, g_ref) if b is not None) <= 1e-10, blocks


class _SavedThenInplaceBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l3 = nn.Linear(6, 6), nn.Linear(6, 6)

    def forward(self, h):
        y = self.l1(h)
        z = torch.relu(y)  # saves y
        y += 1.0
        return self.l3(y) * z


class _SavedThenInplaceNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.out = nn.Linear(4, 6), nn.Linear(6, 4)
        self.blocks = nn.ModuleList([_SavedThenInplaceBlock() for _ in range(2)])

    def forward(self, t, u, x):
        h = self.inp(x) * (1 + t[:, None]) + u[:, None]
        for block in self.blocks:
            h = block(h)
        return self.out(h)


def test_inplace_on_a_saved_tensor_in_a_recomputed_block():
    """``y += 1`` after an op saved y, in a recomputed block: the forward accepted it, and the recomputation
    in backward refused it (checkpoint holds detached aliases of what the block saved, which the storage
    check counted as views; found in review). Now = reference."""
    torch.manual_seed(0)
    model = _SavedThenInplaceNet().double()
    _, grad_err = _fused_vs_reference(model, sgflow.dualize(model, blocks="all"), (7, 4), seed=17)
    assert grad_err <= 1e-10


class _MutatesItsInput(nn.Module):
    def __init__(self, which):
        super().__init__()
        self.lin, self.which = nn.Linear(4, 4), which

    def forward(self, t, u, x):
        (x if self.which == "x" else u).mul_(2.0)
        return self.lin(x) * (1 + t[:, None] + u[:, None])


@pytest.mark.parametrize("which,match", [("x", r"input of the model"), ("u", r"inputs without a tangent in place")])
def test_inplace_on_the_models_own_input_raises(which, match):
    """sgflow calls the model more than once on the same x and u (the profile, the stop-gradient velocity): a
    model changing one in place got different values on each call (found in review). x carries a tangent
    (its rule refuses); u does not (SGFlow's u-tangent is zero: dual_call sees its version change)."""
    x1, kw = gen_batch((5, 4), seed=3)
    with pytest.raises(sgflow.DualizeError, match=match):
        sgflow.fused_loss(sgflow.dualize(_MutatesItsInput(which).double(), blocks="none"), x1, **kw)


class _GnSiluConv(nn.Module):
    def __init__(self, inplace):
        super().__init__()
        self.inp, self.gn = nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8)
        self.act, self.conv = nn.SiLU(inplace=inplace), nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, t, u, x):
        h = self.inp(x) * (1 + t[:, None, None, None]) + u[:, None, None, None]
        return self.conv(self.act(self.gn(h)))


@pytest.mark.parametrize("inplace", [True, False], ids=["SiLU-inplace", "SiLU"])
def test_inplace_silu_after_group_norm_keeps_the_fused_stage(inplace):
    """``nn.SiLU(inplace=True)`` after a GroupNorm (common in U-Nets): the lazy GroupNorm+SiLU node is swapped
    in uncomputed, so the following conv still runs the fused GroupNorm-SiLU-conv stage; = reference."""
    torch.manual_seed(0)
    model = _GnSiluConv(inplace).double()
    dual = sgflow.dualize(model, blocks="none")
    _, grad_err = _fused_vs_reference(model, dual, (3, 3, 5, 7), seed=5)
    assert grad_err <= 1e-10
    assert dual.last_report.kinds().get("rule:group_norm+silu+conv (fused stage op)", 0) == 1, dual.last_report


class _SinWithJVP(torch.autograd.Function):
    """A custom autograd.Function with both backward and jvp (PyTorch's forward AD can run it)."""

    @staticmethod
    def forward(x):
        return torch.sin(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * torch.cos(x)

    @staticmethod
    def jvp(ctx, x_dot):
        (x,) = ctx.saved_tensors
        return x_dot * torch.cos(x)


class _CustomFunctionBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, h):
        return h + _SinWithJVP.apply(self.lin(h))


def test_custom_autograd_function_with_jvp_gets_reference_gradient():
    """An op without an sgflow rule takes PyTorch's forward AD: a custom Function with a jvp included."""
    torch.manual_seed(SEED)
    model = _ErrorNet("none").double()
    model.blocks[1] = _CustomFunctionBlock().double()
    _assert_fused_equals_reference(sgflow.dualize(model), model, gen_batch((3, 4), seed=21), 1e-10)


class _ClosureBlock(nn.Module):
    """Reads a parameter that lives outside the module tree through a closure."""

    def __init__(self, gain: torch.Tensor, mix: torch.Tensor):
        super().__init__()
        self.lin = nn.Linear(6, 6)
        self._gain = lambda: gain
        self._mix = lambda: mix

    def forward(self, h):
        return h + torch.tanh(self.lin(h) * self._gain()) @ self._mix()


class _ClosureNet(nn.Module):
    def __init__(self, gain, mix):
        super().__init__()
        self.inp = nn.Linear(3, 6)
        self.blocks = nn.ModuleList([_ClosureBlock(gain, mix), _ClosureBlock(gain, mix)])
        self.out = nn.Linear(6, 3)

    def forward(self, t, u, x):
        h = self.inp(x) * (1 + t[:, None]) + u[:, None]
        for block in self.blocks:
            h = block(h)
        return self.out(torch.sin(h))


def test_parameter_reached_through_closure_inside_recomputed_block_gets_reference_gradient():
    torch.manual_seed(SEED)
    gain = nn.Parameter(torch.tensor(1.3, dtype=D64))
    mix = nn.Parameter(torch.randn(6, 6, dtype=D64) * 0.5)
    model = _ClosureNet(gain, mix).double()
    assert not any(p is gain or p is mix for p in model.parameters())
    dual = sgflow.dualize(model, blocks="all")
    assert dual.blocks == ["inp", "blocks.0", "blocks.1", "out"]
    _assert_fused_equals_reference(dual, model, gen_batch((3, 3), seed=18), 1e-10, extra_params=[gain, mix])


# ---------------------------------------------------------------------------------------------------
# 5. Dropout, train / eval, autocast
# ---------------------------------------------------------------------------------------------------


def _set_dropout(model, p):
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = p
        if isinstance(m, testnets.UNetBlock):
            m.dropout = p


def _loss_and_grads(fused_model, params, batch, seed):
    x1, kw = batch
    torch.manual_seed(seed)
    loss, _ = sgflow.fused_loss(fused_model, x1, **kw)
    return loss.detach(), _flat(torch.autograd.grad(loss, params), params)


@pytest.mark.parametrize("name", [pytest.param("adm", id="adm-nn.Dropout"), pytest.param("edm", id="edm-F.dropout")])
def test_dropout_masks_replayed_by_recomputation_and_eval_is_p0(name):
    torch.manual_seed(SEED)
    model = testnets.build(name, (3, 8, 8), dropout=0.3).double().train()
    params = _params(model)
    batch = gen_batch((3, 3, 8, 8), seed=19)
    recomputed = sgflow.dualize(model, blocks="all")  # every dropout inside a recomputed block
    kept = sgflow.dualize(model, blocks="none")
    assert recomputed.blocks and kept.blocks == []
    l_rec, g_rec = _loss_and_grads(recomputed, params, batch, seed=7)
    l_keep, g_keep = _loss_and_grads(kept, params, batch, seed=7)
    assert g_keep.abs().max() > 0
    assert rel_err(l_rec, l_keep) <= 1e-12
    assert rel_err(g_rec, g_keep) <= 1e-12, "recomputed blocks drew different dropout masks"

    # Dropout is active in train mode: another seed gives another loss, and p = 0 another still.
    l_other, _ = _loss_and_grads(recomputed, params, batch, seed=8)
    assert rel_err(l_other, l_rec) > 1e-6
    model_p0 = copy.deepcopy(model)
    _set_dropout(model_p0, 0.0)
    l_p0, g_p0 = _loss_and_grads(sgflow.dualize(model_p0), _params(model_p0), batch, seed=7)
    assert rel_err(l_p0, l_rec) > 1e-6

    # eval() is honoured: the p = 0.3 model in eval mode gives the p = 0 result.
    model.eval()
    l_eval, g_eval = _loss_and_grads(recomputed, params, batch, seed=9)
    assert rel_err(l_eval, l_p0) <= 1e-12
    assert rel_err(g_eval, g_p0) <= 1e-12


class _CountDtypes(TorchDispatchMode):
    """Counts convolutions and matrix products by the dtype of their first operand."""

    OPS = {"convolution", "convolution_backward", "mm", "addmm", "bmm"}

    def __init__(self):
        super().__init__()
        self.counts: dict = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.OPS and isinstance(args[0], torch.Tensor):
            key = (name, args[0].dtype)
            self.counts[key] = self.counts.get(key, 0) + 1
        return func(*args, **(kwargs or {}))


def _bf16_errors(model, loss_fn, params):
    """(loss error, gradient error) of ``loss_fn()`` under bf16 autocast vs float32, and the op counts."""
    loss32 = loss_fn()
    g32 = _flat(torch.autograd.grad(loss32, params), params)
    counter = _CountDtypes()
    with counter:
        with torch.autocast("cpu", dtype=BF16):
            loss16 = loss_fn()
        g16 = _flat(torch.autograd.grad(loss16, params), params)
    assert loss16.dtype == F32 and torch.isfinite(loss16) and g16.dtype == F32
    assert torch.isfinite(g16).all()
    return rel_err(loss16, loss32), rel_err(g16, g32), counter.counts


def _float_batch(shape, seed):
    x1, kw = gen_batch(shape, seed=seed)
    return x1.float(), {k: (v.float() if v.is_floating_point() else v) for k, v in kw.items()}


def test_autocast_bf16_adm_runs_in_bf16_with_error_like_pytorch_flow_matching():
    """Under bf16 autocast the dualized ADM runs its convolutions and linears in bf16; its SGFlow gradient
    error (vs float32) is within 2x of PyTorch's own bf16 flow-matching gradient error on the same network
    and batch, and its tangent's elementwise error within 2x of PyTorch's bf16 error of f~ itself.

    (The SGFlow *loss* is a difference of two terms and its time-derivative error is correlated across
    pixels, so its relative error is not comparable to flow matching's; it is compared with the
    hand-written fused path in the next test.)
    """
    torch.manual_seed(SEED)
    model = testnets.build("adm", (3, 8, 8))
    params = _params(model)
    x1, kw = _float_batch((3, 3, 8, 8), seed=20)
    sg_loss_err, sg_grad_err, counts = _bf16_errors(model, lambda: sgflow.fused_loss(model, x1, **kw)[0], params)
    fm_loss_err, fm_grad_err, _ = _bf16_errors(
        model, lambda: sgflow.flow_matching_loss(model, x1, noise=kw["noise"], t=kw["t"])[0], params)

    dual = as_dual_model(model)
    t, u = kw["t"], kw["u"]
    tangents = (torch.ones_like(t), torch.zeros_like(u), torch.randn(x1.shape, generator=torch.Generator().manual_seed(1)))
    with torch.no_grad():
        f32, fd32 = dual.dual_forward(t, u, x1, *tangents)
        with torch.autocast("cpu", dtype=BF16):
            f16, fd16 = dual.dual_forward(t, u, x1, *tangents)
    f_err, fd_err = rel_err(f16, f32), rel_err(fd16, fd32)
    print(f"bf16 vs fp32: SGFlow fused loss {sg_loss_err:.2e} grad {sg_grad_err:.2e}; flow matching loss "
          f"{fm_loss_err:.2e} grad {fm_grad_err:.2e}; f~ {f_err:.2e}, JVP f~ {fd_err:.2e}; ops {counts}")
    n_convs = sum(isinstance(m, (nn.Conv1d, nn.Conv2d)) for m in model.modules())
    assert counts.get(("convolution", BF16), 0) >= n_convs
    assert counts.get(("convolution", F32), 0) == 0, counts
    assert counts.get(("convolution_backward", F32), 0) == 0, counts
    assert counts.get(("addmm", BF16), 0) + counts.get(("mm", BF16), 0) > 0, counts
    assert counts.get(("addmm", F32), 0) + counts.get(("mm", F32), 0) == 0, counts
    assert fm_grad_err > 1e-3 and f_err > 1e-3, "autocast did not reduce precision: the comparison would prove nothing"
    assert sg_grad_err <= 2 * fm_grad_err
    assert fd_err <= 2 * f_err


def test_autocast_bf16_dualized_no_worse_than_handwritten_fused():
    """sgflow.nn's tiny U-Net: the dualized forward's bf16 loss and gradient errors (vs float32) stay
    within 1.5x of those of its hand-written dual_forward on the same batch."""
    torch.manual_seed(SEED)
    model = _sgflow_nn("tiny", (3, 8, 8), zero_init=False)
    params = _params(model)
    x1, kw = _float_batch((3, 3, 8, 8), seed=20)
    hand = _bf16_errors(model, lambda: sgflow.fused_loss(model, x1, **kw)[0], params)
    dual = sgflow.dualize(model)
    auto = _bf16_errors(model, lambda: sgflow.fused_loss(dual, x1, **kw)[0], params)
    print(f"bf16 vs fp32 loss / grad error: hand-written {hand[0]:.2e} / {hand[1]:.2e}, dualized {auto[0]:.2e} / {auto[1]:.2e}")
    assert auto[2].get(("convolution", BF16), 0) > 0 and auto[2].get(("convolution", F32), 0) == 0, auto[2]
    assert hand[1] > 1e-3
    assert auto[0] <= 1.5 * hand[0]
    assert auto[1] <= 1.5 * hand[1]


def _gn_tangent_ref(x, xd, w, b, groups, silu):
    def fn(x):
        with decomposed():
            y = F.group_norm(x, groups, w, b, eps=1e-5)
        return F.silu(y) if silu else y

    return torch.func.jvp(fn, (x,), (xd,))[1]


def _gn_tangent_bf16_naive(x, xd, w, groups):
    """The GroupNorm tangent formula evaluated entirely in bf16 (what fp32 statistics avoid)."""
    n = x.shape[0]
    xs, xds = x.reshape(n, groups, -1), xd.reshape(n, groups, -1)
    xc = xs - xs.mean(-1, keepdim=True)
    r = torch.rsqrt(xc.square().mean(-1, keepdim=True) + 1e-5)
    xh = xc * r
    xhd = r * (xds - xds.mean(-1, keepdim=True) - xh * (xh * xds).mean(-1, keepdim=True))
    return xhd.reshape(x.shape) * w[:, None, None]


@pytest.mark.parametrize("silu", [pytest.param(False, id="group_norm"), pytest.param(True, id="group_norm+silu")])
@pytest.mark.parametrize("autocast", [pytest.param(False, id="bf16-input"), pytest.param(True, id="bf16-input-autocast")])
def test_group_norm_statistics_in_fp32_for_bf16(silu, autocast):
    gen = torch.Generator().manual_seed(SEED)
    c, groups = 63, 9
    x64 = 4.0 + _r(gen, 3, c, 7, 5)  # mean 4: bf16 statistics would lose the centred values' bits
    xd64 = _r(gen, 3, c, 7, 5)
    w64, b64 = 1 + _r(gen, c, scale=0.1), _r(gen, c, scale=0.1)
    xb, xdb, wb, bb = (a.to(BF16) for a in (x64, xd64, w64, b64))
    exact = _gn_tangent_ref(x64, xd64, w64, b64, groups, silu)
    rows: dict = {}

    def fn(x):
        y = F.group_norm(x, groups, wb, bb, eps=1e-5)
        return F.silu(y) if silu else y

    with torch.autocast("cpu", dtype=BF16, enabled=autocast):
        _, yd = dual_call(fn, (xb,), (xdb,), (), rows)
    kinds = set(rows.values())
    assert ("rule:group_norm+silu (fused op)" if silu else "rule:group_norm") in kinds, rows
    # Best possible from the bf16 inputs: the formula in fp64 on the rounded values, rounded to the output dtype.
    best = _gn_tangent_ref(xb.double(), xdb.double(), wb.double(), bb.double(), groups, silu).to(yd.dtype)
    err, err_best = rel_err(yd, exact), rel_err(best, exact)
    print(f"tangent error vs fp64: dual {err:.3e}, fp64 formula on bf16 inputs {err_best:.3e} (output {yd.dtype})")
    assert err_best > 0
    assert err <= 1.3 * err_best
    if not silu:  # the bound is tight enough to tell: bf16 statistics miss it
        assert rel_err(_gn_tangent_bf16_naive(xb, xdb, wb, groups), exact) > 1.3 * err_best


# ---------------------------------------------------------------------------------------------------
# 6. report
# ---------------------------------------------------------------------------------------------------


def test_report_on_adm_names_rules_per_module_path():
    torch.manual_seed(SEED)
    model = testnets.build("adm", (3, 8, 8)).double()
    dual = sgflow.dualize(model)
    gen = torch.Generator().manual_seed(SEED)
    t = _r(gen, 3, lo=0.0) * 0.5
    report = dual.report(t, t + 0.2, _r(gen, 3, 3, 8, 8))
    by_path: dict = {}
    for (path, _), kind in report.rows.items():
        by_path.setdefault(path, set()).add(kind)
    assert "rule:conv-stacked" in by_path["input_blocks.0.0"]
    # GroupNorm -> SiLU -> conv (ADM's output layer): the fused stage op, named at the conv.
    assert "rule:group_norm+silu+conv (fused stage op)" in by_path["out.2"]
    assert "rule:group_norm+silu+conv (fused stage op)" in by_path["middle_block.0.in_layers.2"]
    assert "rule:linear-stacked" in by_path["time_embed.0"]
    # GroupNorm followed directly by SiLU: the fused op, named at the SiLU's module path.
    assert "rule:group_norm+silu (fused op)" in by_path["out.1"]
    assert "rule:group_norm+silu (fused op)" in by_path["middle_block.0.in_layers.1"]
    # The scale-shift GroupNorm (ADM out_layers) is not followed by SiLU directly: the plain rule.
    assert "rule:group_norm" in by_path["middle_block.0.out_layers.0"]
    assert "rule:attention" in by_path["middle_block.1"]
    kinds = report.kinds()
    assert kinds["rule:attention"] == sum(isinstance(m, testnets.AttentionBlock) for m in model.modules())
    assert report.blocks == dual.blocks and "middle_block" in report.blocks
    text = str(report)
    for needle in ("middle_block.1", "rule:attention", "out.1", "rule:group_norm+silu (fused op)",
                   "rule:conv-stacked", f"{len(dual.blocks)} recomputed blocks"):
        assert needle in text, needle
    assert len(text.splitlines()) >= len(report.rows)


class _GNSiLUDropConv(nn.Module):
    """GroupNorm -> SiLU -> Dropout -> Conv2d: the stage the dual path runs as one fused op."""

    def __init__(self, c=6, groups=3, p=0.4):
        super().__init__()
        self.norm, self.drop, self.conv = nn.GroupNorm(groups, c), nn.Dropout(p), nn.Conv2d(c, 5, 3, padding=1)

    def forward(self, x):
        return self.conv(self.drop(F.silu(self.norm(x))))


@pytest.mark.parametrize("train", [pytest.param(True, id="dropout-active"), pytest.param(False, id="eval")])
def test_fused_gn_silu_dropout_conv_stage_matches_jvp_with_the_same_mask(train):
    from sgflow.autodual import dual_call

    torch.manual_seed(SEED)
    m = _GNSiLUDropConv().double().train(train)
    gen = torch.Generator().manual_seed(SEED)
    x, xd = _r(gen, 2, 6, 7, 5), _r(gen, 2, 6, 7, 5)
    torch.manual_seed(123)
    rows: dict = {}
    y, yd = dual_call(m, (x,), (xd,), report=rows)
    assert any("fused stage op" in k for k in rows.values()), rows
    # The fused op draws one bool keep-mask of x's shape from the global generator: replay it.
    torch.manual_seed(123)
    p = m.drop.p
    keep = torch.empty(x.shape, dtype=torch.bool).bernoulli_(1 - p) if train else torch.ones_like(x, dtype=torch.bool)
    scale = 1 / (1 - p) if train else 1.0

    def ref_fn(x):
        return m.conv(F.silu(m.norm(x)) * keep * scale)

    y_ref, yd_ref = torch.func.jvp(ref_fn, (x,), (xd,))
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(yd, yd_ref, rtol=1e-12, atol=1e-12)
    c, cd = torch.randn_like(y), torch.randn_like(yd)  # cotangents of y and y_dot
    g = torch.autograd.grad((y * c).sum() + (yd * cd).sum(), list(m.parameters()))
    g_ref = torch.autograd.grad((y_ref * c).sum() + (yd_ref * cd).sum(), list(m.parameters()))
    for a, b in zip(g, g_ref):
        assert b.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_function_apply_is_pytorchs_own_outside_dual_forwards():
    # Custom autograd Functions are routed to the dual dispatch only while a dual forward or a block's
    # recomputation runs; compiled and other code never sees a patched Function.apply.
    # PyTorch's own object (a Python classmethod up to torch 2.13, a C classmethod_descriptor from
    # 2.14): the one autodual saw at import, not its hook.
    from sgflow.autodual import tensor as autodual_tensor
    pytorch_apply = torch.autograd.Function.__dict__["apply"]
    assert pytorch_apply is autodual_tensor._ORIG_APPLY
    assert "sgflow" not in str(getattr(pytorch_apply, "__func__", pytorch_apply))
    torch.manual_seed(SEED)
    model = testnets.build("mlp", (2,)).double()
    x1 = torch.randn(3, 2, dtype=torch.float64)
    loss, _ = sgflow.fused_loss(model, x1)
    assert torch.autograd.Function.__dict__["apply"] is pytorch_apply
    loss.backward()  # the blocks' recomputation (hook on for its duration) and after it
    assert torch.autograd.Function.__dict__["apply"] is pytorch_apply


@pytest.mark.parametrize("make,shape,out_numel", [
    pytest.param(lambda: nn.Linear(63, 5), (32, 63), 32 * 5, id="linear-63to5-b32"),
    pytest.param(lambda: nn.Conv2d(16, 2, 3, padding=1), (4, 16, 7, 5), 4 * 2 * 7 * 5, id="conv-16to2-7x5-b4"),
])
def test_dual_conv_and_linear_allocate_only_their_two_outputs(make, shape, out_numel):
    """Primal and tangent through a conv / linear: the forward allocates the two outputs and nothing of
    the inputs' size (a product over the stacked rows [x; x_dot] copies both inputs first: with 63 -> 5
    features that copy is 12x the outputs)."""
    from sgflow.memory import PeakTensorBytes

    torch.manual_seed(0)
    layer = make()
    x, x_dot = torch.randn(shape), torch.randn(shape)
    ref = torch.func.jvp(layer, (x,), (x_dot,))
    with PeakTensorBytes() as mode:
        y, y_dot = dual_call(layer, (x,), (x_dot,))
    assert mode.peak == 2 * out_numel * 4, (mode.peak, 2 * out_numel * 4)
    torch.testing.assert_close((y, y_dot), ref)


NORM_CASES = [c for c in OP_CASES if "norm" in c.id]


@pytest.mark.parametrize("build,kind", NORM_CASES)
def test_norm_rules_in_row_slices_match_jvp_reference(build, kind, monkeypatch):
    """The normalisation rules' recomputed backward over row slices (forced here on small inputs: every
    sample its own slice) gives the reference gradients; a batch norm in training, whose statistics
    mix the rows, must not be sliced (it would give wrong gradients, not an error)."""
    import sgflow.ops.recompute as recompute  # the module whose RecomputeOp reads it

    monkeypatch.setattr(recompute, "ROW_SLICE_MIN_NUMEL", 1)
    test_rule_matches_jvp_reference(build, kind, torch.float64, monkeypatch)


@pytest.mark.parametrize("make,shape", [
    pytest.param(lambda: testnets.build("adm", (3, 8, 8)), (3, 3, 8, 8), id="adm"),
    pytest.param(lambda: testnets.build("dit", (3, 8, 8)), (3, 3, 8, 8), id="dit"),
    pytest.param(lambda: _sgflow_nn("tiny", (3, 7, 5), zero_init=False), (3, 3, 7, 5), id="sgflow-tiny-unet-7x5"),
])
def test_recomputed_blocks_under_a_callers_saved_tensor_hooks(make, shape):
    """A caller's saved_tensors_hooks (a memory meter, CPU offloading) around the fused step: every block
    recomputed, the reference gradients still. (Checkpoint keeps its inputs as saved tensors; a dual input
    came back from such a hook as a plain tensor and the block was recomputed without its tangent.)"""
    torch.manual_seed(SEED)
    model = make().double()
    fused_model = sgflow.dualize(model, blocks="all")
    packed = []

    def pack(t):
        packed.append(type(t).__name__)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _assert_fused_equals_reference(fused_model, model, gen_batch(shape, seed=17), 1e-10)
    assert packed and "DualTensor" not in packed
