"""Issue 19: nothing lost, nothing broken. Checkpoints only from finite states and verified on load, non-finite
data refused by every loss, resumes that cannot go backwards, non-finite weights refused by sample / eval /
resume, the Python API's split layout under DDP, check_gradients auditing zero-initialised layers, and a
fault-injection run (kills during saves, damaged bytes)."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

import sgflow
import testnets
from sgflow.train import CheckpointError, TrainConfig, Trainer, read_checkpoint, train

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = dict(method="sgflow", data="ring8", model="mlp-small", model_kwargs={"hidden": 16, "depth": 1}, steps=6,
           batch_size=16, lr=1e-2, progress=False, log_every=2, figures=False, device="cpu")


def _cli(*args, timeout=120):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "sgflow.cli", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def _one_error_line(proc, *needles):
    assert proc.returncode != 0, proc.stdout[-500:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


# ------------------------------------------------------------------------------------------------
# (3) Non-finite data or noise: a ValueError naming the tensor and its first bad index, from every loss.

LOSSES = ["fused_loss", "sgflow_loss", "fused_meanflow_loss", "meanflow_loss", "flow_matching_loss", "progressive_loss",
          "lagrangian_loss", "eulerian_loss"]


@pytest.mark.parametrize("loss_name", LOSSES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_x1_or_noise_is_a_value_error_from_every_loss(loss_name, bad):
    loss = getattr(sgflow, loss_name)
    torch.manual_seed(0)
    model = testnets.build("mlp", (2,))  # a fresh model: the fused path's first call would profile a block plan
    x1, noise = torch.randn(8, 2), torch.randn(8, 2)
    x1[5, 1] = bad
    with pytest.raises(ValueError, match=r"x1 must be finite: x1\[5, 1\] = (nan|-?inf) \(1 of 16"):
        loss(model, x1)
    x1[5, 1] = 0.0
    loss(model, x1)[0].backward()  # a later call: the same error
    x1[2, 0] = bad
    with pytest.raises(ValueError, match=r"x1\[2, 0\]"):
        loss(model, x1)
    x1[2, 0] = 0.0
    noise[3, 0] = noise[6, 1] = bad
    with pytest.raises(ValueError, match=r"noise must be finite: noise\[3, 0\] = (nan|-?inf) \(2 of 16"):
        loss(model, x1, noise=noise)


def test_non_finite_images_name_the_full_index():
    model = testnets.build("dit", (3, 8, 8))
    x1 = torch.randn(2, 3, 8, 8)
    x1[1, 2, 4, 7] = float("nan")
    with pytest.raises(ValueError, match=r"x1\[1, 2, 4, 7\] = nan"):
        sgflow.fused_loss(model, x1)


# ------------------------------------------------------------------------------------------------
# (1) Checkpoints only from a finite state; (2) verified on load; (5) no resume backwards; non-finite weights
# refused by sample / eval / resume.

@pytest.fixture
def run_dir(tmp_path):
    """A finished 6-step run (checkpoint at step 6)."""
    out = tmp_path / "run"
    train(TrainConfig(**CFG, out_dir=str(out)))
    return out


def test_a_diverging_run_never_writes_a_non_finite_checkpoint(tmp_path):
    """lr 10 with a checkpoint every 5 steps and a log every 10: the run stops with a clear error at its
    first save after the weights went non-finite, and no NaN checkpoint is ever written (before: step 5
    with NaN weights)."""
    out = tmp_path / "lr10"
    cfg = TrainConfig(**{**CFG, "model": None, "model_kwargs": {}, "batch_size": 64, "lr": 10.0, "steps": 40,
                         "ckpt_every": 5, "log_every": 10, "out_dir": str(out)})
    with pytest.raises(sgflow.train.TrainingDiverged, match="training diverged"):
        train(cfg)
    if (out / "checkpoint.pt").exists():
        ckpt = read_checkpoint(out)
        for key in ("model", "ema"):
            assert all(torch.isfinite(v).all() for v in ckpt[key].values())


@pytest.mark.parametrize("where", ["weight", "optimizer"])
def test_the_last_good_checkpoint_is_kept_when_the_state_goes_non_finite(tmp_path, monkeypatch, where):
    """A NaN appears after step 7 (between two logged steps): the save at step 8 is refused with a message
    naming the tensor, and checkpoint.pt still holds step 6, finite; a resume from it continues."""
    out = tmp_path / "run"
    original = Trainer.train_step

    def poisoned(self):
        res = original(self)
        if self.step == 7:
            with torch.no_grad():
                if where == "weight":
                    next(self.model.parameters())[0].fill_(float("nan"))
                else:
                    next(iter(self.optimizer.state.values()))["exp_avg_sq"].fill_(float("inf"))
        return res

    monkeypatch.setattr(Trainer, "train_step", poisoned)
    cfg = TrainConfig(**{**CFG, "steps": 12, "ckpt_every": 2, "log_every": 100, "out_dir": str(out)})
    with pytest.raises(sgflow.train.TrainingDiverged, match=r"not finite at step 8; no checkpoint written \(the last one, step 6"):
        train(cfg)
    ckpt = read_checkpoint(out)
    assert ckpt["step"] == 6
    sgflow.train._check_finite_checkpoint(ckpt)
    monkeypatch.setattr(Trainer, "train_step", original)
    assert train(cfg, resume=out).step == 12


def _write_non_finite(src: str, dst, key: str):
    ckpt = torch.load(os.path.join(src, "checkpoint.pt"), weights_only=True)
    name = next(iter(ckpt[key]))
    ckpt[key][name] = torch.full_like(ckpt[key][name], float("nan"))
    torch.save(ckpt, dst)
    return name


def test_sample_eval_and_resume_refuse_non_finite_weights(run_dir, tmp_path):
    """A checkpoint with NaN weights (what a diverged run of an earlier sgflow could write): sample, eval
    and resume each refuse with one line (before: samples of NaN with exit 0, a nan table, a traceback)."""
    bad = tmp_path / "nan_ema.pt"
    _write_non_finite(str(run_dir), bad, "ema")
    line = _one_error_line(_cli("sample", str(bad), "--out", str(tmp_path / "s"), "--n", "10", "--device", "cpu"),
                           "holds non-finite values", "EMA weights")
    assert str(bad) in line
    _one_error_line(_cli("eval", str(bad), "--n", "50", "--steps", "1", "--device", "cpu"), "holds non-finite values")
    _one_error_line(_cli("train", "--resume", str(bad), "--steps", "8", "--no-progress", "--out", str(tmp_path / "r")),
                    "holds non-finite values")
    # The raw weights are checked when they are what is used.
    bad_raw = tmp_path / "nan_model.pt"
    _write_non_finite(str(run_dir), bad_raw, "model")
    _one_error_line(_cli("sample", str(bad_raw), "--raw", "--n", "10", "--out", str(tmp_path / "s2"), "--device", "cpu"),
                    "holds non-finite values", "weights")
    with pytest.raises(CheckpointError, match="holds non-finite values"):
        Trainer(TrainConfig(**{**CFG, "steps": 8, "out_dir": str(tmp_path / "r2")}), resume=bad_raw)


def test_a_damaged_checkpoint_is_a_one_line_error(run_dir, tmp_path):
    """64 bytes overwritten in the middle of checkpoint.pt: 'damaged' (before: it loaded, and the resume
    reported a diverged loss)."""
    data = bytearray((run_dir / "checkpoint.pt").read_bytes())
    rng = random.Random(0)
    for trial in range(5):
        mid = len(data) // 2 + rng.randrange(-len(data) // 4, len(data) // 4)
        bad = bytearray(data)
        bad[mid:mid + 64] = bytes((b + 1 + rng.randrange(255)) % 256 for b in bad[mid:mid + 64])
        path = tmp_path / f"damaged{trial}.pt"
        path.write_bytes(bytes(bad))
        with pytest.raises(CheckpointError, match="is damaged"):
            read_checkpoint(path)
    _one_error_line(_cli("train", "--resume", str(path), "--steps", "8", "--no-progress", "--out", str(tmp_path / "r")),
                    "is damaged")
    _one_error_line(_cli("sample", str(path), "--n", "10", "--out", str(tmp_path / "s"), "--device", "cpu"), "is damaged")


def test_checkpoints_of_earlier_versions_still_load(run_dir, tmp_path):
    """The check uses the CRC-32s torch.save has always written: a checkpoint written by plain torch.save (as
    earlier sgflow versions did) loads and resumes."""
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    old = tmp_path / "old.pt"
    torch.save(ckpt, old)
    assert read_checkpoint(old)["step"] == 6
    assert train(TrainConfig(**{**CFG, "steps": 7, "out_dir": str(tmp_path / "r")}), resume=old).step == 7


def test_resume_below_the_checkpoints_step_is_an_error(run_dir, tmp_path):
    """--steps 3 on a checkpoint at step 6 (before: exit 0, 'trained ... to step 6 in 0.0s')."""
    with pytest.raises(CheckpointError, match="is at step 6, past the 3 steps asked for"):
        Trainer(TrainConfig(**{**CFG, "steps": 3, "out_dir": str(run_dir)}), resume=run_dir)
    _one_error_line(_cli("train", "--resume", str(run_dir), "--steps", "3", "--no-progress"),
                    "is at step 6, past the 3 steps asked for")


# ------------------------------------------------------------------------------------------------
# (6) Smaller ones: `sgflow quality --no-progress`, check_gradients on zero-initialised layers, DDP splits.

def test_quality_accepts_no_progress(tmp_path):
    """`sgflow train` accepts --no-progress; `sgflow quality` rejected it."""
    proc = _cli("quality", "--preset", "smoke", "--datasets", "ring8", "--methods", "flow_matching", "--seeds", "0",
                "--train-steps", "3", "--n-eval", "50", "--no-memory", "--no-progress", "--out", str(tmp_path / "q"),
                timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "wrote " in proc.stdout and "[" not in proc.stdout.split("wrote ")[0].split("->")[-1]
    assert (tmp_path / "q" / "quality.json").exists()


def test_check_gradients_audits_zero_initialised_networks():
    """The README's tiny U-Net (zero-initialised output layer): most parameters had an exactly zero reference
    gradient, so the audit checked little. Now its zero tensors get small values on the float64 copy."""
    from sgflow.audit import check_gradients
    from sgflow.nn import build_model

    torch.manual_seed(0)
    model = build_model("tiny", (3, 7, 5)).eval()
    zero = [n for n, p in model.named_parameters() if not p.any()]
    assert zero, "the test needs a zero-initialised network"
    x1 = torch.randn(3, 3, 7, 5, generator=torch.Generator().manual_seed(1))
    report = check_gradients(model, x1, directions=2, include_raw_torch=False)
    assert set(zero) <= set(report.perturbed_params)
    assert report.zero_grad_params == [], report.zero_grad_params
    assert report.ok(), report
    assert "zero-initialised parameters given small random values" in str(report)
    assert all(not p.any() for n, p in model.named_parameters() if n in zero)  # the caller's model is untouched
    off = check_gradients(model, x1, directions=1, include_raw_torch=False, perturb_zero=False)
    assert len(off.zero_grad_params) > len(zero) and off.perturbed_params == []


# ------------------------------------------------------------------------------------------------
# Fault injection: kill -9 during saves, damaged bytes; every resume continues bit-exact or refuses with one line.

FAULT_ARGS = ["train", "--data", "ring8", "--model", "mlp-small", "--model-opt", "hidden=16", "--model-opt", "depth=1",
              "--batch-size", "16", "--lr", "1e-2", "--log-every", "2", "--ckpt-every", "1", "--no-progress",
              "--no-figures", "--device", "cpu", "--threads", "1"]
FAULT_STEPS = 24


def _final_state(out):
    ckpt = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    return ckpt


def _assert_same_state(a, b):
    assert a["step"] == b["step"]
    for key in ("model", "ema"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs from the uninterrupted run"
    for pid, st in a["optimizer"]["state"].items():
        for k, v in st.items():
            assert torch.equal(v, b["optimizer"]["state"][pid][k]), f"optimizer state {pid}.{k} differs"
    assert torch.equal(a["rng"]["stream"], b["rng"]["stream"])


def _run_and_kill(args, out, rng):
    """Start a training process and SIGKILL it during (or right after) its k-th save, k random in 1..3: the
    moment checkpoint.pt.tmp appears, after a random 0-3 ms. Returns True when it was killed (False: it finished)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "sgflow.cli", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=env)
    tmp = os.path.join(out, "checkpoint.pt.tmp")
    saves, target, seen = 0, rng.randint(1, 3), False
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        now = os.path.exists(tmp)
        if now and not seen:
            saves += 1
            if saves == target:
                time.sleep(rng.random() * 0.003)
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return True
        seen = now
        time.sleep(0.0002)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()[-3000:]
    return False


