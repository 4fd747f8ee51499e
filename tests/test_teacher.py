"""SGFlow distillation: ``teacher=`` on sgflow_loss / fused_loss, the trainer's teacher and the CLI.

With the exact velocity v of a Gaussian mixture as the teacher:

- ``teacher_mode="second"`` (both terms on the same samples) is, per sample,
  ||a + J v||^2 + 2 <a + J v, J (Xdot - v)>, linear in Xdot given X_t; over a conditional law of Xdot
  with mean v (each drawn Xdot paired with its mirror 2 v - Xdot at the same X_t) it is exactly the ideal
  loss and gradient,
- ``teacher_mode="both"`` is the ideal loss per sample.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import sgflow
import testnets
from sgflow.data.mixtures import gaussian_mixture_2d, random_mixture
from sgflow.losses.common import draw_batch, mean_sq
from sgflow.losses.sgflow import flow_map_jvp
from sgflow.memory import saved_tensor_bytes
from sgflow.testing import rel_err

from test_dualize import _flat, gen_batch

D64 = torch.float64

pytestmark = pytest.mark.usefixtures("one_thread")


def _mlp(dim, seed=0):
    from sgflow.nn import build_model

    torch.manual_seed(seed)
    return build_model("mlp-small", (dim,), time_scale=30.0).double()


def _ideal_loss(model, mix, x1, noise, t, u):
    """E ||d_t f + (d_x f) v||^2 with the exact velocity v (direction (1, 0, v)), per-sample mean."""
    b = draw_batch(x1, noise=noise, t=t, u=u)
    v = mix.velocity(b.t, b.xt)
    _, jvp_f = flow_map_jvp(model, b.t, b.u, b.xt, torch.ones_like(b.t), torch.zeros_like(b.u), v)
    return mean_sq(jvp_f).mean()


def _mixture_batch(mix, n, seed, mirrored=False):
    """Off-diagonal (t < u) samples of the mixture; ``mirrored``: each X_t twice, with Xdot and 2 v - Xdot."""
    g = torch.Generator().manual_seed(seed)
    x1 = mix.sample(n, generator=g, dtype=D64)
    x0 = torch.randn(x1.shape, generator=g, dtype=D64)
    t = torch.rand(n, generator=g, dtype=D64) * 0.9
    u = torch.clamp(t + 0.02 + torch.rand(n, generator=g, dtype=D64) * (1 - t), max=1.0)
    if mirrored:
        # Linear interpolant: X_t = (1 - t) x0 + t x1, Xdot = x1 - x0. Keep X_t, use Xdot' = 2 v(t, X_t) - Xdot.
        xt, xdot = (1 - t)[:, None] * x0 + t[:, None] * x1, x1 - x0
        xdot2 = 2 * mix.velocity(t, xt) - xdot
        x1b, x0b = xt + (1 - t)[:, None] * xdot2, xt - t[:, None] * xdot2
        x1, x0, t, u = torch.cat([x1, x1b]), torch.cat([x0, x0b]), torch.cat([t, t]), torch.cat([u, u])
    return x1, x0, t, u


# ------------------------------------------------------------------ the exact-velocity teacher
@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
def test_second_mode_with_exact_velocity_is_the_ideal_loss_in_expectation(fused):
    mix = random_mixture(3, 4, seed=5)
    model = _mlp(3)
    params = list(model.parameters())
    x1, x0, t, u = _mixture_batch(mix, 512, seed=1, mirrored=True)
    loss_fn = sgflow.fused_loss if fused else sgflow.sgflow_loss
    loss, info = loss_fn(model, x1, noise=x0, t=t, u=u, both_terms=True, teacher=mix.velocity)
    g = torch.autograd.grad(loss, params)
    ideal = _ideal_loss(model, mix, x1, x0, t, u)
    g_ideal = torch.autograd.grad(ideal, params)
    assert rel_err(loss, ideal) <= 1e-10
    assert rel_err(_flat(g, params), _flat(g_ideal, params)) <= 1e-10
    # Per drawn sample (no mirror) the two differ by the zero-mean cross term: a noisy estimate.
    assert float(info["term2"]) > 0.1 * float(info["term1"])


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
def test_both_mode_with_exact_velocity_is_the_ideal_loss_per_sample(fused):
    mix = gaussian_mixture_2d("ring8")
    model = _mlp(2)
    params = list(model.parameters())
    x1, x0, t, u = _mixture_batch(mix, 256, seed=2)
    loss_fn = sgflow.fused_loss if fused else sgflow.sgflow_loss
    split = torch.arange(256) % 2 == 0  # checked, then unused: every sample takes the one term
    loss, info = loss_fn(model, x1, noise=x0, t=t, u=u, split=split, teacher=mix.velocity, teacher_mode="both")
    ideal = _ideal_loss(model, mix, x1, x0, t, u)
    assert rel_err(loss, ideal) <= 1e-12
    g = torch.autograd.grad(loss, params)
    g_ideal = torch.autograd.grad(ideal, params)
    assert rel_err(_flat(g, params), _flat(g_ideal, params)) <= 1e-12
    assert float(info["term2"]) == 0.0 and int(info["n_first"]) == 256


def test_both_mode_keeps_flow_matching_on_the_diagonal():
    mix = gaussian_mixture_2d("grid9")
    model = _mlp(2)
    x1, x0, t, _ = _mixture_batch(mix, 64, seed=3)
    loss, _ = sgflow.sgflow_loss(model, x1, noise=x0, t=t, u=t, teacher=mix.velocity, teacher_mode="both")
    fm, _ = sgflow.flow_matching_loss(model, x1, noise=x0, t=t)
    assert rel_err(loss, fm) <= 1e-12


def test_teacher_equal_to_the_models_diagonal_is_todays_loss_bit_for_bit():
    model = _mlp(2, seed=4)
    x1, x0, t, u = _mixture_batch(gaussian_mixture_2d("ring8"), 64, seed=4)
    split = torch.arange(64) % 3 == 0
    kw = dict(noise=x0, t=t, u=u, split=split)
    for fn in (sgflow.sgflow_loss, sgflow.fused_loss):
        plain, _ = fn(model, x1, **kw)
        taught, _ = fn(model, x1, teacher=lambda t_, x_: model(t_, t_, x_), **kw)
        g1 = torch.autograd.grad(plain, list(model.parameters()))
        g2 = torch.autograd.grad(taught, list(model.parameters()))
        assert torch.equal(plain, taught)
        assert all(torch.equal(a, b) for a, b in zip(g1, g2))


# ------------------------------------------------------------------ fused = reference on the test networks
def _gen_batch(shape, seed):
    """test_dualize's float64 batch, its last row on the diagonal and the split alternating."""
    x1, kw = gen_batch(shape, seed)
    kw["u"][-1] = kw["t"][-1]  # one diagonal row
    kw["split"] = torch.zeros(shape[0], dtype=torch.bool)
    kw["split"][0::2] = True
    return x1, kw


