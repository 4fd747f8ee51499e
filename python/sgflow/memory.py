"""Measuring what a training step keeps for backward (deterministic, works on CPU) and its peak memory."""
from __future__ import annotations

from typing import Callable

import torch


def saved_tensor_bytes(step: Callable[[], torch.Tensor]) -> dict:
    """Run ``step()`` (which builds a graph and returns the loss) and count what autograd saved.

    Every tensor packed by ``torch.autograd.graph.saved_tensors_hooks`` is counted once per
    underlying storage (views and re-saves of one buffer are not double counted). Parameters are
    counted separately, since every method keeps them anyway.

    Returns ``{"bytes": activations saved, "param_bytes": parameters saved, "tensors": count, "loss": loss}``.
    """
    seen: dict[tuple, int] = {}
    param_ptrs: set = set()

    def pack(t: torch.Tensor):
        try:
            storage = t.untyped_storage()
            key = (storage.data_ptr(), t.device.type, t.device.index)
            if storage.data_ptr() != 0:
                seen[key] = max(seen.get(key, 0), storage.nbytes())
                if isinstance(t, torch.nn.Parameter) or (t.is_leaf and t.requires_grad):
                    param_ptrs.add(key)
        except (RuntimeError, NotImplementedError):  # tensors without storage (e.g. functorch wrappers)
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step()
    act = sum(n for k, n in seen.items() if k not in param_ptrs)
    par = sum(n for k, n in seen.items() if k in param_ptrs)
    return {"bytes": act, "param_bytes": par, "tensors": len(seen), "loss": loss}
