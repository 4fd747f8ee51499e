"""SGFlow's training recipe: the semi-gradient update (``update="semi"``), the trainer's defaults and
its early warning.

The semi update's gradient is, per sample, 2<r1, de> with r1 = JVP_(1,0,Xdot) f, r2 = JVP_(0,0,Xdot-v_hat) f
and e = r1 - r2: the paper's L_sg gradient 2<r1, dr1> - 2<r2, dr2> = 2<r1, de> + 2<e, dr2> without its
second part (sgflow/losses/semi.py). Checked here exactly in float64, fused against the reference, and
in training: the paper's update on the 16-D mixture trips the early warning before the loss passes -1e3,
the default recipe does not.
"""
import copy
import dataclasses
import math
import warnings

import pytest
import torch

import sgflow
import testnets
from sgflow.nn import build_model
from sgflow.decompose import decomposed
from sgflow.losses.common import flow_map, mean_sq
from sgflow.train import METHOD_DEFAULTS, SGFlowInstabilityWarning, TrainConfig, Trainer, TrainingDiverged

from test_dualize import _assert_fused_equals_reference, gen_batch, rel_err

D64 = torch.float64


def _batch(shape, seed, n_diag=1):
    """x1 and explicit noise / t / u, the first ``n_diag`` samples on the diagonal (t = u)."""
    x1, kw = gen_batch(shape, seed, both_terms=True)
    del kw["both_terms"]
    kw["u"] = kw["u"].clone()
    kw["u"][:n_diag] = kw["t"][:n_diag]
    return x1, kw


def _mlp(dim, seed=0):
    torch.manual_seed(seed)
    return testnets.build("mlp", (dim,)).double()


def test_semi_gradient_is_the_paper_gradient_without_its_cross_part():
    """grad L_sg(both terms) - grad semi == grad of mean 2<sg[e], r2> (r2 with the graph), float64."""
    model = _mlp(5)
    x1, kw = _batch((6, 5), seed=3, n_diag=2)
    params = [p for p in model.parameters() if p.requires_grad]
    paper, info_p = sgflow.sgflow_loss(model, x1, both_terms=True, **kw)
    g_paper = torch.autograd.grad(paper, params)
    semi, info_s = sgflow.sgflow_loss(model, x1, update="semi", **kw)
    g_semi = torch.autograd.grad(semi, params)

    t, u, noise = kw["t"], kw["u"], kw["noise"]
    xt, xdot = (1 - t)[:, None] * noise + t[:, None] * x1, x1 - noise
    with torch.no_grad():
        v_hat = model(t, t, xt)
    ones, zeros = torch.ones_like(t), torch.zeros_like(t)
    fn = lambda a, b, c: flow_map(model, a, b, c)  # noqa: E731
    with decomposed():  # torch's own layer-norm JVP gradients are wrong (pytorch#196700)
        e = torch.func.jvp(fn, (t, u, xt), (ones, zeros, v_hat))[1].detach()
        r2 = torch.func.jvp(fn, (t, u, xt), (zeros, zeros, xdot - v_hat))[1]
    cross = (2 * (e * r2).flatten(1).mean(1)).mean()
    g_cross = torch.autograd.grad(cross, params)
    for gp, gs, gc in zip(g_paper, g_semi, g_cross):
        torch.testing.assert_close(gp - gs, gc, rtol=1e-10, atol=1e-12)
    # The semi loss's value is the paper's first term (mean ||r1||^2 over every sample).
    torch.testing.assert_close(semi.detach(), info_p["term1"], rtol=1e-12, atol=0)
    assert info_s["n_first"] == 6 and info_s["n_second"] == 4  # 2 diagonal samples need no target JVP


NETWORKS = [
    pytest.param(lambda: testnets.build("adm", (3, 8, 8)), (3, 3, 8, 8), id="adm-3x8x8-b3"),
    pytest.param(lambda: testnets.build("dit", (3, 8, 8)), (3, 3, 8, 8), id="dit-3x8x8-b3"),
    pytest.param(lambda: testnets.build("mlp", (5,)), (4, 5), id="attnmlp-d5-b4"),
    pytest.param(lambda: build_model("tiny", (3, 7, 5), zero_init=False), (3, 3, 7, 5), id="sgflow-tiny-unet-7x5-b3"),
]


CASES = [pytest.param(*p.values, False, id=p.id + "-own-target") for p in NETWORKS] + [
    pytest.param(*p.values, True, id=p.id + "-ema-target") for p in NETWORKS if p.id.startswith(("dit", "attnmlp"))]


