r"""DDPM++-style U-Net flow map for images x: [B, C, H, W] (any H, W >= 1, odd sizes included).

Layout (L levels with multipliers ``channel_mult``, ``num_blocks`` residual blocks per level):

    e    = SiLU(TwoTimeEmbedding(t, u))                       [B, emb_dim], shared by all blocks
    h    = Conv3x3(x)                                          skips = [h]
    encoder, level l = 0..L-1:  num_blocks x (ResBlock -> [Attn if l in attn_levels]) -> push,
                                then (l < L-1) Downsample (ceil(H/2), ceil(W/2)) -> push
    middle: ResBlock -> Attn -> ResBlock
    decoder, level l = L-1..0:  (num_blocks + 1) x (ResBlock on [h, skips.pop()] -> [Attn]),
                                then (l > 0) Upsample to the next skip's size
    ftilde = Conv3x3(SiLU(GroupNorm(h)))                       [B, C, H, W]

ResBlock(x, e) = s * (skip(x) + Conv(Drop(SiLU(GN(Conv(SiLU(GN(x))) + Linear(e)[:, :, None, None])))))
with skip a 1x1 conv when the channel count changes (identity otherwise) and s = 1/sqrt(2) when
``skip_rescale`` (DDPM++), else 1.
Attn(x) = s * (x + Proj(MHA(qkv(GN(x))))) with multi-head softmax attention over the H*W positions.

The forward uses PyTorch ops only (explicit softmax, so ``torch.func.jvp`` applies). It is the one
forward: the fused losses run it through :func:`sgflow.dualize`, where every GroupNorm->SiLU->(Dropout)
->Conv stage becomes the fused ``gn_silu_conv_dual`` op and the softmax attention the dual attention
op, with the recomputed blocks chosen by measurement (:mod:`sgflow.autodual.plan`).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from sgflow.nn.base import FlowMapNet
from sgflow.nn.embedding import TwoTimeEmbedding
from sgflow.nn.layers import Downsample, GNSiLUConv, Upsample, variance_scaling_
from sgflow.ops.embedding import DEFAULT_SCALE

__all__ = ["ResBlock", "AttnBlock", "UNet", "UNET_CONFIGS"]

UNET_CONFIGS: dict[str, dict] = {
    # DDPM++ (Song et al. 2021) CIFAR-10 widths: 32x32 / 16x16 / 8x8 at 256 channels, attention at 16x16.
    "cifar10": dict(
        in_channels=3, channels=128, channel_mult=(2, 2, 2), num_blocks=4, attn_levels=(1,), dropout=0.1,
        num_groups=32, head_channels=64,
    ),
    # Quick CPU model for tests and smoke runs (any image size, e.g. 8x8, 7x5, 8x12).
    "tiny": dict(
        in_channels=3, channels=32, channel_mult=(1, 2), num_blocks=1, attn_levels=(1,), dropout=0.0,
        num_groups=8, head_channels=32,
    ),
    # sklearn digits: 8x8 grayscale -> 8x8 / 4x4 (attention) / 2x2.
    "digits": dict(
        in_channels=1, channels=32, channel_mult=(1, 2, 2), num_blocks=2, attn_levels=(1,), dropout=0.1,
        num_groups=8, head_channels=32,
    ),
}


class ResBlock(nn.Module):
    """DDPM++ residual block: [B, Cin, H, W], emb [B, E] -> [B, Cout, H, W] (see module doc).

    ``emb`` is the already SiLU-activated time embedding (shared across blocks).
    """

    def __init__(self, in_channels, out_channels, emb_dim, num_groups, dropout=0.0, eps=1e-6, skip_rescale=True, zero_init=True):
        super().__init__()
        self.stage1 = GNSiLUConv(in_channels, out_channels, num_groups, 3, dropout=0.0, eps=eps)
        self.emb_proj = nn.Linear(emb_dim, out_channels)
        variance_scaling_(self.emb_proj.weight)
        nn.init.zeros_(self.emb_proj.bias)
        # Zero-init of the last conv makes the block start as (a scaled) identity, as in DDPM++.
        self.stage2 = GNSiLUConv(out_channels, out_channels, num_groups, 3, dropout=dropout, eps=eps, init_scale=0.0 if zero_init else 1.0)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        if self.skip is not None:
            variance_scaling_(self.skip.weight)
            nn.init.zeros_(self.skip.bias)
        self.skip_scale = 1 / math.sqrt(2) if skip_rescale else 1.0

    def forward(self, x, emb):
        h = self.stage1(x) + self.emb_proj(emb)[:, :, None, None]
        h = self.stage2(h)
        s = x if self.skip is None else self.skip(x)
        return (s + h) * self.skip_scale


class AttnBlock(nn.Module):
    """Self-attention block: [B, C, H, W] -> [B, C, H, W], residual (see module doc).

    GroupNorm (no SiLU) -> 1x1 conv to q, k, v (channel layout [3, heads, head_dim]) -> softmax
    attention per head over the N = H*W positions with scale head_dim^-1/2 -> 1x1 projection.
    """

    def __init__(self, channels, num_groups, head_channels=64, eps=1e-6, skip_rescale=True, zero_init=True):
        super().__init__()
        self.heads = max(1, channels // head_channels)
        if channels % self.heads:
            raise ValueError(f"AttnBlock: {channels} channels do not split into {self.heads} heads")
        self.norm = nn.GroupNorm(num_groups, channels, eps=eps)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        variance_scaling_(self.qkv.weight)
        variance_scaling_(self.proj.weight, 0.0 if zero_init else 1.0)
        nn.init.zeros_(self.qkv.bias)
        nn.init.zeros_(self.proj.bias)
        self.skip_scale = 1 / math.sqrt(2) if skip_rescale else 1.0

    def _split(self, qkv):
        """[B, 3C, H, W] -> q, k, v each [B, heads, N, head_dim] (contiguous)."""
        b, c3, hh, ww = qkv.shape
        parts = qkv.reshape(b, 3, self.heads, c3 // (3 * self.heads), hh * ww).transpose(-1, -2)
        return [p.contiguous() for p in parts.unbind(1)]

    @staticmethod
    def _merge(o, shape):
        """[B, heads, N, head_dim] -> [B, C, H, W]."""
        return o.transpose(-1, -2).reshape(shape)

    def forward(self, x):
        q, k, v = self._split(self.qkv(self.norm(x)))
        # Explicit softmax (not SDPA): torch.func.jvp needs a forward-mode rule for every op here.
        w = torch.softmax((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5, dim=-1)
        o = self._merge(w @ v, x.shape)
        return (x + self.proj(o)) * self.skip_scale

    def extra_repr(self):
        return f"heads={self.heads}"


class ResAttn(nn.Module):
    """A ResBlock optionally followed by an AttnBlock; ``forward(x, emb)``."""

    def __init__(self, res: ResBlock, attn: AttnBlock | None):
        super().__init__()
        self.res, self.attn = res, attn

    def forward(self, x, emb):
        h = self.res(x, emb)
        return h if self.attn is None else self.attn(h)


class UNet(FlowMapNet):
    """DDPM++-style U-Net flow map ``net(t, u, x)``, x: [B, in_channels, H, W] -> same shape.

    Args:
        in_channels: image channels C.
        channels: base width; level l has ``channels * channel_mult[l]`` channels.
        channel_mult: per-level multipliers (number of levels = its length; each level below the
            first halves H and W, rounding up).
        num_blocks: residual blocks per level (the decoder has one more per level).
        attn_levels: level indices with self-attention after each residual block (the middle block
            always has attention when ``mid_attn``).
        dropout: dropout probability inside the residual blocks (second stage).
        num_groups: GroupNorm groups (must divide every channel count used).
        head_channels: channels per attention head (heads = max(1, C // head_channels)).
        time_dim: sinusoidal features per time (default ``channels``); emb_dim: time-embedding
            width (default ``4 * channels``). time_scale: multiplies t and u - t before the sinusoids.
        resample: ``"conv"`` (stride-2 conv down) or ``"avgpool"``; upsampling is nearest + conv.
        skip_rescale: scale residual sums by 1/sqrt(2) (DDPM++).
        zero_init: zero-init the last conv of every residual branch, the attention projection and
            the output conv (the network starts as ftilde = 0).
        eps: GroupNorm epsilon.

    The fused losses dualize it (:func:`sgflow.dualize`); which blocks are recomputed in backward is
    chosen there, by measurement (``sgflow.dualize(net, blocks=...)`` fixes it). The dual ops' backend
    (C++, Triton, torch) is chosen per call by :mod:`sgflow.ops.backend` (``SGFLOW_BACKEND``).
    """

    def __init__(
        self,
        in_channels: int = 3,
        channels: int = 128,
        channel_mult=(2, 2, 2),
        num_blocks: int = 4,
        attn_levels=(1,),
        dropout: float = 0.1,
        num_groups: int = 32,
        head_channels: int = 64,
        time_dim: int | None = None,
        emb_dim: int | None = None,
        time_scale: float = DEFAULT_SCALE,
        resample: str = "conv",
        skip_rescale: bool = True,
        mid_attn: bool = True,
        zero_init: bool = True,
        eps: float = 1e-6,
        recompute=None,
    ):
        super().__init__()
        if recompute is not None:  # the option of the deleted hand-written dual forward (older configs)
            raise ValueError(
                f"UNet(recompute={recompute!r}) is gone: the fused losses choose the recomputed blocks by measurement; "
                "to fix them, pass sgflow.dualize(net, blocks=...) (e.g. blocks=[sgflow.nn.AttnBlock] or 'all') to the loss")
        channel_mult = tuple(int(m) for m in channel_mult)
        attn_levels = tuple(int(a) for a in attn_levels)
        if in_channels < 1 or channels < 1 or num_blocks < 1 or not channel_mult or min(channel_mult) < 1:
            raise ValueError(
                f"UNet needs in_channels, channels, num_blocks >= 1 and positive channel_mult; got in_channels={in_channels}, "
                f"channels={channels}, num_blocks={num_blocks}, channel_mult={channel_mult}"
            )
        bad = [a for a in attn_levels if not 0 <= a < len(channel_mult)]
        if bad:
            raise ValueError(f"attn_levels {bad} out of range for {len(channel_mult)} levels")
        # Decoder concatenations are sums of these widths, so they are divisible too.
        widths = {channels * m for m in channel_mult} | {channels}
        if any(w % num_groups for w in widths):
            raise ValueError(f"num_groups={num_groups} must divide every channel count of the network ({sorted(widths)})")
        self.in_channels = int(in_channels)
        self.config = dict(
            in_channels=in_channels, channels=channels, channel_mult=channel_mult, num_blocks=num_blocks,
            attn_levels=attn_levels, dropout=dropout, num_groups=num_groups, head_channels=head_channels,
            time_dim=time_dim, emb_dim=emb_dim, time_scale=time_scale, resample=resample, skip_rescale=skip_rescale,
            mid_attn=mid_attn, zero_init=zero_init, eps=eps,
        )
        time_dim = time_dim or channels
        emb_dim = emb_dim or 4 * channels
        self.time_embed = TwoTimeEmbedding(time_dim, emb_dim, scale=time_scale)

        def res(cin, cout):
            return ResBlock(cin, cout, emb_dim, num_groups, dropout, eps, skip_rescale, zero_init)

        def attn(c):
            return AttnBlock(c, num_groups, head_channels, eps, skip_rescale, zero_init)

        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)
        variance_scaling_(self.conv_in.weight)
        nn.init.zeros_(self.conv_in.bias)

        self.down = nn.ModuleList()
        skip_ch = [channels]
        ch = channels
        for level, mult in enumerate(channel_mult):
            out = channels * mult
            for _ in range(num_blocks):
                self.down.append(ResAttn(res(ch, out), attn(out) if level in attn_levels else None))
                ch = out
                skip_ch.append(ch)
            if level < len(channel_mult) - 1:
                self.down.append(Downsample(ch, resample))
                skip_ch.append(ch)

        self.mid1 = res(ch, ch)
        self.mid_attn = attn(ch) if mid_attn else None
        self.mid2 = res(ch, ch)

        self.up = nn.ModuleList()
        for level in reversed(range(len(channel_mult))):
            out = channels * channel_mult[level]
            for _ in range(num_blocks + 1):
                self.up.append(ResAttn(res(ch + skip_ch.pop(), out), attn(out) if level in attn_levels else None))
                ch = out
            if level > 0:
                self.up.append(Upsample(ch))
        assert not skip_ch

        self.out = GNSiLUConv(ch, in_channels, num_groups, 3, dropout=0.0, eps=eps, init_scale=0.0 if zero_init else 1.0)

    @classmethod
    def from_config(cls, name: str, **overrides) -> "UNet":
        """A named configuration (``"cifar10"``, ``"tiny"``, ``"digits"``) with keyword overrides
        (e.g. ``in_channels=1``, ``dropout=0.0``)."""
        if name not in UNET_CONFIGS:
            raise ValueError(f"unknown UNet config {name!r}; valid names: {sorted(UNET_CONFIGS)}")
        cfg = dict(UNET_CONFIGS[name])
        cfg.update(overrides)
        return cls(**cfg)

    def _check_x(self, x):
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"UNet expects x of shape [B, {self.in_channels}, H, W], got {tuple(x.shape)}")
        if x.shape[2] < 1 or x.shape[3] < 1:
            raise ValueError(f"UNet needs non-empty images, got {tuple(x.shape)}")

    def _forward(self, t, u, x):
        emb = F.silu(self.time_embed(t, u))
        h = self.conv_in(x)
        skips = [h]
        for blk in self.down:
            h = blk(h) if isinstance(blk, Downsample) else blk(h, emb)
            skips.append(h)
        h = self.mid1(h, emb)
        if self.mid_attn is not None:
            h = self.mid_attn(h)
        h = self.mid2(h, emb)
        for blk in self.up:
            if isinstance(blk, Upsample):
                h = blk(h, skips[-1].shape[-2:])
            else:
                h = blk(torch.cat([h, skips.pop()], 1), emb)
        return self.out(h)
