"""sgflow.nn's networks: their one forward, dualized (sgflow.dualize), vs torch.func.jvp of it.

float64 on CPU. For every network, ``sgflow.dualize(net).dual_forward(t, u, x, t_dot, u_dot, x_dot)``
must equal ``torch.func.jvp(net, (t, u, x), (t_dot, u_dot, x_dot))`` and the gradients of
<g, y> + <g_dot, y_dot> w.r.t. all parameters and all six inputs must agree, with every block
recomputed in backward (``blocks="all"``). In train mode with dropout the RNG is reset before each path:
both draw the same masks, so agreement also shows the dual path applies one mask to primal and tangent
(the jvp reference does by construction).
"""
from __future__ import annotations

import pytest
import torch

import sgflow
from sgflow.autodual import dual_call
from sgflow.nn import MODEL_CONFIGS, MLPFlowMap, TwoTimeEmbedding, UNet, build_model
from sgflow.testing import dual_grads, grad_errors, jvp_reference, rel_err

TOL = 1e-10
D = torch.float64


def _perturb(net, seed=0, std=0.05):
    """Zero-initialised layers would make many gradients trivially zero: give every weight noise."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(std * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return net


def _inputs(batch, shape, seed=1):
    gen = torch.Generator().manual_seed(seed)
    t = 0.6 * torch.rand(batch, generator=gen, dtype=D)
    u = t + 0.4 * torch.rand(batch, generator=gen, dtype=D)
    x = torch.randn(batch, *shape, generator=gen, dtype=D)
    # Small time tangents, kept from a former 1000x time scale: the default time_scale is now
    # DEFAULT_SCALE = 1 (sgflow.ops.embedding), where d/dt and d/dx are of the same order, so the
    # t- and u-directions are only ~1% of these tangents.
    t_dot = 0.01 * torch.randn(batch, generator=gen, dtype=D)
    u_dot = 0.01 * torch.randn(batch, generator=gen, dtype=D)
    x_dot = torch.randn(batch, *shape, generator=gen, dtype=D)
    return (t, u, x), (t_dot, u_dot, x_dot)


def _dual(net, blocks="all"):
    """The network's dual forward through its own forward, every block recomputed in backward."""
    return sgflow.dualize(net, blocks=blocks).dual_forward


def _check_net(net, primals, tangents, rng_seed=None):
    """Compare the dualized forward with torch.func.jvp; returns the max relative error."""
    params = list(net.parameters())

    def seeded(fn):
        def call(*a):
            if rng_seed is not None:
                torch.manual_seed(rng_seed)
            return fn(*a)

        return call

    y, y_dot, cot, grads = jvp_reference(seeded(net), primals, tangents, params, seed=2)
    y_d, y_dot_d, grads_d = dual_grads(seeded(_dual(net)), primals, tangents, params, cot)
    errs = [rel_err(y_d, y), rel_err(y_dot_d, y_dot)]
    assert errs[0] <= TOL, f"primal rel err {errs[0]:.3g}"
    assert errs[1] <= TOL, f"tangent rel err {errs[1]:.3g}"
    names = ["t", "u", "x", "t_dot", "u_dot", "x_dot"] + [n for n, _ in net.named_parameters()]
    grad_errs = grad_errors(grads_d, grads, [*primals, *tangents, *params], names)
    for name, err in grad_errs.items():
        assert err <= TOL, f"grad of {name}: rel err {err:.3g}"
    return max(errs + list(grad_errs.values()))


MLP_CASES = [
    pytest.param(dict(dim=2, hidden=32, depth=3, time_dim=16), 5, id="mlp-2d"),
    pytest.param(dict(dim=7, hidden=24, depth=1, time_dim=9), 3, id="mlp-7d-depth1-oddtime"),
]


@pytest.mark.parametrize("kwargs,batch", MLP_CASES)
def test_mlp_dual_matches_jvp(kwargs, batch):
    torch.manual_seed(0)
    net = _perturb(MLPFlowMap(**kwargs).double())
    primals, tangents = _inputs(batch, (kwargs["dim"],))
    _check_net(net, primals, tangents)


def test_two_time_embedding_dual():
    torch.manual_seed(0)
    emb = TwoTimeEmbedding(8, 20).double()
    (t, u, _), (td, ud, _) = _inputs(4, (1,))
    ref, ref_dot = torch.func.jvp(emb, (t, u), (td, ud))
    e, e_dot = dual_call(emb, (t, u), (td, ud))
    assert e.shape == (4, 20)
    assert rel_err(e, ref) <= TOL and rel_err(e_dot, ref_dot) <= TOL


def _tiny(in_channels, **kw):
    torch.manual_seed(0)
    return _perturb(UNet.from_config("tiny", in_channels=in_channels, **kw).double())


