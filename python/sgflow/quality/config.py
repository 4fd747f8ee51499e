"""What the quality table runs: its methods, data sets (with their networks), settings and each method's
tuning search space."""
from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass, field

from torch import nn

from sgflow.data import get_dataset
from sgflow.nn import MLPFlowMap, build_model
from sgflow.train import available_methods

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
    "distill": ("SGFlow distilled from flow matching", "sgflow_fused", "sgflow"),
    "meanflow_2x": ("MeanFlow, 2x steps", "meanflow_fused", "meanflow"),
}
# Loss options per method key where they differ from the trainer's recipe (None: sgflow.train.METHOD_DEFAULTS).
# "sgflow" is the default recipe (the semi-gradient update with the EMA as its target network); "sgflow_paper" the
# paper's L_sg with the batch split half/half between its terms. "oracle" (mixtures only) trains the ideal loss
# E||d_t f + (d_x f) v||^2 with the mixture's exact velocity v (sgflow_loss's teacher=v, teacher_mode="both"): what
# any flow-map loss with a perfect velocity could reach with this network and budget.
METHOD_LOSS_KWARGS = {"sgflow_paper": {}}
ORACLE_METHODS = ("oracle",)
# "distill": a flow-matching teacher trained first (same budget and seed, flow matching's tuned settings when the
# table is tuned, the untuned ones inside tuning trials), then SGFlow's recipe with the teacher's velocity in place of
# its own diagonal (sgflow.train.Trainer(teacher=...), teacher_mode "both"): 2x the steps in all, and each student
# step costs one teacher forward more. "meanflow_2x": MeanFlow from scratch with that total budget (2x steps).
DISTILL_METHODS = ("distill",)
STEP_MULTIPLIER = {"distill": 1, "meanflow_2x": 2}  # steps of the run itself, times the data set's budget
# The methods the table runs unless asked (the distillation rows cost 2x: `--methods ... distill meanflow_2x`).
DEFAULT_METHODS = ("flow_matching", "lagrangian", "eulerian", "progressive", "meanflow", "sgflow", "sgflow_paper", "oracle")

SAMPLER_LABELS = {"flow_map": "jumps", "euler": "Euler", "heun": "Heun"}
METRIC_LABELS = {
    "map_mse": "flow-map MSE against the exact map",
    "energy": "energy distance to fresh data",
    "frechet": "Frechet distance in classifier features",
}
# Drawing order and colours of the figure (matplotlib's tab10, one per method).
COLORS = {"flow_matching": "#1f77b4", "lagrangian": "#8c564b", "eulerian": "#9467bd", "progressive": "#7f7f7f",
          "meanflow": "#ff7f0e", "sgflow": "#d62728", "sgflow_paper": "#e377c2", "oracle": "#2ca02c",
          "distill": "#17becf", "meanflow_2x": "#bcbd22"}


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


# The equal tuning budget: every method gets the same number of trials (3 x 2 = 6) over its peak learning rate
# (centred on the untuned default, 3e-3) and one knob of its own: the share of t = u pairs for the flow-map
# methods (where their velocity is learnt; MeanFlow's paper trains 75 % there), the EMA decay for flow matching
# (which trains on t = u only, so the share means nothing to it). Trials run on QualityConfig.tune_seed, which is
# never a reported seed.
TUNED_LRS = (1.5e-3, 3e-3, 6e-3)
TUNING = {key: {"lr": TUNED_LRS, "diagonal_fraction": (0.5, 0.75)} for key in METHODS}
TUNING["flow_matching"] = {"lr": TUNED_LRS, "ema_decay": (0.995, 0.999)}
TUNABLE = ("lr", "diagonal_fraction", "ema_decay")  # the QualityConfig fields a trial may set


def tuning_trials(key: str, space: dict | None = None) -> list:
    """Method ``key``'s trials: the Cartesian product of its search space (``TUNING[key]``), as a list of
    ``{field: value}`` dicts, in a fixed order."""
    space = TUNING[key] if space is None else space
    bad = [f for f in space if f not in TUNABLE]
    if bad:
        raise ValueError(f"cannot tune {bad} of {key!r}; tunable settings: {', '.join(TUNABLE)}")
    names = list(space)
    return [dict(zip(names, vals)) for vals in itertools.product(*(space[n] for n in names))]


@dataclass
class QualityConfig:
    """What the quality table runs.

    ``train_steps``: optimisation steps per data set key (one budget for all methods and seeds).
    Optimiser settings are those of ``sgflow demo`` (lr 3e-3, 100 warm-up steps, cosine decay, EMA 0.995,
    gradient clip 1); the time sampler is the library default (uniform, half of the pairs on t = u).

    ``tune``: before the reported runs, every method is trained once per trial of its search space
    (:data:`TUNING`, the same number of trials for every method) on ``tune_seed`` and scored at 1 and 2 NFE;
    its best trial's settings replace ``lr`` / ``diagonal_fraction`` / ``ema_decay`` for its reported seeds.
    Without it every method gets exactly the settings above. ``jobs``: runs trained at once, each in its own
    process with ``threads`` torch threads (step times are then measured side by side).
    """

    datasets: tuple = ("ring8", "grid9", "gmm16", "digits")
    methods: tuple = DEFAULT_METHODS  # "oracle" runs on the mixtures only (it needs the exact velocity)
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
    tune: bool = False
    tune_seed: int = 100
    tune_nfe: tuple = (1, 2)
    jobs: int = 1

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for k in ("datasets", "methods", "seeds", "nfe", "tune_nfe"):
            d[k] = list(d[k])
        return d


def preset(name: str = "full", **overrides) -> QualityConfig:
    """``"full"`` (4 data sets, 3 seeds, 2000 steps, every method tuned: see docs/quality.md for its
    time), ``"quick"`` (ring8 and grid9,
    2 seeds, 800 steps, 1000 evaluation samples: ~2 CPU minutes) or ``"smoke"`` (ring8, 1 seed, 40
    steps, 256 evaluation samples: a structural check in seconds). ``overrides`` replace fields."""
    if name == "full":
        cfg = QualityConfig(tune=True)
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
    if cfg.tune and cfg.tune_seed in cfg.seeds:
        raise ValueError(f"the tuning seed {cfg.tune_seed} is also a reported seed {list(cfg.seeds)}: settings chosen "
                         "on a seed must be reported on others")
    if not isinstance(cfg.jobs, int) or cfg.jobs < 1:
        raise ValueError(f"jobs must be an integer >= 1, got {cfg.jobs!r}")


def training_method(key: str) -> str:
    """The :func:`sgflow.train.available_methods` name that trains method ``key`` (fused where available)."""
    _, fused, reference = METHODS[key]
    return fused if fused in available_methods() else reference


def samplers_for(key: str) -> tuple:
    """Flow-map jumps then the diagonal's Euler and Heun; flow matching has only the diagonal."""
    return ("euler", "heun") if key == "flow_matching" else ("flow_map", "euler", "heun")


def metrics_of(spec_key: str) -> tuple:
    """Headline metric first: the exact flow-map error for mixtures, the Frechet distance for digits."""
    return ("frechet",) if DATA_SPECS[spec_key].data == "digits" else ("map_mse", "energy")