@pytest.mark.parametrize("make,shape,with_target", CASES)
def test_semi_update_fused_equals_reference_float64(make, shape, with_target):
    torch.manual_seed(0)
    model = make().double()
    x1, kw = _batch(shape, seed=11, n_diag=1)
    kw["update"] = "semi"
    if with_target:
        # A target network as the trainer's EMA would be: the same architecture, other weights, no grad.
        target = copy.deepcopy(model).requires_grad_(False)
        with torch.no_grad():
            for p in target.parameters():
                p.add_(0.05 * torch.randn_like(p))
        kw["target"] = target
    _assert_fused_equals_reference(model, model, (x1, kw), 1e-10)
    if with_target:
        assert all(p.grad is None for p in target.parameters())


def test_target_network_gives_v_hat_and_the_stop_gradient_target():
    """With target=T: loss = mean ||JVP_(1,0,v_T) f + sg[J_T (Xdot - v_T)]||^2, v_T = T~(t, t, X_t)."""
    model, target = _mlp(4, seed=0), _mlp(4, seed=1)
    x1, kw = _batch((5, 4), seed=2, n_diag=1)
    loss, _ = sgflow.sgflow_loss(model, x1, update="semi", target=target, **kw)
    t, u, noise = kw["t"], kw["u"], kw["noise"]
    xt, xdot = (1 - t)[:, None] * noise + t[:, None] * x1, x1 - noise
    ones, zeros = torch.ones_like(t), torch.zeros_like(t)
    with decomposed():
        v_t = target(t, t, xt).detach()
        e = torch.func.jvp(lambda a, b, c: flow_map(model, a, b, c), (t, u, xt), (ones, zeros, v_t))[1]
        r2 = torch.func.jvp(lambda a, b, c: flow_map(target, a, b, c), (t, u, xt), (zeros, zeros, xdot - v_t))[1].detach()
    torch.testing.assert_close(loss, mean_sq(e + r2).mean(), rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="pass update='semi' with it"):
        sgflow.fused_loss(model, x1, target=target, **kw)


def test_semi_update_with_the_exact_velocity_is_unbiased_for_the_ideal_gradient():
    """Teacher = the mixture's exact v: the semi gradient minus the ideal loss's gradient is the gradient of
    mean 2<sg[r2], e> with E[r2 | X_t] = 0, so it vanishes in expectation: checked on an affine family
    (3 parameter tensors) within 4 standard errors per coordinate, over 40k samples."""
    from sgflow.analytic import GaussianAffineFlowMap
    from sgflow.data.mixtures import random_mixture

    mix = random_mixture(3, 3, std=0.4, seed=4)
    model = GaussianAffineFlowMap(3, mean=[0.3, -0.2, 0.1], std=0.7, gain=1.3)
    n = 40000
    g = torch.Generator().manual_seed(5)
    x1 = mix.sample(n, generator=g, dtype=D64)
    noise = torch.randn(n, 3, generator=g, dtype=D64)
    t = torch.rand(n, generator=g, dtype=D64) * 0.9
    u = t + (1 - t) * torch.rand(n, generator=g, dtype=D64)
    params = list(model.parameters())

    semi, _ = sgflow.sgflow_loss(model, x1, noise=noise, t=t, u=u, update="semi", teacher=mix.velocity)
    g_semi = torch.cat([gg.flatten() for gg in torch.autograd.grad(semi, params)])
    xt = (1 - t)[:, None] * noise + t[:, None] * x1
    v = mix.velocity(t, xt)
    fn = lambda a, b, c: flow_map(model, a, b, c)  # noqa: E731
    ones, zeros = torch.ones_like(t), torch.zeros_like(t)
    ideal_rows = mean_sq(torch.func.jvp(fn, (t, u, xt), (ones, zeros, v))[1])
    g_ideal = torch.cat([gg.flatten() for gg in torch.autograd.grad(ideal_rows.mean(), params)])
    # Standard error of the difference from per-chunk estimates (20 chunks of 2000 samples).
    diffs = []
    for c in range(20):
        sl = slice(c * 2000, (c + 1) * 2000)
        s_c, _ = sgflow.sgflow_loss(model, x1[sl], noise=noise[sl], t=t[sl], u=u[sl], update="semi", teacher=mix.velocity)
        i_c = mean_sq(torch.func.jvp(fn, (t[sl], u[sl], xt[sl]), (ones[sl], zeros[sl], v[sl]))[1]).mean()
        gs = torch.cat([gg.flatten() for gg in torch.autograd.grad(s_c, params)])
        gi = torch.cat([gg.flatten() for gg in torch.autograd.grad(i_c, params)])
        diffs.append(gs - gi)
    diffs = torch.stack(diffs)
    se = diffs.std(0) / math.sqrt(len(diffs))
    assert ((g_semi - g_ideal).abs() < 4 * se + 1e-12).all(), ((g_semi - g_ideal) / se)
    # Not trivially true: the per-chunk differences are far from zero (the estimator is noisy).
    assert (diffs.abs().mean(0) > 3 * se).any()


