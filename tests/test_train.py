"""Training loop: quality improves, exact resume, checkpoints, configuration errors."""
import copy
import dataclasses
import json
import math

import pytest
import torch

from sgflow.evaluate import evaluate_points
from sgflow.train import (
    CheckpointError,
    ConfigError,
    TrainConfig,
    Trainer,
    available_methods,
    ema_decay_at,
    load_model,
    lr_at,
    lr_factor,
    paired_split,
    read_checkpoint,
    train,
    validate_config,
)

# Small and fast: a 2-layer MLP of width 64 on the 8-mode ring.
TINY = dict(data="ring8", model="mlp-small", model_kwargs={"hidden": 64, "depth": 2, "time_scale": 30.0},
            batch_size=32, lr=2e-3, progress=False, log_every=2)
FUSED = "sgflow_fused" if "sgflow_fused" in available_methods() else "sgflow"


@pytest.fixture(autouse=True)
def _one_thread():
    # Bit-exact comparisons need the same reduction order in every run; one thread also avoids
    # oversubscription when tests run beside other work.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _cfg(tmp_path, name="run", **kw):
    return TrainConfig(**{**TINY, "out_dir": str(tmp_path / name) if tmp_path is not None else None, **kw})


def test_sgflow_training_improves_one_and_four_step_quality(tmp_path):
    """800 SGFlow steps (~5 s) on a 2-D mixture beat the untrained network clearly at 1 and 4 steps.

    (The untrained network is near the identity map, which is already a fair match in energy distance for
    this unit-scale data, so the bar is a 2x improvement; seen: ED 0.074 -> 0.017 / 0.011, map MSE 0.22 -> 0.06.)
    """
    cfg = TrainConfig(method=FUSED, data="ring8", model="mlp-small", model_kwargs={"time_scale": 30.0},
                      loss_kwargs={"both_terms": True}, diagonal_fraction=0.5, steps=800, batch_size=128, lr=3e-3,
                      warmup=50, ema_decay=0.99, out_dir=None, progress=False, log_every=50)
    trainer = Trainer(cfg)
    untrained = copy.deepcopy(trainer.model)
    cache = {}
    before = evaluate_points(untrained, trainer.dataset, steps=(1, 4), n=1000, seed=5, pairs=(), cache=cache)
    trainer.run()
    after = evaluate_points(trainer.ema, trainer.dataset, steps=(1, 4), n=1000, seed=5, pairs=(), cache=cache)
    for b, a in zip(before["rows"], after["rows"]):
        print(f"steps {b['steps']}: ED {b['energy']:.4f} -> {a['energy']:.4f}, map MSE {b['map_mse']:.4f} -> {a['map_mse']:.4f}")
        assert a["energy"] < 0.5 * b["energy"], f"{a['steps']}-step energy distance did not improve enough"
        assert a["map_mse"] < 0.5 * b["map_mse"], f"{a['steps']}-step flow-map error did not improve enough"


def _states(trainer):
    return {
        "model": trainer.model.state_dict(),
        "ema": trainer.ema.state_dict(),
        "opt": trainer.optimizer.state_dict()["state"],
        "stream": trainer.stream.get_state(),
        "loss_gen": trainer.loss_gen.get_state(),
    }


def _assert_equal_nested(a, b, path=""):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _assert_equal_nested(a[k], b[k], f"{path}.{k}")
    elif torch.is_tensor(a):
        assert torch.equal(a, b), f"{path} differs"
    else:
        assert a == b, path


