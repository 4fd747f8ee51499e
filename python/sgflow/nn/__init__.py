"""Flow-map networks ``net(t, u, x) -> ftilde``, each with one plain forward.

The fused losses carry the tangent through that forward with :func:`sgflow.dualize` (see
docs/DESIGN.md). Build one by name with :func:`build_model`.
"""
from sgflow.nn.base import FlowMapNet
from sgflow.nn.configs import MLP_CONFIGS, MODEL_CONFIGS, build_model
from sgflow.nn.embedding import TwoTimeEmbedding
from sgflow.nn.layers import (
    Downsample,
    GNSiLUConv,
    Upsample,
    dropout_mask,
)
from sgflow.nn.mlp import MLPFlowMap
from sgflow.nn.unet import UNET_CONFIGS, AttnBlock, ResBlock, UNet

__all__ = [
    "FlowMapNet",
    "MLPFlowMap",
    "UNet",
    "ResBlock",
    "AttnBlock",
    "TwoTimeEmbedding",
    "GNSiLUConv",
    "Downsample",
    "Upsample",
    "dropout_mask",
    "build_model",
    "MODEL_CONFIGS",
    "MLP_CONFIGS",
    "UNET_CONFIGS",
]