def _sgflow_nn(config, shape, **kw):
    from sgflow.nn import build_model

    return build_model(config, shape, **kw)


NETWORKS = [
    pytest.param(lambda: testnets.build("adm", (3, 8, 8)), (3, 3, 8, 8), id="adm"),
    pytest.param(lambda: testnets.build("edm", (3, 8, 8)), (3, 3, 8, 8), id="edm"),
    pytest.param(lambda: testnets.build("dit", (3, 8, 8)), (3, 3, 8, 8), id="dit"),
    pytest.param(lambda: testnets.build("mlp", (5,)), (4, 5), id="attnmlp"),
    pytest.param(lambda: _sgflow_nn("tiny", (3, 7, 5), zero_init=False), (3, 3, 7, 5), id="sgflow-tiny-unet"),
    pytest.param(lambda: _sgflow_nn("mlp", (5,)), (4, 5), id="sgflow-mlp"),
]


def _teacher_case(make, shape, seed):
    """(model, teacher network, teacher v(t, x) = its diagonal, x1, loss kwargs) in float64."""
    torch.manual_seed(11)
    model = make().double()
    torch.manual_seed(12)
    teacher_net = make().double().eval()
    x1, kw = _gen_batch(shape, seed=seed)
    return model, teacher_net, (lambda t, x: teacher_net(t, t, x)), x1, kw


def _reference_and_fused(model, x1, **kw):
    """[(loss, info, flat gradient)] of sgflow_loss, then fused_loss, on the same inputs."""
    params = [p for p in model.parameters() if p.requires_grad]
    out = []
    for fn in (sgflow.sgflow_loss, sgflow.fused_loss):
        loss, info = fn(model, x1, **kw)
        out.append((loss, info, _flat(torch.autograd.grad(loss, params, allow_unused=True), params)))
    return out


