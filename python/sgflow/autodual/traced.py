r"""The dual forward under ``torch.compile``: one opaque call that AOTAutograd traces to ATen ops.

Eagerly, a dual forward is Python: every torch op on a :class:`~sgflow.autodual.tensor.DualTensor` goes through
``__torch_function__`` to a rule, module forwards are patched for the call, custom Functions are routed by a
patched ``Function.apply``. Dynamo cannot trace that (the ``Function.apply`` patch is an unsupported context
manager, and dynamo does not dispatch ``__torch_function__`` for subclass elements of tuple arguments, so a
traced ``torch.cat((a, b))`` would silently drop a tangent). So dynamo does not look inside:
:func:`dual_forward_compiled` hands the model's parameters and buffers, the inputs and the tangents to
:func:`_dual_graph`, which is ``allow_in_graph`` (one node in dynamo's graph). AOTAutograd then runs that node
in Python with its functional / fake tensors (``torch.func.functional_call`` with the parameters and buffers
as inputs), and the dual forward's Python — rules, patches, hooks — executes once, leaving only the ATen ops it
dispatched: primal and tangent of every op in one graph with the loss, differentiated and partitioned like any
other graph (inductor fuses the pointwise tangent chains). The plan's recomputed blocks are tagged for
recomputation the way torch.compile checkpoints (:func:`sgflow.autodual.call._traced_checkpoint`), so the
partitioner recomputes them in backward; row slices do not apply.

What makes the dual forward traceable: under tracing, a DualTensor is a storage-less wrapper
(:func:`~sgflow.autodual.tensor.make_dual`) instead of an alias of its primal (a functional tensor cannot be
aliased by another subclass), and an input's tangent is always carried (its values are unknown).

A DualizedModel is found from inside the graph by an integer key (:data:`_MODELS`), registered outside dynamo
when it is created (:func:`register`).
"""
from __future__ import annotations

import itertools
import weakref

import torch
from torch import nn

__all__ = ["dual_forward_compiled", "register"]

# key -> DualizedModel; weak: a model that goes away takes its entry with it.
_MODELS: "weakref.WeakValueDictionary[int, nn.Module]" = weakref.WeakValueDictionary()
_KEYS = itertools.count()


def register(dual) -> int:
    """A key by which the traced graph finds ``dual`` (a DualizedModel); called by its constructor, which also
    marks :func:`_dual_graph` for dynamo here rather than at import: ``torch._dynamo`` takes seconds to import,
    and ``import sgflow`` should not pay them (a dual step imports it anyway)."""
    global _ALLOWED
    if not _ALLOWED:
        import torch._dynamo

        torch._dynamo.allow_in_graph(_dual_graph)
        _ALLOWED = True
    key = next(_KEYS)
    _MODELS[key] = dual
    return key


_ALLOWED = False  # _dual_graph marked allow_in_graph


class _DualCall(nn.Module):
    """``dual_call`` of ``model`` as a module forward, so that ``torch.func.functional_call`` can run it with
    the parameters and buffers given as inputs."""

    def __init__(self, model: nn.Module, blocks=(), save=None, keep=()):
        super().__init__()
        self.model = model
        self.blocks = tuple(blocks)
        self.save = save
        self.keep = frozenset(keep)

    def forward(self, t, u, x, t_dot, u_dot, x_dot):
        from sgflow.autodual.call import dual_call

        # The blocks are tagged for recomputation (call._traced_checkpoint), not sliced in rows.
        return dual_call(self.model, (t, u, x), (t_dot, u_dot, x_dot), self.blocks, save=self.save, keep=self.keep)


def _state_names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]


def _dual_graph(key: int, tensors: list, t, u, x, t_dot, u_dot, x_dot):
    """(f~, JVP f~) of the DualizedModel registered as ``key``, its parameters then buffers replaced by
    ``tensors`` (in ``named_parameters()``, ``named_buffers()`` order). One node of dynamo's graph (marked
    ``allow_in_graph`` by :func:`register`); run by AOTAutograd (and dynamo's own fake-tensor pass) with
    traced tensors."""
    dual = _MODELS.get(key)
    if dual is None:
        raise RuntimeError("sgflow.dualize: the dualized model of this compiled graph no longer exists")
    model = dual.module
    names = _state_names(model)
    if len(names) != len(tensors):
        raise RuntimeError(f"sgflow.dualize: {len(tensors)} parameters and buffers for a model that has {len(names)}")
    state = {"model." + n: v for n, v in zip(names, tensors)}
    call = _DualCall(model, dual.blocks, dual.save, getattr(dual, "keep", ()))
    return torch.func.functional_call(call, state, (t, u, x, t_dot, u_dot, x_dot))


def dual_forward_compiled(dual, t, u, x, t_dot, u_dot, x_dot):
    """What ``DualizedModel.dual_forward`` does while dynamo traces: one graph node (see module doc).
    Shapes as ``dual_forward``: t, u, t_dot, u_dot [B]; x, x_dot [B, *D]; returns (f~, JVP f~), [B, *D] each."""
    model = dual.module
    tensors = [*model.parameters(), *model.buffers()]
    return _dual_graph(dual._trace_key, tensors, t, u, x, t_dot, u_dot, x_dot)
