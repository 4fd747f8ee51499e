"""The quality table: every method trained alike, sampled at 1-16 network evaluations, scored.

Every method (flow matching, Lagrangian, Eulerian, progressive, MeanFlow, SGFlow; optionally SGFlow distilled
from flow matching and MeanFlow with that total budget) is trained on the same network, data, step budget
and seeds by :class:`sgflow.train.Trainer`, then its EMA
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

Tuning (``QualityConfig.tune``, on in the full preset): every method first trains the same number of trials
over its learning rate and one knob of its own (:data:`sgflow.quality.config.TUNING`) on a seed that is never
reported, and its best trial's settings are used on the reported seeds. Without it every method gets the
settings of :class:`QualityConfig`; to compare one setting across whole tables, run the table once per setting
and call :func:`compare_settings`. ``jobs``: runs trained at once, in worker processes (same numbers).

    from sgflow.quality import preset, run_quality
    results = run_quality(preset("quick"), "out/quality_quick")   # JSON, Markdown table, PNG figure

Command line: ``sgflow quality --quick --out DIR`` or ``python benchmarks/quality.py ...``.
"""
from __future__ import annotations

from .cli import add_arguments, command_line, config_from_args, default_out, run_from_args
from .config import (DATA_SPECS, METHOD_LOSS_KWARGS, METHODS, ORACLE_METHODS, DataSpec, FlatFlowMap, QualityConfig,
                     check_config, metrics_of, preset, samplers_for, training_method)
from .report import compare_settings, figure, markdown, render, summarize, verdicts
from .runs import evaluate_method, run_quality, train_method

__all__ = [
    "METHODS", "DATA_SPECS", "DataSpec", "FlatFlowMap", "QualityConfig", "preset", "check_config", "run_quality",
    "train_method", "evaluate_method", "summarize", "verdicts", "markdown", "figure", "add_arguments",
    "config_from_args", "run_from_args", "command_line", "render", "compare_settings", "training_method", "samplers_for",
]