# Narrower variants (channels 16) keep the odd-geometry cases fast; the first case is the real config.
NARROW = dict(channels=16, num_groups=4, head_channels=16)
UNET_CASES = [
    pytest.param(3, (8, 8), {}, id="tiny-3x8x8"),
    pytest.param(3, (7, 5), NARROW, id="narrow-3x7x5-odd"),
    pytest.param(2, (8, 12), dict(NARROW, resample="avgpool", skip_rescale=False), id="narrow-2x8x12-avgpool"),
    pytest.param(1, (5, 3), dict(NARROW, channel_mult=(1, 2, 2), attn_levels=(0, 2)), id="narrow-3levels-1x5x3"),
]


@pytest.mark.parametrize("cin,hw,kw", UNET_CASES)
def test_unet_dual_matches_jvp_eval(cin, hw, kw):
    net = _tiny(cin, dropout=0.3, **kw).eval()
    primals, tangents = _inputs(2, (cin, *hw))
    _check_net(net, primals, tangents)


@pytest.mark.parametrize(
    "cin,hw,kw", [pytest.param(3, (8, 8), {}, id="tiny-3x8x8"), pytest.param(3, (7, 5), NARROW, id="narrow-3x7x5-odd")]
)
def test_unet_dual_matches_jvp_train_dropout(cin, hw, kw):
    net = _tiny(cin, dropout=0.3, **kw).train()
    primals, tangents = _inputs(2, (cin, *hw))
    _check_net(net, primals, tangents, rng_seed=123)
    # Dropout is really on: another seed, or eval mode, changes the output.
    t, u, x = primals
    torch.manual_seed(123)
    y1 = net(t, u, x)
    torch.manual_seed(124)
    y2 = net(t, u, x)
    assert rel_err(y1, y2) > 1e-3
    with torch.no_grad():
        assert rel_err(net.eval()(t, u, x), y1) > 1e-3


def test_unet_train_tangent_matches_finite_differences():
    """The dual forward alone, same RNG state for every call: its tangent is the derivative of its
    own primal, i.e. primal and tangent share the dropout mask."""
    net = _tiny(3, dropout=0.3, **NARROW).train()
    dual = _dual(net)
    (t, u, x), (td, ud, xd) = _inputs(2, (3, 7, 5))
    td, ud = td / 10, ud / 10

    def primal(eps):
        torch.manual_seed(7)
        with torch.no_grad():
            return dual(t + eps * td, u + eps * ud, x + eps * xd, td, ud, xd)

    _, y_dot = primal(0.0)
    h = 1e-5
    fd = (primal(h)[0] - primal(-h)[0]) / (2 * h)
    assert rel_err(fd, y_dot) < 1e-7


def test_unet_diagonal_and_none_tangents():
    """u = t (the velocity), and None time tangents mean zero."""
    net = _tiny(3, **NARROW).eval()
    (t, _, x), (_, _, xd) = _inputs(2, (3, 6, 6))
    y, y_dot = _dual(net)(t, t, x, None, None, xd)
    ref, ref_dot = torch.func.jvp(net, (t, t, x), (torch.zeros_like(t), torch.zeros_like(t), xd))
    assert rel_err(y, ref) <= TOL and rel_err(y_dot, ref_dot) <= TOL


def test_digits_config_forward():
    net = _perturb(build_model("digits", (1, 8, 8)).double()).eval()
    (t, u, x), (td, ud, xd) = _inputs(1, (1, 8, 8))
    y, y_dot = _dual(net, blocks="auto")(t, u, x, td, ud, xd)
    ref, ref_dot = torch.func.jvp(net, (t, u, x), (td, ud, xd))
    assert y.shape == x.shape
    assert rel_err(y, ref) <= TOL and rel_err(y_dot, ref_dot) <= TOL


def _count(net):
    return sum(p.numel() for p in net.parameters())


def test_config_parameter_counts():
    cifar = build_model("cifar10", (3, 32, 32))
    assert 45e6 <= _count(cifar) <= 65e6, _count(cifar)
    assert cifar.config["dropout"] == 0.1
    assert build_model("cifar10", (3, 32, 32), dropout=0.0).config["dropout"] == 0.0
    assert 1e5 <= _count(build_model("tiny", (3, 8, 8))) <= 1e6


def test_zero_init_starts_at_zero():
    net = UNet.from_config("tiny")
    x = torch.randn(2, 3, 8, 8)
    t = torch.tensor([0.1, 0.5])
    assert net(t, t, x).abs().max() == 0


