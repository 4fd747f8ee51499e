"""A small flow map over sets of points, shared by the reference and audit tests."""
import torch
import torch.nn.functional as F
from torch import nn


class AttentionFlowMap(nn.Module):
    """f~ over a set of N points [B, N, 2]: embed (x, t, u), one softmax self-attention layer via
    F.scaled_dot_product_attention (``heads`` heads, causal if asked), LayerNorm, linear read-out."""

    def __init__(self, width=12, heads=2, causal=False):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.inp = nn.Linear(4, width)
        self.qkv = nn.Linear(width, 3 * width)
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, 2)

    def forward(self, t, u, x):
        b, n, _ = x.shape
        h = self.inp(torch.cat([x, t[:, None, None].expand(b, n, 1), u[:, None, None].expand(b, n, 1)], -1))
        q, k, v = self.qkv(torch.tanh(h)).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal).transpose(1, 2).reshape(b, n, -1)
        return self.out(self.norm(h + a))
