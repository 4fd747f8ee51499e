"""Data parallel on CPU with gloo (2 processes): gradients through DDP's own forward equal one process's;
the JVP losses that cannot go through DDP refuse it; `sgflow train` keeps replicas identical.

Why the gradient comparisons are exact: every loss here is a mean over rows (SGFlow: the mean of the
first-term rows minus the mean of the second-term rows). DDP averages the two ranks' gradients, i.e. it
differentiates (L_0 + L_1) / 2 with L_r the loss of rank r's half. That equals the loss of the whole batch
only when every mean has as many rows on each rank: SGFlow with ``both_terms=True`` (each rank: B/2 rows
per term) or an explicit ``split`` with the same number of first-term rows per rank; flow matching and
MeanFlow (all rows); progressive with one t = u row per rank. The data, noise, times, split (and
progressive's s) are explicit, so both sides see the same numbers; dropout draws from per-rank seeds,
which the one-process reference replays half by half.
"""
import os
import socket
import subprocess
import sys
import tempfile
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import sgflow
from sgflow.distributed import DualDDP, state_digest
from sgflow.train import TrainConfig, read_checkpoint, train

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

CFG = dict(method="sgflow", data="ring8", model="mlp-small", model_kwargs={"hidden": 32, "depth": 2, "time_scale": 30.0},
           steps=5, batch_size=8, lr=1e-2, progress=False, log_every=1, figures=False, device="cpu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _leave_group(finished: bool) -> None:
    """Destroy the process group; after a barrier when this rank finished normally, so that no rank tears
    its gloo connections down while the other still completes its last collective (an abort at exit)."""
    if finished:
        dist.barrier()
    dist.destroy_process_group()


def _exit_now() -> None:
    """End a worker whose results are written and whose process group is gone without the interpreter's
    teardown: C++ static destructors of threads that torch / gloo started may abort there ("terminate
    called without an active exception", exit -6; seen once in CI), which says nothing about what the
    tests compare."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _spawn(fn, args, timeout=180):
    """Run fn(rank, *args) in 2 fresh processes; fail (instead of hanging) when one does not finish."""
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=fn, args=(r, *args)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    stuck = [p for p in procs if p.is_alive()]
    for p in stuck:
        p.kill()
        p.join()
    assert not stuck, "a rank did not finish (deadlock in a collective?)"
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]


@pytest.fixture
def single_process_env(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)


# ------------------------------------------------------------------------------------------------
# Gradient equality: one spawn per group of cases runs every case on 2 ranks; the tests compare.

def _net(kind: str) -> torch.nn.Module:
    import testnets
    from sgflow.nn import build_model

    torch.manual_seed(1234)  # the same initial weights in every process
    net = {"mlp": lambda: testnets.build("mlp", (2,)),
           "dit": lambda: testnets.build("dit", (3, 8, 8)),
           "unet": lambda: build_model("tiny", (3, 8, 8), zero_init=False),
           "unet-dropout": lambda: build_model("tiny", (3, 8, 8), zero_init=False, dropout=0.3)}[kind]()
    return net.double()


def _batch(kind: str):
    """Global batch: x1, noise, t, u, split (2 first-term rows per rank), s; t = u on rows 0 and B/2."""
    B, shape = (8, (2,)) if kind == "mlp" else (4, (3, 8, 8))
    g = torch.Generator().manual_seed(7)
    x1 = torch.randn(B, *shape, generator=g, dtype=torch.float64)
    noise = torch.randn(B, *shape, generator=g, dtype=torch.float64)
    t = 0.6 * torch.rand(B, generator=g, dtype=torch.float64)
    u = t + 0.4 * torch.rand(B, generator=g, dtype=torch.float64)
    u[[0, B // 2]] = t[[0, B // 2]]
    split = torch.arange(B) % 2 == 0
    return dict(x1=x1, noise=noise, t=t, u=u, split=split, s=(t + u) / 2)


def _loss(name: str, model, b: dict):
    kw = dict(noise=b["noise"], t=b["t"], u=b["u"])
    if name == "fused":
        return sgflow.fused_loss(model, b["x1"], both_terms=True, **kw)[0]
    if name == "fused_split":
        return sgflow.fused_loss(model, b["x1"], split=b["split"], **kw)[0]
    if name == "fused_meanflow":
        return sgflow.fused_meanflow_loss(model, b["x1"], **kw)[0]
    if name == "flow_matching":
        return sgflow.flow_matching_loss(model, b["x1"], **kw)[0]
    if name == "progressive":
        return sgflow.progressive_loss(model, b["x1"], s=b["s"], **kw)[0]
    raise KeyError(name)


# case -> (network, loss, wrapper: "ddp" (a plain DistributedDataParallel) or "dualddp", DDP options)
GROUPS = {
    "mlp": {
        "fused": ("mlp", "fused", "ddp", {}),
        "fused_split": ("mlp", "fused_split", "ddp", {}),
        "fused_meanflow": ("mlp", "fused_meanflow", "ddp", {}),
        "flow_matching": ("mlp", "flow_matching", "ddp", {}),
        "progressive": ("mlp", "progressive", "ddp", {}),
        "fused_meanflow_find_unused": ("mlp", "fused_meanflow", "ddp", {"find_unused_parameters": True}),
        "dualddp_fused": ("mlp", "fused", "dualddp", {}),
        "dualddp_find_unused": ("mlp", "fused", "dualddp", {"find_unused_parameters": True}),
        "dualddp_static_graph": ("mlp", "fused_split", "dualddp", {"static_graph": True}),
        "dualddp_meanflow_find_unused": ("mlp", "fused_meanflow", "dualddp", {"find_unused_parameters": True}),
        "ddp_find_unused": ("mlp", "fused", "ddp", {"find_unused_parameters": True}),
        "ddp_static_graph": ("mlp", "fused", "ddp", {"static_graph": True}),
    },
    "images": {
        "dit": ("dit", "fused", "ddp", {}),
        "unet": ("unet", "fused", "ddp", {}),
        "unet_dualddp_static_graph": ("unet", "fused", "dualddp", {"static_graph": True}),
        "unet_dropout": ("unet-dropout", "fused", "ddp", {}),
    },
}
ITERS = 3  # the second iteration rebuilds DDP's buckets; static_graph syncs late in the first one only
RANK_SEEDS = (101, 202)  # dropout masks: torch.manual_seed(RANK_SEEDS[rank]) before each rank's loss


def _rank_slice(b: dict, rank: int) -> dict:
    h = b["x1"].shape[0] // 2
    return {k: v[rank * h:(rank + 1) * h] for k, v in b.items()}


def _grad_worker(rank, store, group, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2, timeout=timedelta(seconds=60))
    finished = False
    try:
        for case, (kind, loss_name, wrap, ddp_kw) in GROUPS[group].items():
            net = _net(kind)
            model = DualDDP(net, **ddp_kw) if wrap == "dualddp" else torch.nn.parallel.DistributedDataParallel(net, **ddp_kw)
            b = _rank_slice(_batch(kind), rank)
            grads, error = [], None
            try:
                for _ in range(ITERS):
                    net.zero_grad(set_to_none=True)
                    torch.manual_seed(RANK_SEEDS[rank])
                    _loss(loss_name, model, b).backward()
                    grads.append({n: None if p.grad is None else p.grad.clone() for n, p in net.named_parameters()})
            except Exception as e:  # recorded for the tests; both ranks fail alike (no collective left hanging)
                error = f"{type(e).__name__}: {e}\n{traceback.format_exc()[-1500:]}"
            torch.save({"grads": grads, "error": error}, os.path.join(out_dir, f"{case}.rank{rank}.pt"))
        finished = True
    finally:
        _leave_group(finished)
    _exit_now()


_RESULTS = {}


def _results(group: str, tmp_path_factory) -> str:
    """Run a group of cases on 2 gloo ranks once per session; returns the directory of the results."""
    if group not in _RESULTS:
        out = tmp_path_factory.mktemp(f"ddp_{group}")
        _spawn(_grad_worker, (str(out / "store"), group, str(out)))
        _RESULTS[group] = str(out)
    return _RESULTS[group]


def _one_process_grads(case: str):
    """The same loss on the whole batch in this process (dropout: the two halves with the ranks' seeds)."""
    kind, loss_name, wrap, _ = next(c for g in GROUPS.values() for k, c in g.items() if k == case)
    net = _net(kind)
    b = _batch(kind)
    if kind == "unet-dropout":
        # No recomputation here: the ranks' masks, replayed in their blocks' recomputation, must be the
        # masks of a forward that keeps every activation.
        model = sgflow.dualize(net, blocks="none")
        loss = 0
        for r in range(2):
            torch.manual_seed(RANK_SEEDS[r])
            loss = loss + _loss(loss_name, model, _rank_slice(b, r)) / 2
    else:
        loss = _loss(loss_name, net, b)
    loss.backward()
    return {n: p.grad.clone() for n, p in net.named_parameters()}


def _compare(case: str, group: str, tmp_path_factory, tol: float):
    out = _results(group, tmp_path_factory)
    ranks = [torch.load(os.path.join(out, f"{case}.rank{r}.pt"), weights_only=True) for r in range(2)]
    for r in ranks:
        assert r["error"] is None, r["error"]
    ref = _one_process_grads(case)
    assert all(g.abs().max() > 0 for g in ref.values()), "a parameter without gradient: the comparison would be vacuous"
    for it in range(ITERS):
        for name, g_ref in ref.items():
            g0, g1 = ranks[0]["grads"][it][name], ranks[1]["grads"][it][name]
            assert g0 is not None and g1 is not None, f"{case}: no gradient for {name} (iteration {it})"
            assert torch.equal(g0, g1), f"{case}: ranks disagree on {name} (iteration {it})"
            err = ((g0 - g_ref).norm() / g_ref.norm()).item()
            assert err <= tol, f"{case}: {name} (iteration {it}) relative error {err:.3g} against one process"
    return ranks, ref


@pytest.mark.parametrize("case", [c for c in GROUPS["mlp"] if not c.startswith("ddp_")])
def test_ddp_gradients_equal_one_process_mlp(case, tmp_path_factory):
    """Fused SGFlow / MeanFlow through a plain DDP and through DualDDP (any option), and the plain-forward
    losses through DDP as they are: gradients of one process on the whole batch."""
    _compare(case, "mlp", tmp_path_factory, tol=1e-12)


@pytest.mark.parametrize("case", list(GROUPS["images"]))
def test_ddp_gradients_equal_one_process_images(case, tmp_path_factory):
    """A DiT, the tiny U-Net through its own forward (blocks recomputed in backward) and through its
    hand-written dual_forward (DualDDP, static graph), and the U-Net with dropout in train mode."""
    ranks, ref = _compare(case, "images", tmp_path_factory, tol=1e-12)
    if case == "unet_dropout":
        # The masks matter: the same loss without dropout has another gradient.
        net = _net("unet-dropout").eval()
        _loss("fused", net, _batch("unet-dropout")).backward()
        rel = max(((p.grad - ref[n]).norm() / ref[n].norm()).item() for n, p in net.named_parameters())
        assert rel > 1e-3


@pytest.mark.parametrize("case", ["ddp_find_unused", "ddp_static_graph"])
def test_plain_ddp_with_find_unused_or_static_graph(case, tmp_path_factory):
    """A plain DistributedDataParallel with find_unused_parameters / static_graph: DDP's output sink gets its
    dual rule (sgflow.distributed), gradients of one process (DualDDP works with or without that rule)."""
    _compare(case, "mlp", tmp_path_factory, tol=1e-12)


# ------------------------------------------------------------------------------------------------
# Losses that cannot run through DDP's forward refuse it, saying what to do.

@pytest.fixture
def one_rank_group():
    with tempfile.TemporaryDirectory() as d:
        dist.init_process_group("gloo", init_method=f"file://{d}/store", rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()


@pytest.mark.parametrize("name,instead", [("sgflow_loss", "sgflow.fused_loss"), ("meanflow_loss", "sgflow.fused_meanflow_loss"),
                                          ("lagrangian_loss", None), ("eulerian_loss", None)])
@pytest.mark.parametrize("wrapper", ["DistributedDataParallel", "DualDDP"])
def test_jvp_losses_refuse_ddp_saying_what_to_do(one_rank_group, name, instead, wrapper):
    from sgflow.nn import build_model

    net = build_model("mlp", (2,))
    model = DualDDP(net) if wrapper == "DualDDP" else torch.nn.parallel.DistributedDataParallel(net)
    with pytest.raises(TypeError, match="cannot take a DistributedDataParallel") as info:
        getattr(sgflow, name)(model, torch.randn(4, 2))
    msg = str(info.value)
    assert "model.module" in msg and "allreduce_gradients" in msg
    if instead:
        assert f"Use {instead}" in msg
    # The plain module works (what the message says to pass).
    getattr(sgflow, name)(model.module, torch.randn(4, 2))[0].backward()


def test_dualddp_wraps_the_plain_network_only(one_rank_group):
    from sgflow.nn import build_model

    net = build_model("mlp", (2,))
    model = DualDDP(net)
    assert model.module is net and set(model.state_dict()) == {f"ddp.module.module.{k}" for k in net.state_dict()}
    with pytest.raises(TypeError, match="pass its .module"):
        DualDDP(model.ddp)
    with pytest.raises(TypeError, match="pass its .module"):
        DualDDP(model)


def _fsdp1(net):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    return FSDP(net, use_orig_params=True, device_id=torch.device("cpu"))


@pytest.mark.parametrize("name,instead", [("sgflow_loss", "Use sgflow.fused_loss"), ("meanflow_loss", "Use sgflow.fused_meanflow_loss"),
                                          ("lagrangian_loss", "Train the plain module"), ("eulerian_loss", "Train the plain module")])
def test_jvp_losses_refuse_fsdp1_saying_what_to_do(one_rank_group, name, instead):
    """Issue 19 (4): sgflow_loss on an FSDP1 model crashed both processes (a segfault inside FSDP's unshard)."""
    from sgflow.nn import build_model

    model = _fsdp1(build_model("mlp", (2,)))
    with pytest.raises(TypeError, match="cannot take an FSDP1 FullyShardedDataParallel model") as info:
        getattr(sgflow, name)(model, torch.randn(4, 2))
    assert instead in str(info.value)
    if name == "sgflow_loss":  # what the message says to use works on the same model
        sgflow.fused_loss(model, torch.randn(4, 2))[0].backward()


def _fsdp_worker(rank, store, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2, timeout=timedelta(seconds=60))
    finished = False
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        for wrap in ("fsdp2", "fsdp1"):
            net = _net("mlp")
            if wrap == "fsdp2":
                from torch.distributed.device_mesh import init_device_mesh
                from torch.distributed.fsdp import fully_shard

                model = fully_shard(net, mesh=init_device_mesh("cpu", (2,)))
            else:
                model = _fsdp1(net)
            b = _rank_slice(_batch("mlp"), rank)
            grads, error = [], None
            try:
                for _ in range(ITERS):
                    model.zero_grad(set_to_none=True)
                    _loss("fused", model, b).backward()
                    if wrap == "fsdp2":  # DTensor shards: gather the whole gradient
                        grads.append({n: p.grad.full_tensor().clone() for n, p in net.named_parameters()})
                    else:
                        with FSDP.summon_full_params(model, with_grads=True):
                            grads.append({n.replace("_fsdp_wrapped_module.", ""): p.grad.clone()
                                          for n, p in model.named_parameters()})
            except Exception as e:  # recorded for the test
                error = f"{type(e).__name__}: {e}\n{traceback.format_exc()[-1500:]}"
            torch.save({"grads": grads, "error": error}, os.path.join(out_dir, f"{wrap}.rank{rank}.pt"))
        finished = True
    finally:
        _leave_group(finished)
    _exit_now()


def test_fused_loss_through_fsdp2_and_fsdp1_equals_one_process(tmp_path):
    """The way to shard: sgflow.fused_loss through FSDP2 (fully_shard) and FSDP1 (use_orig_params=True) on 2
    gloo ranks gives the gradients of one process on the whole batch."""
    _spawn(_fsdp_worker, (str(tmp_path / "store"), str(tmp_path)))
    ref = _one_process_grads("fused")
    for wrap in ("fsdp2", "fsdp1"):
        for r in range(2):
            res = torch.load(tmp_path / f"{wrap}.rank{r}.pt", weights_only=True)
            assert res["error"] is None, res["error"]
            for it in range(ITERS):
                assert set(res["grads"][it]) == set(ref), f"{wrap}: parameter names {sorted(res['grads'][it])}"
                for name, g_ref in ref.items():
                    err = ((res["grads"][it][name] - g_ref).norm() / g_ref.norm()).item()
                    assert err <= 1e-12, f"{wrap} rank {r}: {name} (iteration {it}) relative error {err:.3g}"


def _default_split_worker(rank, store, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2, timeout=timedelta(seconds=60))
    finished = False
    try:
        net = _net("mlp")
        model = torch.nn.parallel.DistributedDataParallel(net)
        b = _rank_slice(_batch("mlp"), rank)
        # No split=: each rank draws its own (from its own generator), as a user of the Python API would.
        loss, info = sgflow.fused_loss(model, b["x1"], noise=b["noise"], t=b["t"], u=b["u"],
                                       generator=torch.Generator().manual_seed(100 + rank))
        loss.backward()
        torch.save({"grads": {n: p.grad.clone() for n, p in net.named_parameters()}, "n_first": int(info["n_first"])},
                   os.path.join(out_dir, f"split.rank{rank}.pt"))
        finished = True
    finally:
        _leave_group(finished)
    _exit_now()


def test_default_split_under_ddp_gives_one_process_gradients(tmp_path):
    """Issue 19 (6): through the Python API, ranks that draw their own split (the default) gave gradients 0.52
    relative off one process's, silently. Inside a process group the default split now holds exactly half
    first-term rows on every rank: the DDP gradient is one process's on the concatenated batch and splits."""
    from sgflow.losses.sgflow import balanced_split

    _spawn(_default_split_worker, (str(tmp_path / "store"), str(tmp_path)))
    ranks = [torch.load(tmp_path / f"split.rank{r}.pt", weights_only=True) for r in range(2)]
    assert [r["n_first"] for r in ranks] == [2, 2]
    b = _batch("mlp")
    split = torch.cat([balanced_split(4, "cpu", 0.5, torch.Generator().manual_seed(100 + r)) for r in range(2)])
    net = _net("mlp")
    sgflow.fused_loss(net, b["x1"], noise=b["noise"], t=b["t"], u=b["u"], split=split)[0].backward()
    for name, p in net.named_parameters():
        for r in ranks:
            err = ((r["grads"][name] - p.grad).norm() / p.grad.norm()).item()
            assert err <= 1e-12, f"{name}: relative error {err:.3g} against one process"


# ------------------------------------------------------------------------------------------------
# `sgflow train` under 2 processes.

def _train_worker(rank, world, port, cfg, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    trainer = train(cfg)
    torch.save({"model": trainer.model.state_dict(), "ema": trainer.ema.state_dict(), "history": trainer.history,
                "data_parallel": trainer.data_parallel}, os.path.join(out, f"rank{rank}.pt"))
    _exit_now()


def test_two_gloo_ranks_match_each_other_and_one_process(tmp_path, single_process_env):
    """Method sgflow (torch.func.jvp): the plain module and an explicit gradient all-reduce."""
    cfg = {**CFG, "out_dir": str(tmp_path / "ddp")}
    _spawn(_train_worker, (2, _free_port(), cfg, str(tmp_path)))
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0["data_parallel"] == "allreduce"
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
    assert len(ckpt["replica_digests"]) == 2 and ckpt["replica_digests"][0] == ckpt["replica_digests"][1]


def _fused_resume_worker(rank, port, cfg, out):
    """Under DDP: 5 steps straight, and 3 steps + a resume to 5, in one process group."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=2, timeout=timedelta(seconds=60))
    finished = False
    try:
        straight = train({**cfg, "out_dir": os.path.join(out, "straight")})
        train({**cfg, "steps": 3, "out_dir": os.path.join(out, "part")})
        dist.barrier()  # rank 0 writes the checkpoint after the last collective: wait for it before reading it
        resumed = train({**cfg, "out_dir": os.path.join(out, "part")}, resume=os.path.join(out, "part"))
        torch.save({"straight": straight.model.state_dict(), "resumed": resumed.model.state_dict(),
                    "ema": resumed.ema.state_dict(), "straight_ema": straight.ema.state_dict(),
                    "data_parallel": straight.data_parallel}, os.path.join(out, f"rank{rank}.pt"))
        finished = True
    finally:
        _leave_group(finished)
    _exit_now()


def test_fused_training_through_ddp_resumes_exactly(tmp_path, single_process_env):
    """Method sgflow_fused trains through DualDDP: ranks identical, a resumed run bit-equal to a straight
    one, and both equal to one process on the whole batch (up to the all-reduce's summation order)."""
    cfg = {**CFG, "method": "sgflow_fused", "ckpt_every": 0}
    _spawn(_fused_resume_worker, (_free_port(), cfg, str(tmp_path)))
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0["data_parallel"] == "ddp"
    for key in ("straight", "resumed", "ema", "straight_ema"):
        for name in r0[key]:
            assert torch.equal(r0[key][name], r1[key][name]), f"ranks diverged in {key}.{name}"
    for name in r0["straight"]:
        assert torch.equal(r0["resumed"][name], r0["straight"][name]), f"resume is not exact in {name}"
        assert torch.equal(r0["ema"][name], r0["straight_ema"][name]), f"resumed EMA is not exact in {name}"
    # Checkpoints hold the plain module's weights (no "module." prefixes).
    ckpt = read_checkpoint(tmp_path / "straight")
    assert set(ckpt["model"]) == set(r0["straight"]) and ckpt["replica_digests"][0] == ckpt["replica_digests"][1]

    torch.set_num_threads(1)
    single = train(TrainConfig(**{**cfg, "out_dir": None}))
    for name, p in single.model.state_dict().items():
        torch.testing.assert_close(r0["straight"][name], p, rtol=1e-5, atol=1e-7, msg=f"DDP != single process in {name}")


def test_torchrun_cli_end_to_end(tmp_path, single_process_env):
    """`torchrun --nproc_per_node=2 -m sgflow.cli train --method sgflow_fused` trains through DDP: both ranks end
    with identical weights, equal to one process; a bad batch size is one clear line."""
    base = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(_free_port()),
            "-m", "sgflow.cli", "train", "--method", "sgflow_fused", "--data", "ring8", "--model", "mlp-small",
            "--model-opt", "hidden=16", "--model-opt", "depth=1", "--steps", "3", "--no-progress", "--no-figures",
            "--device", "cpu", "--threads", "1", "--lr", "1e-2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ok = subprocess.run(base + ["--batch-size", "8", "--out", str(tmp_path / "run")], capture_output=True, text=True,
                        env=env, timeout=120)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "data parallel over 2 processes: DistributedDataParallel" in ok.stderr
    ckpt = read_checkpoint(tmp_path / "run")
    assert ckpt["world_size"] == 2 and ckpt["step"] == 3
    digests = ckpt["replica_digests"]
    assert len(digests) == 2 and digests[0] == digests[1], "the two ranks ended with different weights"
    assert digests[0] == state_digest(ckpt["model"])  # rank 0 saved the checkpoint
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())

    torch.set_num_threads(1)
    one = train(TrainConfig.from_dict({**ckpt["config"].to_dict(), "out_dir": None}))
    for name, p in one.model.state_dict().items():
        torch.testing.assert_close(ckpt["model"][name], p, rtol=1e-5, atol=1e-7, msg=f"torchrun != one process in {name}")

    base[5] = str(_free_port())
    bad = subprocess.run(base + ["--batch-size", "9", "--out", str(tmp_path / "bad")], capture_output=True, text=True,
                         env=env, timeout=120)
    assert bad.returncode != 0
    assert "error: batch size 9 is not divisible by the number of processes 2" in bad.stderr
    assert "Traceback" not in bad.stderr.split("error: batch size")[0]

