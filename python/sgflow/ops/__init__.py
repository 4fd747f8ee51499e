"""Dual (primal + tangent) ops: ``(x, x_dot, params...) -> (y, y_dot)``, each differentiable in all
inputs (the gradient flows through the tangent). One op per file: reference ``*_ref`` -> autograd
Function -> functional API; kernels in ``sgflow_kernels/`` (Triton) and ``csrc/`` (C++/CUDA).

    groupnorm_silu_dual   y = silu(group_norm(x))                 x: [B, C, *spatial]
    gn_silu_conv_dual     GroupNorm -> SiLU -> Dropout -> Conv2d    x: [B, C, H, W]
    attention_dual        softmax(s q k^T) v                       q, k, v: [B, H, N, D]

``sgflow.ops.groupnorm.GroupNormDual`` (GroupNorm alone) is applied by the dual engine's GroupNorm rule;
``sgflow.ops.embedding.sinusoidal_embedding`` is the networks' (primal) time embedding. The engine's own
Functions: ``sgflow.ops.conv_linear`` (``DualConv``, ``DualLinear``), ``sgflow.ops.pointwise``
(``PointwiseDual``), ``sgflow.ops.recompute`` (``RecomputeOp``, ``recompute_op``).
"""
from sgflow.ops.attention import attention_dual
from sgflow.ops.groupnorm_silu import gn_silu_conv_dual, groupnorm_silu_dual

__all__ = ["attention_dual", "gn_silu_conv_dual", "groupnorm_silu_dual"]
