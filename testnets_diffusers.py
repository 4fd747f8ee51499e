"""diffusers' own networks behind the thin flow-map wrapper users write (for tests and benchmarks).

Like ``testnets.py`` (next to it at the repository's top level; ``import testnets_diffusers`` from the
repository root: tests/conftest.py and the benchmarks put it on ``sys.path``), this is NOT part of sgflow's
API. The backbones are diffusers' models, unmodified code from the ``diffusers`` package (imported only
when a network is built: importing this module without diffusers works, building raises ``ImportError``
naming the package). They exist so that ``sgflow.dualize(model)`` is tested and benchmarked on the
networks users already have, through the wrapper they write around them.

Every network follows the flow-map calling convention of ``docs/DESIGN.md``: ``model(t, u, x)`` with
``t, u`` of shape ``[B]`` (times in [0, 1], t <= u, x's dtype and device) returns the velocity
ftilde(t, u, x) with x's shape and dtype. The diffusers model is the wrapper's ``self.net``; t enters as
diffusers' timestep (``t * time_scale``, 1000 by default: the scale of the DDPM timesteps the model's
sinusoidal embedding is laid out for) and the step ``u - t`` (same scale) through the model's extra
conditioning path, summed with the timestep embedding:

- :class:`DiffusersUNet`: ``diffusers.UNet2DModel`` (the DDPM / ADM UNet) with
  ``class_embed_type="identity"``: the wrapper embeds the step with :class:`StepEmbedding` (diffusers'
  ``Timesteps`` sinusoids + ``TimestepEmbedding`` MLP, as the UNet embeds t) and hands the result in as
  ``class_labels``, which the UNet adds to its time embedding. (``class_embed_type="timestep"`` would do
  the same inside the UNet, but diffusers 0.42 feeds its float32 sinusoids to the class MLP without the
  cast it applies to the time path: it only runs in float32, not in the float64 of the tests.)
- :class:`DiffusersDiT`: ``diffusers.DiTTransformer2DModel``. Its class path is an ``nn.Embedding`` of
  integer labels (``LabelEmbedding``), which has no derivative in u: each block's ``norm1.emb``
  (``CombinedTimestepLabelEmbeddings``, which sums ``timestep_embedder(t) + class_embedder(labels)``)
  gets its ``class_embedder`` replaced by :class:`StepEmbedding`, a second diffusers timestep path
  (``Timesteps`` + ``TimestepEmbedding``) for the step. A second time embedder summed with the first is
  what MeanFlow-style DiTs do for their second time; the block code of diffusers stays as it is.

Both run in float64 as they are (diffusers computes the sinusoidal projections in float32 and casts them
to the model's dtype; that rounding is the model's own, the same on every path). Defaults are tiny
(few channels, two levels / two blocks, 8x8 images) for tests; benchmarks pass larger configs.

``build(name, shape, **overrides)`` takes ``in_channels`` / ``sample_size`` from a data shape (without
batch) like ``testnets.build``; ``overrides`` go to the diffusers model's constructor (``time_scale`` to
the wrapper).
"""
from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["DiffusersUNet", "DiffusersDiT", "StepEmbedding", "NETWORKS", "build", "TINY_UNET", "TINY_DIT"]

# Two levels (the second with self-attention), one ResNet per level, 8 groups: under a second per float64
# SGFlow step at 8x8 on one CPU thread.
TINY_UNET = dict(
    block_out_channels=(16, 32),
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    layers_per_block=1,
    norm_num_groups=8,
    attention_head_dim=8,
)
# Two blocks of two 8-dimensional heads, patch 2.
TINY_DIT = dict(num_attention_heads=2, attention_head_dim=8, num_layers=2, patch_size=2)


def _diffusers():
    try:
        import diffusers
    except ImportError as e:  # pragma: no cover - exercised without diffusers only
        raise ImportError("testnets_diffusers needs the 'diffusers' package (pip install diffusers, or "
                          "pip install -e .[test])") from e
    return diffusers


class DiffusersUNet(nn.Module):
    """``diffusers.UNet2DModel`` behind a flow-map wrapper: ``forward(t, u, x)`` -> velocity, x ``[B, C, H, W]``.

    ``self.net(x, t * time_scale, class_labels=self.step_embed((u - t) * time_scale)).sample`` with the UNet
    built with ``class_embed_type="identity"``: the step gets its own sinusoids + MLP (:class:`StepEmbedding`,
    the wrapper's), summed with t's embedding inside the UNet. ``unet_kw`` override :data:`TINY_UNET` and go
    to ``UNet2DModel``; a ``block_out_channels`` of another length without block types gets ``DownBlock2D``
    at full resolution and attention blocks at every lower one (mirrored going up).
    """

    def __init__(self, in_channels: int = 3, sample_size: int | tuple[int, int] = 8, time_scale: float = 1000.0,
                 **unet_kw):
        super().__init__()
        diffusers = _diffusers()
        kw = {**TINY_UNET, **unet_kw}
        levels = len(kw["block_out_channels"])
        if "down_block_types" not in unet_kw and levels != len(TINY_UNET["down_block_types"]):
            # Another depth without block types: DownBlock2D first, attention at every lower resolution.
            kw["down_block_types"] = ("DownBlock2D",) + ("AttnDownBlock2D",) * (levels - 1)
        if "up_block_types" not in unet_kw and levels != len(TINY_UNET["up_block_types"]):
            kw["up_block_types"] = ("AttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",)
        kw.setdefault("class_embed_type", "identity")
        self.time_scale = float(time_scale)
        self.net = diffusers.UNet2DModel(sample_size=sample_size, in_channels=in_channels, out_channels=in_channels, **kw)
        # The UNet's own time path: Timesteps(block_out_channels[0], cos first, freq_shift) -> MLP to emb_dim.
        cfg = self.net.config
        emb_dim = cfg.time_embedding_dim or cfg.block_out_channels[0] * 4
        self.step_embed = StepEmbedding(emb_dim, freq_dim=cfg.block_out_channels[0], flip_sin_to_cos=cfg.flip_sin_to_cos,
                                        freq_shift=cfg.freq_shift)

    def forward(self, t, u, x):
        s = self.time_scale
        return self.net(x, t * s, class_labels=self.step_embed((u - t) * s)).sample


