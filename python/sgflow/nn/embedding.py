r"""Two-time embedding of (t, u) for flow maps.

    e(t, u) = Linear_2(SiLU(Linear_1([sin_emb(t), sin_emb(u - t)])))        [B, emb_dim]

Embedding the gap ``u - t`` instead of ``u`` makes the diagonal u = t (where f~ is the velocity) a
fixed input (gap 0) for every t. Under :func:`sgflow.dualize` the tangent of the gap is ``u_dot - t_dot``.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from sgflow.ops.embedding import DEFAULT_SCALE, sinusoidal_embedding

__all__ = ["TwoTimeEmbedding"]


class TwoTimeEmbedding(nn.Module):
    """Sinusoidal features of t and of (u - t), concatenated, through Linear-SiLU-Linear.

    Args:
        dim: sinusoidal features per time (the MLP input is ``2 * dim``).
        emb_dim: output width (default ``4 * dim``, as DDPM).
        max_period, scale: sinusoid convention of :func:`sgflow.ops.embedding.sinusoidal_embedding`.

    Shapes: ``forward(t, u) -> [B, emb_dim]``.
    """

    def __init__(self, dim: int, emb_dim: int | None = None, max_period: float = 10000, scale: float = DEFAULT_SCALE):
        super().__init__()
        if dim < 2:
            raise ValueError(f"TwoTimeEmbedding: dim must be >= 2, got {dim}")
        self.dim = int(dim)
        self.emb_dim = int(emb_dim) if emb_dim is not None else 4 * self.dim
        self.max_period, self.scale = float(max_period), float(scale)
        self.fc1 = nn.Linear(2 * self.dim, self.emb_dim)
        self.act = nn.SiLU()
        self.fc2 = nn.Linear(self.emb_dim, self.emb_dim)

    def forward(self, t: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        feats = torch.cat(
            [
                sinusoidal_embedding(t, self.dim, self.max_period, self.scale),
                sinusoidal_embedding(u - t, self.dim, self.max_period, self.scale),
            ],
            1,
        )
        return self.fc2(self.act(self.fc1(feats)))
