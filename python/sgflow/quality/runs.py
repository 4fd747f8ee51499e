"""Training and scoring the quality table's runs, and the whole table (:func:`run_quality`)."""
from __future__ import annotations

import copy
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from sgflow.evaluate import DEFAULT_PAIRS, evaluate_digits, evaluate_points
from sgflow.memory import peak_tensor_bytes
from sgflow.train import TrainConfig, Trainer, TrainingDiverged

from .config import DATA_SPECS, METHODS, ORACLE_METHODS, METHOD_LOSS_KWARGS, DataSpec, QualityConfig, check_config, \
    metrics_of, samplers_for, training_method
from .report import _clean, figure, markdown, summarize, verdicts

# ---------------------------------------------------------------------- one run
def _median_ms_per_step(history: list, first_step: int) -> float | None:
    """Median over logging intervals of the wall time per step (robust to a busy machine's spikes).

    ``history``: the trainer's log records ({"step", "time": seconds since run() started}); the first
    interval starts at ``first_step`` (where run() began) and time 0.
    """
    rates = []
    prev_step, prev_time = first_step, 0.0
    for rec in history:
        if rec["step"] <= prev_step:
            continue
        rates.append((rec["time"] - prev_time) / (rec["step"] - prev_step))
        prev_step, prev_time = rec["step"], rec["time"]
    return 1e3 * statistics.median(rates) if rates else None


def train_method(key: str, spec: DataSpec, seed: int, cfg: QualityConfig):
    """Train method ``key`` on ``spec`` with ``seed``. Returns ``(EMA model, untrained copy, record)``.

    The network is built right after ``torch.manual_seed(seed)``, so every method starts from the same
    weights for one seed. Steps 1 and 2 run outside the timed loop: step 1 creates Adam's state, step
    2 is measured for peak tensor memory; steps 3.. are timed by the trainer's log (every 25 steps).
    The record holds ``step_ms`` (median per-step wall time), ``peak_bytes``, ``final_loss``,
    ``train_s`` and ``diverged`` (the trainer's message, or None).
    """
    dataset = spec.dataset()
    steps = int(cfg.train_steps[spec.key])
    tc = TrainConfig(
        method=training_method(key), data=spec.data, data_kwargs=dict(spec.data_kwargs),
        model=spec.model, model_kwargs=dict(spec.model_kwargs), steps=steps, batch_size=spec.batch_size,
        lr=cfg.lr, warmup=cfg.warmup, lr_schedule=cfg.lr_schedule, ema_decay=cfg.ema_decay, grad_clip=cfg.grad_clip,
        seed=int(seed), time_dist=cfg.time_dist, diagonal_fraction=cfg.diagonal_fraction, out_dir=None,
        log_every=25, progress=False, figures=False, device=cfg.device, loss_kwargs=METHOD_LOSS_KWARGS.get(key),
        teacher_mode="both",
    )
    torch.manual_seed(seed)
    net = spec.build_network(dataset.shape)
    untrained = copy.deepcopy(net).eval()
    teacher = None
    if key in ORACLE_METHODS:
        teacher = getattr(dataset, "mixture", None)
        if teacher is None:
            raise ValueError(f"the oracle needs a data set with an exact velocity (a Gaussian mixture), not {spec.key!r}")
        teacher = teacher.velocity  # the trainer's teacher path, with the exact velocity
    trainer = Trainer(tc, model=net, teacher=teacher)
    rec = {"method": key, "training_method": tc.method, "dataset": spec.key, "seed": int(seed), "steps": steps,
           "step_ms": None, "step_ms_mean": None, "peak_bytes": None, "final_loss": None, "train_s": None,
           "diverged": None}
    t0 = time.perf_counter()
    try:
        trainer.train_step()
        if cfg.measure_memory:
            if trainer.device.type == "cuda":
                torch.cuda.synchronize(trainer.device)
            rec["peak_bytes"] = int(peak_tensor_bytes(trainer.train_step)["peak_bytes"])
        else:
            trainer.train_step()
        first = trainer.step
        t_run = time.perf_counter()
        trainer.run()
        run_s = time.perf_counter() - t_run
        rec["step_ms"] = _median_ms_per_step(trainer.history, first)
        rec["step_ms_mean"] = 1e3 * run_s / max(trainer.step - first, 1)
        if trainer.history:
            rec["final_loss"] = float(trainer.history[-1]["loss"])
    except TrainingDiverged as e:
        rec["diverged"] = str(e)
    finally:
        trainer.close()
    rec["train_s"] = time.perf_counter() - t0
    return trainer.ema.eval(), untrained, rec


