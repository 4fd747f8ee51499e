"""Flow-map networks with a plain forward and an explicit-tangent dual forward on one set of weights.

``net(t, u, x) -> ftilde`` and ``net.dual_forward(t, u, x, t_dot, u_dot, x_dot) -> (ftilde, ftilde_dot)``
(see docs/DESIGN.md). Build one by name with :func:`build_model`.
"""
from sgflow.nn.base import FlowMapNet
from sgflow.nn.configs import MLP_CONFIGS, MODEL_CONFIGS, build_model
from sgflow.nn.embedding import TwoTimeEmbedding
from sgflow.nn.layers import (
    Downsample,
    DualConv2d,
    DualGroupNorm,
    DualLinear,
    DualSiLU,
    GNSiLUConv,
    Upsample,
    dropout_mask,
    set_backend,
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
    "DualLinear",
    "DualConv2d",
    "DualSiLU",
    "DualGroupNorm",
    "GNSiLUConv",
    "Downsample",
    "Upsample",
    "dropout_mask",
    "set_backend",
    "build_model",
    "MODEL_CONFIGS",
    "MLP_CONFIGS",
    "UNET_CONFIGS",
]
