"""Named model configurations: ``build_model(config, data_shape, **overrides)``."""
from __future__ import annotations

import torch.nn as nn

from sgflow.nn.mlp import MLPFlowMap
from sgflow.nn.unet import UNET_CONFIGS, UNet

__all__ = ["MLP_CONFIGS", "MODEL_CONFIGS", "build_model"]

MLP_CONFIGS: dict[str, dict] = {
    "mlp": dict(hidden=256, depth=4, time_dim=64),
    "mlp-small": dict(hidden=128, depth=3, time_dim=32),
}

#: Every name ``build_model`` accepts: MLPs for data [d], U-Nets for images [C, H, W].
MODEL_CONFIGS: tuple[str, ...] = (*MLP_CONFIGS, *UNET_CONFIGS)


def build_model(config: str, data_shape: tuple[int, ...], **overrides) -> nn.Module:
    """Build a flow-map network for samples of shape ``data_shape`` (without the batch dim).

    Args:
        config: one of :data:`MODEL_CONFIGS`: ``"mlp"``, ``"mlp-small"`` (data_shape ``(d,)``),
            ``"tiny"``, ``"digits"``, ``"cifar10"`` (data_shape ``(C, H, W)``; C sets in_channels).
        data_shape: per-sample shape.
        overrides: constructor keyword arguments replacing the config's values (e.g. ``dropout=0.0``).

    Returns:
        An :class:`~sgflow.nn.mlp.MLPFlowMap` or :class:`~sgflow.nn.unet.UNet`.
    """
    try:
        shape = tuple(int(s) for s in data_shape)
    except TypeError:
        raise TypeError(f"data_shape must be a tuple of ints, got {data_shape!r}") from None
    if any(s < 1 for s in shape):
        raise ValueError(f"data_shape must have positive sizes, got {shape}")
    if config in MLP_CONFIGS:
        if len(shape) != 1:
            raise ValueError(
                f"model config {config!r} takes flat data of shape (d,), got {shape}; "
                f"for images (C, H, W) use one of {sorted(UNET_CONFIGS)}"
            )
        return MLPFlowMap(shape[0], **{**MLP_CONFIGS[config], **overrides})
    if config in UNET_CONFIGS:
        if len(shape) != 3:
            raise ValueError(
                f"model config {config!r} takes images of shape (C, H, W), got {shape}; "
                f"for flat data (d,) use one of {sorted(MLP_CONFIGS)}"
            )
        if "in_channels" in overrides and int(overrides["in_channels"]) != shape[0]:
            raise ValueError(f"in_channels={overrides['in_channels']} contradicts data_shape {shape}")
        return UNet.from_config(config, **{**overrides, "in_channels": shape[0]})
    raise ValueError(f"unknown model config {config!r}; valid names: {list(MODEL_CONFIGS)}")