@pytest.mark.slow  # ~12 fresh processes (torch's import alone ~3 s each): 40-130 s on 2 shared cores
def test_fault_injection_kills_during_saves_and_damaged_bytes(tmp_path):
    """>= 10 kill -9 during checkpoint saves (a save every step) and, every third kill, damaged bytes in the
    checkpoint: each resume either continues and the run ends bit-exact to an uninterrupted one, or refuses
    with one line (a damaged file); never a non-finite checkpoint, never a traceback."""
    from sgflow.cli import build_train_config, make_parser

    ref_out, out = str(tmp_path / "straight"), str(tmp_path / "killed")
    # The uninterrupted run, in this process (one thread, as the killed processes' --threads 1).
    cfg, _ = build_train_config(make_parser().parse_args([*FAULT_ARGS, "--steps", str(FAULT_STEPS), "--out", ref_out]))
    train(cfg)
    reference = _final_state(ref_out)

    rng = random.Random(19)
    args = [*FAULT_ARGS, "--steps", str(FAULT_STEPS), "--out", out, "--resume", "auto"]
    kills = damaged = 0
    t0 = time.monotonic()
    while True:
        if not _run_and_kill(args, out, rng):
            break
        kills += 1
        ckpt_path = os.path.join(out, "checkpoint.pt")
        if not os.path.exists(ckpt_path):
            continue  # killed during the very first save: the next start begins afresh
        ckpt = read_checkpoint(ckpt_path)  # the kill never leaves a damaged checkpoint.pt behind
        assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
        if kills % 3 == 0:
            good = open(ckpt_path, "rb").read()
            bad = bytearray(good)
            at = rng.randrange(len(bad) // 4, 3 * len(bad) // 4)
            bad[at:at + 64] = bytes((b + 1 + rng.randrange(255)) % 256 for b in bad[at:at + 64])
            with open(ckpt_path, "wb") as f:
                f.write(bad)
            try:  # what --resume auto reads first
                same = read_checkpoint(ckpt_path)
            except CheckpointError as e:
                assert "is damaged" in str(e)
                if damaged == 0:  # and once through the CLI: one line
                    _one_error_line(_cli(*args), "is damaged")
                damaged += 1
            else:  # only bytes no reader uses (a record's alignment padding) can change unnoticed
                _assert_same_state(same, ckpt)
            with open(ckpt_path, "wb") as f:  # the user restores a good copy
                f.write(good)
        assert time.monotonic() - t0 < 400, "fault injection is taking too long"
    assert kills >= 10, f"only {kills} kills before the run finished: raise FAULT_STEPS"
    assert damaged >= 3
    _assert_same_state(_final_state(out), reference)


def test_resume_at_the_checkpoints_step_says_so(run_dir):
    proc = _cli("train", "--resume", str(run_dir), "--steps", "6", "--no-progress")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "is already at step 6: nothing to train" in proc.stderr and "trained" not in proc.stdout