def test_build_model_names_and_shapes():
    assert set(MODEL_CONFIGS) >= {"mlp", "mlp-small", "tiny", "digits", "cifar10"}
    assert isinstance(build_model("mlp", (2,)), MLPFlowMap)
    assert isinstance(build_model("tiny", (1, 8, 8)), UNet)
    with pytest.raises(ValueError, match="unknown model config 'resnet'.*valid names"):
        build_model("resnet", (2,))
    with pytest.raises(ValueError, match=r"takes images of shape \(C, H, W\)"):
        build_model("cifar10", (2,))
    with pytest.raises(ValueError, match=r"takes flat data of shape \(d,\)"):
        build_model("mlp", (3, 8, 8))
    with pytest.raises(ValueError, match="contradicts data_shape"):
        build_model("tiny", (3, 8, 8), in_channels=1)
    with pytest.raises(ValueError, match="valid names"):
        UNet.from_config("imagenet")
    with pytest.raises(ValueError, match="num_groups"):
        UNet(channels=12, num_groups=8)
    with pytest.raises(ValueError, match=r"recompute='all'\) is gone.*sgflow.dualize\(net, blocks="):
        build_model("tiny", (3, 8, 8), recompute="all")


BAD_INPUTS = [
    pytest.param("mlp", dict(x=torch.randn(3, 4)), ValueError, r"expects x of shape \[B, 2\]", id="mlp-wrong-dim"),
    pytest.param("mlp", dict(x=torch.randn(3, 2, 1)), ValueError, r"expects x of shape \[B, 2\]", id="mlp-wrong-rank"),
    pytest.param("unet", dict(x=torch.randn(3, 1, 8, 8)), ValueError, r"expects x of shape \[B, 3, H, W\]", id="unet-wrong-channels"),
    pytest.param("unet", dict(x=torch.randn(3, 8, 8)), ValueError, r"expects x of shape \[B, 3, H, W\]", id="unet-wrong-rank"),
    pytest.param("mlp", dict(t=torch.rand(3, 1)), ValueError, r"t must have shape \[B\] = \[3\]", id="t-2d"),
    pytest.param("mlp", dict(u=torch.rand(2)), ValueError, r"u must have shape \[B\] = \[3\]", id="u-wrong-batch"),
    pytest.param("mlp", dict(t=torch.zeros(3, dtype=torch.long)), TypeError, "floating-point", id="t-integer"),
    pytest.param("mlp", dict(x=torch.zeros(3, 2, dtype=torch.long)), TypeError, "floating-point", id="x-integer"),
    pytest.param("mlp", dict(t=0.5), TypeError, "must be a torch.Tensor", id="t-float"),
]


@pytest.mark.parametrize("kind,bad,exc,match", BAD_INPUTS)
def test_bad_inputs_raise(kind, bad, exc, match):
    net = build_model("mlp-small", (2,)) if kind == "mlp" else build_model("tiny", (3, 8, 8))
    args = dict(t=torch.rand(3), u=torch.rand(3), x=torch.randn(3, 2) if kind == "mlp" else torch.randn(3, 3, 8, 8))
    args.update(bad)
    with pytest.raises(exc, match=match):
        net(args["t"], args["u"], args["x"])
    # The dual path runs the same forward, so the same checks, before any dual op.
    x_dot = torch.zeros_like(args["x"]) if isinstance(args["x"], torch.Tensor) and args["x"].is_floating_point() else None
    with pytest.raises(exc, match=match):
        sgflow.dualize(net).dual_forward(args["t"], args["u"], args["x"], None, None, x_dot)


def _triton_runnable():
    from sgflow.ops.backend import triton_available, triton_interpreting

    return triton_available() and (torch.cuda.is_available() or triton_interpreting())


@pytest.mark.skipif(not _triton_runnable(), reason="needs triton (GPU or TRITON_INTERPRET=1)")
def test_unet_triton_backend_matches_torch_backend(monkeypatch):
    """The network's dual path through the Triton kernels (interpreted on CPU): a micro UNet,
    train mode with dropout, outputs and all gradients equal to the torch backend's."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    net = UNet(in_channels=1, channels=8, channel_mult=(1,), num_blocks=1, attn_levels=(0,), num_groups=4,
               head_channels=8, dropout=0.3)
    net = _perturb(net.double()).to(device).train()
    primals, tangents = _inputs(1, (1, 3, 5))
    primals = [p.to(device) for p in primals]
    tangents = [p.to(device) for p in tangents]
    params = list(net.parameters())
    gen = torch.Generator().manual_seed(3)
    cot = tuple(torch.randn(1, 1, 3, 5, generator=gen, dtype=D).to(device) for _ in range(2))
    results = []
    for backend in ("torch", "triton"):
        monkeypatch.setenv("SGFLOW_BACKEND", backend)
        torch.manual_seed(11)
        results.append(dual_grads(_dual(net), primals, tangents, params, cot))
    (y0, yd0, g0), (y1, yd1, g1) = results
    assert rel_err(y1, y0) <= 1e-9 and rel_err(yd1, yd0) <= 1e-9
    for a, b in zip(g1, g0):
        assert rel_err(a, b) <= 1e-9
