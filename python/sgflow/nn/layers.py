r"""Layers of the sgflow.nn networks: plain ``forward``s in PyTorch ops.

The fused SGFlow path runs them through :func:`sgflow.dualize` (the tangent travels through this same
forward; GroupNorm -> SiLU -> dropout -> conv becomes the fused stage op there), so no layer has a
second, hand-written dual form.

Dropout is the one stochastic piece: :class:`GNSiLUConv` draws its keep-mask with :func:`dropout_mask`
and applies it with :func:`sgflow.ops.apply_dropout_mask`, which dualize fuses into the stage with one
mask for the primal and the tangent.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from sgflow.ops.groupnorm_silu import apply_dropout_mask, make_dropout_mask

__all__ = [
    "dropout_mask",
    "variance_scaling_",
    "GNSiLUConv",
    "Downsample",
    "Upsample",
]


def dropout_mask(shape, p: float, device=None) -> torch.Tensor:
    """Bool keep-mask of ``shape``, each entry True with probability ``1 - p`` (global RNG).

    The same draw as ``sgflow.ops.groupnorm_silu.make_dropout_mask``: the fused stage op and the plain
    forward use identical masks for identical RNG states (recomputation in backward replays the state).
    """
    return make_dropout_mask(shape, p, device)


def variance_scaling_(weight: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """DDPM's ``default_init``: uniform with variance ``scale / fan_avg`` (zero for scale 0)."""
    fan_in = weight.shape[1] * math.prod(weight.shape[2:])
    fan_out = weight.shape[0] * math.prod(weight.shape[2:])
    if scale == 0:
        return nn.init.zeros_(weight)
    bound = math.sqrt(3.0 * scale / ((fan_in + fan_out) / 2))
    return nn.init.uniform_(weight, -bound, bound)


class GNSiLUConv(nn.Module):
    r"""One stage ``Conv(Dropout(SiLU(GroupNorm(x))))``: [B, Cin, H, W] -> [B, Cout, H, W].

    ``forward`` uses plain PyTorch ops; under :func:`sgflow.dualize` the whole stage runs as the fused
    dual op ``gn_silu_conv_dual`` (one autograd Function saving only its input, tangent, the group
    statistics and the bool dropout mask). Dropout (active in training mode when ``dropout > 0``)
    multiplies kept activations by ``1 / (1 - p)``; the mask is drawn with :func:`dropout_mask` on the
    activation's shape and shared by the primal and the tangent.

    Args:
        in_channels, out_channels: channel counts; ``in_channels`` divisible by ``num_groups``.
        num_groups: GroupNorm groups. kernel_size: odd conv kernel (padding keeps H, W).
        dropout: drop probability p. eps: GroupNorm epsilon. init_scale: conv weight variance scale
            (0: zero init, as DDPM++ does for the last conv of a residual branch).
    """

    def __init__(self, in_channels, out_channels, num_groups, kernel_size=3, dropout=0.0, eps=1e-6, init_scale=1.0):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        if in_channels % num_groups:
            raise ValueError(f"GroupNorm: {in_channels} channels are not divisible into {num_groups} groups")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.norm = nn.GroupNorm(num_groups, in_channels, eps=eps)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        variance_scaling_(self.conv.weight, init_scale)
        nn.init.zeros_(self.conv.bias)
        self.dropout = float(dropout)

    def _mask(self, x):
        if self.training and self.dropout > 0:
            return dropout_mask(x.shape, self.dropout, x.device)
        return None

    def forward(self, x):
        h = F.silu(self.norm(x))
        mask = self._mask(h)
        if mask is not None:
            h = apply_dropout_mask(h, mask, self.dropout)  # dualize() fuses it into the stage
        return self.conv(h)

    def extra_repr(self):
        return f"dropout={self.dropout}"


class Downsample(nn.Module):
    """Halve H and W (rounding up, so odd sizes work): stride-2 3x3 conv or 2x2 average pooling.

    [B, C, H, W] -> [B, C, ceil(H/2), ceil(W/2)]. Both variants are linear in x, so the tangent
    goes through the same map (without the conv bias).
    """

    def __init__(self, channels, mode="conv"):
        super().__init__()
        if mode not in ("conv", "avgpool"):
            raise ValueError(f"downsampling mode must be 'conv' or 'avgpool', got {mode!r}")
        self.mode = mode
        if mode == "conv":
            self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)
            variance_scaling_(self.conv.weight)
            nn.init.zeros_(self.conv.bias)

    @staticmethod
    def _pool(x):
        return F.avg_pool2d(x, 2, ceil_mode=True)

    def forward(self, x):
        return self.conv(x) if self.mode == "conv" else self._pool(x)


class Upsample(nn.Module):
    """Nearest-neighbour upsampling to a given size, then a 3x3 conv: [B, C, h, w] -> [B, C, H, W].

    The target size is the skip connection's (2h or 2h - 1 for odd sizes), so the decoder matches
    every encoder resolution exactly. Nearest upsampling is linear: both streams take it.
    """

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        variance_scaling_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, x, size):
        return self.conv(F.interpolate(x, size=tuple(size), mode="nearest"))
