"""The accumulation dtype of every sgflow kernel and op, written once (torch only, no triton import, so
that both the kernels here and the torch backends of ``sgflow.ops`` use it).

Statistics (group means and variances, softmax row maxima and sums), second-order terms and reductions
run in float32 for float16/bfloat16/float32 inputs and in float64 for float64 inputs; outputs are cast
back to the input dtype.
"""
import torch

__all__ = ["acc_dtype"]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 for every other floating dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32