@pytest.mark.parametrize("mode", ["second", "both"])
@pytest.mark.parametrize("make,shape", NETWORKS)
def test_fused_equals_reference_with_a_teacher_float64(make, shape, mode):
    model, teacher_net, teacher, x1, kw = _teacher_case(make, shape, seed=13)
    (loss_ref, info_ref, g_ref), (loss_f, info_f, g_f) = _reference_and_fused(
        model, x1, teacher=teacher, teacher_mode=mode, **kw)
    assert rel_err(loss_f, loss_ref) <= 1e-10
    for key in ("term1", "term2"):
        assert rel_err(info_f[key], info_ref[key]) <= 1e-10, key
    assert g_ref.abs().max() > 0
    assert rel_err(g_f, g_ref) <= 1e-10
    assert all(p.grad is None for p in teacher_net.parameters())


# ------------------------------------------------------------------ the teacher's parameters and memory
class _Teacher(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, t, x):
        return self.net(t, t, x)


@pytest.mark.parametrize("fn", [sgflow.sgflow_loss, sgflow.fused_loss], ids=["reference", "fused"])
@pytest.mark.parametrize("mode", ["second", "both"])
def test_teacher_parameters_get_no_gradient_and_keep_requires_grad(fn, mode):
    model = _mlp(2, seed=1)
    teacher = _Teacher(_mlp(2, seed=2))
    frozen = list(teacher.parameters())[0]
    frozen.requires_grad_(False)
    flags = [p.requires_grad for p in teacher.parameters()]
    x1, x0, t, u = _mixture_batch(gaussian_mixture_2d("ring8"), 32, seed=5)
    loss, _ = fn(model, x1, noise=x0, t=t, u=u, teacher=teacher, teacher_mode=mode)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert [p.requires_grad for p in teacher.parameters()] == flags
    assert any(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("fn", [sgflow.sgflow_loss, sgflow.fused_loss], ids=["reference", "fused"])
def test_teacher_adds_no_saved_activations(fn):
    model = _mlp(2, seed=1)
    big = _Teacher(_sgflow_nn("mlp", (2,)).double().eval())  # a much wider network than the student
    x1, x0, t, u = _mixture_batch(gaussian_mixture_2d("ring8"), 128, seed=6)
    split = torch.arange(128) % 2 == 0
    zero = lambda t_, x_: torch.zeros_like(x_)  # noqa: E731  (a teacher that costs nothing)

    def saved(**kw):
        return saved_tensor_bytes(lambda: fn(model, x1, noise=x0, t=t, u=u, split=split, **kw)[0])

    plain = saved()
    with_big = saved(teacher=big)
    assert with_big["bytes"] == plain["bytes"] == saved(teacher=zero)["bytes"]
    assert with_big["param_bytes"] == plain["param_bytes"]  # none of the teacher's parameters are saved
    assert saved(teacher=big, teacher_mode="both")["bytes"] == saved(teacher=zero, teacher_mode="both")["bytes"]


# ------------------------------------------------------------------ bad teachers
@pytest.mark.parametrize("bad,match", [
    (lambda t, x: x[:, :1], r"teacher\(t, x\) returned \(\d+, 1\)"),
    (lambda t, x: x.float(), r"torch.float32"),
    (lambda t, x: torch.zeros(x.shape, dtype=x.dtype, device="meta"), r"on meta"),
])
@pytest.mark.parametrize("fn", [sgflow.sgflow_loss, sgflow.fused_loss], ids=["reference", "fused"])
@pytest.mark.parametrize("mode", ["second", "both"])
def test_bad_teacher_output_is_a_one_line_error(fn, mode, bad, match):
    model = _mlp(2)
    x1 = torch.randn(8, 2, dtype=D64)
    with pytest.raises(ValueError, match=match) as e:
        fn(model, x1, teacher=bad, teacher_mode=mode, split=torch.arange(8) % 2 == 0)
    assert "\n" not in str(e.value)


def test_bad_teacher_arguments():
    model = _mlp(2)
    x1 = torch.randn(8, 2, dtype=D64)
    with pytest.raises(TypeError, match="teacher must be a callable"):
        sgflow.sgflow_loss(model, x1, teacher=3.0)
    with pytest.raises(ValueError, match="teacher_mode must be one of"):
        sgflow.fused_loss(model, x1, teacher=lambda t, x: x, teacher_mode="first")
    with pytest.raises(ValueError, match="needs a teacher"):
        sgflow.fused_loss(model, x1, teacher_mode="both")
    with pytest.raises(TypeError, match="must return a tensor"):
        sgflow.sgflow_loss(model, x1, teacher=lambda t, x: x.tolist())


# ------------------------------------------------------------------ trainer and command line
SMALL = ["--data", "ring8", "--model", "mlp-small", "--model-opt", "hidden=32", "--model-opt", "depth=2",
         "--model-opt", "time_scale=30", "--batch-size", "32", "--no-progress", "--threads", "1"]


@pytest.fixture(scope="module")
def fm_run(tmp_path_factory):
    """A small flow-matching checkpoint on ring8: the teacher of the CLI tests."""
    from sgflow.cli import main

    out = tmp_path_factory.mktemp("teacher") / "fm"
    assert main(["train", *SMALL, "--method", "flow_matching", "--steps", "4", "--out", str(out), "--no-figures"]) == 0
    return out


def _err(capsys):
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("sgflow: error: "), err
    return err


@pytest.mark.parametrize("mode", ["second", "both"])
def test_train_with_a_teacher_checkpoint(fm_run, tmp_path, capsys, mode):
    from sgflow.cli import main
    from sgflow.train import TeacherVelocity, TrainConfig, Trainer, read_checkpoint

    out = tmp_path / "student"
    assert main(["train", *SMALL, "--method", "sgflow_fused", "--teacher", str(fm_run), "--teacher-mode", mode,
                 "--steps", "3", "--out", str(out), "--no-figures"]) == 0
    cfg = read_checkpoint(out)["config"]
    assert cfg.teacher == str(fm_run) and cfg.teacher_mode == mode
    assert TrainConfig().teacher_mode == "both"  # the measured default
    trainer = Trainer(cfg, resume=out)
    try:
        assert isinstance(trainer.teacher, TeacherVelocity) and not trainer.teacher.training
        assert not any(p.requires_grad for p in trainer.teacher.parameters())
        info = trainer.train_step()
        assert all(p.grad is None for p in trainer.teacher.parameters())
        if mode == "both":
            assert float(info["term2"]) == 0.0
    finally:
        trainer.close()


def test_teacher_run_resumes_exactly(fm_run, tmp_path):
    from sgflow.train import TrainConfig, Trainer, train

    kw = dict(method="sgflow_fused", data="ring8", model="mlp-small", model_kwargs={"hidden": 32, "depth": 2},
              batch_size=32, progress=False, figures=False, teacher=str(fm_run), teacher_schedule="linear", steps=6)
    full = train(TrainConfig(out_dir=str(tmp_path / "a"), **kw))
    half = Trainer(TrainConfig(out_dir=str(tmp_path / "b"), **kw))  # the same run, stopped after 3 steps
    for _ in range(3):
        half.train_step()
    half.save_checkpoint()
    half.close()
    resumed = train(TrainConfig(out_dir=str(tmp_path / "b"), **kw), resume=tmp_path / "b")
    for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)