@pytest.mark.parametrize("method", [FUSED, "progressive"])
def test_resume_reproduces_uninterrupted_run_bit_for_bit(tmp_path, method):
    """Stop at step 6 (checkpoint), resume to 12: weights, EMA, optimizer, RNG and loss log all equal."""
    full = train(_cfg(tmp_path, "full", method=method, steps=12, ckpt_every=6, figures=False))
    first = train(_cfg(tmp_path, "part", method=method, steps=6, figures=False))
    assert first.step == 6
    resumed = train(_cfg(tmp_path, "part", method=method, steps=12, figures=False), resume=tmp_path / "part")
    assert resumed.step == 12
    _assert_equal_nested(_states(full), _states(resumed))
    strip = lambda recs: [{k: v for k, v in r.items() if k not in ("time", "samples_per_s")} for r in recs]  # noqa: E731
    log_full = [json.loads(l) for l in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    log_part = [json.loads(l) for l in (tmp_path / "part" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log_part] == list(range(2, 13, 2))
    assert strip(log_full) == strip(log_part)


def test_resume_truncates_log_written_after_the_checkpoint(tmp_path):
    cfg = _cfg(tmp_path, method="flow_matching", steps=4, figures=False)
    train(cfg)
    with open(tmp_path / "run" / "log.jsonl", "a") as f:  # as if the run went on and crashed before saving
        f.write(json.dumps({"step": 6, "loss": 1.0}) + "\n")
    train(dataclasses.replace(cfg, steps=8), resume=tmp_path / "run")
    steps = [json.loads(l)["step"] for l in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6, 8]


def test_outputs_and_checkpoint_contents(tmp_path):
    trainer = train(_cfg(tmp_path, method="sgflow", steps=4, sample_every=2, ckpt_every=2))
    out = tmp_path / "run"
    assert (out / "checkpoint.pt").exists() and (out / "config.json").exists()
    assert sorted(p.name for p in (out / "samples").glob("*.png")) == ["step_0000002.png", "step_0000004.png"]
    rec = json.loads((out / "log.jsonl").read_text().splitlines()[-1])
    assert {"step", "loss", "grad_norm", "lr", "samples_per_s", "term1", "term2"} <= set(rec)
    ckpt = read_checkpoint(out)
    assert ckpt["step"] == 4 and ckpt["config"].method == "sgflow" and ckpt["data_shape"] == [2]
    model, cfg, _ = load_model(out / "checkpoint.pt")
    for p, q in zip(model.parameters(), trainer.ema.parameters()):
        assert torch.equal(p, q)
    raw, _, _ = load_model(out, use_ema=False)
    for p, q in zip(raw.parameters(), trainer.model.parameters()):
        assert torch.equal(p, q)


def test_resume_with_different_config_is_refused(tmp_path):
    train(_cfg(tmp_path, method="sgflow", steps=2, figures=False))
    with pytest.raises(CheckpointError, match="method='sgflow'.*'meanflow'"):
        Trainer(_cfg(tmp_path, method="meanflow", steps=4), resume=tmp_path / "run")
    with pytest.raises(CheckpointError, match="batch_size"):
        Trainer(_cfg(tmp_path, method="sgflow", steps=4, batch_size=16), resume=tmp_path / "run")


def test_bad_checkpoints(tmp_path):
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="not a valid PyTorch file"):
        read_checkpoint(bad)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, other)
    with pytest.raises(CheckpointError, match="not an sgflow checkpoint"):
        read_checkpoint(other)
    with pytest.raises(FileNotFoundError):
        read_checkpoint(tmp_path / "missing.pt")
    train(_cfg(tmp_path, method="sgflow", steps=1, figures=False))
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    ckpt["config"]["model_kwargs"]["hidden"] = 48  # weights no longer fit the network the config builds
    torch.save(ckpt, tmp_path / "mismatch.pt")
    with pytest.raises(CheckpointError, match="does not fit"):
        load_model(tmp_path / "mismatch.pt")


@pytest.mark.parametrize("change,match", [
    (dict(method="nope"), "unknown method"),
    (dict(batch_size=1, loss_kwargs={"update": "paper"}), "at least 2 samples"),
    (dict(batch_size=0), "batch size"),
    (dict(lr=-1.0), "learning rate"),
    (dict(betas=(0.9, 1.5)), "betas"),
    (dict(ema_decay=1.0), "EMA"),
    (dict(grad_clip=-1.0), "grad clip"),
    (dict(time_dist="beta"), "time distribution"),
    (dict(diagonal_fraction=2.0), "diagonal"),
    (dict(interpolant="cubic"), "interpolant"),
    (dict(loss_kwargs={"bogus": 1}), "no option 'bogus'"),
    (dict(loss_kwargs={"noise": 1}), "set by the trainer"),
    (dict(steps=-1), "steps"),
    (dict(log_every=0), "log every"),
], ids=lambda v: str(v)[:30])
def test_config_errors(change, match):
    with pytest.raises(ConfigError, match=match):
        validate_config(TrainConfig(**change))


def test_batch_must_divide_over_processes():
    with pytest.raises(ConfigError, match="not divisible by the number of processes 3"):
        validate_config(TrainConfig(batch_size=8), world_size=3)
    with pytest.raises(ConfigError, match="at least 2 samples per process"):
        validate_config(TrainConfig(batch_size=4, loss_kwargs={}), world_size=4)  # the paper's split batch
    validate_config(TrainConfig(batch_size=4), world_size=4)  # the default semi update: one row per sample
    validate_config(TrainConfig(method="flow_matching", batch_size=4), world_size=4)


def test_unknown_network_config(tmp_path):
    with pytest.raises(ConfigError, match="unknown network config 'huge'"):
        Trainer(_cfg(tmp_path, model="huge"))
    with pytest.raises(ConfigError, match="cannot build network 'tiny'"):
        Trainer(_cfg(tmp_path, model="tiny", model_kwargs={}))  # image network on 2-D points


