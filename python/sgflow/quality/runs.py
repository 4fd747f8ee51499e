"""Training and scoring the quality table's runs, and the whole table (:func:`run_quality`)."""
from __future__ import annotations

import copy
import dataclasses
import json
import multiprocessing
import math
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from sgflow.evaluate import DEFAULT_PAIRS, evaluate_digits, evaluate_points
from sgflow.memory import peak_tensor_bytes
from sgflow.train import TeacherVelocity, TrainConfig, Trainer, TrainingDiverged

from .config import DATA_SPECS, DISTILL_METHODS, METHODS, ORACLE_METHODS, STEP_MULTIPLIER, METHOD_LOSS_KWARGS, TUNABLE, TUNING, DataSpec, QualityConfig, \
    check_config, metrics_of, samplers_for, training_method, tuning_trials
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


def initial_network(spec: DataSpec, shape, seed: int):
    """The network every method of one seed starts from: built right after ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    return spec.build_network(shape)


def train_method(key: str, spec: DataSpec, seed: int, cfg: QualityConfig, settings: dict | None = None,
                 teacher_settings: dict | None = None):
    """Train method ``key`` on ``spec`` with ``seed``. Returns ``(EMA model, untrained copy, record)``.

    ``settings``: values for ``lr`` / ``diagonal_fraction`` / ``ema_decay`` that replace ``cfg``'s for this
    run (a tuning trial, or the trial the tuning chose); stored in the record. ``teacher_settings``: the same for
    the flow-matching teacher of a distillation method (``DISTILL_METHODS``), trained first with this seed; its
    record is the student's ``teacher`` entry, its time counts in ``train_s``.

    The network is built right after ``torch.manual_seed(seed)``, so every method starts from the same
    weights for one seed. Steps 1 and 2 run outside the timed loop: step 1 creates Adam's state, step
    2 is measured for peak tensor memory; steps 3.. are timed by the trainer's log (every 25 steps).
    The record holds ``step_ms`` (median per-step wall time), ``peak_bytes``, ``final_loss``,
    ``train_s`` and ``diverged`` (the trainer's message, or None).
    """
    dataset = spec.dataset()
    steps = int(cfg.train_steps[spec.key]) * STEP_MULTIPLIER.get(key, 1)
    settings = dict(settings or {})
    bad = [k for k in settings if k not in TUNABLE]
    if bad:
        raise ValueError(f"unknown run settings {bad}; expected some of: {', '.join(TUNABLE)}")
    cfg = dataclasses.replace(cfg, **settings) if settings else cfg
    tc = TrainConfig(
        method=training_method(key), data=spec.data, data_kwargs=dict(spec.data_kwargs),
        model=spec.model, model_kwargs=dict(spec.model_kwargs), steps=steps, batch_size=spec.batch_size,
        lr=cfg.lr, warmup=cfg.warmup, lr_schedule=cfg.lr_schedule, ema_decay=cfg.ema_decay, grad_clip=cfg.grad_clip,
        seed=int(seed), time_dist=cfg.time_dist, diagonal_fraction=cfg.diagonal_fraction, out_dir=None,
        log_every=25, progress=False, figures=False, device=cfg.device, loss_kwargs=METHOD_LOSS_KWARGS.get(key),
        teacher_mode="both",
    )
    net = initial_network(spec, dataset.shape, seed)
    untrained = copy.deepcopy(net).eval()
    teacher, teacher_rec, t0 = None, None, time.perf_counter()
    if key in DISTILL_METHODS:
        teacher_net, _, teacher_rec = train_method("flow_matching", spec, seed, dataclasses.replace(cfg, measure_memory=False),
                                                   teacher_settings)
        teacher = TeacherVelocity(teacher_net)
    if key in ORACLE_METHODS:
        teacher = getattr(dataset, "mixture", None)
        if teacher is None:
            raise ValueError(f"the oracle needs a data set with an exact velocity (a Gaussian mixture), not {spec.key!r}")
        teacher = teacher.velocity  # the trainer's teacher path, with the exact velocity
    trainer = Trainer(tc, model=net, teacher=teacher)
    rec = {"method": key, "training_method": tc.method, "dataset": spec.key, "seed": int(seed), "steps": steps,
           "settings": settings,
           "step_ms": None, "step_ms_mean": None, "peak_bytes": None, "final_loss": None, "train_s": None,
           "diverged": None, "teacher": teacher_rec}
    try:
        if teacher_rec is not None and teacher_rec["diverged"]:
            raise TrainingDiverged(f"the flow-matching teacher diverged: {teacher_rec['diverged']}")
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


def evaluate_method(model, key: str, dataset, cfg: QualityConfig, seed: int, cache: dict, samplers=None,
                    nfe=None) -> dict:
    """Score ``model`` with each of its samplers (or ``samplers``) at every NFE in ``cfg.nfe`` (or ``nfe``).

    Returns ``{"rows": [{"sampler", "nfe", metric: value...}], "floor", "exact_energy", "pairs",
    "classifier_accuracy"}``. Heun takes 2 evaluations per step, so it appears at even NFE only.
    ``seed`` fixes the evaluation noise and reference data (the same for every method of one seed);
    ``cache`` keeps the exact flow maps between the methods of one seed.
    """
    out = {"rows": [], "floor": None, "exact_energy": None, "pairs": [], "classifier_accuracy": None}
    device = torch.device(cfg.device)
    if samplers is None:
        samplers = samplers_for(key) if key != "untrained" else ("euler",)
    for sampler in samplers:
        per_eval = 2 if sampler == "heun" else 1
        ks = [k for k in (cfg.nfe if nfe is None else nfe) if k % per_eval == 0]
        if not ks:
            continue
        steps = [k // per_eval for k in ks]
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
        for k, row in zip(ks, res["rows"]):
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


# Per process: data sets and the exact flow maps of one (data set, evaluation seed), kept between the runs a
# process does (every method of a seed shares them; with jobs > 1 each worker keeps its own).
_DATASETS: dict = {}
_EXACT_CACHES: dict = {}


def _dataset(key: str):
    if key not in _DATASETS:
        _DATASETS[key] = DATA_SPECS[key].dataset()
    return _DATASETS[key]


def _eval_seed(seed: int) -> int:
    return 10_000 + int(seed)  # evaluation noise apart from the training stream


def _run_job(job: dict) -> dict:
    """One run, in this process or a worker: train ``job["method"]`` (or take the initial network for
    ``"untrained"``) and score it. ``job``: method, dataset, seed, settings, cfg, and for a tuning trial
    ``tune=True`` (scored at ``cfg.tune_nfe`` with the method's natural samplers only, no memory measurement)."""
    cpu0 = time.process_time()
    cfg, d, key, seed = job["cfg"], job["dataset"], job["method"], int(job["seed"])
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    spec, dataset = DATA_SPECS[d], _dataset(d)
    cache = _EXACT_CACHES.setdefault((d, _eval_seed(seed)), {})
    rec = None
    if key == "untrained":
        # Reference: the common initial network (identical for every method of this seed).
        model = initial_network(spec, dataset.shape, seed).eval()
    else:
        run_cfg = dataclasses.replace(cfg, measure_memory=False) if job.get("tune") else cfg
        model, _, rec = train_method(key, spec, seed, run_cfg, job.get("settings"), job.get("teacher_settings"))
    t_eval = time.perf_counter()
    if job.get("tune"):
        natural = ("euler", "heun") if key == "flow_matching" else ("flow_map",)
        ev = evaluate_method(model, key, dataset, cfg, _eval_seed(seed), cache, samplers=natural, nfe=cfg.tune_nfe)
    else:
        ev = evaluate_method(model, key, dataset, cfg, _eval_seed(seed), cache)
    if rec is not None:
        rec["eval_s"] = time.perf_counter() - t_eval
    return {"rec": rec, "eval": {"dataset": d, "method": key, "seed": seed, **ev}, "cpu_s": time.process_time() - cpu0,
            "pid": os.getpid()}


def _execute(jobs: list, n_workers: int):
    """Yield ``(job, result)`` for every job: in order in this process (``n_workers`` 1), else as they finish
    in ``n_workers`` spawned processes (spawn: no forked torch thread pools)."""
    if n_workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            yield job, _run_job(job)
        return
    from concurrent.futures import ProcessPoolExecutor, as_completed

    with ProcessPoolExecutor(max_workers=min(n_workers, len(jobs)), mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(_run_job, job): job for job in jobs}
        try:
            for fut in as_completed(futures):
                yield futures[fut], fut.result()
        except BaseException:
            for fut in futures:
                fut.cancel()
            raise


def tuning_score(ev: dict, dataset_key: str, nfe=(1, 2)) -> float:
    """A tuning trial's score (lower is better): the mean over ``nfe`` of the headline metric (flow-map MSE for
    mixtures, Frechet distance for digits) with the method's natural sampler (flow matching: the better of
    Euler and Heun at each NFE). Infinite when a value is missing or non-finite (a diverged trial)."""
    metric = metrics_of(dataset_key)[0]
    vals = []
    for k in nfe:
        # Trials are scored with the natural samplers only: one row per NFE, or Euler and Heun for flow matching.
        cands = [r.get(metric) for r in ev["rows"] if r["nfe"] == k and metric in r]
        cands = [v if v is not None and math.isfinite(v) else math.inf for v in cands]
        if not cands or not math.isfinite(min(cands)):
            return math.inf
        vals.append(min(cands))
    return statistics.fmean(vals)


def _applies(key: str, dataset) -> bool:
    return key not in ORACLE_METHODS or getattr(dataset, "mixture", None) is not None  # the oracle needs exact v


def choose_settings(trials: list) -> dict:
    """``{dataset: {method: settings}}``: each method's trial with the lowest score on each data set (the earlier
    trial on a tie); ``{}`` (the untuned settings) where every trial diverged."""
    chosen: dict = {}
    for t in trials:
        cur = chosen.setdefault(t["dataset"], {}).get(t["method"])
        if cur is None or t["score"] < cur[0] or (t["score"] == cur[0] and t["index"] < cur[1]):
            chosen[t["dataset"]][t["method"]] = (t["score"], t["index"], t["settings"])
    return {d: {k: (dict(v[2]) if math.isfinite(v[0]) else {}) for k, v in m.items()} for d, m in chosen.items()}


def run_quality(cfg: QualityConfig, out_dir, log=print, command: str | None = None) -> dict:
    """Train and score every method of ``cfg``; write ``quality.json``, ``quality.md`` and ``quality.png``
    under ``out_dir`` and return the results dict (see :func:`summarize` for its ``summary`` part).

    With ``cfg.tune`` every method is first trained once per trial of its search space on ``cfg.tune_seed``
    (``results["tuning"]``: each trial's settings and score, and the settings chosen per data set and
    method), then on the reported seeds with the chosen settings. The JSON is rewritten after every run,
    so an interrupted table keeps what it measured. ``command``: the command line shown in the Markdown header.
    """
    check_config(cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    threads_before = torch.get_num_threads()
    if cfg.threads:
        # One thread: the small MLPs gain little from more, and a busy 2-core machine slows a
        # multi-threaded step down many times (see `sgflow demo --threads`).
        torch.set_num_threads(int(cfg.threads))
    t_start, cpu_s = time.perf_counter(), 0.0
    cpu_main = time.process_time()
    results = {"config": cfg.to_dict(), "machine": machine_info(cfg), "command": command,
               "methods": {k: {"label": METHODS[k][0], "training_method": training_method(k)} for k in cfg.methods},
               "networks": {d: DATA_SPECS[d].describe() for d in cfg.datasets}, "runs": [], "evals": []}
    json_path = out / "quality.json"

    def save():
        results["wall_time_s"] = time.perf_counter() - t_start
        json_path.write_text(json.dumps(_clean(results), indent=1) + "\n")

    def stamp() -> str:
        return f"[{time.perf_counter() - t_start:7.1f}s]"

    try:
        datasets = {d: _dataset(d) for d in cfg.datasets}
        if cfg.jobs > 1 and any(ds.is_image for ds in datasets.values()):
            # The digits feature classifier is trained once and cached before the workers would race to.
            from sgflow.evaluate import digits_classifier

            for ds in datasets.values():
                if ds.is_image:
                    digits_classifier(ds, cfg.cache_dir, verbose=False)
        chosen: dict = {}
        if cfg.tune:
            space = {k: {n: list(v) for n, v in TUNING[k].items()} for k in cfg.methods}
            results["tuning"] = {"seed": cfg.tune_seed, "nfe": list(cfg.tune_nfe), "space": space, "trials": [],
                                 "chosen": {}}
            jobs = [{"cfg": cfg, "dataset": d, "method": k, "seed": cfg.tune_seed, "settings": s, "tune": True, "index": i}
                    for d in cfg.datasets for k in cfg.methods if _applies(k, datasets[d])
                    for i, s in enumerate(tuning_trials(k))]
            log(f"tuning: {len(jobs)} trials on seed {cfg.tune_seed} ({', '.join(f'{k} {len(tuning_trials(k))}' for k in cfg.methods)} "
                f"per data set), scored at {list(cfg.tune_nfe)} NFE")
            for job, res in _execute(jobs, cfg.jobs):
                rec, ev = res["rec"], res["eval"]
                cpu_s += res["cpu_s"] if res["pid"] != os.getpid() else 0.0  # a worker's; ours is counted below
                score = math.inf if rec["diverged"] else tuning_score(ev, job["dataset"], cfg.tune_nfe)
                results["tuning"]["trials"].append({
                    "dataset": job["dataset"], "method": job["method"], "index": job["index"], "settings": job["settings"],
                    "score": score, "diverged": rec["diverged"], "train_s": rec["train_s"], "step_ms": rec["step_ms"],
                    "rows": ev["rows"]})
                log(f"{stamp()} tune {job['dataset']} {job['method']:<13} "
                    + ", ".join(f"{n}={v}" for n, v in job["settings"].items())
                    + (f": score {score:.4g}" if math.isfinite(score) else ": diverged" if rec["diverged"] else ": no score"))
                save()
            results["tuning"]["trials"].sort(key=lambda t: (cfg.datasets.index(t["dataset"]), cfg.methods.index(t["method"]),
                                                            t["index"]))
            chosen = choose_settings(results["tuning"]["trials"])
            results["tuning"]["chosen"] = chosen
            for d, per in chosen.items():
                log(f"tuned on {d}: " + "; ".join(
                    f"{k} " + (", ".join(f"{n}={v}" for n, v in s.items()) or "untuned (every trial diverged)")
                    for k, s in per.items()))
        jobs = []
        for d in cfg.datasets:
            for seed in cfg.seeds:
                mine = [k for k in cfg.methods if _applies(k, datasets[d])]
                jobs += [{"cfg": cfg, "dataset": d, "method": k, "seed": seed, "settings": chosen.get(d, {}).get(k),
                          "teacher_settings": chosen.get(d, {}).get("flow_matching")} for k in mine]
                if mine:
                    jobs.append({"cfg": cfg, "dataset": d, "method": "untrained", "seed": seed})
        for job, res in _execute(jobs, cfg.jobs):
            rec, ev = res["rec"], res["eval"]
            cpu_s += res["cpu_s"] if res["pid"] != os.getpid() else 0.0  # a worker's; ours is counted below
            results["evals"].append(ev)
            if rec is not None:
                results["runs"].append(rec)
                d, head = job["dataset"], metrics_of(job["dataset"])[0]
                best = [r[head] for r in ev["rows"] if r["nfe"] == min(cfg.nfe) and head in r]
                step_ms = f"{rec['step_ms']:.1f} ms/step" if rec["step_ms"] is not None else "no timing"
                log(f"{stamp()} {d} seed {job['seed']} {job['method']:<13} {step_ms}, "
                    f"train {rec['train_s']:.1f}s, eval {rec['eval_s']:.1f}s, {head}@{min(cfg.nfe)} NFE "
                    + (", ".join(f"{v:.4g}" if v is not None else "nan" for v in best) or "-")
                    + (f"  DIVERGED: {rec['diverged']}" if rec["diverged"] else ""))
            save()
    finally:
        torch.set_num_threads(threads_before)
    order = {k: i for i, k in enumerate([*cfg.methods, "untrained"])}
    rank = lambda r: (cfg.datasets.index(r["dataset"]), cfg.seeds.index(r["seed"]), order[r["method"]])  # noqa: E731
    results["runs"].sort(key=rank)
    results["evals"].sort(key=rank)
    results["wall_time_s"] = time.perf_counter() - t_start
    # CPU time of the runs (each measured in the process that did it) and of this process's own work: on a
    # shared machine the wall time also counts other people's work.
    main_s = time.process_time() - cpu_main
    results["cpu_time_s"] = main_s + cpu_s
    results["summary"] = summarize(results)
    results["verdicts"] = verdicts(results)
    save()
    (out / "quality.md").write_text(markdown(results))
    figure(results, out / "quality.png")
    log(f"wrote {json_path}, {out / 'quality.md'}, {out / 'quality.png'} "
        f"(wall time {results['wall_time_s']:.0f}s)")
    return results
