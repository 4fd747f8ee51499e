"""Dual (primal + tangent) ops: ``(x, x_dot, params...) -> (y, y_dot)``, each differentiable in all
inputs (the gradient flows through the tangent). One op per file: reference ``*_ref`` -> autograd
Function -> functional API; kernels in ``sgflow_kernels/`` (Triton) and ``csrc/`` (C++/CUDA).

    groupnorm_silu_dual   y = silu(group_norm(x))                 x: [B, C, *spatial]
    gn_silu_conv_dual     GroupNorm -> SiLU -> Dropout -> Conv2d    x: [B, C, H, W]
    groupnorm_dual        group_norm(x)                            x: [B, C, *spatial]
    attention_dual        softmax(s q k^T) v                       q, k, v: [B, H, N, D]
    conv2d_dual           conv2d(x, W) + b                         x: [B, C, H, W]
    linear_dual           x W^T + b                                x: [N, ..., Din]
    silu_dual             silu(x)                                  any shape
    sinusoidal_embedding_dual                                      s: [B]
    recompute_dual        a dual block recomputed in backward
"""
from sgflow.ops.activation import silu_dual
from sgflow.ops.attention import attention_dual
from sgflow.ops.conv import conv2d_dual
from sgflow.ops.embedding import sinusoidal_embedding_dual
from sgflow.ops.groupnorm import groupnorm_dual
from sgflow.ops.groupnorm_silu import gn_silu_conv_dual, groupnorm_silu_dual
from sgflow.ops.linear import linear_dual
from sgflow.ops.recompute import recompute_dual

__all__ = [
    "attention_dual", "conv2d_dual", "gn_silu_conv_dual", "groupnorm_dual", "groupnorm_silu_dual", "linear_dual",
    "recompute_dual", "silu_dual", "sinusoidal_embedding_dual",
]
