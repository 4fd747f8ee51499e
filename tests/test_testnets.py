"""Third-party-style test networks (testnets): shapes, dtypes, gradients, zero init, build().

float64 on CPU, small default sizes. torch.func.jvp through these networks is not tested here: the
fused CPU kernels of F.scaled_dot_product_attention lack forward AD.
"""
from __future__ import annotations

import pathlib

import pytest
import torch

import testnets
from testnets import NETWORKS, build

D = torch.float64

# (name, data shape without batch)
CASES = [
    pytest.param("adm", (3, 8, 8), id="adm-3x8x8"),
    pytest.param("adm", (3, 16, 16), id="adm-3x16x16"),
    pytest.param("edm", (3, 8, 8), id="edm-3x8x8"),
    pytest.param("edm", (3, 16, 16), id="edm-3x16x16"),
    pytest.param("dit", (3, 8, 8), id="dit-3x8x8"),
    pytest.param("mlp", (2,), id="mlp-2"),
]
ONE_PER_NET = [
    pytest.param("adm", (3, 8, 8), id="adm"),
    pytest.param("edm", (3, 8, 8), id="edm"),
    pytest.param("dit", (3, 8, 8), id="dit"),
    pytest.param("mlp", (2,), id="mlp"),
]


def _inputs(batch, shape, seed=1):
    gen = torch.Generator().manual_seed(seed)
    t = torch.rand(batch, generator=gen, dtype=D)
    u = t + (1 - t) * torch.rand(batch, generator=gen, dtype=D)
    x = torch.randn(batch, *shape, generator=gen, dtype=D)
    return t, u, x


def test_registry_names():
    assert set(NETWORKS) == {"adm", "edm", "dit", "mlp"}


@pytest.mark.parametrize("batch", [1, 2], ids=["b1", "b2"])
@pytest.mark.parametrize("name,shape", CASES)
def test_output_shape_and_dtype(name, shape, batch):
    model = build(name, shape).to(D).eval()
    t, u, x = _inputs(batch, shape)
    with torch.no_grad():
        y = model(t, u, x)
    assert y.shape == x.shape
    assert y.dtype == x.dtype
    assert torch.isfinite(y).all()
    assert y.abs().max() > 0


@pytest.mark.parametrize("name,shape", ONE_PER_NET)
def test_every_parameter_gets_nonzero_gradient(name, shape):
    model = build(name, shape).to(D)
    t, u, x = _inputs(2, shape)
    model(t, u, x).square().sum().backward()
    names = [n for n, _ in model.named_parameters()]
    assert names
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    zero_grad = [n for n, p in model.named_parameters() if p.grad is not None and not p.grad.abs().max() > 0]
    assert no_grad == [], f"{name}: parameters without gradient: {no_grad}"
    assert zero_grad == [], f"{name}: parameters with an all-zero gradient: {zero_grad}"


@pytest.mark.parametrize("name,shape", ONE_PER_NET)
def test_zero_init_output_is_exactly_zero(name, shape):
    model = build(name, shape, zero_init=True).to(D)
    t, u, x = _inputs(2, shape)
    with torch.no_grad():
        y = model(t, u, x)
    assert y.shape == x.shape
    assert torch.equal(y, torch.zeros_like(y))


@pytest.mark.parametrize("name,shape", ONE_PER_NET)
def test_time_inputs_matter(name, shape):
    """Both t and u change the output (u enters through its own embedding path)."""
    model = build(name, shape).to(D).eval()
    t, u, x = _inputs(2, shape)
    with torch.no_grad():
        y = model(t, u, x)
        assert not torch.allclose(y, model(t * 0.5, u, x))
        assert not torch.allclose(y, model(t, 0.5 * (t + u), x))


@pytest.mark.parametrize("name,shape", ONE_PER_NET)
def test_no_inplace_modules(name, shape):
    model = build(name, shape)
    inplace = [n for n, m in model.named_modules() if getattr(m, "inplace", False)]
    assert inplace == []


def test_dropout_train_and_eval():
    model = build("adm", (3, 8, 8), dropout=0.5).to(D)
    t, u, x = _inputs(2, (3, 8, 8))
    with torch.no_grad():
        model.eval()
        assert torch.equal(model(t, u, x), model(t, u, x))
        model.train()
        assert model(t, u, x).shape == x.shape


def test_build_uses_shape_and_overrides():
    assert build("mlp", (5,)).dim == 5
    dit = build("dit", (1, 16, 16), patch_size=4, depth=1)
    assert (dit.in_channels, dit.input_size, dit.patch_size, len(dit.blocks)) == (1, 16, 4, 1)
    edm = build("edm", (2, 16, 16))
    assert (edm.in_channels, edm.img_resolution) == (2, 16)
    adm = build("adm", (1, 8, 12), channel_mult=(1, 2, 2))
    assert adm.in_channels == 1 and adm.channel_mult == (1, 2, 2)


@pytest.mark.parametrize(
    "name,shape,overrides,match",
    [
        pytest.param("resnet", (3, 8, 8), {}, r"adm.*dit.*edm.*mlp", id="unknown-name"),
        pytest.param("adm", (3, 7, 7), {}, "divisible by 2", id="adm-odd-size"),
        pytest.param("adm", (3, 8, 8), {"channel_mult": (1, 2, 2, 2, 2)}, "divisible by 16", id="adm-too-deep"),
        pytest.param("edm", (3, 6, 6), {"channel_mult": (1, 2, 2)}, "divisible by 4", id="edm-odd-size"),
        pytest.param("edm", (3, 8, 16), {}, "square", id="edm-not-square"),
        pytest.param("dit", (3, 9, 9), {}, "patch_size", id="dit-not-divisible"),
        pytest.param("dit", (3, 8, 16), {}, "square", id="dit-not-square"),
        pytest.param("mlp", (3, 8, 8), {}, r"\(D,\)", id="mlp-image-shape"),
        pytest.param("dit", (16,), {}, r"\(C, H, W\)", id="dit-flat-shape"),
        pytest.param("adm", (3, 8, 8), {"in_channels": 1}, "contradicts", id="conflicting-override"),
    ],
)
def test_build_errors(name, shape, overrides, match):
    with pytest.raises(ValueError, match=match):
        build(name, shape, **overrides)


def test_module_imports_only_torch_and_math():
    src = pathlib.Path(testnets.__file__).read_text()
    imports = sorted({line.split()[1] for line in src.splitlines() if line.startswith(("import ", "from "))})
    assert imports == ["__future__", "math", "torch", "torch.nn", "torch.nn.functional"]
    assert "dual_forward" not in src.replace("no ``dual_forward``", "")
