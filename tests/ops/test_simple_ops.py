"""Simple dual ops (conv2d, linear, silu, sinusoidal embedding, groupnorm) vs torch.func.jvp + autograd.

Every op is checked in float64 on CPU: the reference ``*_dual_ref`` and the functional API (autograd
Function) must give the JVP of the plain op, and the Function's backward must give the gradients of
<g, y> + <g_dot, y_dot> w.r.t. inputs, tangents and parameters, also when only one cotangent is used.
Then: ``torch.func.vmap`` / ``grad`` through the functional APIs against a loop of plain calls, and the
bf16 accuracy of the ops against float64 on the same bf16-rounded inputs.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sgflow.ops.activation import silu_dual, silu_dual_ref
from sgflow.ops.conv import conv2d_dual, conv2d_dual_ref
from sgflow.ops.embedding import sinusoidal_embedding, sinusoidal_embedding_dual, sinusoidal_embedding_dual_ref
from sgflow.ops.groupnorm import groupnorm_dual, groupnorm_dual_ref
from sgflow.ops.linear import linear_dual, linear_dual_ref
from sgflow.testing import dual_grads, grad_errors, jvp_reference, rel_err

TOL = 1e-10
D = torch.float64


def _randn(*shape, gen):
    return torch.randn(*shape, generator=gen, dtype=D)


def _compare(plain, ref, dual, primals, tangents, params, drop=None):
    """plain(*primals, *params) vs ref / dual(*primals, *tangents, *params).

    ``drop``: None (both cotangents), "g" (primal output unused) or "g_dot" (tangent unused).
    """
    params = [p.detach().clone().requires_grad_(True) for p in params]
    y, y_dot, (g, g_dot), grads = jvp_reference(lambda *a: plain(*a, *params), primals, tangents, params)
    if drop == "g":
        g = torch.zeros_like(g)
    elif drop == "g_dot":
        g_dot = torch.zeros_like(g_dot)
    if drop is not None:
        _, _, _, grads = jvp_reference(lambda *a: plain(*a, *params), primals, tangents, params, cotangents=(g, g_dot))

    y_r, yd_r = ref(*primals, *tangents, *params)
    assert rel_err(y_r, y) <= TOL
    assert rel_err(yd_r, y_dot) <= TOL

    n = len(primals)

    def call(*a):
        out, out_dot = dual(*a[:n], *a[n:], *params)
        return out, out_dot

    if drop is None:
        y_d, yd_d, grads_d = dual_grads(call, primals, tangents, params, (g, g_dot))
    else:
        # Use only one output so the Function's backward receives None for the other.
        ps = [p.detach().clone().requires_grad_(True) for p in primals]
        ts = [t.detach().clone().requires_grad_(True) for t in tangents]
        y_d, yd_d = call(*ps, *ts)
        scalar = (yd_d * g_dot).sum() if drop == "g" else (y_d * g).sum()
        grads_d = list(torch.autograd.grad(scalar, [*ps, *ts, *params], allow_unused=True))
        y_d, yd_d = y_d.detach(), yd_d.detach()
    assert rel_err(y_d, y) <= TOL
    assert rel_err(yd_d, y_dot) <= TOL
    errs = grad_errors(grads_d, grads, [*primals, *tangents, *params])
    for i, err in errs.items():
        assert err <= TOL, f"grad {i}: rel err {err:.3g}"
    return max(errs.values())


CONV_CASES = [
    # (B, Cin, Cout, H, W, k, stride, padding, bias)
    pytest.param(2, 3, 5, 7, 5, 3, 1, 1, True, id="3x3-pad1-odd-7x5"),
    pytest.param(1, 4, 6, 8, 12, 3, 2, 1, True, id="3x3-stride2-8x12"),
    pytest.param(3, 5, 2, 7, 7, 3, 2, 1, False, id="3x3-stride2-nobias-odd"),
    pytest.param(2, 63, 7, 4, 3, 1, 1, 0, True, id="1x1-63ch"),
]


@pytest.mark.parametrize("b,cin,cout,h,w,k,stride,padding,bias", CONV_CASES)
@pytest.mark.parametrize("drop", [None, "g", "g_dot"], ids=["both", "tangent-only", "primal-only"])
def test_conv2d_dual(b, cin, cout, h, w, k, stride, padding, bias, drop):
    gen = torch.Generator().manual_seed(1)
    x, xd = _randn(b, cin, h, w, gen=gen), _randn(b, cin, h, w, gen=gen)
    weight = _randn(cout, cin, k, k, gen=gen) / math.sqrt(cin * k * k)
    params = [weight] + ([_randn(cout, gen=gen)] if bias else [])

    def plain(x_, *p):
        return F.conv2d(x_, p[0], p[1] if len(p) > 1 else None, stride=stride, padding=padding)

    def ref(x_, xd_, *p):
        return conv2d_dual_ref(x_, xd_, p[0], p[1] if len(p) > 1 else None, stride, padding)

    def dual(x_, xd_, *p):
        return conv2d_dual(x_, xd_, p[0], p[1] if len(p) > 1 else None, stride, padding)

    _compare(plain, ref, dual, [x], [xd], params, drop)


LINEAR_CASES = [
    pytest.param((5, 7), 3, True, id="2d-7to3"),
    pytest.param((2, 3, 6), 9, True, id="3d-6to9"),
    pytest.param((1, 4), 4, False, id="nobias-B1"),
]


@pytest.mark.parametrize("shape,dout,bias", LINEAR_CASES)
@pytest.mark.parametrize("drop", [None, "g", "g_dot"], ids=["both", "tangent-only", "primal-only"])
def test_linear_dual(shape, dout, bias, drop):
    gen = torch.Generator().manual_seed(2)
    x, xd = _randn(*shape, gen=gen), _randn(*shape, gen=gen)
    params = [_randn(dout, shape[-1], gen=gen)] + ([_randn(dout, gen=gen)] if bias else [])

    def plain(x_, *p):
        return F.linear(x_, *p)

    def ref(x_, xd_, *p):
        return linear_dual_ref(x_, xd_, *p)

    def dual(x_, xd_, *p):
        return linear_dual(x_, xd_, *p)

    _compare(plain, ref, dual, [x], [xd], params, drop)


@pytest.mark.parametrize("shape", [pytest.param((7,), id="1d"), pytest.param((2, 3, 5, 4), id="4d")])
@pytest.mark.parametrize("drop", [None, "g", "g_dot"], ids=["both", "tangent-only", "primal-only"])
def test_silu_dual(shape, drop):
    gen = torch.Generator().manual_seed(3)
    x, xd = 3 * _randn(*shape, gen=gen), _randn(*shape, gen=gen)
    _compare(F.silu, silu_dual_ref, silu_dual, [x], [xd], [], drop)


@pytest.mark.parametrize(
    "dim,max_period",
    [pytest.param(16, 10000, id="dim16"), pytest.param(7, 10000, id="odd-dim7"), pytest.param(64, 100, id="dim64-period100")],
)
@pytest.mark.parametrize("drop", [None, "g", "g_dot"], ids=["both", "tangent-only", "primal-only"])
def test_sinusoidal_embedding_dual(dim, max_period, drop):
    gen = torch.Generator().manual_seed(4)
    # Times in [0, 1] as the networks see them, at the default scale (DEFAULT_SCALE = 1: omega_0 = 1).
    s = torch.rand(5, generator=gen, dtype=D)
    sd = _randn(5, gen=gen)

    def plain(s_):
        return sinusoidal_embedding(s_, dim, max_period)

    def ref(s_, sd_):
        return sinusoidal_embedding_dual_ref(s_, sd_, dim, max_period)

    def dual(s_, sd_):
        return sinusoidal_embedding_dual(s_, sd_, dim, max_period)

    _compare(plain, ref, dual, [s], [sd], [], drop)


def test_sinusoidal_embedding_convention():
    s = torch.tensor([0.0, 0.5], dtype=D)
    emb = sinusoidal_embedding(s, 8)
    assert emb.shape == (2, 8)
    assert torch.allclose(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4, dtype=D))
    # Lowest column: omega_0 = scale rad per unit time (default scale 1).
    assert torch.allclose(emb[1, 0], torch.cos(torch.tensor(0.5, dtype=D)))
    emb1000 = sinusoidal_embedding(s, 8, scale=1000.0)
    assert torch.allclose(emb1000[1, 0], torch.cos(torch.tensor(500.0, dtype=D)))


GN_CASES = [
    pytest.param(2, 6, 3, (7, 5), True, id="6ch-3groups-7x5"),
    pytest.param(3, 63, 7, (3, 4), True, id="63ch-7groups"),
    pytest.param(2, 8, 8, (5, 5), False, id="noaffine-instance"),
    pytest.param(2, 4, 1, (6,), True, id="1d-spatial-layernorm"),
]


@pytest.mark.parametrize("b,c,groups,spatial,affine", GN_CASES)
@pytest.mark.parametrize("drop", [None, "g", "g_dot"], ids=["both", "tangent-only", "primal-only"])
def test_groupnorm_dual(b, c, groups, spatial, affine, drop):
    gen = torch.Generator().manual_seed(5)
    x = 2 * _randn(b, c, *spatial, gen=gen) + 0.5
    xd = _randn(b, c, *spatial, gen=gen)
    params = [1 + 0.3 * _randn(c, gen=gen), 0.3 * _randn(c, gen=gen)] if affine else []

    def w_b(p):
        return (p[0], p[1]) if p else (None, None)

    def plain(x_, *p):
        return F.group_norm(x_, groups, *w_b(p), eps=1e-5)

    def ref(x_, xd_, *p):
        return groupnorm_dual_ref(x_, xd_, *w_b(p), groups)

    def dual(x_, xd_, *p):
        return groupnorm_dual(x_, xd_, *w_b(p), groups)

    _compare(plain, ref, dual, [x], [xd], params, drop)


def test_bad_inputs_raise():
    x = torch.randn(2, 3, 4, 4, dtype=D)
    w = torch.randn(5, 3, 3, 3, dtype=D)
    with pytest.raises(ValueError, match="x_dot has shape"):
        conv2d_dual(x, x[:1], w, None)
    with pytest.raises(ValueError, match="weight must have shape"):
        conv2d_dual(x, x, torch.randn(5, 4, 3, 3, dtype=D), None)
    with pytest.raises(ValueError, match="input features"):
        linear_dual(torch.randn(2, 3, dtype=D), torch.randn(2, 3, dtype=D), torch.randn(4, 5, dtype=D))
    with pytest.raises(ValueError, match="x_dot has shape"):
        silu_dual(x, x[0])
    with pytest.raises(ValueError, match="1-d tensor"):
        sinusoidal_embedding_dual(x, x, 8)
    with pytest.raises(ValueError, match="not divisible"):
        groupnorm_dual(x, x, None, None, 2)


# ----------------------------------------------------------------------------------------------------
# torch.func transforms: the Functions have setup_context + generate_vmap_rule
# ----------------------------------------------------------------------------------------------------
def _vmap_case(name, gen):
    """``(op, batched, params)``: ``op(*batched_items, *params) -> (y, y_dot)``; batched tensors carry a
    leading vmap dim of 3 over an op batch of 1 (the odd sizes of the cases above)."""
    if name == "linear":
        batched = [_randn(3, 1, 2, 7, gen=gen), _randn(3, 1, 2, 7, gen=gen)]
        return (lambda x, xd, w, b: linear_dual(x, xd, w, b)), batched, [_randn(5, 7, gen=gen), _randn(5, gen=gen)]
    if name == "conv2d":
        batched = [_randn(3, 1, 4, 7, 5, gen=gen), _randn(3, 1, 4, 7, 5, gen=gen)]
        params = [_randn(6, 4, 3, 3, gen=gen) / 6, _randn(6, gen=gen)]
        return (lambda x, xd, w, b: conv2d_dual(x, xd, w, b, 2, 1)), batched, params
    if name == "silu":
        return silu_dual, [3 * _randn(3, 1, 63, gen=gen), _randn(3, 1, 63, gen=gen)], []
    if name == "groupnorm":
        batched = [2 * _randn(3, 1, 63, 7, 5, gen=gen) + 0.5, _randn(3, 1, 63, 7, 5, gen=gen)]
        params = [1 + 0.3 * _randn(63, gen=gen), 0.3 * _randn(63, gen=gen)]
        return (lambda x, xd, w, b: groupnorm_dual(x, xd, w, b, 7)), batched, params
    assert name == "embedding"
    batched = [torch.rand(3, 5, generator=gen, dtype=D), _randn(3, 5, gen=gen)]
    return (lambda s_, sd_: sinusoidal_embedding_dual(s_, sd_, 7)), batched, []


VMAP_OPS = [pytest.param(n, id=n) for n in ("linear", "conv2d", "silu", "groupnorm", "embedding")]


@pytest.mark.parametrize("name", VMAP_OPS)
def test_vmap_and_grad_match_a_loop(name):
    """vmap of the functional API, and vmap(grad(<g, y> + <g_dot, y_dot>)) w.r.t. inputs, tangents and
    parameters (per-sample parameter gradients), against a Python loop of plain calls + autograd."""
    gen = torch.Generator().manual_seed(6)
    op, batched, params = _vmap_case(name, gen)
    nb = len(batched)
    probe = op(*[b[0] for b in batched], *params)
    cots = [torch.randn((3, *t.shape), generator=gen, dtype=D) for t in probe]
    in_dims = (0,) * nb + (None,) * len(params)

    y_v, yd_v = torch.func.vmap(op, in_dims=in_dims)(*batched, *params)

    def scalar(*args):
        *inputs, g, g_dot = args
        y, y_dot = op(*inputs)
        return (y * g).sum() + (y_dot * g_dot).sum()

    argnums = tuple(range(nb + len(params)))
    per_sample_grad = torch.func.vmap(torch.func.grad(scalar, argnums=argnums), in_dims=in_dims + (0, 0))
    grads_v = per_sample_grad(*batched, *params, *cots)

    for i in range(3):
        leaves = [b[i].clone().requires_grad_(True) for b in batched] + [p.clone().requires_grad_(True) for p in params]
        y, y_dot = op(*leaves)
        assert rel_err(y_v[i], y) <= TOL and rel_err(yd_v[i], y_dot) <= TOL
        grads = torch.autograd.grad((y * cots[0][i]).sum() + (y_dot * cots[1][i]).sum(), leaves)
        for k, (gv, gl) in enumerate(zip(grads_v, grads)):
            assert gl.abs().max() > 0, f"{name}: zero loop gradient {k}, the comparison would prove nothing"
            assert rel_err(gv[i], gl) <= TOL, f"{name}: grad {k}, sample {i}"


# ----------------------------------------------------------------------------------------------------
# bf16 accuracy against exact math on the same bf16 inputs
# ----------------------------------------------------------------------------------------------------
B16 = torch.bfloat16


def _bf16_errors(dual, ref, inputs, cots, which):
    """bf16 error of ``dual`` vs the best bf16 can do, output by output.

    ``inputs`` and ``cots`` are float64 tensors already rounded to bf16 (so both sides see exactly the
    same numbers). The reference is the float64 computation on them: ``ref`` (the float64 ``*_ref``)
    with autograd for the gradients of <g, y> + <g_dot, y_dot>. "Exact math on bf16-rounded inputs"
    is that float64 result rounded to bf16 once, the least error any bf16 output can have. Returns,
    for each name in ``which`` ("y", "y_dot" or an input index), ``(err, err_exact)``: the relative
    error of ``dual`` run in bf16 and of the rounded float64 result, both against the float64 result.
    """
    def run(fn, args, dtype):
        leaves = [a.to(dtype).requires_grad_(True) for a in args]
        y, y_dot = fn(*leaves)
        g, g_dot = (c.to(dtype) for c in cots)
        grads = torch.autograd.grad((y.double() * g.double()).sum() + (y_dot.double() * g_dot.double()).sum(), leaves)
        return {"y": y, "y_dot": y_dot, **dict(enumerate(grads))}

    want, got = run(ref, inputs, D), run(dual, inputs, B16)
    out = {}
    for k in which:
        assert got[k].dtype == B16, k
        out[k] = (rel_err(got[k], want[k]), rel_err(want[k].to(B16), want[k]))
    return out


def _rounded(*ts):
    return [t.to(B16).double() for t in ts]


def test_groupnorm_dual_bf16_within_exact_rounding():
    """Inputs of mean 4 (the attention pre-norm after residual sums): a bf16 mean loses the centring.
    With statistics and the second-order terms in fp32 each bf16 result is within 1.3x the error of
    exact math rounded to bf16 (with them in bf16: dx 3.0-3.3x, dx_dot 2.5x)."""
    gen = torch.Generator().manual_seed(7)
    shape, groups = (3, 63, 7, 5), 7
    x, xd = 4 + _randn(*shape, gen=gen), _randn(*shape, gen=gen)
    w, b = 1 + 0.3 * _randn(63, gen=gen), 0.3 * _randn(63, gen=gen)
    inputs = _rounded(x, xd, w, b)
    cots = _rounded(_randn(*shape, gen=gen), _randn(*shape, gen=gen))
    errs = _bf16_errors(lambda *a: groupnorm_dual(*a, groups), lambda *a: groupnorm_dual_ref(*a, groups),
                        inputs, cots, ["y", "y_dot", 0, 1])
    for k, (err, exact) in errs.items():
        assert err <= 1.3 * exact, f"{k}: bf16 error {err:.3g} vs exact-rounded {exact:.3g}"


@pytest.mark.parametrize("drop", [None, "g"], ids=["both", "tangent-only"])
def test_silu_dual_bf16_within_exact_rounding(drop):
    """dx = G y' + G_dot x_dot y'' in bf16 within 1.3x exact math rounded to bf16; "tangent-only"
    (G = 0) isolates the second-derivative term (y'' in bf16: 3.7-4.4x, both terms 2.7-2.8x)."""
    gen = torch.Generator().manual_seed(8)
    shape = (1, 63, 7, 5)
    inputs = _rounded(3 * _randn(*shape, gen=gen), _randn(*shape, gen=gen))
    cots = _rounded(_randn(*shape, gen=gen), _randn(*shape, gen=gen))
    if drop == "g":
        cots[0] = torch.zeros_like(cots[0])
    errs = _bf16_errors(silu_dual, silu_dual_ref, inputs, cots, ["y", "y_dot", 0, 1])
    for k, (err, exact) in errs.items():
        assert err <= 1.3 * exact, f"{k}: bf16 error {err:.3g} vs exact-rounded {exact:.3g}"


@pytest.mark.parametrize("op", ["linear", "conv2d"])
def test_weight_grad_bf16_one_stacked_product(op):
    """dW = G^T x + G_dot^T x_dot as one product on the stacked streams rounds once: within 1.2x the
    error of exact math rounded to bf16. Two bf16 products summed in bf16 (the former backward, rebuilt
    here) err 1.45-1.5x; the new one must not be worse than that."""
    gen = torch.Generator().manual_seed(9)
    if op == "linear":
        xs, ws, gs = (129, 63), (31, 63), (129, 31)
        dual, ref = linear_dual, linear_dual_ref

        def two_products(x, xd, g, gd):
            return g.t() @ x + gd.t() @ xd
    else:
        xs, ws, gs = (3, 63, 7, 5), (10, 63, 3, 3), (3, 10, 7, 5)

        def dual(*a):
            return conv2d_dual(*a, 1, 1)

        def ref(*a):
            return conv2d_dual_ref(*a, 1, 1)

        def two_products(x, xd, g, gd):
            from torch.nn.grad import conv2d_weight
            return conv2d_weight(x, ws, g, padding=1) + conv2d_weight(xd, ws, gd, padding=1)
    inputs = _rounded(_randn(*xs, gen=gen), _randn(*xs, gen=gen), _randn(*ws, gen=gen) / 8, _randn(ws[0], gen=gen))
    cots = _rounded(_randn(*gs, gen=gen), _randn(*gs, gen=gen))
    (err, exact), = _bf16_errors(dual, ref, inputs, cots, [2]).values()
    x, xd = inputs[0], inputs[1]
    err_old = rel_err(two_products(*(t.to(B16) for t in (x, xd, *cots))), two_products(x, xd, *cots))
    print(f"{op} dW bf16: stacked {err:.3e}, two products {err_old:.3e}, exact-rounded {exact:.3e}")
    assert err <= 1.2 * exact, f"bf16 dW error {err:.3g} vs exact-rounded {exact:.3g}"
    assert err <= err_old


def test_recompute_dual_finds_unlisted_parameters_and_replays_dropout():
    """recompute_dual (torch.utils.checkpoint underneath) gives every tensor the block reads its gradient,
    listed in ``params`` or not (it used to give an unlisted parameter grad=None without a word), and
    replays the block's dropout mask in the recomputation."""
    from sgflow.ops.recompute import recompute_dual

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    xd = torch.randn(5, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(7, generator=gen, dtype=torch.float64, requires_grad=True)  # never listed

    def block(a, a_dot):
        mask = (torch.rand(a.shape, dtype=a.dtype) > 0.3).to(a.dtype)
        return torch.tanh(a * w + v) * mask, (1 - torch.tanh(a * w + v) ** 2) * w * a_dot * mask

    grads = []
    for run in (block, lambda a, a_dot: recompute_dual(block, a, a_dot, params=[w])):
        torch.manual_seed(11)
        y, y_dot = run(x, xd)
        grads.append(torch.autograd.grad(y.square().sum() + y_dot.square().sum(), (x, xd, w, v)))
    for name, a, r in zip(("x", "x_dot", "w", "v"), *grads):
        assert r.abs().max() > 0, name
        torch.testing.assert_close(a, r, rtol=1e-12, atol=0, msg=name)
    with pytest.raises(TypeError, match="params must be tensors"):
        recompute_dual(block, x, xd, params=["w"])
