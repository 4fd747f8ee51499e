"""The quality table: every method trained alike, sampled at 1-16 network evaluations, scored.

Every method (flow matching, Lagrangian, Eulerian, progressive, MeanFlow, SGFlow) is trained on the same
network, data, step budget, optimiser settings and seeds by :class:`sgflow.train.Trainer`, then its EMA
weights are sampled at each number of network evaluations (NFE) in ``nfe`` with

- flow-map jumps (``flow_map``, k jumps = k NFE) for the flow-map methods,
- Euler (k steps = k NFE) and Heun (k/2 steps = k NFE, none at 1 NFE) on the diagonal f~(t, t, x): flow
  matching's only sampler, and a control for the flow-map methods' own velocity.

Metrics come from :mod:`sgflow.evaluate`: for Gaussian mixtures (ring8, grid9, gmm in 16 dims) the MSE of
the k-step map against the exact flow map f*(0, 1, x0) and the energy distance to fresh data (noise floor:
the energy distance between two fresh data draws); for sklearn digits the Frechet distance in a
self-trained classifier's feature space (floor: two disjoint halves of the real set). Per method, the
same runs give the training time per step (median over logging intervals, fastest seed) and the peak
tensor memory of one training step (:class:`sgflow.memory.PeakTensorBytes`, measured on step 2, which
is not timed).

Nothing is tuned inside: every method gets the settings of :class:`QualityConfig`. To compare settings
(equally for every method), run the table once per setting and call :func:`compare_settings`.

    from sgflow.quality import preset, run_quality
    results = run_quality(preset("quick"), "out/quality_quick")   # JSON, Markdown table, PNG figure

Command line: ``sgflow quality --quick --out DIR`` or ``python benchmarks/quality.py ...``.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

import sgflow
from sgflow.data import get_dataset
from sgflow.evaluate import DEFAULT_PAIRS, evaluate_digits, evaluate_points
from sgflow.memory import peak_tensor_bytes
from sgflow.nn import MLPFlowMap, build_model
from sgflow.train import TrainConfig, Trainer, TrainingDiverged, available_methods

# Method key -> (display name, training method when the fused path exists, reference fallback).
# The fused SGFlow and MeanFlow losses have the reference losses' gradients (tests/test_fused.py) and
# are faster on these MLPs (CPU, batch 256: SGFlow 6.1 vs 9.0 ms/step, MeanFlow 4.0 vs 6.1 ms/step).
METHODS = {
    "flow_matching": ("flow matching", "flow_matching", "flow_matching"),
    "lagrangian": ("Lagrangian", "lagrangian", "lagrangian"),
    "eulerian": ("Eulerian", "eulerian", "eulerian"),
    "progressive": ("progressive", "progressive", "progressive"),
    "meanflow": ("MeanFlow", "meanflow_fused", "meanflow"),
    "sgflow": ("SGFlow", "sgflow_fused", "sgflow"),
    "sgflow_paper": ("SGFlow (paper recipe)", "sgflow_fused", "sgflow"),
    "oracle": ("ideal loss, exact v (bound)", "sgflow_fused", "sgflow"),
}
# Loss options per method key where they differ from the trainer's recipe (None: sgflow.train.METHOD_DEFAULTS).
# "sgflow" is the default recipe (the semi-gradient update with the EMA as its target network); "sgflow_paper" the
# paper's L_sg with the batch split half/half between its terms. "oracle" (mixtures only) trains the ideal loss
# E||d_t f + (d_x f) v||^2 with the mixture's exact velocity v (sgflow_loss's teacher=v, teacher_mode="both"): what
# any flow-map loss with a perfect velocity could reach with this network and budget.
METHOD_LOSS_KWARGS = {"sgflow_paper": {}}
ORACLE_METHODS = ("oracle",)

SAMPLER_LABELS = {"flow_map": "jumps", "euler": "Euler", "heun": "Heun"}
METRIC_LABELS = {
    "map_mse": "flow-map MSE against the exact map",
    "energy": "energy distance to fresh data",
    "frechet": "Frechet distance in classifier features",
}
# Drawing order and colours of the figure (matplotlib's tab10, one per method).
COLORS = {"flow_matching": "#1f77b4", "lagrangian": "#8c564b", "eulerian": "#9467bd", "progressive": "#7f7f7f",
          "meanflow": "#ff7f0e", "sgflow": "#d62728", "sgflow_paper": "#e377c2", "oracle": "#2ca02c"}


# ---------------------------------------------------------------------- networks and data
class FlatFlowMap(nn.Module):
    """An :class:`~sgflow.nn.MLPFlowMap` for image-shaped data: [B, C, H, W] is flattened to [B, C*H*W]
    and the output reshaped back (the fused losses dualize this forward).

    Used for digits on a CPU: the digits U-Net costs ~0.3 s per SGFlow step there (batch 64), an MLP
    on the 64 pixels ~10 ms, so every method can be trained for thousands of steps per seed.
    """

    def __init__(self, shape, **mlp_kwargs):
        super().__init__()
        self.shape = tuple(int(s) for s in shape)
        self.net = MLPFlowMap(math.prod(self.shape), **mlp_kwargs)

    def forward(self, t, u, x):
        return self.net(t, u, x.flatten(1)).reshape(x.shape)


@dataclass(frozen=True)
class DataSpec:
    """One data set of the table: how to build it, its network and its training budget.

    ``network``: ``"mlp"`` (an sgflow.nn MLP config: ``model`` with ``model_kwargs``) or ``"flat"``
    (:class:`FlatFlowMap` with ``model_kwargs`` as the MLP's arguments, for images).
    """

    key: str
    data: str
    data_kwargs: dict
    model: str
    model_kwargs: dict
    network: str = "mlp"
    batch_size: int = 256

    def dataset(self):
        return get_dataset(self.data, **self.data_kwargs)

    def build_network(self, shape):
        if self.network == "flat":
            return FlatFlowMap(shape, **self.model_kwargs)
        return build_model(self.model, tuple(shape), **self.model_kwargs)

    def describe(self) -> str:
        kw = ", ".join(f"{k}={v}" for k, v in self.model_kwargs.items())
        net = f"MLP on the flattened pixels ({kw})" if self.network == "flat" else f"{self.model} ({kw})"
        return f"{net}, batch {self.batch_size}"


# The time embedding's frequencies are lowered (time_scale 30, as in `sgflow demo`) for every method:
# the t-JVPs of SGFlow, MeanFlow and Eulerian differentiate them.
_SMALL_MLP = {"time_scale": 30.0}
DATA_SPECS = {
    "ring8": DataSpec("ring8", "ring8", {}, "mlp-small", _SMALL_MLP),
    "grid9": DataSpec("grid9", "grid9", {}, "mlp-small", _SMALL_MLP),
    "gmm16": DataSpec("gmm16", "gmm", {"dim": 16}, "mlp-small", _SMALL_MLP),
    "digits": DataSpec("digits", "digits", {}, "mlp", {"hidden": 256, "depth": 4, "time_dim": 64, "time_scale": 30.0},
                       network="flat", batch_size=128),
    # The other shipped data sets (the recipe's stability sweep): mixtures in 8-64 dimensions and the 2-D sets
    # without an exact flow map (energy distance only).
    **{f"gmm{d}": DataSpec(f"gmm{d}", "gmm", {"dim": d}, "mlp-small", _SMALL_MLP) for d in (8, 32, 64)},
    **{n: DataSpec(n, n, {}, "mlp-small", _SMALL_MLP) for n in ("checkerboard", "moons", "spirals")},
}


@dataclass
class QualityConfig:
    """What the quality table runs. Every method gets exactly these settings (nothing is searched).

    ``train_steps``: optimisation steps per data set key (one budget for all methods and seeds).
    Optimiser settings are those of ``sgflow demo`` (lr 3e-3, 100 warm-up steps, cosine decay, EMA 0.995,
    gradient clip 1); the time sampler is the library default (uniform, half of the pairs on t = u)
    and SGFlow splits each batch half/half between its two terms (the trainer's paired split).
    """

    datasets: tuple = ("ring8", "grid9", "gmm16", "digits")
    methods: tuple = tuple(METHODS)  # "oracle" runs on the mixtures only (it needs the exact velocity)
    seeds: tuple = (0, 1, 2)
    nfe: tuple = (1, 2, 4, 8, 16)
    train_steps: dict = field(default_factory=lambda: {d: 2000 for d in DATA_SPECS})
    lr: float = 3e-3
    warmup: int = 100
    lr_schedule: str = "cosine"
    ema_decay: float = 0.995
    grad_clip: float = 1.0
    time_dist: str = "uniform"
    diagonal_fraction: float = 0.5
    n_eval: int = 2000
    threads: int = 1
    device: str = "cpu"
    measure_memory: bool = True
    cache_dir: str | None = None
    preset: str = "full"

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for k in ("datasets", "methods", "seeds", "nfe"):
            d[k] = list(d[k])
        return d


def preset(name: str = "full", **overrides) -> QualityConfig:
    """``"full"`` (4 data sets, 3 seeds, 2000 steps: ~17 CPU minutes), ``"quick"`` (ring8 and grid9,
    2 seeds, 800 steps, 1000 evaluation samples: ~2 CPU minutes) or ``"smoke"`` (ring8, 1 seed, 40
    steps, 256 evaluation samples: a structural check in seconds). ``overrides`` replace fields."""
    if name == "full":
        cfg = QualityConfig()
    elif name == "quick":
        cfg = QualityConfig(datasets=("ring8", "grid9"), seeds=(0, 1), train_steps={"ring8": 800, "grid9": 800},
                            n_eval=1000, preset="quick")
    elif name == "smoke":
        cfg = QualityConfig(datasets=("ring8",), seeds=(0,), train_steps={"ring8": 40}, n_eval=256, warmup=10,
                            preset="smoke")
    else:
        raise ValueError(f"unknown preset {name!r}; expected 'full', 'quick' or 'smoke'")
    return dataclasses.replace(cfg, **overrides) if overrides else cfg


def check_config(cfg: QualityConfig) -> None:
    """Raise ValueError with one line for an unknown data set or method, or bad steps / seeds / NFE."""
    for d in cfg.datasets:
        if d not in DATA_SPECS:
            raise ValueError(f"unknown data set {d!r}; expected one of: {', '.join(DATA_SPECS)}")
        steps = cfg.train_steps.get(d)
        if not isinstance(steps, int) or steps < 2:
            raise ValueError(f"training steps for {d!r} must be an integer >= 2, got {steps!r}")
    for m in cfg.methods:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}; expected one of: {', '.join(METHODS)}")
    if not cfg.seeds or len(set(cfg.seeds)) != len(cfg.seeds):
        raise ValueError(f"seeds must be distinct integers, got {list(cfg.seeds)}")
    if not cfg.nfe or any(not isinstance(k, int) or k < 1 for k in cfg.nfe):
        raise ValueError(f"NFE values must be positive integers, got {list(cfg.nfe)}")
    if cfg.n_eval < 2:
        raise ValueError(f"n_eval must be >= 2, got {cfg.n_eval}")


def training_method(key: str) -> str:
    """The :func:`sgflow.train.available_methods` name that trains method ``key`` (fused where available)."""
    _, fused, reference = METHODS[key]
    return fused if fused in available_methods() else reference


def samplers_for(key: str) -> tuple:
    """Flow-map jumps then the diagonal's Euler and Heun; flow matching has only the diagonal."""
    return ("euler", "heun") if key == "flow_matching" else ("flow_map", "euler", "heun")


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


# ---------------------------------------------------------------------- the whole table
def metrics_of(spec_key: str) -> tuple:
    """Headline metric first: the exact flow-map error for mixtures, the Frechet distance for digits."""
    return ("frechet",) if DATA_SPECS[spec_key].data == "digits" else ("map_mse", "energy")


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


def _clean(obj):
    """JSON-safe copy: non-finite floats become None (strict JSON has no Infinity/NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


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


# ---------------------------------------------------------------------- aggregation
def _stats(values: list) -> dict:
    """mean, std (over seeds, n-1), min, max; any non-finite value (a diverged seed) makes them inf."""
    vals = [float(v) for v in values]
    if not vals:
        return {"values": [], "mean": None, "std": None, "min": None, "max": None}
    if not all(math.isfinite(v) for v in vals):
        return {"values": vals, "mean": math.inf, "std": math.inf, "min": min(vals), "max": math.inf}
    std = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return {"values": vals, "mean": statistics.fmean(vals), "std": std, "min": min(vals), "max": max(vals)}


def summarize(results: dict) -> dict:
    """Per data set: ``rows`` (one per method, sampler, metric and NFE: mean/std/min/max over seeds),
    ``floor`` (noise floor over seeds), ``exact_energy`` and ``cost`` (per method: step time, fastest
    seed, peak memory, mean over seeds, and their ratios to flow matching's)."""
    summary = {}
    cfg = results["config"]
    for d in cfg["datasets"]:
        evals = [e for e in results["evals"] if e["dataset"] == d]
        if not evals:
            continue
        rows = []
        for key in [*cfg["methods"], "untrained"]:
            mine = [e for e in evals if e["method"] == key]
            if not mine:
                continue
            for sampler in ("flow_map", "euler", "heun"):
                for metric in metrics_of(d):
                    for k in cfg["nfe"]:
                        # A stored null is a non-finite measurement (a diverged model): it stays infinite.
                        hits = [(e["seed"], math.inf if r[metric] is None else r[metric]) for e in mine for r in e["rows"]
                                if r["sampler"] == sampler and r["nfe"] == k and metric in r]
                        if hits:
                            rows.append({"method": key, "sampler": sampler, "metric": metric, "nfe": k,
                                         **_stats([v for _, v in hits]), "seeds": [seed for seed, _ in hits]})
        # Floors depend on the evaluation seed only: one value per seed, whichever method's evaluation made it.
        floors = list({e["seed"]: e["floor"] for e in evals if e["floor"] is not None}.values())
        exact = list({e["seed"]: e["exact_energy"] for e in evals if e.get("exact_energy") is not None}.values())
        cost = {}
        for key in cfg["methods"]:
            runs = [r for r in results["runs"] if r["dataset"] == d and r["method"] == key]
            ms = [r["step_ms"] for r in runs if r["step_ms"] is not None]
            peak = [r["peak_bytes"] for r in runs if r["peak_bytes"] is not None]
            # Fastest seed: on a shared machine other work only ever slows a run down, so the least
            # disturbed of the (identical-cost) seed runs is the best estimate of the step's own time.
            cost[key] = {"step_ms": min(ms) if ms else None, "step_ms_seeds": ms,
                         "peak_bytes": statistics.fmean(peak) if peak else None,
                         "diverged_seeds": [r["seed"] for r in runs if r["diverged"]],
                         "training_method": runs[0]["training_method"] if runs else None}
        fm = cost.get("flow_matching", {})
        for c in cost.values():
            for name in ("step_ms", "peak_bytes"):
                base = fm.get(name)
                c[f"{name}_x_fm"] = c[name] / base if c[name] is not None and base else None
        summary[d] = {"rows": rows, "floor": _stats(floors) if floors else None,
                      "exact_energy": _stats(exact) if exact else None, "cost": cost,
                      "classifier_accuracy": next((e["classifier_accuracy"] for e in evals if e.get("classifier_accuracy")), None)}
    return summary


def _row(summary_d: dict, method: str, sampler: str, metric: str, nfe: int):
    for r in summary_d["rows"]:
        if (r["method"], r["sampler"], r["metric"], r["nfe"]) == (method, sampler, metric, nfe):
            return r
    return None


def _best_fm(summary_d, metric, nfe):
    """Flow matching's better sampler at this NFE (Euler or Heun, by mean)."""
    cands = [r for s in ("euler", "heun") if (r := _row(summary_d, "flow_matching", s, metric, nfe)) is not None]
    return min(cands, key=lambda r: r["mean"]) if cands else None


def _compare(a, b) -> str:
    """How row a (lower is better) compares with row b over seeds."""
    if a["mean"] < b["mean"]:
        return "better, seed ranges disjoint" if a["max"] < b["min"] else "better on the mean, seed ranges overlap"
    return "worse, seed ranges disjoint" if a["min"] > b["max"] else "worse on the mean, seed ranges overlap"


def verdicts(results: dict, few=(1, 2)) -> list:
    """Per data set, metric and few-step NFE: SGFlow's jumps against MeanFlow's jumps and flow matching's
    better ODE sampler, and which row is best overall. One dict per comparison (``text`` for humans)."""
    out = []
    summary = results.get("summary") or summarize(results)
    cfg = results["config"]
    if "sgflow" not in cfg["methods"]:
        return out
    for d, sd in summary.items():
        for metric in metrics_of(d):
            for k in few:
                if k not in cfg["nfe"]:
                    continue
                sg = _row(sd, "sgflow", "flow_map", metric, k)
                if sg is None:
                    continue
                item = {"dataset": d, "metric": metric, "nfe": k, "sgflow": sg["mean"]}
                parts = [f"{d}, {METRIC_LABELS[metric]}, {k} NFE: SGFlow {_fmt(sg['mean'])}"]
                mf = _row(sd, "meanflow", "flow_map", metric, k)
                if mf is not None:
                    item["vs_meanflow"] = _compare(sg, mf)
                    parts.append(f"vs MeanFlow {_fmt(mf['mean'])}: {item['vs_meanflow']}")
                fm = _best_fm(sd, metric, k)
                if fm is not None:
                    item["vs_flow_matching"] = _compare(sg, fm)
                    parts.append(f"vs flow matching ({SAMPLER_LABELS[fm['sampler']]}) {_fmt(fm['mean'])}: "
                                 f"{item['vs_flow_matching']}")
                cands = [r for r in sd["rows"] if r["metric"] == metric and r["nfe"] == k and r["method"] != "untrained"]
                best = min(cands, key=lambda r: r["mean"])
                item["best"] = f"{METHODS[best['method']][0]} ({SAMPLER_LABELS[best['sampler']]})"
                parts.append(f"best row: {item['best']} {_fmt(best['mean'])}")
                div = {k: sd["cost"].get(k, {}).get("diverged_seeds") for k in ("sgflow", "meanflow", "flow_matching")}
                div = {k: v for k, v in div.items() if v}
                if div:
                    item["diverged"] = div
                    parts.append("diverged: " + ", ".join(f"{METHODS[k][0]} seeds {v}" for k, v in div.items()))
                item["text"] = "; ".join(parts)
                out.append(item)
    return out


# ---------------------------------------------------------------------- Markdown
def _fmt(v) -> str:
    if v is None:
        return "-"
    if not math.isfinite(v):
        return "diverged"
    return f"{v:.3g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"


def _cell(r, bold=False) -> str:
    if r is None:
        return "-"
    text = _fmt(r["mean"]) + (f" ± {_fmt(r['std'])}" if r["std"] and math.isfinite(r["mean"]) else "")
    return f"**{text}**" if bold else text


def markdown(results: dict, diagonal: bool = True) -> str:
    """The Markdown report: header (command, machine, wall time, settings), one table per data set and
    metric (mean ± std over seeds, best mean per column in bold), the cost table and the verdicts.

    ``diagonal=False``: only each method's natural sampler (jumps; Euler and Heun for flow matching)."""
    cfg, summary = results["config"], results.get("summary") or summarize(results)
    m = results["machine"]
    nfe = cfg["nfe"]
    lines = ["# Quality vs network evaluations", ""]
    if results.get("command"):
        lines += [f"Command: `{results['command']}`", ""]
    lines += [
        f"Machine: {m['processor']}, {m['cpu_count']} CPU cores, torch {m['torch']}, {m['torch_threads']} thread(s), "
        f"device {m['device']}" + (f" ({m['gpu']})" if m.get("gpu") else "") + (f", nice {m['nice']}" if m.get("nice") is not None else "")
        + f". Wall time {results.get('wall_time_s', 0):.0f} s"
        + (f", CPU time {results['cpu_time_s']:.0f} s" if results.get("cpu_time_s") else "") + f" (preset {cfg['preset']}).",
        "",
        f"Seeds {cfg['seeds']}; training steps {cfg['train_steps']}; lr {cfg['lr']} ({cfg['lr_schedule']}, "
        f"{cfg['warmup']} warm-up steps), EMA {cfg['ema_decay']}, grad clip {cfg['grad_clip']}, time sampler "
        f"{cfg['time_dist']} with diagonal fraction {cfg['diagonal_fraction']}; {cfg['n_eval']} samples per evaluation. "
        "Every method gets these settings; nothing was searched for any method.",
        "",
        "Losses: " + ", ".join(f"{v['label']} `{v['training_method']}`" for v in results["methods"].values()) + ".",
        "Networks: " + "; ".join(f"{d}: {n}" for d, n in results["networks"].items()) + ".",
        "",
        "Samplers: *jumps* = flow-map jumps (k jumps = k NFE); *Euler* / *Heun* = ODE integration of the "
        "diagonal f~(t,t,x) at the same number of network evaluations (Heun: 2 per step, so none at 1 NFE). "
        "Cells: mean ± std over seeds; bold: best mean in the column. Lower is better everywhere.",
        "",
    ]
    for d, sd in summary.items():
        floor = sd["floor"]
        for metric in metrics_of(d):
            lines.append(f"## {d}: {METRIC_LABELS[metric]}")
            lines.append("")
            if metric == "energy" and floor:
                extra = f" Exact flow map's samples: {_fmt(sd['exact_energy']['mean'])}." if sd.get("exact_energy") else ""
                lines += [f"Noise floor (energy distance between two fresh data draws, one per seed): "
                          f"{', '.join(_fmt(v) for v in floor['values'])}; values within "
                          f"±{_fmt(max(abs(v) for v in floor['values']))} are noise.{extra}", ""]
            if metric == "frechet" and floor:
                acc = sd.get("classifier_accuracy")
                lines += [f"Floor (two disjoint halves of the real set): {_fmt(floor['mean'])}"
                          + (f"; feature classifier held-out accuracy {acc:.3f}" if acc else "") + ".", ""]
            lines.append("| method | sampler | " + " | ".join(f"{k} NFE" for k in nfe) + " |")
            lines.append("|---|---|" + "---|" * len(nfe))
            table = [r for r in sd["rows"] if r["metric"] == metric
                     and (diagonal or r["method"] == "flow_matching" or r["sampler"] == "flow_map")]
            best = {k: min((r["mean"] for r in table if r["nfe"] == k and r["method"] != "untrained"), default=None) for k in nfe}
            for key in [*cfg["methods"], "untrained"]:
                for sampler in ("flow_map", "euler", "heun"):
                    if not diagonal and key not in ("flow_matching", "untrained") and sampler != "flow_map":
                        continue
                    cells = [_row(sd, key, sampler, metric, k) for k in nfe]
                    if all(c is None for c in cells):
                        continue
                    label = METHODS[key][0] if key in METHODS else "untrained network"
                    lines.append(f"| {label} | {SAMPLER_LABELS[sampler]} | " + " | ".join(
                        _cell(c, bold=c is not None and key != "untrained" and c["mean"] == best[c["nfe"]]) for c in cells) + " |")
            lines.append("")
    lines += ["## Cost per training step (same runs)", "",
              "Median wall time per step over 25-step logging intervals, and the peak tensor memory of one step "
              "(forward, backward, Adam; `sgflow.memory.PeakTensorBytes`); time: fastest seed (other work on a "
              "shared machine only slows runs down), memory: mean over seeds; "
              "x FM: ratio to flow matching.", ""]
    ds = list(summary)
    lines.append("| method | " + " | ".join(f"{d} ms/step (x FM) | {d} peak KiB (x FM)" for d in ds) + " |")
    lines.append("|---|" + "---|---|" * len(ds))
    for key in cfg["methods"]:
        cells = []
        for d in ds:
            c = summary[d]["cost"].get(key, {})
            ms, px = c.get("step_ms"), c.get("peak_bytes")
            cells.append(f"{ms:.2f} ({c['step_ms_x_fm']:.2f})" if ms is not None and c.get("step_ms_x_fm") else "-")
            cells.append(f"{px / 1024:.0f} ({c['peak_bytes_x_fm']:.2f})" if px is not None and c.get("peak_bytes_x_fm") else "-")
        lines.append(f"| {METHODS[key][0]} | " + " | ".join(cells) + " |")
    div = [(d, k, c["diverged_seeds"]) for d in ds for k, c in summary[d]["cost"].items() if c["diverged_seeds"]]
    lines.append("")
    if div:
        lines += ["Diverged runs: " + "; ".join(f"{METHODS[k][0]} on {d}, seeds {s}" for d, k, s in div) + ".", ""]
    vs = results.get("verdicts") or verdicts(results)
    if vs:
        lines += ["## SGFlow at few steps, as measured here", ""] + [f"- {v['text']}" for v in vs] + [""]
    return "\n".join(lines)


# ---------------------------------------------------------------------- figure
def figure(results: dict, path) -> Path:
    """Metric vs NFE (log-x), one line per method with its natural sampler (flow matching: Euler solid,
    Heun dashed; the untrained network dotted grey), seeds shaded min-max; one row per data set."""
    # A Figure with its own Agg canvas: files only, no display, and neither pyplot's global figure list
    # nor the process's backend (matplotlib.use) is touched.
    from sgflow._extras import require

    FigureCanvasAgg = require("matplotlib.backends.backend_agg", "the quality figure").FigureCanvasAgg
    Figure = require("matplotlib.figure", "the quality figure").Figure

    cfg, summary = results["config"], results.get("summary") or summarize(results)
    ds = list(summary)
    ncol = max(len(metrics_of(d)) for d in ds)
    fig = Figure(figsize=(5.2 * ncol, 3.6 * len(ds)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(ds), ncol, squeeze=False)
    for i, d in enumerate(ds):
        sd = summary[d]
        for j in range(ncol):
            ax = axes[i][j]
            if j >= len(metrics_of(d)):
                ax.axis("off")
                continue
            metric = metrics_of(d)[j]
            # A diverged run's numbers (1e4 and up) would flatten every other curve: draw a method over its
            # seeds that did not diverge (the label says how many), or not at all, and say so in the title;
            # the tables keep every number.
            bad = {k: set(sd["cost"].get(k, {}).get("diverged_seeds") or ()) for k in cfg["methods"]}
            curves = [(k, s) for k in cfg["methods"] for s in (("euler", "heun") if k == "flow_matching" else ("flow_map",))]
            curves.append(("untrained", "euler"))
            notes, drawn_max = [], []
            for key, sampler in curves:
                rows = [r for k in cfg["nfe"] if (r := _row(sd, key, sampler, metric, k)) is not None]
                if not rows:
                    continue
                keep = [[v for v, sd_ in zip(r["values"], r["seeds"]) if sd_ not in bad.get(key, ())] for r in rows]
                n_all, n_kept = len(rows[0]["values"]), len(keep[0])
                if not n_kept:
                    notes.append(f"{METHODS[key][0]}: every seed diverged, not drawn")
                    continue
                x = [r["nfe"] for r in rows]
                stats = [_stats(v) for v in keep]
                fin = lambda v: v if v is not None and math.isfinite(v) else float("nan")  # noqa: E731
                color = COLORS.get(key, "#aaaaaa")
                style = ":" if key == "untrained" else ("--" if sampler == "heun" else "-")
                label = ("untrained" if key == "untrained" else METHODS[key][0]) + (
                    f" ({SAMPLER_LABELS[sampler]})" if key == "flow_matching" else "")
                if n_kept < n_all:
                    label += f" [{d}: {n_kept} of {n_all} seeds]"
                    notes.append(f"{METHODS[key][0]}: {n_all - n_kept} of {n_all} seeds diverged, the others drawn")
                ax.plot(x, [fin(st["mean"]) for st in stats], style, color=color, marker="o" if key != "untrained" else None,
                        ms=3, lw=1.6, label=label)
                if key != "untrained" and n_kept > 1:
                    ax.fill_between(x, [fin(st["min"]) for st in stats], [fin(st["max"]) for st in stats], color=color,
                                    alpha=0.15, lw=0)
                drawn_max += [st["max"] for st in stats if st["max"] is not None and math.isfinite(st["max"])]
            floor = max(abs(v) for v in sd["floor"]["values"]) if sd["floor"] and sd["floor"]["values"] else None
            if metric == "energy" and floor is not None:
                ax.axhline(floor, color="k", lw=0.8, ls="--", label="noise floor: max |ED(data, data')| over seeds")
            if metric == "frechet" and floor is not None:
                ax.axhline(floor, color="k", lw=0.8, ls="-.", label="floor: FD(real half, real half)")
            ax.set_xscale("log", base=2)
            ax.set_xticks(cfg["nfe"], [str(k) for k in cfg["nfe"]])
            ax.minorticks_off()
            if metric == "energy":
                # The unbiased energy distance can dip below 0 near the floor: a symmetric log axis, linear
                # within the floor, and cut at minus the floor (anything below is noise).
                lin = max(floor if floor is not None else 1e-3, 1e-4)
                ax.set_yscale("symlog", linthresh=lin, linscale=0.5)
                top = max([abs(v) for v in drawn_max] + [10 * lin])
                ax.set_ylim(0, 1.5 * top)
                ax.set_yticks([0] + [10.0**e for e in range(math.ceil(math.log10(lin)), math.floor(math.log10(1.5 * top)) + 1)])
            else:
                ax.set_yscale("log")
            ax.set_xlabel("network evaluations (NFE)")
            ax.set_title("\n".join([f"{d}: {METRIC_LABELS[metric]}", *notes]), fontsize=10)
            ax.grid(True, which="major", alpha=0.3)
    seen = {}
    for row in axes:
        for ax in row:
            for h, lab in zip(*ax.get_legend_handles_labels()):
                seen.setdefault(lab, h)
    height = 3.6 * len(ds)
    legend_rows = math.ceil(len(seen) / 5)
    top = 1 - (0.3 + 0.2 * legend_rows) / height  # inches kept free for the title and the legend
    fig.suptitle(f"Quality vs NFE (mean over seeds {cfg['seeds']}, shaded: min-max), lower is better",
                 y=1 - 0.08 / height, fontsize=11)
    fig.legend(list(seen.values()), list(seen), loc="upper center", bbox_to_anchor=(0.5, 1 - 0.32 / height),
               ncol=min(len(seen), 5), fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, top))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def render(out_dir, diagonal: bool = True) -> dict:
    """Recompute the summary and verdicts of ``out_dir``'s ``quality.json`` from its per-run records and
    rewrite the JSON, ``quality.md`` and ``quality.png`` (no training). Returns the results.

    Values that were non-finite when measured are stored as null and count as infinite."""
    out = Path(out_dir)
    path = out / "quality.json"
    if not path.exists():
        raise FileNotFoundError(f"no quality.json in {out}")
    results = json.loads(path.read_text())
    results["summary"] = summarize(results)
    results["verdicts"] = verdicts(results)
    path.write_text(json.dumps(_clean(results), indent=1) + "\n")
    (out / "quality.md").write_text(markdown(results, diagonal=diagonal))
    figure(results, out / "quality.png")
    return results


def compare_settings(runs: dict) -> str:
    """Which of several runs of the table (one setting each, e.g. two learning rates) wins, per data set
    and method: ``runs`` maps a label to a results dict or an output directory holding quality.json.

    Score (lower is better): the geometric mean over NFE of the headline metric's seed mean, each method
    with its natural sampler (flow matching: the better of Euler and Heun at each NFE). A run with a
    diverged seed scores infinite for that method. Returns a Markdown table with the winner per row.
    """
    loaded = {}
    for label, res in runs.items():
        if not isinstance(res, dict):
            res = json.loads((Path(res) / "quality.json").read_text())
        res["summary"] = summarize(res)
        loaded[label] = res
    labels = list(loaded)
    lines = ["| data set | method | " + " | ".join(labels) + " | winner |", "|---|---|" + "---|" * (len(labels) + 1)]
    datasets = [d for d in DATA_SPECS if all(d in r["summary"] for r in loaded.values())]
    for d in datasets:
        metric = metrics_of(d)[0]
        for key in METHODS:
            scores = {}
            for label, res in loaded.items():
                sd = res["summary"][d]
                if key not in res["config"]["methods"]:
                    continue
                if sd["cost"][key]["diverged_seeds"]:
                    scores[label] = math.inf
                    continue
                vals = []
                for k in res["config"]["nfe"]:
                    r = _best_fm(sd, metric, k) if key == "flow_matching" else _row(sd, key, "flow_map", metric, k)
                    if r is not None:
                        vals.append(r["mean"])
                ok = vals and all(math.isfinite(v) and v > 0 for v in vals)
                scores[label] = math.exp(statistics.fmean(math.log(v) for v in vals)) if ok else math.inf
            if len(scores) < len(labels):
                continue
            best = min(scores, key=scores.get)
            lines.append(f"| {d} | {METHODS[key][0]} | " + " | ".join(_fmt(scores[lab]) for lab in labels)
                         + f" | {best if math.isfinite(scores[best]) else '-'} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------- command line
def add_arguments(p) -> None:
    """The options shared by ``sgflow quality`` and ``benchmarks/quality.py``."""
    p.add_argument("--quick", action="store_true", help="ring8 and grid9, 2 seeds, 800 steps (~3 min on 2 CPU cores)")
    p.add_argument("--preset", choices=("full", "quick", "smoke"), default=None, help="full (default), quick or smoke")
    p.add_argument("--out", default=None, help="output directory (default ./sgflow-quality[_quick]; "
                   "benchmarks/quality.py: benchmarks/results/quality[_quick])")
    p.add_argument("--datasets", nargs="+", default=None, help=f"subset of {' '.join(DATA_SPECS)}")
    p.add_argument("--methods", nargs="+", default=None, help=f"subset of {' '.join(METHODS)}")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="training seeds")
    p.add_argument("--train-steps", type=int, default=None, help="training steps for every data set (overrides the preset)")
    p.add_argument("--n-eval", type=int, default=None, help="samples per evaluation (default 2000)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate of every method (default 3e-3)")
    p.add_argument("--diagonal-fraction", type=float, default=None,
                   help="fraction of training pairs on t = u, for every method (default 0.5)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1)")
    p.add_argument("--device", default=None, help="cpu (default) or cuda")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement of step 2")
    p.add_argument("--cache-dir", default=None, help="where the digits feature classifier is cached")
    p.add_argument("--render", action="store_true", help="only recompute the summary, table and figure from --out's quality.json")
    p.add_argument("--no-progress", action="store_true", help="no line per trained run (as `sgflow train --no-progress`)")


def config_from_args(args) -> QualityConfig:
    """A :class:`QualityConfig` from parsed :func:`add_arguments` options (ValueError on bad values)."""
    name = args.preset or ("quick" if args.quick else "full")
    if args.quick and args.preset not in (None, "quick"):
        raise ValueError(f"--quick contradicts --preset {args.preset}")
    cfg = preset(name)
    over = {}
    if args.datasets:
        over["datasets"] = tuple(args.datasets)
    if args.methods:
        over["methods"] = tuple(args.methods)
    if args.seeds:
        over["seeds"] = tuple(args.seeds)
    datasets = over.get("datasets", cfg.datasets)
    steps = dict(cfg.train_steps)
    for d in datasets:
        if args.train_steps is not None:
            steps[d] = args.train_steps
        elif d not in steps:  # a data set outside the preset: the full mode's budget
            steps[d] = QualityConfig().train_steps.get(d)
    over["train_steps"] = steps
    for name_, val in (("n_eval", args.n_eval), ("lr", args.lr), ("threads", args.threads), ("device", args.device),
                       ("cache_dir", args.cache_dir), ("diagonal_fraction", args.diagonal_fraction)):
        if val is not None:
            over[name_] = val
    if args.no_memory:
        over["measure_memory"] = False
    cfg = dataclasses.replace(cfg, **over)
    if not (math.isfinite(cfg.lr) and cfg.lr > 0):
        raise ValueError(f"--lr must be a positive number, got {cfg.lr}")
    if not 0.0 < cfg.diagonal_fraction < 1.0:
        raise ValueError(f"--diagonal-fraction must be in (0, 1) (flow-map methods need pairs with t < u and t = u), "
                         f"got {cfg.diagonal_fraction}")
    if cfg.threads is not None and cfg.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {cfg.threads}")
    check_config(cfg)
    return cfg


def default_out(cfg: QualityConfig, prog: str = "sgflow quality") -> str:
    """benchmarks/results/quality[_preset] for the repository's script, ./sgflow-quality[_preset] for the CLI."""
    base = "sgflow-quality" if prog.startswith("sgflow") else "benchmarks/results/quality"
    return base + ("" if cfg.preset == "full" else f"_{cfg.preset}")


def command_line(args, prog: str = "sgflow quality") -> str:
    """The options of parsed ``args`` written back as a command line (for the report's header)."""
    parts = [prog]
    for dest, value in sorted(vars(args).items()):
        if dest in ("func", "command") or value in (None, False):
            continue
        flag = "--" + dest.replace("_", "-")
        if value is True:
            parts.append(flag)
        elif isinstance(value, (list, tuple)):
            parts += [flag, *map(str, value)]
        else:
            parts += [flag, str(value)]
    return " ".join(parts)


def run_from_args(args, prog: str = "sgflow quality") -> dict:
    """Run the table from parsed options (or with ``--render`` redraw it); prints progress."""
    cfg = config_from_args(args)
    out = args.out or default_out(cfg, prog)
    if args.render:
        results = render(out)
        print(f"recomputed {Path(out) / 'quality.json'}'s summary; rewrote {Path(out) / 'quality.md'} and {Path(out) / 'quality.png'}")
        return results
    command = command_line(args, prog)
    print(f"quality table ({cfg.preset}): {len(cfg.datasets)} data set(s) x {len(cfg.seeds)} seed(s) x "
          f"{len(cfg.methods)} methods -> {out}", flush=True)
    quiet = getattr(args, "no_progress", False)

    def log(line: str) -> None:
        if not (quiet and line.startswith("[")):  # --no-progress: no per-run lines ("[  12.3s] ring8 seed 0 ...")
            print(line, flush=True)

    return run_quality(cfg, out, log=log, command=command)


__all__ = [
    "METHODS", "DATA_SPECS", "DataSpec", "FlatFlowMap", "QualityConfig", "preset", "check_config", "run_quality",
    "train_method", "evaluate_method", "summarize", "verdicts", "markdown", "figure", "add_arguments",
    "config_from_args", "run_from_args", "command_line", "render", "compare_settings", "training_method", "samplers_for",
]