@pytest.mark.parametrize("fn", [sgflow.sgflow_loss, sgflow.fused_loss], ids=["reference", "fused"])
@pytest.mark.parametrize("kw,match", [
    ({"update": "fast"}, "update must be one of"),
    ({"update": "semi", "both_terms": True}, "apply to update='paper' only"),
    ({"update": "semi", "split": torch.tensor([True, False, True])}, "apply to update='paper' only"),
    ({"update": "semi", "split_fraction": 0.3}, "apply to update='paper' only"),
    ({"update": "paper", "target": lambda t, u, x: x}, "pass update=.semi. with it"),
], ids=["unknown", "both-terms", "split", "split-fraction", "target-without-semi"])
def test_semi_update_refuses_paper_only_options(fn, kw, match):
    model = _mlp(2)
    with pytest.raises(ValueError, match=match):
        fn(model, torch.randn(3, 2, dtype=D64), **kw)


# ------------------------------------------------------------------ the trainer's recipe
def test_default_recipe_is_the_semi_update_and_explicit_options_are_kept():
    assert METHOD_DEFAULTS["sgflow"] == METHOD_DEFAULTS["sgflow_fused"] == {"update": "semi", "target": "ema"}
    assert TrainConfig(method="sgflow_fused").loss_kwargs == {"update": "semi", "target": "ema"}
    assert TrainConfig(method="meanflow").loss_kwargs == {}
    # An explicit dict (a checkpoint of an older run included) is used exactly as given.
    assert TrainConfig(method="sgflow", loss_kwargs={}).loss_kwargs == {}
    old = TrainConfig(method="sgflow").to_dict()
    old["loss_kwargs"] = {"both_terms": True}
    assert TrainConfig.from_dict(old).loss_kwargs == {"both_terms": True}


def test_cli_loss_options_add_to_the_default_recipe():
    from sgflow.cli import build_train_config, make_parser

    args = make_parser().parse_args(["train", "--method", "sgflow_fused", "--out", "/nonexistent/x", "--loss-opt", "update=paper",
                                     "--loss-opt", "both_terms=true"])
    cfg, _ = build_train_config(args)
    assert cfg.loss_kwargs == {"update": "paper", "both_terms": True}  # choosing the update replaces the recipe
    args = make_parser().parse_args(["train", "--method", "sgflow_fused", "--out", "/nonexistent/x", "--loss-opt",
                                     "split_fraction=0.3"])
    cfg, _ = build_train_config(args)
    assert cfg.loss_kwargs == {"update": "semi", "target": "ema", "split_fraction": 0.3}
    with pytest.raises(ValueError, match="apply to update='paper' only"):  # not silently ignored
        Trainer(dataclasses.replace(cfg, out_dir=None, steps=1, progress=False, figures=False)).run()
    args = make_parser().parse_args(["train", "--method", "sgflow_fused", "--out", "/nonexistent/x"])
    assert build_train_config(args)[0].loss_kwargs == {"update": "semi", "target": "ema"}


def _gmm16_trainer(loss_kwargs, steps, seed=0):
    cfg = TrainConfig(method="sgflow_fused", data="gmm", data_kwargs={"dim": 16}, model="mlp-small",
                      model_kwargs={"time_scale": 30.0}, steps=steps, lr=3e-3, warmup=100, lr_schedule="cosine",
                      ema_decay=0.995, out_dir=None, log_every=1, progress=False, figures=False, seed=seed,
                      loss_kwargs=loss_kwargs)
    return Trainer(cfg)


def test_early_warning_fires_before_the_paper_update_diverges():
    """The paper's update on the 16-D mixture (the quality table's settings) diverges near step 110; the
    warning names the cause before the loss passes -1e3, and the divergence error repeats it."""
    torch.set_num_threads(1)
    tr = _gmm16_trainer({"update": "paper"}, steps=400)
    with pytest.warns(SGFlowInstabilityWarning, match=r"L_sg = L_ideal - E\|\|J \(v_hat - v\)\|\|\^2"):
        with pytest.raises(TrainingDiverged, match="Cause, seen from step") as err:
            tr.run()
    assert "semi-gradient update" in str(err.value)
    first_big = next(h["step"] for h in tr.history if h["loss"] < -1e3)
    assert tr.instability is not None and tr.instability["step"] < first_big


def test_early_warning_stays_quiet_on_the_default_recipe():
    torch.set_num_threads(1)
    tr = _gmm16_trainer(None, steps=300)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SGFlowInstabilityWarning)
        tr.run()
    assert tr.instability is None
    assert all(0.5 < h["ratio"] < 2.0 for h in tr.history)
    assert tr.history[-1]["loss"] >= 0  # the semi update's loss is E||r1||^2: bounded below
