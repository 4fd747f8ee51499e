"""Test networks written the way third-party diffusion code writes them (for tests and benchmarks).

They live at the repository's top level, outside the ``sgflow`` package (``import testnets`` from the repository
root: tests/conftest.py and the benchmarks put it on ``sys.path``). These are NOT part of sgflow's API and are deliberately not built from ``sgflow.nn`` or ``sgflow.ops``:
they have no ``dual_forward``, and they use only standard ``torch.nn`` modules, ``torch.nn.functional``
calls and ordinary tensor methods, laid out the way public diffusion code lays them out (module
containers, ``modulate`` helpers, ``TimestepEmbedSequential``, ...). They exist so that
``sgflow.dualize(model)`` (which runs a user's own ``forward`` with a tangent carried along) can be tested
and benchmarked on networks that look like what users already have.

Every network follows the flow-map calling convention of ``docs/DESIGN.md``: ``model(t, u, x)`` with
``t, u`` of shape ``[B]`` (times in [0, 1], t <= u, same dtype/device as x) returns the velocity
ftilde(t, u, x) with x's shape and dtype. The second time u enters through a second embedding path that
is summed with t's, the way class / label embeddings are summed in the originals.

- :class:`ADMUNet`: DDPM / ADM UNet (guided-diffusion, diffusers ``UNet2DModel``) for ``[B, C, H, W]``.
- :class:`EDMUNet`: EDM DDPM++ / NCSN++ style UNet (NVlabs edm ``SongUNet``) for ``[B, C, H, W]``.
- :class:`DiT`: Diffusion Transformer (facebookresearch/DiT) for ``[B, C, H, W]``.
- :class:`AttnMLP`: residual MLP with one token self-attention layer for flat data ``[B, D]``.

All layers use the default ``torch.nn`` initialisation (DiT: its own xavier / normal(0.02) scheme) so that
every parameter receives a non-zero gradient at init. ``zero_init=True`` additionally zeroes the output
layers and residual-branch outputs (adaLN gates for DiT) the way the originals do; the network's output is
then exactly zero at init. No activation is computed in place (no ``inplace=True``, no ``x += y``).

``build(name, shape, **overrides)`` picks the input-size arguments from a data shape (without batch).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ADMUNet", "EDMUNet", "DiT", "AttnMLP", "NETWORKS", "build"]


def _zero_params(module: nn.Module) -> nn.Module:
    """Set every parameter of ``module`` to zero (guided-diffusion's ``zero_module``) and return it."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


# ----------------------------------------------------------------------------------------------------
# ADM / DDPM UNet (guided-diffusion, diffusers UNet2DModel)
# ----------------------------------------------------------------------------------------------------

def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of a batch of (possibly fractional) timesteps: [B] -> [B, dim], cos then sin."""
    half = dim // 2
    exponent = torch.arange(half, dtype=timesteps.dtype, device=timesteps.device) / half
    freqs = torch.exp(-math.log(max_period) * exponent)
    args = timesteps[:, None] * freqs[None, :]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2 == 1:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class TimestepBlock(nn.Module):
    """Marker base class for layers whose ``forward`` takes ``(x, emb)``."""


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    """A Sequential that hands the timestep embedding to the children that take one."""

    def forward(self, x, emb):
        for layer in self:
            if isinstance(layer, TimestepBlock):
                x = layer(x, emb)
            else:
                x = layer(x)
        return x


class Downsample(nn.Module):
    """Strided 3x3 convolution: [B, C, H, W] -> [B, C, H/2, W/2]."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    """Nearest-neighbour upsampling followed by a 3x3 convolution: [B, C, H, W] -> [B, C, 2H, 2W]."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x)


class ResBlock(TimestepBlock):
    """ADM residual block with scale-shift norm conditioning: [B, C_in, H, W] -> [B, C_out, H, W]."""

    def __init__(self, channels: int, emb_channels: int, dropout: float, out_channels: int | None = None,
                 num_groups: int = 32, zero_init: bool = False):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.in_layers = nn.Sequential(
            nn.GroupNorm(num_groups, channels),
            nn.SiLU(),
            nn.Conv2d(channels, self.out_channels, 3, padding=1),
        )
        self.emb_layers = nn.Sequential(
            nn.SiLU(),
            nn.Linear(emb_channels, 2 * self.out_channels),
        )
        out_conv = nn.Conv2d(self.out_channels, self.out_channels, 3, padding=1)
        self.out_layers = nn.Sequential(
            nn.GroupNorm(num_groups, self.out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            _zero_params(out_conv) if zero_init else out_conv,
        )
        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        else:
            self.skip_connection = nn.Conv2d(channels, self.out_channels, 1)

    def forward(self, x, emb):
        h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)
        scale, shift = emb_out.chunk(2, dim=1)
        out_norm, out_rest = self.out_layers[0], self.out_layers[1:]
        h = out_norm(h) * (1 + scale[..., None, None]) + shift[..., None, None]
        h = out_rest(h)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Spatial self-attention over the H*W positions: [B, C, H, W] -> [B, C, H, W]."""

    def __init__(self, channels: int, num_heads: int = 1, num_groups: int = 32, zero_init: bool = False):
        super().__init__()
        if channels % num_heads != 0:
            raise ValueError(f"channels {channels} not divisible by num_heads {num_heads}")
        self.channels = channels
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(num_groups, channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        proj_out = nn.Conv1d(channels, channels, 1)
        self.proj_out = _zero_params(proj_out) if zero_init else proj_out

    def forward(self, x):
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(x))                                   # [B, 3C, T]
        qkv = qkv.reshape(b, self.num_heads, 3 * c // self.num_heads, -1)
        q, k, v = qkv.chunk(3, dim=2)                                  # each [B, heads, C/heads, T]
        h = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        h = h.transpose(-1, -2).reshape(b, c, -1)
        h = self.proj_out(h)
        return (x + h).reshape(b, c, *spatial)


_ADM_CHANNEL_MULT = (1, 2)


class ADMUNet(nn.Module):
    """DDPM / ADM UNet in the guided-diffusion layout, conditioned on two times.

    ``forward(t, u, x)``: t, u ``[B]``, x ``[B, in_channels, H, W]`` -> ``[B, in_channels, H, W]``
    (x's dtype); H and W must be divisible by ``2 ** (len(channel_mult) - 1)``. t and u are scaled by 1000 and
    embedded by separate sinusoid -> Linear-SiLU-Linear paths (u like diffusers' "timestep" class
    embedding) whose sum conditions every ResBlock through scale-shift GroupNorm.
    ``attention_resolutions`` are downsample factors (1 = input resolution) at which attention is used;
    the middle block always has one. ``zero_init=True`` zeroes every ResBlock's last conv, every
    attention ``proj_out`` and the output conv (the guided-diffusion ``zero_module`` calls).
    """

    def __init__(self, in_channels: int = 3, model_channels: int = 32, channel_mult=_ADM_CHANNEL_MULT,
                 num_res_blocks: int = 1, attention_resolutions=(2,), num_heads: int = 2,
                 num_groups: int = 8, dropout: float = 0.0, zero_init: bool = False):
        super().__init__()
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.channel_mult = tuple(channel_mult)
        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, time_embed_dim),
            nn.SiLU(),
            nn.Linear(time_embed_dim, time_embed_dim),
        )
        self.u_embed = nn.Sequential(
            nn.Linear(model_channels, time_embed_dim),
            nn.SiLU(),
            nn.Linear(time_embed_dim, time_embed_dim),
        )

        def res_block(ch_in, ch_out):
            return ResBlock(ch_in, time_embed_dim, dropout, out_channels=ch_out, num_groups=num_groups,
                            zero_init=zero_init)

        def attn_block(ch_):
            return AttentionBlock(ch_, num_heads=num_heads, num_groups=num_groups, zero_init=zero_init)

        ch = model_channels * self.channel_mult[0]
        self.input_blocks = nn.ModuleList([
            TimestepEmbedSequential(nn.Conv2d(in_channels, ch, 3, padding=1)),
        ])
        input_block_chans = [ch]
        ds = 1
        for level, mult in enumerate(self.channel_mult):
            for _ in range(num_res_blocks):
                layers = [res_block(ch, model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_resolutions:
                    layers.append(attn_block(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                input_block_chans.append(ch)
            if level != len(self.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                input_block_chans.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(res_block(ch, ch), attn_block(ch), res_block(ch, ch))

        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(self.channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                skip_ch = input_block_chans.pop()
                layers = [res_block(ch + skip_ch, model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_resolutions:
                    layers.append(attn_block(ch))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        out_conv = nn.Conv2d(ch, in_channels, 3, padding=1)
        self.out = nn.Sequential(
            nn.GroupNorm(num_groups, ch),
            nn.SiLU(),
            _zero_params(out_conv) if zero_init else out_conv,
        )

    def forward(self, t, u, x):
        emb = self.time_embed(timestep_embedding(t * 1000, self.model_channels))
        emb = emb + self.u_embed(timestep_embedding(u * 1000, self.model_channels))
        hs = []
        h = x
        for module in self.input_blocks:
            h = module(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for module in self.output_blocks:
            h = torch.cat([h, hs.pop()], dim=1)
            h = module(h, emb)
        return self.out(h).type(x.dtype)


# ----------------------------------------------------------------------------------------------------
# EDM DDPM++ / NCSN++ style UNet (NVlabs edm SongUNet)
# ----------------------------------------------------------------------------------------------------

class FourierEmbedding(nn.Module):
    """Random Fourier features with fixed frequencies (a buffer): [B] -> [B, num_channels], cos then sin."""

    def __init__(self, num_channels: int, scale: float = 16.0):
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, x):
        x = x.ger((2 * math.pi * self.freqs).to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


class PositionalEmbedding(nn.Module):
    """Transformer sin/cos features with geometric frequencies: [B] -> [B, num_channels], cos then sin."""

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = False):
        super().__init__()
        self.num_channels = num_channels
        self.max_positions = max_positions
        self.endpoint = endpoint

    def forward(self, x):
        half = self.num_channels // 2
        steps = torch.arange(half, dtype=x.dtype, device=x.device)
        steps = steps / (half - 1 if self.endpoint else half)
        freqs = (1.0 / self.max_positions) ** steps
        x = x.ger(freqs)
        return torch.cat([x.cos(), x.sin()], dim=1)


class UNetBlock(nn.Module):
    """EDM UNet block: [B, C_in, H, W] -> [B, C_out, H', W'] (H' = H/2 with ``down``, 2H with ``up``).

    GroupNorm -> SiLU -> (resample) -> conv3x3, adaptive scale/shift from the embedding, SiLU, dropout,
    conv3x3, skip (resampled, 1x1 conv when channels change) scaled by ``skip_scale``; optional
    multi-head self-attention (hand-written einsum + softmax) with its own scaled residual.
    """

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, up: bool = False,
                 down: bool = False, attention: bool = False, channels_per_head: int = 32,
                 dropout: float = 0.0, skip_scale: float = 1.0, num_groups: int = 8, eps: float = 1e-6,
                 zero_init: bool = False):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up = up
        self.down = down
        self.dropout = dropout
        self.skip_scale = skip_scale
        self.num_heads = max(out_channels // channels_per_head, 1) if attention else 0

        self.norm0 = nn.GroupNorm(num_groups, in_channels, eps=eps)
        self.conv0 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.affine = nn.Linear(emb_channels, 2 * out_channels)
        self.norm1 = nn.GroupNorm(num_groups, out_channels, eps=eps)
        self.conv1 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = None
        if out_channels != in_channels:
            self.skip = nn.Conv2d(in_channels, out_channels, 1)
        if self.num_heads:
            self.norm2 = nn.GroupNorm(num_groups, out_channels, eps=eps)
            self.qkv = nn.Conv2d(out_channels, 3 * out_channels, 1)
            self.proj = nn.Conv2d(out_channels, out_channels, 1)
        if zero_init:
            _zero_params(self.conv1)
            if self.num_heads:
                _zero_params(self.proj)

    def _resample(self, x):
        if self.down:
            return F.avg_pool2d(x, 2)
        if self.up:
            return F.interpolate(x, scale_factor=2, mode="nearest")
        return x

    def forward(self, x, emb):
        orig = x
        x = self.conv0(self._resample(F.silu(self.norm0(x))))

        params = self.affine(emb).unsqueeze(2).unsqueeze(3).to(x.dtype)
        scale, shift = params.chunk(chunks=2, dim=1)
        x = F.silu(torch.addcmul(shift, self.norm1(x), scale + 1))
        x = self.conv1(F.dropout(x, p=self.dropout, training=self.training))

        skip = self._resample(orig)
        if self.skip is not None:
            skip = self.skip(skip)
        x = (x + skip) * self.skip_scale

        if self.num_heads:
            n, c, h, w = x.shape
            ch = c // self.num_heads
            qkv = self.qkv(self.norm2(x)).reshape(n, self.num_heads, 3, ch, h * w)
            q, k, v = qkv.permute(2, 0, 1, 4, 3).reshape(3, n * self.num_heads, h * w, ch).unbind(0)
            weights = torch.einsum("nqc,nkc->nqk", q, k / math.sqrt(ch)).softmax(dim=2)
            a = torch.einsum("nqk,nkc->nqc", weights, v)
            a = a.reshape(n, self.num_heads, h * w, ch).permute(0, 1, 3, 2).reshape(n, c, h, w)
            x = (self.proj(a) + x) * self.skip_scale
        return x


_EDM_CHANNEL_MULT = (1, 2)


class EDMUNet(nn.Module):
    """DDPM++-style UNet in the layout of edm's ``SongUNet``, conditioned on two times.

    ``forward(t, u, x)``: t, u ``[B]``, x ``[B, in_channels, R, R]`` -> ``[B, in_channels, R, R]``
    (x's dtype).
    t goes through ``FourierEmbedding`` (random fixed frequencies, scale 16, t used as is) and u*1000
    through ``PositionalEmbedding`` (sin/cos halves swapped as edm does); each has its own Linear, their sum
    goes through SiLU -> Linear -> SiLU and conditions every block. Blocks are keyed
    ``"{res}x{res}_..."`` from ``img_resolution`` (the R the network is built for; other sizes divisible
    by ``2 ** (len(channel_mult) - 1)`` run too, with attention placed by the build-time names).
    ``attn_resolutions`` are absolute resolutions: with the defaults (R = 8, two levels) attention runs at
    4x4 only, in the last encoder block, the first decoder block (which, as in edm, always has
    attention at the lowest resolution) and the last decoder block of that level.
    ``zero_init=True`` zeroes every block's ``conv1`` and attention ``proj`` and the output conv
    (edm scales those by 1e-5; here exactly zero).
    """

    def __init__(self, in_channels: int = 3, model_channels: int = 32, channel_mult=_EDM_CHANNEL_MULT,
                 num_blocks: int = 1, attn_resolutions=(4,), img_resolution: int = 8,
                 num_groups: int = 8, dropout: float = 0.0, channels_per_head: int = 32,
                 zero_init: bool = False):
        super().__init__()
        self.in_channels = in_channels
        self.img_resolution = img_resolution
        emb_channels = model_channels * 4
        block_kwargs = dict(emb_channels=emb_channels, channels_per_head=channels_per_head, dropout=dropout,
                            skip_scale=math.sqrt(0.5), num_groups=num_groups, eps=1e-6, zero_init=zero_init)

        # Mapping from the two times to the conditioning vector.
        self.map_t_features = FourierEmbedding(model_channels)
        self.map_u_features = PositionalEmbedding(model_channels, endpoint=True)
        self.map_t = nn.Linear(model_channels, emb_channels)
        self.map_u = nn.Linear(model_channels, emb_channels)
        self.map_layer1 = nn.Linear(emb_channels, emb_channels)

        # Encoder.
        self.enc = nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin = cout
                cout = model_channels
                self.enc[f"{res}x{res}_conv"] = nn.Conv2d(cin, cout, 3, padding=1)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block_kwargs)
            for idx in range(num_blocks):
                cin = cout
                cout = model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(
                    cin, cout, attention=(res in attn_resolutions), **block_kwargs)
        skips = [block.out_channels for block in self.enc.values()]

        # Decoder.
        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin = cout + skips.pop()
                cout = model_channels * mult
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(
                    cin, cout, attention=(idx == num_blocks and res in attn_resolutions), **block_kwargs)

        self.out_norm = nn.GroupNorm(num_groups, cout, eps=1e-6)
        self.out_conv = nn.Conv2d(cout, in_channels, 3, padding=1)
        if zero_init:
            _zero_params(self.out_conv)

    def forward(self, t, u, x):
        emb_u = self.map_u_features(u * 1000)
        emb_u = emb_u.reshape(emb_u.shape[0], 2, -1).flip(1).reshape(*emb_u.shape)  # swap cos/sin
        emb = self.map_t(self.map_t_features(t)) + self.map_u(emb_u)
        emb = F.silu(emb)
        emb = F.silu(self.map_layer1(emb))

        skips = []
        for block in self.enc.values():
            x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)
        for block in self.dec.values():
            if x.shape[1] != block.in_channels:
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb)
        return self.out_conv(F.silu(self.out_norm(x)))


# ----------------------------------------------------------------------------------------------------
# DiT (facebookresearch/DiT)
# ----------------------------------------------------------------------------------------------------

def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def _sincos_1d(embed_dim: int, pos: torch.Tensor) -> torch.Tensor:
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000 ** omega
    out = pos.reshape(-1)[:, None] * omega[None, :]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_2d_pos_embed(embed_dim: int, grid_size: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position table, [grid_size**2, embed_dim] (row-major over the patch grid)."""
    coords = torch.arange(grid_size, dtype=torch.float64)
    grid_y, grid_x = torch.meshgrid(coords, coords, indexing="ij")
    return torch.cat([_sincos_1d(embed_dim // 2, grid_x), _sincos_1d(embed_dim // 2, grid_y)], dim=1)


class TimestepEmbedder(nn.Module):
    """Scalar time -> vector: sinusoid of 1000*t -> Linear -> SiLU -> Linear. [B] -> [B, hidden_size]."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t, dim, max_period=10000):
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(0, half, dtype=t.dtype, device=t.device) / half)
        args = t[:, None] * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t):
        t_freq = self.timestep_embedding(t * 1000, self.frequency_embedding_size)
        return self.mlp(t_freq)


class Attention(nn.Module):
    """timm-style multi-head self-attention over tokens: [B, N, C] -> [B, N, C]."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class Mlp(nn.Module):
    """timm-style transformer MLP: [B, N, C] -> [B, N, C]."""

    def __init__(self, in_features: int, hidden_features: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """DiT block with adaLN-Zero conditioning: x [B, N, C], c [B, C] -> [B, N, C]."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(
            nn.SiLU(),
            nn.Linear(hidden_size, 6 * hidden_size, bias=True),
        )

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm then Linear to patch pixels: [B, N, C] -> [B, N, p*p*out_channels]."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(
            nn.SiLU(),
            nn.Linear(hidden_size, 2 * hidden_size, bias=True),
        )

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        x = modulate(self.norm_final(x), shift, scale)
        return self.linear(x)


class DiT(nn.Module):
    """Diffusion Transformer (facebookresearch/DiT layout), conditioned on two times.

    ``forward(t, u, x)``: t, u ``[B]``, x ``[B, in_channels, input_size, input_size]`` -> same shape
    (x's dtype); ``input_size`` must be divisible by ``patch_size``. t and u each go through their own
    ``TimestepEmbedder`` (sinusoid of 1000*time) and are summed into ``c`` (where DiT sums time and label).
    Initialisation follows DiT (xavier Linear weights, zero biases, normal(0.02) time MLPs); the adaLN
    modulations and the final Linear are zeroed only with ``zero_init=True`` (the output is then zero).
    """

    def __init__(self, input_size: int = 8, patch_size: int = 2, in_channels: int = 3, hidden_size: int = 32,
                 depth: int = 2, num_heads: int = 2, mlp_ratio: float = 4.0, zero_init: bool = False):
        super().__init__()
        if input_size % patch_size != 0:
            raise ValueError(f"input_size {input_size} not divisible by patch_size {patch_size}")
        if hidden_size % num_heads != 0 or hidden_size % 4 != 0:
            raise ValueError(f"hidden_size {hidden_size} must be divisible by 4 and by num_heads {num_heads}")
        self.in_channels = in_channels
        self.out_channels = in_channels
        self.patch_size = patch_size
        self.input_size = input_size
        self.num_heads = num_heads

        self.x_embedder = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.u_embedder = TimestepEmbedder(hidden_size)
        grid_size = input_size // patch_size
        pos_embed = sincos_2d_pos_embed(hidden_size, grid_size).unsqueeze(0).to(torch.get_default_dtype())
        self.register_buffer("pos_embed", pos_embed, persistent=False)

        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio=mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights(zero_init)

    def initialize_weights(self, zero_init: bool = False):
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                torch.nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)
        self.apply(_basic_init)

        w = self.x_embedder.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.bias, 0)

        for embedder in (self.t_embedder, self.u_embedder):
            nn.init.normal_(embedder.mlp[0].weight, std=0.02)
            nn.init.normal_(embedder.mlp[2].weight, std=0.02)

        if zero_init:
            for block in self.blocks:
                nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
                nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
            nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
            nn.init.constant_(self.final_layer.linear.weight, 0)
            nn.init.constant_(self.final_layer.linear.bias, 0)

    def unpatchify(self, x):
        """[N, T, p*p*C] -> [N, C, H, W]."""
        c = self.out_channels
        p = self.patch_size
        h = w = int(round(x.shape[1] ** 0.5))
        assert h * w == x.shape[1]
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def forward(self, t, u, x):
        x = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed   # [N, T, D]
        c = self.t_embedder(t) + self.u_embedder(u)                           # [N, D]
        for block in self.blocks:
            x = block(x, c)
        x = self.final_layer(x, c)                                            # [N, T, p*p*C]
        return self.unpatchify(x)


# ----------------------------------------------------------------------------------------------------
# MLP with one token self-attention layer, for flat data
# ----------------------------------------------------------------------------------------------------

class SinusoidalPosEmb(nn.Module):
    """[B] -> [B, dim]: sin then cos of 1000*x at geometric frequencies."""

    def __init__(self, dim: int, scale: float = 1000.0):
        super().__init__()
        self.dim = dim
        self.scale = scale

    def forward(self, x):
        half_dim = self.dim // 2
        emb = math.log(10000) / (half_dim - 1)
        emb = torch.exp(torch.arange(half_dim, device=x.device, dtype=x.dtype) * -emb)
        emb = (self.scale * x)[:, None] * emb[None, :]
        return torch.cat((emb.sin(), emb.cos()), dim=-1)


class MLPResBlock(nn.Module):
    """Pre-norm residual MLP block with an additive time embedding: h [B, H], emb [B, H] -> [B, H]."""

    def __init__(self, hidden: int, emb_dim: int, expansion: int = 2, zero_init: bool = False):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, expansion * hidden)
        self.emb_proj = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, expansion * hidden))
        self.act = nn.SiLU()
        self.fc2 = nn.Linear(expansion * hidden, hidden)
        if zero_init:
            _zero_params(self.fc2)

    def forward(self, h, emb):
        z = self.fc1(self.norm(h)) + self.emb_proj(emb)
        return h + self.fc2(self.act(z))


class TokenSelfAttention(nn.Module):
    """Self-attention among ``n_tokens`` equal chunks of the hidden vector: [B, H] -> [B, H]."""

    def __init__(self, hidden: int, n_tokens: int, zero_init: bool = False):
        super().__init__()
        if hidden % n_tokens != 0:
            raise ValueError(f"hidden {hidden} not divisible by n_tokens {n_tokens}")
        self.n_tokens = n_tokens
        self.token_dim = hidden // n_tokens
        self.norm = nn.LayerNorm(hidden)
        self.to_qkv = nn.Linear(self.token_dim, 3 * self.token_dim)
        self.proj = nn.Linear(hidden, hidden)
        if zero_init:
            _zero_params(self.proj)

    def forward(self, h):
        B = h.shape[0]
        tokens = self.norm(h).view(B, self.n_tokens, -1)                     # [B, T, d]
        q, k, v = self.to_qkv(tokens).chunk(3, dim=-1)
        attn = torch.bmm(q, k.transpose(1, 2)) * (self.token_dim ** -0.5)    # [B, T, T]
        attn = attn.softmax(dim=-1)
        out = torch.bmm(attn, v).reshape(B, -1)                              # [B, H]
        return h + self.proj(out)


class AttnMLP(nn.Module):
    """Residual MLP for flat data with one token self-attention layer, conditioned on two times.

    ``forward(t, u, x)``: t, u ``[B]``, x ``[B, dim]`` -> ``[B, dim]`` (x's dtype). t and u each get
    sinusoidal features -> Linear-SiLU-Linear; their sum is added to the input projection and fed to every
    residual block. The attention layer (``hidden`` viewed as ``n_tokens`` tokens, ``torch.bmm`` +
    ``softmax``) sits before block ``depth // 2``. Output: LayerNorm -> SiLU -> Linear.
    ``zero_init=True`` zeroes every block's ``fc2``, the attention ``proj`` and the output Linear.
    """

    def __init__(self, dim: int = 2, hidden: int = 64, depth: int = 2, n_tokens: int = 4, freq_dim: int = 32,
                 zero_init: bool = False):
        super().__init__()
        if depth < 1:
            raise ValueError("depth must be >= 1")
        self.dim = dim
        self.t_embed = nn.Sequential(SinusoidalPosEmb(freq_dim), nn.Linear(freq_dim, hidden), nn.SiLU(),
                                     nn.Linear(hidden, hidden))
        self.u_embed = nn.Sequential(SinusoidalPosEmb(freq_dim), nn.Linear(freq_dim, hidden), nn.SiLU(),
                                     nn.Linear(hidden, hidden))
        self.input_proj = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList([MLPResBlock(hidden, hidden, zero_init=zero_init) for _ in range(depth)])
        self.attn = TokenSelfAttention(hidden, n_tokens, zero_init=zero_init)
        self.attn_index = depth // 2
        self.final_norm = nn.LayerNorm(hidden)
        self.output_proj = nn.Linear(hidden, dim)
        if zero_init:
            _zero_params(self.output_proj)

    def forward(self, t, u, x):
        emb = self.t_embed(t) + self.u_embed(u)
        h = self.input_proj(x) + emb
        for i, block in enumerate(self.blocks):
            if i == self.attn_index:
                h = self.attn(h)
            h = block(h, emb)
        return self.output_proj(F.silu(self.final_norm(h)))


# ----------------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------------

NETWORKS = {"adm": ADMUNet, "edm": EDMUNet, "dit": DiT, "mlp": AttnMLP}


def _image_shape(name: str, shape: tuple) -> tuple[int, int, int]:
    if len(shape) != 3:
        raise ValueError(f"network {name!r} takes image data of shape (C, H, W); got shape {tuple(shape)}")
    return tuple(int(s) for s in shape)


def _set_from_shape(name: str, overrides: dict, key: str, value: int) -> None:
    if key in overrides and overrides[key] != value:
        raise ValueError(f"network {name!r}: override {key}={overrides[key]!r} contradicts the data shape "
                         f"(which gives {key}={value})")
    overrides[key] = value


def build(name: str, shape: tuple, **overrides) -> nn.Module:
    """Build test network ``name`` (one of ``NETWORKS``) for data of ``shape`` (without batch).

    ``in_channels`` / ``img_resolution`` / ``input_size`` / ``dim`` come from ``shape``; ``overrides`` go to
    the constructor. Raises ``ValueError`` for an unknown name or a shape the network cannot take.
    """
    if name not in NETWORKS:
        raise ValueError(f"unknown test network {name!r}; choose one of {sorted(NETWORKS)}")
    shape = tuple(shape)
    overrides = dict(overrides)
    if name == "mlp":
        if len(shape) != 1:
            raise ValueError(f"network 'mlp' takes flat data of shape (D,); got shape {shape} "
                             f"(image networks: {sorted(k for k in NETWORKS if k != 'mlp')})")
        _set_from_shape(name, overrides, "dim", int(shape[0]))
        return AttnMLP(**overrides)

    c, h, w = _image_shape(name, shape)
    if name in ("adm", "edm"):
        default_mult = _ADM_CHANNEL_MULT if name == "adm" else _EDM_CHANNEL_MULT
        factor = 2 ** (len(tuple(overrides.get("channel_mult", default_mult))) - 1)
        if h % factor or w % factor:
            raise ValueError(f"network {name!r}: image size {h}x{w} must be divisible by {factor} "
                             f"(2 ** (len(channel_mult) - 1))")
        _set_from_shape(name, overrides, "in_channels", c)
        if name == "adm":
            return ADMUNet(**overrides)
        if h != w:
            raise ValueError(f"network 'edm' takes square images; got {h}x{w}")
        _set_from_shape(name, overrides, "img_resolution", h)
        return EDMUNet(**overrides)

    # dit
    patch = int(overrides.get("patch_size", 2))
    if h != w:
        raise ValueError(f"network 'dit' takes square images; got {h}x{w}")
    if h % patch:
        raise ValueError(f"network 'dit': image size {h} must be divisible by patch_size {patch}")
    _set_from_shape(name, overrides, "in_channels", c)
    _set_from_shape(name, overrides, "input_size", h)
    return DiT(**overrides)
