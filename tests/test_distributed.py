"""Data-parallel training on CPU with gloo: replicas stay identical and equal one process on the whole batch."""
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sgflow.train import TrainConfig, read_checkpoint, train

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

CFG = dict(method="sgflow", data="ring8", model="mlp-small", model_kwargs={"hidden": 32, "depth": 2, "time_scale": 30.0},
           steps=5, batch_size=8, lr=1e-2, progress=False, log_every=1, figures=False, device="cpu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, cfg, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    trainer = train(cfg)
    torch.save({"model": trainer.model.state_dict(), "ema": trainer.ema.state_dict(), "history": trainer.history},
               os.path.join(out, f"rank{rank}.pt"))


@pytest.fixture
def single_process_env(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)


def test_two_gloo_ranks_match_each_other_and_one_process(tmp_path, single_process_env):
    cfg = {**CFG, "out_dir": str(tmp_path / "ddp")}
    mp.spawn(_worker, args=(2, _free_port(), cfg, str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for key in ("model", "ema"):
        for name in r0[key]:
            assert torch.equal(r0[key][name], r1[key][name]), f"ranks diverged in {key}.{name}"

    torch.set_num_threads(1)
    single = train(TrainConfig(**{**CFG, "out_dir": str(tmp_path / "single")}))
    for name, p in single.model.state_dict().items():
        torch.testing.assert_close(r0["model"][name], p, rtol=1e-4, atol=1e-6, msg=f"DDP != single process in {name}")
    for name, p in single.ema.state_dict().items():
        torch.testing.assert_close(r0["ema"][name], p, rtol=1e-4, atol=1e-6)
    # The logged loss is the mean over ranks = the loss of the whole batch (equal row counts per rank).
    ddp_loss = [r["loss"] for r in r0["history"]]
    one_loss = [r["loss"] for r in single.history]
    assert ddp_loss == pytest.approx(one_loss, rel=1e-4, abs=1e-6)
    ckpt = read_checkpoint(tmp_path / "ddp")
    assert ckpt["world_size"] == 2 and ckpt["step"] == 5 and len(ckpt["rng"]["ranks"]) == 2


def test_torchrun_cli_end_to_end(tmp_path, single_process_env):
    """`torchrun --nproc_per_node=2 -m sgflow.cli train ...` trains; a bad batch size is one clear line."""
    base = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(_free_port()),
            "-m", "sgflow.cli", "train", "--data", "ring8", "--model", "mlp-small", "--model-opt", "hidden=16",
            "--model-opt", "depth=1", "--steps", "3", "--no-progress", "--no-figures", "--device", "cpu", "--threads", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ok = subprocess.run(base + ["--batch-size", "8", "--out", str(tmp_path / "run")], capture_output=True, text=True,
                        env=env, timeout=120)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert read_checkpoint(tmp_path / "run")["world_size"] == 2
    base[5] = str(_free_port())
    bad = subprocess.run(base + ["--batch-size", "9", "--out", str(tmp_path / "bad")], capture_output=True, text=True,
                         env=env, timeout=120)
    assert bad.returncode != 0
    assert "error: batch size 9 is not divisible by the number of processes 2" in bad.stderr
    assert "Traceback" not in bad.stderr.split("error: batch size")[0]


@pytest.mark.parametrize("name", ["sgflow_loss", "fused_loss", "meanflow_loss", "eulerian_loss", "lagrangian_loss"])
def test_jvp_losses_refuse_a_ddp_model(tmp_path, name):
    """JVPs bypass DDP.forward, where its gradient all-reduce is armed: refuse instead of silently not syncing."""
    import sgflow
    from sgflow.nn import build_model

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(build_model("mlp", (2,)))
        with pytest.raises(TypeError, match="DistributedDataParallel"):
            getattr(sgflow, name)(ddp, torch.randn(4, 2))
    finally:
        dist.destroy_process_group()
