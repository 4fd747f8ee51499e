"""Input validation shared by the losses, samplers and dual ops: clear errors instead of wrong numbers.

Checks of types, shapes, dtypes and devices are static and cost nothing under ``torch.compile``. The
checks of values (times finite, in [0, 1], t <= u) need the data: eagerly they raise ``ValueError``
naming the first offending sample; while ``torch.compile`` traces them (:func:`_compiling`) they are
``torch._assert_async`` ops instead (a ``RuntimeError`` with a fixed message), because a Python
``bool`` / ``.item()`` of a tensor would break the graph (tests/test_compile.py counts the breaks).
"""
from __future__ import annotations

import torch


def _compiling() -> bool:
    """True while dynamo traces the caller (``torch.compile``, ``torch._dynamo.explain``, export)."""
    return torch.compiler.is_compiling()


def check_data(x: torch.Tensor, name: str = "x1") -> None:
    """A batch of data: a floating tensor [B, *D] with B >= 1 and at least one feature dim."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"{name} must have shape [B, *D] with at least one feature dimension, got {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} has an empty batch")


def check_finite(x: torch.Tensor, name: str) -> None:
    """``x`` must hold no NaN or inf: a ``ValueError`` naming the tensor, its first bad element (as an index)
    and how many there are. Eagerly one reduction and one device sync; under ``torch.compile`` a
    ``torch._assert_async``. The losses run it on x1 and the noise before anything else (so a non-finite
    batch never reaches a network, a block plan's profile or the optimiser). Measured cost (CPU, one
    thread): 20 us for a [256, 2] batch, 1 ms for [64, 3, 32, 32], against a training step of 30 ms and
    seconds; on a GPU one sync, as the times' checks already do, so there is no switch to turn it off."""
    if _compiling():
        torch._assert_async(torch.isfinite(x).all(), f"{name} must be finite (no NaN or inf)")
        return
    if bool(torch.isfinite(x).all()):
        return
    bad = ~torch.isfinite(x.detach())
    idx = tuple(int(i) for i in bad.nonzero()[0])
    raise ValueError(
        f"{name} must be finite: {name}[{', '.join(map(str, idx))}] = {x[idx].item()} "
        f"({int(bad.sum())} of {x.numel()} elements are NaN or inf)"
    )


def check_like(other: torch.Tensor, ref: torch.Tensor, name: str, ref_name: str = "x1") -> None:
    """``other`` must match ``ref`` in shape, dtype and device."""
    if not isinstance(other, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(other).__name__}")
    if other.shape != ref.shape:
        raise ValueError(f"{name} has shape {tuple(other.shape)} but {ref_name} has shape {tuple(ref.shape)}")
    if other.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {other.dtype} but {ref_name} has dtype {ref.dtype}")
    if other.device != ref.device:
        raise ValueError(f"{name} is on {other.device} but {ref_name} is on {ref.device}")