def test_paired_split_is_balanced_on_even_slices():
    s = paired_split(10, torch.Generator().manual_seed(0))
    assert s.dtype == torch.bool and s.shape == (10,)
    for lo in range(0, 10, 2):
        assert s[lo:lo + 2].sum() == 1
    assert paired_split(7, torch.Generator().manual_seed(0)).shape == (7,)


def test_lr_schedule():
    cfg = TrainConfig(lr=1.0, warmup=10, steps=110, lr_schedule="cosine")
    assert lr_at(cfg, 0) == pytest.approx(0.1)
    assert lr_at(cfg, 9) == pytest.approx(1.0)
    assert lr_at(cfg, 60) == pytest.approx(0.5)
    assert lr_at(cfg, 110) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(TrainConfig(lr=0.5), 1000) == 0.5


def _formula_lr(cfg, step):
    """The schedule as the trainer wrote it before it used a LambdaLR (hand-set param_group["lr"])."""
    scale = 1.0
    if cfg.warmup > 0:
        scale = min(1.0, (step + 1) / cfg.warmup)
    if cfg.lr_schedule == "cosine" and cfg.steps > 0:
        progress = min(max(step - cfg.warmup, 0) / max(cfg.steps - cfg.warmup, 1), 1.0)
        scale *= 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.lr * scale


@pytest.mark.parametrize("sched", [dict(warmup=3, lr_schedule="cosine"), dict(warmup=0, lr_schedule="cosine"),
                                   dict(warmup=4, lr_schedule="constant")])
def test_trainer_scheduler_follows_the_formula_bit_for_bit(sched):
    """The LambdaLR drives the optimizer's rate; the logged rate of every step equals the closed formula."""
    trainer = train(_cfg(None, method="flow_matching", steps=12, log_every=1, **sched))
    assert isinstance(trainer.scheduler, torch.optim.lr_scheduler.LambdaLR)
    cfg = trainer.config
    assert [r["lr"] for r in trainer.history] == [_formula_lr(cfg, s) for s in range(12)]
    assert [lr_at(cfg, s) for s in (0, 1, 5, 11, 12, 50)] == [_formula_lr(cfg, s) for s in (0, 1, 5, 11, 12, 50)]
    assert lr_factor(cfg, 5) * cfg.lr == lr_at(cfg, 5)
    assert trainer.optimizer.param_groups[0]["lr"] == _formula_lr(cfg, 12)  # set for the next step


def test_ema_is_an_averaged_model_with_warmup_bit_for_bit():
    """trainer.ema is the AveragedModel's network (the model's keys); its numbers are the former hand-written
    update ema <- lerp(ema, theta, 1 - d), d = min(decay, (1 + step) / (10 + step)), started from a copy."""
    from torch.optim.swa_utils import AveragedModel

    trainer = Trainer(_cfg(None, method="flow_matching", steps=8, ema_decay=0.7))
    assert isinstance(trainer.averaged_model, AveragedModel) and trainer.ema is trainer.averaged_model.module
    assert set(trainer.ema.state_dict()) == set(trainer.model.state_dict())
    assert int(trainer.averaged_model.n_averaged) == 1  # the initial copy
    ref = copy.deepcopy(trainer.model).requires_grad_(False)
    for step in range(8):
        trainer.train_step()
        with torch.no_grad():
            d = min(0.7, (1 + step) / (10 + step))
            assert ema_decay_at(0.7, step + 1) == d
            torch._foreach_lerp_(list(ref.parameters()), list(trainer.model.parameters()), 1.0 - d)
        for (name, a), b in zip(trainer.ema.state_dict().items(), ref.state_dict().values()):
            assert torch.equal(a, b), f"EMA differs from the formula in {name} after step {step}"
    assert int(trainer.averaged_model.n_averaged) == 9
    assert not any(p.requires_grad for p in trainer.ema.parameters())
    trainer.close()


def _as_version_1(ckpt: dict) -> dict:
    """A checkpoint as the trainer wrote it before AveragedModel/LambdaLR (format version 1): the EMA as a
    plain state_dict without a count, no scheduler state, optimizer groups without "initial_lr" and with the
    rate of the last step taken (it was set before each step, not after)."""
    old = copy.deepcopy(ckpt)
    old["version"] = 1
    del old["ema_n_averaged"], old["scheduler"]
    cfg = TrainConfig.from_dict(old["config"])
    for group in old["optimizer"]["param_groups"]:
        del group["initial_lr"]
        group["lr"] = _formula_lr(cfg, old["step"] - 1)
    return old


