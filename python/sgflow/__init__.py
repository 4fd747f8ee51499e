"""sgflow: few-step flow maps trained with SGFlow, and fused dual-tangent kernels that make it cheap.

Main entry points: :func:`sgflow_loss` (reference, torch.func.jvp), :func:`fused_loss` (dual path),
baselines (:func:`flow_matching_loss`, :func:`meanflow_loss`, :func:`lagrangian_loss`,
:func:`eulerian_loss`, :func:`progressive_loss`), samplers and interpolants.
"""
from sgflow.audit import GradientReport, check_gradients
from sgflow.autodual import DualizedModel, DualizeError, dualize
from sgflow.dual import JVPDual
from sgflow import distributed  # noqa: F401,E402 - registers the dual rule of DDP's output sink
from sgflow.interpolants import Interpolant, LinearInterpolant, TrigInterpolant, get_interpolant
from sgflow.losses.baselines import (
    eulerian_loss,
    flow_matching_loss,
    lagrangian_loss,
    meanflow_loss,
    progressive_loss,
)
from sgflow.losses.common import flow_map
from sgflow.losses.fused import fused_loss, fused_meanflow_loss
from sgflow.losses.sgflow import sgflow_loss
from sgflow.samplers import sample, sample_euler, sample_flow_map, sample_heun, time_grid
from sgflow.times import TimeSampler

__version__ = "0.1.0"

LOSSES = {
    "sgflow": sgflow_loss,
    "flow_matching": flow_matching_loss,
    "meanflow": meanflow_loss,
    "lagrangian": lagrangian_loss,
    "eulerian": eulerian_loss,
    "progressive": progressive_loss,
}

# Methods with a fused dual-path implementation (same signature and semantics as in LOSSES).
FUSED_LOSSES = {"sgflow": fused_loss, "meanflow": fused_meanflow_loss}

__all__ = [
    "Interpolant", "LinearInterpolant", "TrigInterpolant", "get_interpolant", "TimeSampler",
    "sgflow_loss", "flow_matching_loss", "meanflow_loss", "lagrangian_loss", "eulerian_loss",
    "progressive_loss", "flow_map", "sample", "sample_flow_map", "sample_euler", "sample_heun",
    "time_grid", "LOSSES", "FUSED_LOSSES", "fused_loss", "fused_meanflow_loss", "JVPDual",
    "dualize", "DualizedModel", "DualizeError", "check_gradients", "GradientReport",
]
