"""Gaussian mixtures: closed-form velocity vs Monte Carlo, flow-map composition, exact sampling."""
import pytest
import torch

from sgflow.data.mixtures import GaussianMixture, gaussian_mixture_2d, random_mixture
from sgflow.metrics import energy_distance
from sgflow.samplers import sample, sample_euler, sample_flow_map, sample_heun, time_grid


def _mc_velocity(mix, t, x, n=400_000, seed=0):
    """E[Xdot_t | X_t = x] by importance sampling over data: X_0 = (x - sigma X_1)/alpha given X_1."""
    g = torch.Generator().manual_seed(seed)
    x1 = mix.sample(n, generator=g, dtype=torch.float64)
    ip = mix.interpolant
    tt = torch.tensor(t, dtype=torch.float64)
    a, s, ad, sd = ip.alpha(tt), ip.sigma(tt), ip.alpha_dot(tt), ip.sigma_dot(tt)
    out = []
    for xi in x:
        logw = -0.5 * ((xi - s * x1) ** 2).sum(1) / a**2
        w = torch.softmax(logw, 0)
        xdot = ad * (xi - s * x1) / a + sd * x1
        out.append((w[:, None] * xdot).sum(0))
    return torch.stack(out)


@pytest.mark.parametrize(
    "dim,interp,t",
    [pytest.param(2, "linear", 0.3, id="2d-linear-t0.3"), pytest.param(3, "trig", 0.6, id="3d-trig-t0.6"), pytest.param(5, "linear", 0.5, id="5d-linear-t0.5")],
)
def test_closed_form_velocity_matches_monte_carlo(dim, interp, t):
    mix = random_mixture(dim, components=3, std=0.5, seed=dim)
    mix.interpolant = __import__("sgflow").get_interpolant(interp)
    x = torch.randn(6, dim, dtype=torch.float64) * 1.2
    v = mix.velocity(torch.full((6,), t, dtype=torch.float64), x)
    v_mc = _mc_velocity(mix, t, x)
    assert (v - v_mc).abs().max().item() < 0.05 * max(1.0, v.abs().max().item())


def test_exact_flow_map_composes():
    mix = random_mixture(3, components=4, std=0.4, seed=1)
    x = torch.randn(64, 3, dtype=torch.float64)
    s, t, u = 0.1, 0.45, 0.9
    direct = mix.flow_map(s, u, x)
    composed = mix.flow_map(t, u, mix.flow_map(s, t, x))
    assert (direct - composed).abs().max().item() < 1e-6
    torch.testing.assert_close(mix.flow_map(0.4, 0.4, x), x)


@pytest.mark.parametrize("steps", [1, 3])
def test_sampler_with_exact_map_reproduces_mixture(steps):
    mix = gaussian_mixture_2d("ring8", std=0.1)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(1500, 2, dtype=torch.float64, generator=g)
    samples = sample_flow_map(mix.exact_model(), x0, steps=steps)
    ref = mix.sample(1500, generator=g, dtype=torch.float64)
    other = mix.sample(1500, generator=g, dtype=torch.float64)
    ed = energy_distance(samples, ref).item()
    ed_same = energy_distance(other, ref).abs().item()
    far = energy_distance(x0, ref).item()
    assert ed < 3 * ed_same + 2e-3 and ed < 0.05 * far, (ed, ed_same, far)


def test_ode_samplers_converge_to_exact_map():
    mix = random_mixture(2, components=3, std=0.3, seed=4)
    x0 = torch.randn(256, 2, dtype=torch.float64)
    exact = mix.flow_map(0.0, 1.0, x0)
    vel = lambda t, u, x: mix.velocity(t, x)  # noqa: E731
    err = lambda fn, n: (fn(vel, x0, steps=n) - exact).abs().mean().item()  # noqa: E731
    assert err(sample_euler, 200) < 0.5 * err(sample_euler, 50)
    heun_50, heun_100 = err(sample_heun, 50), err(sample_heun, 100)
    assert heun_100 < 1e-3 and heun_50 / heun_100 > 3  # second order: ~4x per halving of the step


def test_time_grid_and_sampler_errors():
    torch.testing.assert_close(time_grid(4), torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]))
    model = lambda t, u, x: torch.zeros_like(x)  # noqa: E731
    x0 = torch.randn(3, 2)
    with pytest.raises(ValueError, match="positive integer"):
        sample_flow_map(model, x0, steps=0)
    with pytest.raises(ValueError, match="non-decreasing"):
        sample_flow_map(model, x0, grid=[0.0, 0.6, 0.4, 1.0])
    with pytest.raises(ValueError, match="unknown sampler"):
        sample(model, x0, 2, method="rk4")
    with pytest.raises(ValueError, match="returned shape"):
        sample_euler(lambda t, u, x: x[:, :1], x0, steps=2)


def test_mixture_validation():
    with pytest.raises(ValueError, match="means"):
        GaussianMixture(torch.zeros(3))
    with pytest.raises(ValueError, match="stds"):
        GaussianMixture(torch.zeros(2, 2), stds=-1.0)
    with pytest.raises(ValueError, match="t <= u"):
        random_mixture(2, 2).flow_map(0.8, 0.2, torch.zeros(1, 2))
