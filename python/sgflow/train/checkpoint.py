"""Checkpoints: :func:`read_checkpoint` (CRC-checked, weights-only), :func:`load_model`, :class:`CheckpointError`,
the format constants and the finiteness checks that keep a diverged state out of them.

Format, version 2: ``"ema"`` holds the EMA network's own state_dict (the model's keys, what :func:`load_model`
reads), ``"ema_n_averaged"`` the :class:`~torch.optim.swa_utils.AveragedModel`'s count and ``"scheduler"`` the
LR scheduler's state_dict. Version 1 checkpoints (no count, no scheduler) are migrated on resume by the
:class:`~sgflow.train.Trainer`: both follow from the step. The config is stored as a plain dict
(:meth:`TrainConfig.to_dict`), so no class path is pickled.
"""
from __future__ import annotations

import os
import zipfile
from pathlib import Path

import torch

from sgflow.train.config import ConfigError, TrainConfig, build_network

CHECKPOINT_FORMAT = "sgflow-checkpoint"
CHECKPOINT_VERSION = 2  # 2: "ema_n_averaged" and "scheduler" entries (version 1 checkpoints are migrated)

# Options that may differ between a checkpoint and the run that resumes it; everything else
# (method, data, network, batch size, optimiser...) must match or the resumed run is a different run.
RESUMABLE_OVERRIDES = ("steps", "out_dir", "log_every", "sample_every", "ckpt_every", "device", "progress", "sample_steps",
                       "figures", "divergence_threshold")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, is not an sgflow checkpoint, or does not fit the config."""



def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _first_non_finite(groups) -> str | None:
    """``groups``: (label, {name: value}) pairs. The "label 'name'" of the first floating-point tensor holding a
    NaN or inf, or None when all are finite (one reduction per tensor, one sync for the whole check)."""
    entries = [(label, name, v) for label, named in groups for name, v in named.items()
               if torch.is_tensor(v) and v.is_floating_point() and v.numel()]
    if not entries:
        return None
    by_device: dict = {}
    for _, _, v in entries:
        by_device.setdefault(v.device, []).append(torch.isfinite(v).all())
    if all(bool(torch.stack(flags).all()) for flags in by_device.values()):  # one sync per device
        return None
    label, name, _ = next(e for e in entries if not bool(torch.isfinite(e[2]).all()))
    return f"{label} {name!r}"


def _optimizer_tensors(opt_state: dict) -> dict:
    """The tensors of an optimizer state_dict's per-parameter state (Adam's moments...), by "param.key"."""
    return {f"{i}.{k}": v for i, st in (opt_state or {}).get("state", {}).items() for k, v in st.items()}


def _check_finite_checkpoint(ckpt: dict, keys=("model", "ema", "optimizer")) -> None:
    """A one-line :class:`CheckpointError` when the weights (or optimizer state) of a checkpoint are not finite
    (a checkpoint written by a diverged run of an sgflow before checkpoints were checked on save)."""
    labels = {"model": "weights", "ema": "EMA weights", "optimizer": "optimizer state"}
    groups = [(labels[k], _optimizer_tensors(ckpt.get(k)) if k == "optimizer" else ckpt.get(k) or {}) for k in keys]
    bad = _first_non_finite(groups)
    if bad is not None:
        raise CheckpointError(f"checkpoint {ckpt['path']} holds non-finite values ({bad} has NaN or inf): it was "
                              "written by a diverged run; use an earlier checkpoint or train again")


def _verify_zip(path: Path) -> None:
    """Check every record of a torch.save zip archive against the CRC-32 that torch.save stored for it in the
    archive (torch.load never checks them): a damaged file is a one-line :class:`CheckpointError`. Every
    checkpoint has them, those of earlier sgflow versions included. Reads the file once (~1 GB/s)."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint {path} is damaged ({str(e).strip()[:160] or type(e).__name__}): "
                              "its bytes changed after it was written; use another copy or checkpoint") from None
    if bad is not None:
        raise CheckpointError(f"checkpoint {path} is damaged: record {bad!r} fails its CRC-32 check (its bytes changed "
                              "after it was written); use another copy or checkpoint")


def read_checkpoint(path, map_location="cpu") -> dict:
    """Load and sanity-check an sgflow checkpoint file (weights-only unpickling: no code runs).

    The archive's CRC-32s are verified first (a damaged file is a :class:`CheckpointError` saying so). The
    values are not checked here: :func:`load_model` and a resume refuse non-finite weights."""
    path = Path(os.path.expanduser(str(path)))
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        cand = path / "checkpoint.pt"
        if not cand.exists():
            raise FileNotFoundError(f"no checkpoint.pt in directory {path}")
        path = cand
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"cannot read checkpoint {path}: not a valid PyTorch file (torch.save zip archive)")
    _verify_zip(path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises assorted types for truncated/garbage files
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights only" in msg.lower():
            raise CheckpointError(f"{path} is not an sgflow checkpoint (it holds arbitrary Python objects)") from None
        raise CheckpointError(f"cannot read checkpoint {path}: not a valid PyTorch file ({msg[:160]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not an sgflow checkpoint")
    if ckpt.get("version", 0) > CHECKPOINT_VERSION:
        raise CheckpointError(f"{path} has checkpoint version {ckpt.get('version')}; this sgflow reads up to {CHECKPOINT_VERSION}")
    for key in ("config", "model", "ema", "step"):
        if key not in ckpt:
            raise CheckpointError(f"{path} is incomplete: no {key!r} entry")
    try:
        ckpt["config"] = TrainConfig.from_dict(ckpt["config"])
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{path} holds an invalid training config: {e}") from None
    ckpt["path"] = str(path)
    return ckpt


def _load_state(module: torch.nn.Module, state: dict, what: str, path: str, cfg: TrainConfig) -> None:
    try:
        module.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError) as e:
        first = str(e).strip().splitlines()
        detail = " ".join(line.strip() for line in first[:3])[:240]
        raise CheckpointError(
            f"checkpoint {path} does not fit network {cfg.model!r} for data {cfg.data!r} ({what}: {detail})"
        ) from None


def load_model(path, device="cpu", use_ema: bool = True):
    """Rebuild the network from a checkpoint. Returns ``(model in eval mode, TrainConfig, checkpoint dict)``."""
    ckpt = read_checkpoint(path)
    cfg = ckpt["config"]
    shape = tuple(ckpt.get("data_shape") or ())
    if not shape:
        raise CheckpointError(f"{ckpt['path']} is incomplete: no data shape")
    _check_finite_checkpoint(ckpt, ("ema" if use_ema else "model",))
    net, _ = build_network(cfg.model, shape, **cfg.model_kwargs)
    _load_state(net, ckpt["ema" if use_ema else "model"], "EMA weights" if use_ema else "weights", ckpt["path"], cfg)
    return net.to(device).eval(), cfg, ckpt
