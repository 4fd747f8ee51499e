"""The training loop: :class:`Trainer` (one run's state, its steps, outputs and checkpoints),
:func:`generate` and :func:`train`. See :mod:`sgflow.train` for what one step does."""
from __future__ import annotations

import collections
import copy
import dataclasses
import functools
import inspect
import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch
from torch.optim.lr_scheduler import LambdaLR
from torch.optim.swa_utils import AveragedModel

import sgflow
from sgflow import distributed as D
from sgflow.data import get_dataset
from sgflow.times import TimeSampler
from sgflow.train.checkpoint import (CHECKPOINT_FORMAT, CHECKPOINT_VERSION, RESUMABLE_OVERRIDES, CheckpointError,
                                     _atomic_save, _check_finite_checkpoint, _first_non_finite, _load_state,
                                     _optimizer_tensors, read_checkpoint)
from sgflow.train.config import (MANUAL_ALLREDUCE_METHODS, ConfigError, TrainConfig, available_methods, build_network,
                                 default_sampler, validate_config)
from sgflow.train.schedule import ema_multi_avg_fn, lr_factor, paired_split
from sgflow.train.teacher import load_teacher
from sgflow.train.watch import INSTABILITY_STEPS, DivergenceWatch, TrainingDiverged


class Trainer(DivergenceWatch):
    """Holds the run's state; :meth:`run` trains up to ``config.steps``.

    Args:
        config: a :class:`TrainConfig`.
        resume: a checkpoint path (file or run directory) to continue from; its config must agree
            with ``config`` except for :data:`RESUMABLE_OVERRIDES`.
        model: optional prebuilt network (then ``config.model`` is only recorded, not built).
        teacher: optional teacher velocity, any callable ``v(t, x)`` (e.g. a mixture's exact velocity), in place
            of the checkpoint ``config.teacher`` names (not both); used with ``config.teacher_mode`` /
            ``teacher_schedule``. Not stored in checkpoints: pass it again on resume.
    """

    def __init__(self, config: TrainConfig, resume=None, model: torch.nn.Module | None = None, teacher=None):
        self.config = cfg = copy.deepcopy(config)
        world = D.env_world_size()
        ckpt = None
        if resume is not None:
            ckpt = read_checkpoint(resume)
            # Before validating: an option that differs from the checkpoint's is the error to report.
            self._check_resume(ckpt["config"], cfg, ckpt["path"])
        validate_config(cfg, world)
        if ckpt is not None:
            if cfg.steps < int(ckpt["step"]):
                raise CheckpointError(f"checkpoint {ckpt['path']} is at step {int(ckpt['step'])}, past the {cfg.steps} "
                                      f"steps asked for: ask for more steps than {int(ckpt['step'])} to train further")
            _check_finite_checkpoint(ckpt)
        self.dist = D.init_distributed(cfg.device)
        try:
            self._setup(cfg, ckpt, model, teacher)
        except BaseException:
            D.cleanup(self.dist)
            raise

    # ------------------------------------------------------------------ setup
    def _setup(self, cfg, ckpt, model, teacher=None):
        info = self.dist
        self.device = D.resolve_device(cfg.device, info)
        self.loss_fn = available_methods()[cfg.method]
        data_kwargs = dict(cfg.data_kwargs)
        self.dataset = get_dataset(cfg.data, **data_kwargs)
        self.data_shape = tuple(self.dataset.shape)

        torch.manual_seed(cfg.seed)  # identical initial weights on every rank (and broadcast below anyway)
        if model is None:
            model, cfg.model = build_network(cfg.model, self.data_shape, self.dataset, **cfg.model_kwargs)
        self.model = model.to(self.device)
        if info.enabled:
            D.broadcast_module(self.model)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if not self.params:
            raise ConfigError("the network has no trainable parameters")
        # The EMA: an AveragedModel of the network's parameters. Its buffers (use_buffers=False) are copied from
        # the network, not averaged. Its first "average" copies the initial weights (n_averaged = 1), each
        # optimisation step then averages once. ``self.ema`` is the averaged network itself (a plain module with
        # the model's state_dict keys), what sampling, evaluation and checkpoints use.
        self.averaged_model = AveragedModel(self.model, multi_avg_fn=ema_multi_avg_fn(cfg.ema_decay), use_buffers=False)
        self.averaged_model.requires_grad_(False)
        self.averaged_model.update_parameters(self.model)
        self.ema = self.averaged_model.module
        opt_kw = dict(lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
        self.optimizer = torch.optim.AdamW(self.params, **opt_kw) if cfg.weight_decay > 0 else torch.optim.Adam(self.params, **opt_kw)

        diag = 1.0 if cfg.method == "flow_matching" else cfg.diagonal_fraction  # FM: t uniform, u = t
        self.time_sampler = TimeSampler(cfg.time_dist, diagonal_fraction=diag)
        params = inspect.signature(self.loss_fn).parameters
        self.use_paired_split = (
            "split" in params and "split_fraction" not in cfg.loss_kwargs and not cfg.loss_kwargs.get("both_terms", False)
            and cfg.loss_kwargs.get("update", "paper") != "semi"
        )
        # One CPU stream for data, noise, times and the split (same on every rank, device-independent);
        # a per-rank generator on the training device for draws inside the loss (e.g. progressive's s).
        self.stream = torch.Generator().manual_seed(cfg.seed)
        self.loss_gen = torch.Generator(device=self.device).manual_seed(cfg.seed + 7919 * (info.rank + 1))
        torch.manual_seed(cfg.seed + 104729 * info.rank)  # dropout etc.: different per rank
        self.step = 0
        self.instability: dict | None = None  # step, ratio, gain2 where the early warning fired
        self._log_ratios = collections.deque(maxlen=INSTABILITY_STEPS)
        self.history: list[dict] = []
        self.out_dir = Path(os.path.expanduser(cfg.out_dir)) if cfg.out_dir else None
        if ckpt is not None:
            self._restore(ckpt)
        self._build_scheduler(ckpt)
        self._wrap_data_parallel()
        self.teacher = teacher
        if teacher is not None and (cfg.teacher is not None or not cfg.method.startswith("sgflow")):
            raise ConfigError("teacher= distils into SGFlow (method sgflow or sgflow_fused) in place of "
                              "config.teacher, not beside it")
        if cfg.teacher is not None:
            with torch.random.fork_rng(devices=[]):  # building its network draws nothing from the run's RNG
                self.teacher = load_teacher(cfg.teacher, self.data_shape, self.device, cfg.interpolant)

    def _build_scheduler(self, ckpt) -> None:
        """``self.scheduler``: a LambdaLR of :func:`lr_factor` under this run's config, at ``self.step``.

        The schedule is a function of (config, step), so a resumed run builds it at its step rather than
        loading the saved one: a resume that changes ``steps`` follows the new cosine from its first step
        (the saved state would hold the old one's current rate). A version 2 checkpoint's scheduler state is
        only checked against the step; version 1 checkpoints have none."""
        cfg = self.config
        for group in self.optimizer.param_groups:
            group["initial_lr"] = cfg.lr  # the base rate (a restored group's "lr" is the last scheduled one)
        self.scheduler = LambdaLR(self.optimizer, functools.partial(lr_factor, cfg), last_epoch=self.step - 1)
        saved = ckpt.get("scheduler") if ckpt is not None else None
        if saved is not None and saved.get("last_epoch") != self.step:
            raise CheckpointError(f"checkpoint {ckpt['path']} has a scheduler at step {saved.get('last_epoch')!r} "
                                  f"but is at step {self.step}")

    @staticmethod
    def _check_resume(saved: TrainConfig, cfg: TrainConfig, path: str) -> None:
        a, b = saved.to_dict(), cfg.to_dict()
        if b.get("model") is None:
            b["model"] = a.get("model")
        diffs = [k for k in a if k not in RESUMABLE_OVERRIDES and a[k] != b[k]]
        if diffs:
            k = diffs[0]
            raise CheckpointError(
                f"checkpoint {path} was trained with {k}={a[k]!r} but this run asks for {k}={b[k]!r}"
                + (f" (and {len(diffs) - 1} more differences)" if len(diffs) > 1 else "")
            )

    def _restore(self, ckpt: dict) -> None:
        cfg, path = self.config, ckpt["path"]
        if tuple(ckpt.get("data_shape") or ()) != self.data_shape:
            raise CheckpointError(f"checkpoint {path} is for data of shape {ckpt.get('data_shape')}, not {self.data_shape}")
        if ckpt.get("version", 1) >= 2 and ("ema_n_averaged" not in ckpt or "scheduler" not in ckpt):
            raise CheckpointError(f"checkpoint {path} (version {ckpt['version']}) is incomplete: no EMA count or "
                                  "scheduler state")
        _load_state(self.model, ckpt["model"], "weights", path, cfg)
        _load_state(self.ema, ckpt["ema"], "EMA weights", path, cfg)
        # Version 1 checkpoints hold no count: the EMA started as a copy (1) and averaged once per step.
        self.averaged_model.n_averaged.fill_(int(ckpt.get("ema_n_averaged", int(ckpt["step"]) + 1)))
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
            rng = ckpt["rng"]
            self.stream.set_state(rng["stream"])
            per_rank = rng["ranks"]
        except (KeyError, ValueError, RuntimeError, TypeError) as e:
            raise CheckpointError(f"checkpoint {path} has a broken optimizer or RNG state: {e}") from None
        self.step = int(ckpt["step"])
        # Per-rank generators resume exactly when the process count is unchanged; otherwise re-seed
        # them deterministically from (seed, step) (the shared data stream is exact either way).
        if len(per_rank) == self.dist.world_size:
            mine = per_rank[self.dist.rank]
            self.loss_gen.set_state(mine["loss"])
            torch.set_rng_state(mine["torch"])
            if mine.get("cuda") is not None and self.device.type == "cuda":
                torch.cuda.set_rng_state(mine["cuda"], self.device)
        else:
            self.loss_gen.manual_seed(cfg.seed + 7919 * (self.dist.rank + 1) + self.step)
            torch.manual_seed(cfg.seed + 104729 * self.dist.rank + self.step)
        self.history = [r for r in ckpt.get("history", []) if r.get("step", 0) <= self.step]

    def _wrap_data_parallel(self) -> None:
        """``self.train_model``: what the loss is given. Under torchrun, a :class:`~sgflow.distributed.DualDDP`
        (DDP's forward syncs the gradients) unless the method is in :data:`MANUAL_ALLREDUCE_METHODS`
        (then the plain module, gradients all-reduced after backward). Built after a resume so DDP's
        initial broadcast sends the restored weights."""
        self.ddp = None
        self.data_parallel = "none"
        if self.dist.enabled:
            if self.config.method in MANUAL_ALLREDUCE_METHODS:
                self.data_parallel = "allreduce"
            else:
                self.ddp = D.DualDDP(self.model)
                self.data_parallel = "ddp"
        self.train_model = self.ddp if self.ddp is not None else self.model

    def data_parallel_note(self) -> str:
        """One line saying how gradients are averaged over the processes ("" in a single process)."""
        w = self.dist.world_size
        if self.data_parallel == "ddp":
            return f"data parallel over {w} processes: DistributedDataParallel (gradients synced in its forward/backward)"
        if self.data_parallel == "allreduce":
            return (f"data parallel over {w} processes: method {self.config.method!r} computes its JVP with "
                    "torch.func.jvp, which DDP's forward does not support; training the plain module and "
                    "all-reducing gradients after backward (same update)")
        return ""

    # ------------------------------------------------------------------ one step
    def draw_batch(self):
        """The global batch from the stream, sliced to this rank and moved to the device.

        Returns ``(x1, kwargs for the loss)``.
        """
        cfg, B = self.config, self.config.batch_size
        g = self.stream
        x1 = self.dataset.sample(B, generator=g)
        noise = torch.randn(x1.shape, generator=g, dtype=x1.dtype)
        t, u = self.time_sampler(B, dtype=x1.dtype, generator=g)
        split = paired_split(B, g) if self.use_paired_split else None
        W, r = self.dist.world_size, self.dist.rank
        lo, hi = r * B // W, (r + 1) * B // W
        dev = self.device
        nb = dev.type == "cuda"
        x1 = x1[lo:hi].to(dev, non_blocking=nb)
        kw = dict(noise=noise[lo:hi].to(dev, non_blocking=nb), t=t[lo:hi].to(dev), u=u[lo:hi].to(dev),
                  interpolant=cfg.interpolant, generator=self.loss_gen, **cfg.loss_kwargs)
        if kw.get("target") == "ema":
            kw["target"] = self.ema  # the semi update's target network: this run's EMA weights
        if self.teacher is not None:
            kw.update(self._teacher_kwargs())
        if split is not None:
            kw["split"] = split[lo:hi].to(dev)
        return x1, kw

    def _teacher_kwargs(self) -> dict:
        """``teacher=`` / ``teacher_mode=`` for this step under ``config.teacher_schedule``."""
        cfg = self.config
        if cfg.teacher_schedule == "warm" and self.step >= cfg.steps // 2:
            return {}  # the model's own v_hat: the paper's L_sg
        a = 1.0 - self.step / max(cfg.steps, 1) if cfg.teacher_schedule == "linear" else 1.0
        teacher, model = self.teacher, self.model
        if a < 1.0:
            def teacher(t, x, _t=self.teacher):  # a v_T + (1 - a) sg[f~(t, t, x)]
                return a * _t(t, x) + (1.0 - a) * model(t, t, x)
        kw = {"teacher": teacher, "teacher_mode": cfg.teacher_mode}
        if cfg.teacher_mode == "both" and "update" in cfg.loss_kwargs:
            # No second term is left (Xdot_t -> v_T in both): one plain squared loss per sample, the same under
            # either update rule; the paper's estimator takes it (the semi update refuses it).
            kw["update"] = "paper"
            kw["target"] = None  # and no target network for it
        return kw

    def train_step(self) -> dict:
        """One optimisation step; returns the loss's (detached, on-device) info dict plus grad_norm and lr."""
        cfg = self.config
        self.train_model.train()
        x1, kw = self.draw_batch()
        loss, info = self.loss_fn(self.train_model, x1, **kw)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # under DualDDP this also averages the gradients over the ranks
        if self.ddp is None:
            D.allreduce_gradients(self.params, self.dist.world_size)
        clip = cfg.grad_clip if cfg.grad_clip else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, clip)
        lr = self.scheduler.get_last_lr()[0]  # lr_at(cfg, self.step), set by the scheduler's last step
        self.optimizer.step()
        self.scheduler.step()
        self._update_ema()
        self.step += 1
        out = dict(info)
        out["loss"] = loss.detach()
        out["grad_norm"] = grad_norm.detach()
        out["lr"] = lr
        return out

    @torch.no_grad()
    def _update_ema(self) -> None:
        self.averaged_model.update_parameters(self.model)

    # ------------------------------------------------------------------ outputs
    def state_dict(self) -> dict:
        """Checkpoint contents. Collective under torchrun (gathers every rank's RNG states)."""
        mine = {
            "loss": self.loss_gen.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
        }
        # Each rank's RNG states, and (data parallel) a digest of its weights: the replicas must be identical.
        digest = D.state_digest(self.model) if self.dist.enabled else None
        gathered = D.gather_objects((mine, digest), self.dist)
        ranks = [g[0] for g in gathered]
        replicas = [g[1] for g in gathered]
        if self.dist.is_main and len(set(replicas)) > 1:
            warnings.warn(f"data-parallel replicas differ at step {self.step} (weight digests {replicas})", stacklevel=2)
        return {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "sgflow_version": sgflow.__version__,
            "config": self.config.to_dict(),
            "data_shape": list(self.data_shape),
            "step": self.step,
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "ema_n_averaged": int(self.averaged_model.n_averaged),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": {"stream": self.stream.get_state(), "ranks": ranks},
            "world_size": self.dist.world_size,
            "replica_digests": replicas,
            "history": self.history,
        }

    def save_checkpoint(self, path=None) -> Path | None:
        """Write ``checkpoint.pt`` (rank 0 only; every rank must call it). Returns the path on rank 0.

        Only from a finite state: when a weight, EMA weight or optimizer moment holds a NaN or inf (a run
        diverging between two logged steps) it raises :class:`TrainingDiverged` on every rank and writes
        nothing, so the last good checkpoint stays."""
        bad = _first_non_finite([("weight", self.model.state_dict()), ("EMA weight", self.ema.state_dict()),
                                 ("optimizer state", _optimizer_tensors(self.optimizer.state_dict()))])
        if bad is not None:
            kept = getattr(self, "_saved_step", None)
            raise TrainingDiverged(
                f"training diverged: {bad} is not finite at step {self.step}; no checkpoint written"
                + (f" (the last one, step {kept}, is kept)" if kept is not None else "")
                + f"; lower the learning rate (now {self.config.lr}) or add warm-up steps")
        state = self.state_dict()
        if not self.dist.is_main or self.out_dir is None and path is None:
            return None
        path = Path(path) if path is not None else self.out_dir / "checkpoint.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_save(state, path)
        self._saved_step = self.step
        return path

    @torch.no_grad()
    def sample_figure(self, path=None, n_points: int = 2000, n_images: int = 64):
        """Samples of the EMA model at ``config.sample_steps`` beside the data, saved as a PNG.

        Uses its own fixed-seed generator so figures never disturb the training RNG.
        """
        from sgflow.plotting import samples_figure, save_png

        g = torch.Generator().manual_seed(self.config.seed + 1)
        n = n_images if self.dataset.is_image else n_points
        data = self.dataset.sample(n, generator=g)
        x0 = torch.randn((n, *self.data_shape), generator=g)
        samples = generate(self.ema, x0.to(self.device), self.config.sample_steps, default_sampler(self.config.method))
        footers = None
        if not self.dataset.is_image:
            from sgflow.metrics import energy_distance

            ref = self.dataset.sample(n, generator=g)
            footers = [f"ED {energy_distance(data, ref).item():.4f}"] + [
                f"ED {energy_distance(s.cpu(), ref).item():.4f}" for s in samples.values()
            ]
        img = samples_figure(data, {k: v.cpu() for k, v in samples.items()},
                             title=f"{self.config.method} on {self.config.data}, step {self.step}", footers=footers)
        if path is None:
            path = self.out_dir / "samples" / f"step_{self.step:07d}.png"
        return save_png(img, path)

    def _write_log(self, record: dict) -> None:
        self.history.append(record)
        if self.out_dir is not None and self.dist.is_main:
            with open(self.out_dir / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def _prepare_out_dir(self) -> None:
        if self.out_dir is None or not self.dist.is_main:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "config.json").write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
        # The log mirrors the checkpoint: drop lines past the resumed step (written after the last save).
        log = self.out_dir / "log.jsonl"
        with open(log, "w") as f:
            for rec in self.history:
                f.write(json.dumps(rec) + "\n")

    # ------------------------------------------------------------------ loop
    def run(self) -> "Trainer":
        """Train from the current step to ``config.steps``; writes logs, figures and checkpoints."""
        from sgflow._extras import require

        tqdm = require("tqdm.auto", "the trainer's progress bar").tqdm

        cfg, info = self.config, self.dist
        self._prepare_out_dir()
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not (cfg.progress and info.is_main),
                   unit="step", dynamic_ncols=True, desc=f"{cfg.method}/{cfg.data}")
        t_start = t_last = time.perf_counter()
        step_last = self.step
        try:
            while self.step < cfg.steps:
                out = self.train_step()
                self._watch_instability(out)
                last = self.step == cfg.steps
                if self.step % cfg.log_every == 0 or last:
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)
                    now = time.perf_counter()
                    sps = (self.step - step_last) * cfg.batch_size / max(now - t_last, 1e-9)
                    t_last, step_last = now, self.step
                    vals = {k: float(v) for k, v in out.items() if isinstance(v, (float, int)) or (torch.is_tensor(v) and v.numel() == 1)}
                    vals = D.allreduce_mean(vals, info.world_size, self.device)
                    self._check_divergence(vals)
                    rec = {"step": self.step, **{k: vals[k] for k in sorted(vals)},
                           "samples_per_s": round(sps, 1), "time": round(now - t_start, 3)}
                    self._write_log(rec)
                    bar.set_postfix(loss=f"{vals['loss']:.4g}", samples_s=f"{sps:,.0f}", refresh=False)
                bar.update(1)
                if self.out_dir is not None:
                    if cfg.ckpt_every and self.step % cfg.ckpt_every == 0 and not last:
                        self.save_checkpoint()
                    if cfg.figures and cfg.sample_every and self.step % cfg.sample_every == 0 and not last and info.is_main:
                        self.sample_figure()
        finally:
            bar.close()
        if self.out_dir is not None:
            self.save_checkpoint()
            if info.is_main and cfg.figures:
                self.sample_figure()
        self.wall_time = time.perf_counter() - t_start
        return self

    def close(self, wait: bool | None = None) -> None:
        """Leave the process group if this trainer created it.

        ``wait``: meet the other ranks at a barrier first (see :func:`sgflow.distributed.cleanup`). By default
        it waits unless an exception is propagating, so that ``close()`` in a ``finally`` never blocks on a
        peer that is not coming."""
        if wait is None:
            wait = sys.exc_info()[0] is None
        D.cleanup(self.dist, wait=wait)


@torch.no_grad()
def generate(model, x0: torch.Tensor, steps_list, sampler: str = "flow_map", grid_fn=None) -> dict:
    """Samples for each step count: ``{k: sample(model, x0, k, sampler)}`` (model put in eval mode,
    restored afterwards). x0: noise [n, *D]."""
    was_training = model.training
    model.eval()
    try:
        return {int(k): sgflow.sample(model, x0, steps=int(k), method=sampler) for k in steps_list}
    finally:
        model.train(was_training)


def train(config: TrainConfig | dict | None = None, resume=None, model=None, **overrides) -> Trainer:
    """Build a :class:`Trainer`, run it, release the process group; returns the trainer.

    ``train(TrainConfig(...))``, ``train({"method": "sgflow", ...})`` or ``train(steps=100, ...)``.
    """
    if config is None:
        config = TrainConfig()
    elif isinstance(config, dict):
        config = TrainConfig.from_dict(config)
    if overrides:
        config = dataclasses.replace(config, **overrides)
    trainer = Trainer(config, resume=resume, model=model)
    try:
        return trainer.run()
    finally:
        trainer.close()
