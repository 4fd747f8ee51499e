r"""MLP flow map for low-dimensional data x: [B, dim].

    e  = TwoTimeEmbedding(t, u)                                  [B, time_dim]
    h0 = [x, e]                                                  [B, dim + time_dim]
    h_{l+1} = SiLU(Linear_l(h_l)),  l = 0 .. depth-1             [B, hidden]
    ftilde  = Linear_out(h_depth)                                [B, dim]
"""
from __future__ import annotations

import torch
import torch.nn as nn

from sgflow.nn.base import FlowMapNet
from sgflow.nn.embedding import TwoTimeEmbedding
from sgflow.ops.embedding import DEFAULT_SCALE

__all__ = ["MLPFlowMap"]


class MLPFlowMap(FlowMapNet):
    """SiLU MLP on ``[x, time embedding]``: ``net(t, u, x)`` with x [B, dim] -> [B, dim].

    Args:
        dim: data dimension.
        hidden: hidden width. depth: number of hidden (Linear + SiLU) layers, >= 1.
        time_dim: sinusoidal features per time and width of the time embedding.
        time_scale: times are multiplied by this before the sinusoids (see TwoTimeEmbedding); it
            bounds d ftilde / dt through the fastest frequency, so it sets the scale of the t-JVPs.
    """

    def __init__(self, dim: int, hidden: int = 256, depth: int = 4, time_dim: int = 64, time_scale: float = DEFAULT_SCALE):
        super().__init__()
        if dim < 1 or hidden < 1 or depth < 1:
            raise ValueError(f"MLPFlowMap needs dim, hidden, depth >= 1; got dim={dim}, hidden={hidden}, depth={depth}")
        self.dim = int(dim)
        self.time_embed = TwoTimeEmbedding(time_dim, emb_dim=time_dim, scale=time_scale)
        widths = [dim + time_dim] + [hidden] * depth
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.act = nn.SiLU()
        self.out = nn.Linear(hidden, dim)

    def _check_x(self, x):
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"MLPFlowMap expects x of shape [B, {self.dim}], got {tuple(x.shape)}")

    def _forward(self, t, u, x):
        h = torch.cat([x, self.time_embed(t, u)], 1)
        for layer in self.layers:
            h = self.act(layer(h))
        return self.out(h)