def test_teacher_errors_are_one_line(fm_run, tmp_path, capsys):
    from sgflow.cli import main

    # Another data shape: a 16-D mixture's student, a 2-D teacher.
    gmm = ["--data", "gmm", "--data-opt", "dim=16", "--model", "mlp-small", "--batch-size", "16", "--no-progress"]
    assert main(["train", *gmm, "--method", "sgflow_fused", "--teacher", str(fm_run), "--steps", "1",
                 "--out", str(tmp_path / "a")]) == 1
    assert "is for data of shape [2] (ring8), but this run's data has shape [16]" in _err(capsys)
    # Not an sgflow checkpoint.
    bogus = tmp_path / "bogus.pt"
    torch.save({"weights": torch.zeros(2)}, bogus)
    assert main(["train", *SMALL, "--method", "sgflow_fused", "--teacher", str(bogus), "--steps", "1",
                 "--out", str(tmp_path / "b")]) == 1
    assert "teacher: " in _err(capsys)
    # An sgflow checkpoint of a method this sgflow does not know.
    ckpt = torch.load(fm_run / "checkpoint.pt", weights_only=True)
    ckpt["config"]["method"] = "mystery_flow"
    odd = tmp_path / "odd.pt"
    torch.save(ckpt, odd)
    assert main(["train", *SMALL, "--method", "sgflow_fused", "--teacher", str(odd), "--steps", "1",
                 "--out", str(tmp_path / "c")]) == 1
    assert "checkpoint of method 'mystery_flow'" in _err(capsys)
    # A missing file; a teacher for a method that is not SGFlow; a bad mode.
    assert main(["train", *SMALL, "--method", "sgflow_fused", "--teacher", str(tmp_path / "nope"), "--steps", "1",
                 "--out", str(tmp_path / "d")]) == 1
    assert "not found" in _err(capsys)
    assert main(["train", *SMALL, "--method", "meanflow_fused", "--teacher", str(fm_run), "--steps", "1",
                 "--out", str(tmp_path / "e")]) == 1
    assert "a teacher distils into SGFlow" in _err(capsys)
    assert main(["train", *SMALL, "--teacher", str(fm_run), "--teacher-mode", "first", "--out", str(tmp_path / "f")]) == 2