def check_times(t: torch.Tensor, batch: int, ref: torch.Tensor, name: str = "t") -> None:
    """Times: floating [B] on ref's device, within [0, 1]."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [{batch}], got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if t.shape != (batch,):
        raise ValueError(f"{name} must have shape [{batch}] (one time per sample), got {tuple(t.shape)}")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but the data is on {ref.device}")
    if _compiling():
        torch._assert_async(torch.isfinite(t).all(), f"{name} must be finite")
        torch._assert_async(((t >= 0) & (t <= 1)).all(), f"{name} must lie in [0, 1]")
        return
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        # Comparisons with NaN are false, so the range check below would let a NaN time through.
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"{name} must be finite; {name}[{i}] = {t[i].item()} ({int(bad.sum())} of {t.numel()} samples)")
    if bool(((t < 0) | (t > 1)).any()):
        raise ValueError(f"{name} must lie in [0, 1]; got values in [{t.min().item():.4g}, {t.max().item():.4g}]")


def check_time_pair(t: torch.Tensor, u: torch.Tensor, batch: int, ref: torch.Tensor) -> None:
    """Flow-map times: both [B], 0 <= t <= u <= 1 elementwise."""
    check_times(t, batch, ref, "t")
    check_times(u, batch, ref, "u")
    if _compiling():
        torch._assert_async((t <= u).all(), "flow maps go forward in time: need t <= u")
        return
    bad = t > u
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"flow maps go forward in time: need t <= u, but t[{i}]={t[i].item():.6g} > u[{i}]={u[i].item():.6g} "
            f"({int(bad.sum())} of {batch} samples)"
        )


def check_model_output(out: torch.Tensor, x: torch.Tensor, what: str = "model(t, u, x)") -> torch.Tensor:
    """The network must return f~ with exactly x's shape, floating point.

    Under autocast a lower-precision output is expected: it is cast back to x's dtype, so the loss is
    accumulated in x's precision. Outside autocast a dtype other than x's is an error.
    """
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{what} must return a tensor, got {type(out).__name__}")
    if out.shape != x.shape:
        raise ValueError(f"{what} returned shape {tuple(out.shape)}; expected x's shape {tuple(x.shape)}")
    if out.dtype != x.dtype:
        if out.is_floating_point() and torch.is_autocast_enabled(x.device.type):
            return out.to(x.dtype)
        raise TypeError(f"{what} returned dtype {out.dtype}; expected {x.dtype}")
    return out


def check_split(split: torch.Tensor, batch: int, ref: torch.Tensor) -> None:
    """The SGFlow term assignment: a bool mask [B], True where a sample takes the first term."""
    if not isinstance(split, torch.Tensor) or split.dtype != torch.bool:
        raise TypeError("split must be a bool tensor of shape [B] (True: first term, False: second term)")
    if split.shape != (batch,):
        raise ValueError(f"split must have shape [{batch}], got {tuple(split.shape)}")
    if split.device != ref.device:
        raise ValueError(f"split is on {split.device} but the data is on {ref.device}")


# The fused equivalent of each JVP loss that refuses a DDP model (same loss, JVP through DDP's forward).
_FUSED_EQUIVALENT = {"sgflow_loss": "sgflow.fused_loss", "meanflow_loss": "sgflow.fused_meanflow_loss"}


def _holds_ddp(model) -> bool:
    """Whether ``model`` is, or contains, a DistributedDataParallel (e.g. sgflow.distributed.DualDDP)."""
    ddp = torch.nn.parallel.DistributedDataParallel
    if isinstance(model, ddp):
        return True
    return isinstance(model, torch.nn.Module) and any(isinstance(m, ddp) for m in model.modules())


def _holds_fsdp1(model) -> bool:
    """Whether ``model`` is, or contains, an FSDP1 ``torch.distributed.fsdp.FullyShardedDataParallel``."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    except ImportError:  # a torch built without distributed
        return False
    return isinstance(model, FSDP) or (isinstance(model, torch.nn.Module) and any(isinstance(m, FSDP) for m in model.modules()))


def check_not_ddp(model, loss_name: str) -> None:
    """The losses whose JVP is ``torch.func.jvp`` (or a double VJP) cannot take a DistributedDataParallel
    model, nor a module holding one (:class:`sgflow.distributed.DualDDP`): DDP's forward then runs inside
    the functorch transform, where DDP fails. Measured with torch 2.13: from the second iteration on, a
    synced forward inside ``torch.func.jvp`` raises "Cannot access data pointer of Tensor that doesn't have
    storage" (DDP's bucket rebuild; sgflow_loss always, lagrangian/eulerian_loss on a rank whose batch has
    no t = u row), and with find_unused_parameters / static_graph DDP's output ``autograd.Function`` raises
    inside the transform (meanflow_loss too). Refuse up front, naming what works instead.
    """
    if _holds_fsdp1(model):
        # Measured with torch 2.13 (gloo, 2 processes): sgflow_loss on an FSDP1 model crashes both processes
        # with a segmentation fault inside FSDP's unshard; a plain torch.func.jvp raises NotImplementedError.
        fused = _FUSED_EQUIVALENT.get(loss_name)
        instead = (f"Use {fused} (its JVP runs through FSDP's own forward: FSDP1 with use_orig_params=True, or "
                   "FSDP2 fully_shard), or train the plain module" if fused else
                   "Train the plain module (DDP-style: sgflow.distributed.allreduce_gradients after backward)")
        raise TypeError(
            f"{loss_name} cannot take an FSDP1 FullyShardedDataParallel model: its JVP runs FSDP's forward inside "
            f"torch.func.jvp (or a double VJP), which FSDP does not support. {instead}"
        )
    if not _holds_ddp(model):
        return
    fused = _FUSED_EQUIVALENT.get(loss_name)
    instead = (f"Use {fused} (its JVP runs through DDP's own forward, which syncs the gradients), or pass"
               if fused else "Pass")
    raise TypeError(
        f"{loss_name} cannot take a DistributedDataParallel model: its JVP runs DDP's forward inside "
        f"torch.func.jvp (or a double VJP), which DDP does not support. {instead} the plain module (model.module) "
        "and average the gradients after backward(), e.g. "
        "sgflow.distributed.allreduce_gradients(model.module.parameters(), world_size), as `sgflow train` does"
    )
