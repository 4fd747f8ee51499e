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
from sgflow import testnets
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
