"""The reference SGFlow loss and the baselines on the analytic Gaussian case (Theorem 1 in miniature)."""
import math

import pytest
import torch

import sgflow
from sgflow.analytic import GaussianAffineFlowMap
from sgflow.losses.common import flow_map, mean_sq
from sgflow.testing import rel_err

DIM = 2
MEAN = torch.tensor([1.0, -0.5], dtype=torch.float64)
STD = 0.5


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    return MEAN + STD * torch.randn(n, DIM, dtype=torch.float64, generator=g), g


def _grad(model, loss_fn, n=2**18, seed=0, **kw):
    model.zero_grad()
    x1, g = _data(n, seed)
    loss, _ = loss_fn(model, x1, generator=g, **kw)
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def _exact():
    return GaussianAffineFlowMap(DIM, mean=MEAN, std=STD)


def _perturbed():
    return GaussianAffineFlowMap(DIM, mean=MEAN + torch.tensor([0.1, -0.05], dtype=torch.float64), std=STD * 1.1, gain=0.9)


def test_affine_family_contains_exact_map():
    """f(t,u,x) = u m + (sbar_u/sbar_t)(x - t m), sbar_t^2 = (1-t)^2 + t^2 s^2."""
    model = _exact()
    t = torch.tensor([0.0, 0.2, 0.5, 0.3], dtype=torch.float64)
    u = torch.tensor([1.0, 0.7, 0.5, 0.3 + 1e-7], dtype=torch.float64)
    x = torch.randn(4, DIM, dtype=torch.float64)
    sbar = lambda s: torch.sqrt((1 - s) ** 2 + s**2 * STD**2)  # noqa: E731
    expect = u[:, None] * MEAN + (sbar(u) / sbar(t))[:, None] * (x - t[:, None] * MEAN)
    torch.testing.assert_close(flow_map(model, t, u, x), expect, rtol=1e-10, atol=1e-10)
    # On the diagonal f~ is the exact velocity m + sbar'_t/sbar_t (x - t m).
    tt = t[:3]
    dsbar = (-(1 - tt) + tt * STD**2) / sbar(tt)
    v = MEAN + (dsbar / sbar(tt))[:, None] * (x[:3] - tt[:, None] * MEAN)
    torch.testing.assert_close(model(tt, tt, x[:3]), v, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", sorted(sgflow.LOSSES))
def test_gradient_vanishes_at_exact_map_only(name):
    """At the exact map the (Monte-Carlo) gradient is pure sampling noise; perturbed, it is not."""
    fn = sgflow.LOSSES[name]
    g_exact = _grad(_exact(), fn).norm().item()
    g_pert = _grad(_perturbed(), fn).norm().item()
    assert g_exact < 0.1 * g_pert, (name, g_exact, g_pert)
    assert g_exact < 0.03, (name, g_exact)


@pytest.mark.parametrize("name", ["eulerian", "lagrangian", "progressive"])
def test_self_distillation_residual_is_exactly_zero_off_diagonal(name):
    """Off the diagonal these objectives compare the model with itself: zero at the exact map, sample by sample."""
    n = 64
    t = torch.rand(n, dtype=torch.float64) * 0.5
    u = t + 0.1 + 0.4 * torch.rand(n, dtype=torch.float64)
    g = _grad(_exact(), sgflow.LOSSES[name], n=n, t=t, u=u)
    assert g.norm().item() < 1e-10


def test_sgflow_terms_coincide_at_exact_map():
    """With the exact map, d_t f + (d_x f) Xdot = (d_x f)(Xdot - v): the two terms are equal per sample."""
    x1, g = _data(256, 3)
    _, info = sgflow.sgflow_loss(_exact(), x1, both_terms=True, generator=g)
    assert abs(info["term1"].item() - info["term2"].item()) < 1e-10 * max(1.0, info["term1"].item())


def test_sgflow_loss_matches_independent_jvp():
    """Loss value and parameter gradient against a double-backward JVP (torch.autograd.functional.jvp)."""
    torch.manual_seed(0)
    model = _perturbed()
    n = 33
    x1, _ = _data(n, 5)
    noise = torch.randn(n, DIM, dtype=torch.float64)
    t = torch.rand(n, dtype=torch.float64) * 0.6
    u = torch.minimum(t + torch.rand(n, dtype=torch.float64) * 0.5, torch.ones(n, dtype=torch.float64))
    u[:5] = t[:5]  # some diagonal samples
    split = torch.rand(n) < 0.5
    loss, info = sgflow.sgflow_loss(model, x1, noise=noise, t=t, u=u, split=split)
    params = list(model.parameters())
    g_ref = torch.autograd.grad(loss, params)

    xt = (1 - t[:, None]) * noise + t[:, None] * x1
    xdot = x1 - noise
    with torch.no_grad():
        v_hat = model(t, t, xt)
    a = split.double()
    c = torch.where(split[:, None], xdot, xdot - v_hat)
    _, jf = torch.autograd.functional.jvp(
        lambda tt, uu, xx: flow_map(model, tt, uu, xx), (t, u, xt), (a, torch.zeros_like(u), c), create_graph=True
    )
    per = mean_sq(jf)
    expect = per[split].mean() - per[~split].mean()
    g_exp = torch.autograd.grad(expect, params)
    assert abs(loss.item() - expect.item()) < 1e-12 * max(1, abs(expect.item()))
    for a_, b_ in zip(g_ref, g_exp):
        assert rel_err(a_, b_) < 1e-10
    assert info["n_first"].item() == int(split.sum())


def test_both_terms_equals_two_splits():
    model = _perturbed()
    n = 20
    x1, _ = _data(n, 7)
    kw = dict(noise=torch.randn(n, DIM, dtype=torch.float64), t=torch.full((n,), 0.2, dtype=torch.float64), u=torch.full((n,), 0.9, dtype=torch.float64))
    both, _ = sgflow.sgflow_loss(model, x1, both_terms=True, **kw)
    first, _ = sgflow.sgflow_loss(model, x1, split=torch.ones(n, dtype=torch.bool), **kw)
    second, _ = sgflow.sgflow_loss(model, x1, split=torch.zeros(n, dtype=torch.bool), **kw)
    torch.testing.assert_close(both, first + second, rtol=1e-12, atol=1e-12)


def test_sgflow_converges_to_exact_map():
    """Optimising L_sg from a random start recovers the data mean and std (the unique stationary point)."""
    torch.manual_seed(0)
    model = GaussianAffineFlowMap(DIM, mean=torch.tensor([-0.8, 1.2]), std=1.6, gain=0.4)
    steps = 1200
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / steps)) + 1e-3)
    g = torch.Generator().manual_seed(11)
    for _ in range(steps):
        x1 = MEAN + STD * torch.randn(1024, DIM, dtype=torch.float64, generator=g)
        loss, _ = sgflow.sgflow_loss(model, x1, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    mean_err = (model.mean.detach() - MEAN).abs().max().item()
    std_err = abs(model.log_std.exp().item() - STD)
    gain_err = abs(model.gain.item() - 1.0)
    print(f"SGFlow analytic convergence: |m-m*|_inf={mean_err:.2e} |s-s*|={std_err:.2e} |gain-1|={gain_err:.2e}")
    assert mean_err < 0.02 and std_err < 0.02 and gain_err < 0.03


class _Linear(torch.nn.Module):
    def __init__(self, bad_shape=False):
        super().__init__()
        self.lin = torch.nn.Linear(DIM, DIM)
        self.bad_shape = bad_shape

    def forward(self, t, u, x):
        y = self.lin(x) * (1 + u - t)[:, None]
        return y[:, None, :] if self.bad_shape else y


BAD_INPUTS = [
    ("t_gt_u", dict(t=torch.full((4,), 0.7), u=torch.full((4,), 0.3)), ValueError, "t <= u"),
    ("t_shape", dict(t=torch.rand(3)), ValueError, "shape"),
    ("t_range", dict(t=torch.full((4,), 1.5), u=torch.full((4,), 1.5)), ValueError, r"\[0, 1\]"),
    ("t_int", dict(t=torch.zeros(4, dtype=torch.long)), TypeError, "floating"),
    ("t_nan", dict(t=torch.tensor([0.1, 0.2, float("nan"), 0.3])), ValueError, r"t must be finite; t\[2\]"),
    ("u_inf", dict(t=torch.full((4,), 0.1), u=torch.tensor([0.5, float("inf"), 0.5, 0.5])), ValueError, r"u must be finite; u\[1\]"),
    ("noise_shape", dict(noise=torch.randn(4, 3)), ValueError, "noise has shape"),
    ("noise_batch", dict(noise=torch.randn(5, DIM)), ValueError, "noise has shape"),
    ("noise_dtype", dict(noise=torch.randn(4, DIM, dtype=torch.float64)), TypeError, "dtype"),
]
BAD_CASES = [
    pytest.param(name, *case[1:], id=f"{name}-{case[0]}")
    for name in sorted(sgflow.LOSSES)
    for case in BAD_INPUTS
    if not (name == "flow_matching" and case[0] in ("t_gt_u", "u_inf"))  # flow matching has no u: it sets u = t
]


@pytest.mark.parametrize("name,kwargs,exc,match", BAD_CASES)
def test_bad_input_is_a_clear_error(name, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        sgflow.LOSSES[name](_Linear(), torch.randn(4, DIM), **kwargs)


@pytest.mark.parametrize("name", sorted(sgflow.LOSSES))
def test_bad_data_and_model_output(name):
    fn = sgflow.LOSSES[name]
    with pytest.raises(TypeError, match="floating"):
        fn(_Linear(), torch.ones(4, DIM, dtype=torch.long))
    with pytest.raises(ValueError, match="feature dimension"):
        fn(_Linear(), torch.randn(4))
    t = torch.full((4,), 0.2)
    with pytest.raises(ValueError, match="returned shape"):
        fn(_Linear(bad_shape=True), torch.randn(4, DIM), t=t, u=torch.full((4,), 0.6))


def test_split_errors():
    x1 = torch.randn(4, DIM)
    with pytest.raises(TypeError, match="bool"):
        sgflow.sgflow_loss(_Linear(), x1, split=torch.ones(4))
    with pytest.raises(ValueError, match="shape"):
        sgflow.sgflow_loss(_Linear(), x1, split=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="not both"):
        sgflow.sgflow_loss(_Linear(), x1, split=torch.ones(4, dtype=torch.bool), both_terms=True)
    with pytest.raises(ValueError, match="split_fraction"):
        sgflow.sgflow_loss(_Linear(), x1, split_fraction=1.0)


def test_model_output_dtype_under_autocast():
    """Under autocast a bf16 output is expected and cast back to the data's dtype; outside, a dtype
    other than the data's is an error."""
    model = _Linear()
    x1 = torch.randn(6, DIM)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for name in ("flow_matching", "sgflow", "meanflow"):
            loss, _ = sgflow.LOSSES[name](model, x1)
            assert loss.dtype == torch.float32 and torch.isfinite(loss), name
    with pytest.raises(TypeError, match="dtype"):
        sgflow.flow_matching_loss(lambda t, u, x: model(t, u, x).double(), x1)


@pytest.mark.parametrize("name", ["eulerian", "lagrangian", "progressive", "meanflow", "sgflow"])
@pytest.mark.parametrize("where", ["all_off_diagonal", "all_diagonal"])
def test_baselines_with_one_kind_of_row_only(name, where):
    """A batch with no diagonal (or only diagonal) samples is valid; a network rejecting empty batches must not be called with one."""
    from sgflow.nn import build_model

    torch.manual_seed(0)
    model = build_model("mlp", (DIM,))
    n = 6
    t = torch.full((n,), 0.2)
    u = torch.full((n,), 0.7) if where == "all_off_diagonal" else t.clone()
    loss, _ = sgflow.LOSSES[name](model, torch.randn(n, DIM), t=t, u=u)
    loss.backward()
    assert torch.isfinite(loss)


def test_flow_matching_times_follow_the_base_distribution():
    """Flow matching draws t from the sampler's base law (uniform), not the min of a pair."""
    seen = []
    model = lambda t, u, x: (seen.append(t.clone()), torch.zeros_like(x))[1]  # noqa: E731
    sgflow.flow_matching_loss(model, torch.randn(20000, DIM), generator=torch.Generator().manual_seed(0))
    t = seen[0]
    assert abs(t.mean().item() - 0.5) < 0.01 and abs((t < 0.5).float().mean().item() - 0.5) < 0.015


def test_given_u_with_drawn_t_keeps_t_below_u():
    u = torch.full((50,), 0.3)
    seen = []
    model = lambda t, uu, x: (seen.append((t.clone(), uu.clone())), torch.zeros_like(x))[1]  # noqa: E731
    sgflow.meanflow_loss(model, torch.randn(50, DIM), u=u)
    t_seen, u_seen = seen[-1]
    assert bool((t_seen <= u_seen).all()) and bool((u_seen == 0.3).all())