def test_distill_trains_a_teacher_then_the_student(tmp_path, capsys):
    from sgflow.cli import main
    from sgflow.train import read_checkpoint

    out = tmp_path / "d"
    assert main(["distill", "--data", "ring8", "--model", "mlp-small", "--model-opt", "hidden=32", "--batch-size", "32",
                 "--teacher-steps", "3", "--steps", "2", "--out", str(out), "--no-progress"]) == 0
    assert "distilled sgflow_fused on ring8" in capsys.readouterr().out
    teacher = read_checkpoint(out / "teacher")
    student = read_checkpoint(out)
    assert teacher["config"].method == "flow_matching" and teacher["step"] == 3
    assert student["config"].teacher == str(out / "teacher" / "checkpoint.pt") and student["step"] == 2
    # From an existing teacher; the data set is the teacher's.
    out2 = tmp_path / "d2"
    assert main(["distill", "--teacher", str(out / "teacher"), "--model", "mlp-small", "--model-opt", "hidden=32",
                 "--batch-size", "32", "--steps", "2", "--out", str(out2), "--no-progress"]) == 0
    assert read_checkpoint(out2)["config"].data == "ring8"
    assert main(["distill", "--teacher", str(out / "teacher"), "--teacher-steps", "3", "--out", str(tmp_path / "x")]) == 1
    assert "either --teacher" in _err(capsys)
    assert main(["distill", "--data", "ring8", "--teacher-steps", "2", "--out", str(out)]) == 1
    assert "already holds a teacher" in _err(capsys)


@pytest.mark.parametrize("make,shape", [NETWORKS[0], NETWORKS[3], NETWORKS[5]])
def test_fused_equals_reference_with_a_teacher_semi_update_float64(make, shape):
    """The trainer's SGFlow recipe (update="semi") with a teacher in the second term."""
    model, teacher_net, teacher, x1, kw = _teacher_case(make, shape, seed=14)
    del kw["split"]
    (loss_ref, _, g_ref), (loss_f, _, g_f) = _reference_and_fused(model, x1, teacher=teacher, update="semi", **kw)
    assert rel_err(loss_f, loss_ref) <= 1e-10
    assert rel_err(g_f, g_ref) <= 1e-10
    assert all(p.grad is None for p in teacher_net.parameters())
    # "both" leaves no second term: the same loss under either update.
    both_semi, _ = sgflow.fused_loss(model, x1, teacher=teacher, teacher_mode="both", update="semi", **kw)
    both_paper, _ = sgflow.fused_loss(model, x1, teacher=teacher, teacher_mode="both", **kw)
    assert torch.equal(both_semi, both_paper)


def test_trainer_takes_a_callable_teacher_and_refuses_it_beside_a_checkpoint_or_off_sgflow():
    """Trainer(teacher=v): the exact velocity of ring8 as the teacher (the quality table's oracle row)."""
    from sgflow.data import get_dataset
    from sgflow.train import ConfigError, TrainConfig, Trainer

    v = get_dataset("ring8").mixture.velocity
    cfg = TrainConfig(method="sgflow_fused", data="ring8", model="mlp-small", steps=3, batch_size=16, out_dir=None,
                      progress=False, figures=False, log_every=1)
    tr = Trainer(cfg, teacher=v)
    assert tr.teacher is v
    tr.run()
    assert tr.history[-1]["term2"] == 0  # teacher_mode "both" (the trainer's default): no second term left
    with pytest.raises(ConfigError, match="in place of config.teacher"):
        Trainer(TrainConfig(method="meanflow", data="ring8", model="mlp-small", out_dir=None), teacher=v)