class StepEmbedding(nn.Module):
    """The step ``u - t`` (timestep-scaled) -> ``[B, dim]``: diffusers' ``Timesteps`` sinusoids (defaults: DiT's
    own time path, 256 channels, cos first, shift 1) cast to the MLP's dtype, then a ``TimestepEmbedding``
    MLP (Linear-SiLU-Linear). The DiT's ``class_embedder`` (called as ``class_embedder(labels)``); the
    UNet wrapper's embedding of the step."""

    def __init__(self, dim: int, freq_dim: int = 256, flip_sin_to_cos: bool = True, freq_shift: float = 1):
        super().__init__()
        _diffusers()
        from diffusers.models.embeddings import TimestepEmbedding, Timesteps

        self.time_proj = Timesteps(num_channels=freq_dim, flip_sin_to_cos=flip_sin_to_cos, downscale_freq_shift=freq_shift)
        self.timestep_embedder = TimestepEmbedding(in_channels=freq_dim, time_embed_dim=dim)

    def forward(self, step):
        proj = self.time_proj(step)
        return self.timestep_embedder(proj.to(self.timestep_embedder.linear_1.weight.dtype))


class DiffusersDiT(nn.Module):
    """``diffusers.DiTTransformer2DModel`` behind a flow-map wrapper: ``forward(t, u, x)`` -> velocity.

    ``self.net(x, timestep=t * time_scale, class_labels=(u - t) * time_scale).sample``, every block's
    ``norm1.emb.class_embedder`` replaced by a :class:`StepEmbedding` (a float step, not an integer label).
    ``dit_kw`` override :data:`TINY_DIT` and go to ``DiTTransformer2DModel``. Square images only (diffusers'
    unpatchify assumes it), side divisible by ``patch_size``.
    """

    def __init__(self, in_channels: int = 3, sample_size: int = 8, time_scale: float = 1000.0, **dit_kw):
        super().__init__()
        diffusers = _diffusers()
        kw = {**TINY_DIT, **dit_kw}
        kw.setdefault("num_embeds_ada_norm", 1)  # required by ada_norm_zero; the label table it sizes is replaced
        self.time_scale = float(time_scale)
        self.net = diffusers.DiTTransformer2DModel(in_channels=in_channels, out_channels=in_channels,
                                                   sample_size=sample_size, **kw)
        dim = self.net.inner_dim
        for block in self.net.transformer_blocks:
            block.norm1.emb.class_embedder = StepEmbedding(dim)

    def forward(self, t, u, x):
        s = self.time_scale
        return self.net(x, timestep=t * s, class_labels=(u - t) * s).sample


NETWORKS = {"diffusers-unet": DiffusersUNet, "diffusers-dit": DiffusersDiT}


def _set_from_shape(name: str, overrides: dict, key: str, value) -> None:
    if key in overrides and overrides[key] != value:
        raise ValueError(f"network {name!r}: override {key}={overrides[key]!r} contradicts the data shape "
                         f"(which gives {key}={value!r})")
    overrides[key] = value


def build(name: str, shape: tuple, **overrides) -> nn.Module:
    """Build network ``name`` (one of ``NETWORKS``) for images of ``shape`` = (C, H, W) (without batch).

    ``in_channels`` and ``sample_size`` come from ``shape``; ``overrides`` go to the diffusers constructor
    (``time_scale`` to the wrapper). Raises ``ValueError`` for an unknown name or a shape the network cannot
    take, ``ImportError`` without diffusers.
    """
    if name not in NETWORKS:
        raise ValueError(f"unknown diffusers test network {name!r}; choose one of {sorted(NETWORKS)}")
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3:
        raise ValueError(f"network {name!r} takes image data of shape (C, H, W); got shape {shape}")
    c, h, w = shape
    overrides = dict(overrides)
    _set_from_shape(name, overrides, "in_channels", c)
    if name == "diffusers-unet":
        levels = len(tuple(overrides.get("block_out_channels", TINY_UNET["block_out_channels"])))
        factor = 2 ** (levels - 1)
        if h % factor or w % factor:
            raise ValueError(f"network {name!r}: image size {h}x{w} must be divisible by {factor} "
                             f"(2 ** (len(block_out_channels) - 1))")
        _set_from_shape(name, overrides, "sample_size", h if h == w else (h, w))
        return DiffusersUNet(**overrides)
    patch = int(overrides.get("patch_size", TINY_DIT["patch_size"]))
    if h != w:
        raise ValueError(f"network {name!r} takes square images; got {h}x{w}")
    if h % patch:
        raise ValueError(f"network {name!r}: image size {h} must be divisible by patch_size {patch}")
    _set_from_shape(name, overrides, "sample_size", h)
    return DiffusersDiT(**overrides)