@pytest.mark.parametrize("method", ["flow_matching", FUSED])
def test_resume_from_a_version_1_checkpoint_is_exact(tmp_path, method):
    """An old-format checkpoint (no EMA count, no scheduler) is migrated on load: the resumed run equals an
    uninterrupted one bit for bit (cosine schedule with warm-up, so the rate matters at every step)."""
    kw = dict(method=method, steps=10, warmup=3, lr_schedule="cosine", ema_decay=0.8, figures=False)
    full = train(_cfg(tmp_path, "full", **kw))
    part = Trainer(_cfg(tmp_path, "part", **kw))
    for _ in range(5):
        part.train_step()
    path = part.save_checkpoint()
    part.close()
    new = torch.load(path, weights_only=True)
    assert new["version"] == 2 and new["ema_n_averaged"] == 6 and new["scheduler"]["last_epoch"] == 5
    assert set(new["ema"]) == set(new["model"])  # the EMA is stored with the model's keys
    torch.save(_as_version_1(new), path)
    resumed = train(_cfg(tmp_path, "part", **kw), resume=path)
    assert int(resumed.averaged_model.n_averaged) == 11
    _assert_equal_nested(_states(full), _states(resumed))
    after = [r for r in full.history if r["step"] > 5]
    assert [r["step"] for r in after] == [r["step"] for r in resumed.history] == [6, 8, 10]
    assert [(r["lr"], r["loss"]) for r in after] == [(r["lr"], r["loss"]) for r in resumed.history]
    # The version 1 file is still readable by load_model (the EMA entry did not change shape).
    net, _, _ = load_model(path)
    assert set(net.state_dict()) == set(full.ema.state_dict())


def test_checkpoint_scheduler_state_is_checked(tmp_path):
    train(_cfg(tmp_path, method="flow_matching", steps=4, figures=False))
    path = tmp_path / "run" / "checkpoint.pt"
    ckpt = torch.load(path, weights_only=True)
    broken = dict(ckpt, scheduler={**ckpt["scheduler"], "last_epoch": 3})
    torch.save(broken, tmp_path / "off.pt")
    with pytest.raises(CheckpointError, match="scheduler at step 3 but is at step 4"):
        Trainer(_cfg(tmp_path, method="flow_matching", steps=8), resume=tmp_path / "off.pt")
    incomplete = {k: v for k, v in ckpt.items() if k != "scheduler"}
    torch.save(incomplete, tmp_path / "incomplete.pt")
    with pytest.raises(CheckpointError, match="version 2.*incomplete"):
        Trainer(_cfg(tmp_path, method="flow_matching", steps=8), resume=tmp_path / "incomplete.pt")


def test_resume_with_more_steps_follows_the_new_cosine(tmp_path):
    """``steps`` may change on resume; the schedule is rebuilt from the new config at the checkpoint's step."""
    kw = dict(method="flow_matching", warmup=2, lr_schedule="cosine", figures=False, log_every=1)
    train(_cfg(tmp_path, steps=4, **kw))
    resumed = train(_cfg(tmp_path, steps=10, **kw), resume=tmp_path / "run")
    cfg = resumed.config
    assert [r["lr"] for r in resumed.history[4:]] == [_formula_lr(cfg, s) for s in range(4, 10)]


def test_train_accepts_dict_and_overrides(tmp_path):
    trainer = train({**TINY, "method": "meanflow", "out_dir": None}, steps=3)
    assert trainer.step == 3 and trainer.history[-1]["step"] == 3


def test_digits_training_runs(tmp_path):
    """The image path: a tiny U-Net on 8x8 digits for two steps (SGFlow through torch.func.jvp)."""
    cfg = TrainConfig(method="sgflow", data="digits", model="tiny",
                      model_kwargs={"channels": 8, "num_groups": 4, "head_channels": 8}, batch_size=4, steps=2,
                      out_dir=str(tmp_path / "digits"), progress=False, log_every=1)
    trainer = train(cfg)
    assert trainer.step == 2 and (tmp_path / "digits" / "samples" / "step_0000002.png").exists()
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_divergence_is_caught(tmp_path):
    from sgflow.train import TrainingDiverged

    with pytest.raises(TrainingDiverged, match="training diverged"):
        train(_cfg(tmp_path, method="sgflow", steps=40, lr=1e3, grad_clip=0, figures=False, divergence_threshold=1e3))
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_multiprocess_sgflow_needs_even_batch_per_process():
    from sgflow.train import ConfigError, TrainConfig, validate_config

    validate_config(TrainConfig(method="sgflow", batch_size=8, loss_kwargs={}), world_size=2)
    with pytest.raises(ConfigError, match="even batch per process"):
        validate_config(TrainConfig(method="sgflow", batch_size=6, loss_kwargs={}), world_size=2)
    validate_config(TrainConfig(method="sgflow", batch_size=6), world_size=2)  # semi: no split to balance
    validate_config(TrainConfig(method="sgflow", batch_size=6, loss_kwargs={"both_terms": True}), world_size=2)
    validate_config(TrainConfig(method="flow_matching", batch_size=6), world_size=2)
