import pytest
import torch

from sgflow.interpolants import get_interpolant
from sgflow.times import TimeSampler


@pytest.mark.parametrize("name", ["linear", "trig"])
def test_interpolant_endpoints_and_derivatives(name):
    ip = get_interpolant(name)
    t = torch.rand(17, dtype=torch.float64, requires_grad=True)
    for f, fdot in [(ip.alpha, ip.alpha_dot), (ip.sigma, ip.sigma_dot)]:
        (g,) = torch.autograd.grad(f(t).sum(), t)
        torch.testing.assert_close(g, fdot(t.detach()), rtol=1e-12, atol=1e-12)
    ends = torch.tensor([0.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(ip.alpha(ends), torch.tensor([1.0, 0.0], dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(ip.sigma(ends), torch.tensor([0.0, 1.0], dtype=torch.float64), atol=1e-12, rtol=0)


def test_interpolate_matches_formula():
    ip = get_interpolant("linear")
    x0, x1 = torch.randn(5, 3, 7, 5), torch.randn(5, 3, 7, 5)
    t = torch.rand(5)
    xt, xdot = ip.interpolate(x0, x1, t)
    tb = t[:, None, None, None]
    torch.testing.assert_close(xt, (1 - tb) * x0 + tb * x1)
    torch.testing.assert_close(xdot, x1 - x0)


def test_unknown_interpolant():
    with pytest.raises(ValueError, match="unknown interpolant"):
        get_interpolant("cubic")


@pytest.mark.parametrize("kind", ["uniform", "logit_normal"])
@pytest.mark.parametrize("frac", [0.0, 0.25, 1.0])
def test_time_sampler_support_and_diagonal_mass(kind, frac):
    g = torch.Generator().manual_seed(1)
    t, u = TimeSampler(kind, diagonal_fraction=frac)(20000, generator=g)
    assert t.shape == u.shape == (20000,)
    assert bool((t <= u).all()) and bool((t >= 0).all()) and bool((u <= 1).all())
    diag = (t == u).float().mean().item()
    assert abs(diag - frac) < 0.02
    if kind == "uniform" and frac == 0.0:
        # Uniform on the triangle: E[t] = 1/3, E[u] = 2/3.
        assert abs(t.mean().item() - 1 / 3) < 0.01 and abs(u.mean().item() - 2 / 3) < 0.01


def test_time_sampler_bad_args():
    with pytest.raises(ValueError, match="diagonal_fraction"):
        TimeSampler(diagonal_fraction=1.5)
    with pytest.raises(ValueError, match="unknown time distribution"):
        TimeSampler("beta")
