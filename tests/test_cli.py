"""The sgflow command line end to end in a temporary directory, and its one-line user errors."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from sgflow.cli import main

SMALL = ["--data", "ring8", "--model", "mlp-small", "--model-opt", "hidden=32", "--model-opt", "depth=2",
         "--model-opt", "time_scale=30", "--batch-size", "32", "--no-progress", "--threads", "1"]


@pytest.fixture(autouse=True)
def _single_process(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """One small trained run shared by the sample/eval/error tests."""
    out = tmp_path_factory.mktemp("cli") / "run"
    rc = main(["train", *SMALL, "--steps", "20", "--sample-every", "10", "--ckpt-every", "10", "--out", str(out)])
    assert rc == 0
    return out


def _user_error(capsys, argv, *fragments, code=1):
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith("sgflow") and "error:" in lines[0]
    assert "Traceback" not in err
    for frag in fragments:
        assert frag in lines[0], lines[0]
    return lines[0]


def test_train_writes_everything(run_dir, capsys):
    assert (run_dir / "checkpoint.pt").exists() and (run_dir / "config.json").exists()
    assert sorted(p.name for p in (run_dir / "samples").glob("step_*.png")) == ["step_0000010.png", "step_0000020.png"]
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 20 and "loss" in log[-1] and log[-1]["samples_per_s"] > 0
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["method"] == "sgflow" and cfg["model_kwargs"] == {"hidden": 32, "depth": 2, "time_scale": 30}


def test_train_resume_continues(run_dir, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    assert main(["train", "--resume", str(copy), "--steps", "24", "--no-progress", "--no-figures"]) == 0
    out = capsys.readouterr()
    assert "resuming from" in out.err and "to step 24" in out.out
    assert torch.load(copy / "checkpoint.pt", weights_only=True)["step"] == 24
    # --resume auto in a fresh directory starts from scratch.
    fresh = tmp_path / "fresh"
    assert main(["train", *SMALL, "--steps", "2", "--resume", "auto", "--out", str(fresh), "--no-figures"]) == 0
    assert torch.load(fresh / "checkpoint.pt", weights_only=True)["step"] == 2


def test_fresh_run_does_not_overwrite_a_run_silently(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *SMALL, "--steps", "2", "--out", str(out), "--no-figures", "--no-progress"]) == 0
    capsys.readouterr()
    _user_error(capsys, ["train", *SMALL, "--steps", "3", "--out", str(out), "--no-figures"], "already holds a run", "--overwrite")
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2
    assert main(["train", *SMALL, "--steps", "3", "--out", str(out), "--no-figures", "--no-progress", "--overwrite"]) == 0
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 3


def test_sample(run_dir, tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["sample", str(run_dir), "--steps", "1", "3", "--n", "50", "--out", str(out), "--format", "both"]) == 0
    a = np.load(out / "samples_1step.npy")
    b = torch.load(out / "samples_3steps.pt")
    assert a.shape == (50, 2) and b.shape == (50, 2) and np.isfinite(a).all()
    assert (out / "samples.png").exists()
    # Same seed, same samples.
    assert main(["sample", str(run_dir / "checkpoint.pt"), "--steps", "1", "--n", "50", "--out", str(tmp_path / "t")]) == 0
    assert np.array_equal(a, np.load(tmp_path / "t" / "samples_1step.npy"))


def test_eval_with_baseline_and_json(run_dir, tmp_path, capsys):
    js = tmp_path / "r.json"
    assert main(["eval", str(run_dir), "--steps", "1", "2", "--n", "200", "--baseline", "--json", str(js)]) == 0
    out = capsys.readouterr().out
    assert "ED untrained" in out and "map MSE step 20" in out and "noise floor" in out
    res = json.loads(js.read_text())
    assert set(res["results"]) == {"untrained", "step 20"}
    rows = res["results"]["step 20"]["rows"]
    assert [r["steps"] for r in rows] == [1, 2] and all(r["map_mse"] is not None for r in rows)


def test_flow_matching_uses_euler(tmp_path, capsys):
    out = tmp_path / "fm"
    assert main(["train", *SMALL, "--method", "flow_matching", "--steps", "2", "--out", str(out), "--no-figures"]) == 0
    assert main(["eval", str(out), "--steps", "2", "--n", "100"]) == 0
    assert "sampler euler" in capsys.readouterr().out


def test_digits_train_sample_eval(tmp_path, capsys):
    out = tmp_path / "digits"
    argv = ["train", "--data", "digits", "--model", "tiny", "--model-opt", "channels=8", "--model-opt", "num_groups=4",
            "--model-opt", "head_channels=8", "--method", "flow_matching", "--steps", "2", "--batch-size", "8",
            "--out", str(out), "--no-progress", "--threads", "1"]
    assert main(argv) == 0
    assert main(["sample", str(out), "--steps", "1", "--n", "16", "--out", str(out / "s")]) == 0
    assert np.load(out / "s" / "samples_1step.npy").shape == (16, 1, 8, 8)
    cache = tmp_path / "cache"
    assert main(["eval", str(out), "--steps", "1", "--n", "100", "--cache-dir", str(cache)]) == 0
    text = capsys.readouterr().out
    assert "FD" in text and "classifier held-out accuracy" in text
    acc = float(text.split("accuracy ")[1].split(";")[0])
    assert acc > 0.9
    assert list(cache.glob("digits_classifier_1x8x8_*.pt"))


def test_demo(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--steps", "60", "--n", "300", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "demo" / "demo.png").exists() and (tmp_path / "demo" / "checkpoint.pt").exists()
    assert "ED untrained" in out and "ED trained" in out and "map MSE trained" in out and "wall time" in out
    assert len(list((tmp_path / "demo").rglob("*.png"))) == 1


def test_list(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "sgflow" in out and "ring8" in out and "mlp" in out


# ---------------------------------------------------------------------- user errors
def test_error_unknown_method(capsys):
    _user_error(capsys, ["train", "--method", "magic", "--steps", "1", "--no-progress"], "unknown method 'magic'")


def test_error_unknown_dataset(capsys):
    _user_error(capsys, ["train", "--data", "imagenet", "--steps", "1"], "unknown data set 'imagenet'")


def test_error_unknown_network(capsys):
    _user_error(capsys, ["train", "--model", "resnet", "--steps", "1"], "unknown network config 'resnet'")


def test_error_missing_dataset_path(capsys, tmp_path):
    _user_error(capsys, ["train", "--data", "cifar10", "--data-root", str(tmp_path / "nowhere")], "not found", "nowhere")
    _user_error(capsys, ["train", "--data", "folder", "--data-root", str(tmp_path / "nowhere")], "not found")
    _user_error(capsys, ["train", "--data", "cifar10"], "needs a directory")


def test_error_bad_batch_size(capsys, monkeypatch):
    _user_error(capsys, ["train", "--batch-size", "1", "--steps", "1", "--loss-opt", "update=paper"], "at least 2 samples")
    _user_error(capsys, ["train", "--batch-size", "0", "--steps", "1"], "batch size")
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    _user_error(capsys, ["train", "--batch-size", "8", "--steps", "1"], "not divisible by the number of processes 3")


def test_error_bad_options(capsys):
    _user_error(capsys, ["train", "--data-opt", "novalue"], "key=value")
    _user_error(capsys, ["train", "--lr", "-1"], "learning rate")
    _user_error(capsys, ["train", "--data", "moons", "--data-opt", "wiggle=3"], "bad options for data set 'moons'")
    _user_error(capsys, ["train", "--steps", "x"], "invalid int value", code=2)


def test_error_corrupt_checkpoint(capsys, tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00garbage" * 10)
    for cmd in ("sample", "eval"):
        _user_error(capsys, [cmd, str(bad)], "cannot read checkpoint", "not a valid PyTorch file")
    other = tmp_path / "other.pt"
    torch.save({"state": torch.zeros(2)}, other)
    _user_error(capsys, ["eval", str(other)], "not an sgflow checkpoint")
    _user_error(capsys, ["sample", str(tmp_path / "missing.pt")], "checkpoint not found")
    _user_error(capsys, ["train", "--resume", str(bad)], "cannot read checkpoint")


def test_error_mismatched_checkpoint(capsys, run_dir, tmp_path):
    _user_error(capsys, ["train", "--resume", str(run_dir), "--method", "meanflow", "--out", str(tmp_path / "x")],
                "was trained with method='sgflow'", "'meanflow'")
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    ckpt["config"]["model_kwargs"]["hidden"] = 64
    torch.save(ckpt, tmp_path / "mismatch.pt")
    _user_error(capsys, ["eval", str(tmp_path / "mismatch.pt")], "does not fit network")


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "usage" in capsys.readouterr().err


def test_module_and_console_script(tmp_path):
    r = subprocess.run([sys.executable, "-m", "sgflow.cli", "train", "--method", "nope"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 1
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("sgflow: error: unknown method 'nope'")
    exe = shutil.which("sgflow")
    if exe is None:
        pytest.skip("console script not installed")
    r = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "sgflow" in r.stdout


def test_eval_pairs_use_the_training_interpolant():
    """Single-jump errors compare against the exact map of the path the model was trained on."""
    import copy

    from sgflow.data import get_dataset
    from sgflow.evaluate import evaluate
    from sgflow.interpolants import get_interpolant

    data = get_dataset("ring8")
    trig_mix = copy.copy(data.mixture)
    trig_mix.interpolant = get_interpolant("trig")
    class ExactTrig(torch.nn.Module):
        def forward(self, t, u, x):
            return trig_mix.exact_model()(t, u, x)

    exact_trig = ExactTrig()
    pairs = lambda res: [p["mse"] for p in res["pairs"]]  # noqa: E731
    on_trig = evaluate(exact_trig, data, steps=(1,), n=200, interpolant="trig", verbose=False)
    on_linear = evaluate(exact_trig, data, steps=(1,), n=200, interpolant="linear", verbose=False)
    assert max(pairs(on_trig)) < 1e-6
    assert max(pairs(on_linear)) > 1e-3