def evaluate_method(model, key: str, dataset, cfg: QualityConfig, seed: int, cache: dict) -> dict:
    """Score ``model`` with each of its samplers at every NFE in ``cfg.nfe``.

    Returns ``{"rows": [{"sampler", "nfe", metric: value...}], "floor", "exact_energy", "pairs",
    "classifier_accuracy"}``. Heun takes 2 evaluations per step, so it appears at even NFE only.
    ``seed`` fixes the evaluation noise and reference data (the same for every method of one seed);
    ``cache`` keeps the exact flow maps between the methods of one seed.
    """
    out = {"rows": [], "floor": None, "exact_energy": None, "pairs": [], "classifier_accuracy": None}
    device = torch.device(cfg.device)
    for sampler in samplers_for(key) if key != "untrained" else ("euler",):
        per_eval = 2 if sampler == "heun" else 1
        nfe = [k for k in cfg.nfe if k % per_eval == 0]
        if not nfe:
            continue
        steps = [k // per_eval for k in nfe]
        if dataset.is_image:
            res = evaluate_digits(model, dataset, steps, n=cfg.n_eval, seed=seed, sampler=sampler, device=device,
                                  cache_dir=cfg.cache_dir, verbose=False)
            out["classifier_accuracy"] = res["classifier_accuracy"]
        else:
            # The single-jump errors at fixed (t, u) pairs mean something for flow-map jumps only.
            pairs = DEFAULT_PAIRS if sampler == "flow_map" else ()
            # Few projections: the sliced Wasserstein distance is not reported, and 256 of them cost as much
            # as all the energy distances together.
            res = evaluate_points(model, dataset, steps, n=cfg.n_eval, seed=seed, sampler=sampler, pairs=pairs,
                                  device=device, cache=cache, projections=4)
            out["exact_energy"] = res["exact_energy"]
            if sampler == "flow_map":
                out["pairs"] = res["pairs"]
        out["floor"] = res["noise_floor"]
        for k, row in zip(nfe, res["rows"]):
            vals = {m: row[m] for m in ("map_mse", "energy", "frechet") if row.get(m) is not None}
            out["rows"].append({"sampler": sampler, "nfe": int(k), **vals})
    return out


def machine_info(cfg: QualityConfig) -> dict:
    """Where the numbers were measured (stored in the JSON and printed in the table's header)."""
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "device": cfg.device}
    try:
        info["nice"] = os.nice(0)
    except OSError:
        info["nice"] = None
    if cfg.device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(cfg.device))
    return info


def run_quality(cfg: QualityConfig, out_dir, log=print, command: str | None = None) -> dict:
    """Train and score every method of ``cfg``; write ``quality.json``, ``quality.md`` and ``quality.png``
    under ``out_dir`` and return the results dict (see :func:`summarize` for its ``summary`` part).

    The JSON is rewritten after every run, so an interrupted table keeps what it measured.
    ``command``: the command line shown in the Markdown header.
    """
    check_config(cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    threads_before = torch.get_num_threads()
    if cfg.threads:
        # One thread: the small MLPs gain little from more, and a busy 2-core machine slows a
        # multi-threaded step down many times (see `sgflow demo --threads`).
        torch.set_num_threads(int(cfg.threads))
    t_start, cpu_start = time.perf_counter(), time.process_time()
    results = {"config": cfg.to_dict(), "machine": machine_info(cfg), "command": command,
               "methods": {k: {"label": METHODS[k][0], "training_method": training_method(k)} for k in cfg.methods},
               "networks": {d: DATA_SPECS[d].describe() for d in cfg.datasets}, "runs": [], "evals": []}
    json_path = out / "quality.json"
    try:
        for d in cfg.datasets:
            spec = DATA_SPECS[d]
            dataset = spec.dataset()
            for seed in cfg.seeds:
                cache: dict = {}
                eval_seed = 10_000 + int(seed)  # evaluation noise apart from the training stream
                untrained = None
                for key in cfg.methods:
                    if key in ORACLE_METHODS and getattr(dataset, "mixture", None) is None:
                        continue  # no exact velocity
                    model, untrained, rec = train_method(key, spec, seed, cfg)
                    t_eval = time.perf_counter()
                    ev = evaluate_method(model, key, dataset, cfg, eval_seed, cache)
                    rec["eval_s"] = time.perf_counter() - t_eval
                    results["runs"].append(rec)
                    results["evals"].append({"dataset": d, "method": key, "seed": int(seed), **ev})
                    head = metrics_of(d)[0]
                    best = [r[head] for r in ev["rows"] if r["nfe"] == min(cfg.nfe) and head in r]
                    step_ms = f"{rec['step_ms']:.1f} ms/step" if rec["step_ms"] is not None else "no timing"
                    log(f"[{time.perf_counter() - t_start:7.1f}s] {d} seed {seed} {key:<13} {step_ms}, "
                        f"train {rec['train_s']:.1f}s, eval {rec['eval_s']:.1f}s, {head}@{min(cfg.nfe)} NFE "
                        + (", ".join(f"{v:.4g}" for v in best) or "-")
                        + (f"  DIVERGED: {rec['diverged']}" if rec["diverged"] else ""))
                    results["wall_time_s"] = time.perf_counter() - t_start
                    json_path.write_text(json.dumps(_clean(results), indent=1) + "\n")
                if untrained is not None:
                    # Reference: the common initial network (identical for every method of this seed).
                    ev = evaluate_method(untrained, "untrained", dataset, cfg, eval_seed, cache)
                    results["evals"].append({"dataset": d, "method": "untrained", "seed": int(seed), **ev})
    finally:
        torch.set_num_threads(threads_before)
    results["wall_time_s"] = time.perf_counter() - t_start
    # CPU time of this process: on a shared machine the wall time also counts other people's work.
    results["cpu_time_s"] = time.process_time() - cpu_start
    results["summary"] = summarize(results)
    results["verdicts"] = verdicts(results)
    json_path.write_text(json.dumps(_clean(results), indent=1) + "\n")
    (out / "quality.md").write_text(markdown(results))
    figure(results, out / "quality.png")
    log(f"wrote {json_path}, {out / 'quality.md'}, {out / 'quality.png'} "
        f"(wall time {results['wall_time_s']:.0f}s)")
    return results


