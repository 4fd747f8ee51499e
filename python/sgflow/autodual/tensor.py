r"""The tangent-carrying tensor behind :func:`sgflow.dualize`, and the per-op dispatch.

A :class:`DualTensor` *is* its primal (an alias of the primal's storage, so ``.shape``, ``.dtype``,
``.device`` and every metadata query behave as usual) and carries the tangent in ``_tangent``. It
overrides ``__torch_function__``: every ``torch.*`` function, ``torch.nn.functional`` call and tensor
method that receives a DualTensor is routed to :func:`dispatch`, which computes

    (y, y_dot) = (op(x), J_op(x) x_dot)

from the unwrapped primals and tangents with ordinary tensor ops, so reverse-mode autograd records
both streams and the gradient flows *through* the tangent (reverse over forward), as SGFlow needs.
The rule an op takes (see :mod:`sgflow.autodual.rules`):

- a hand-written rule (conv/linear as two calls on one weight, the normalisation layers from explicit
  formulas, SDPA through the dual attention op, dropout with one mask for both streams, ...);
- ``linear``: ops linear in their tensor data (views, reshapes, cat, sums, pooling, interpolation):
  the tangent is the same op applied to the tangents;
- ``product``: multilinear ops (mul, matmul, einsum, ...): the product rule;
- ``pointwise``: explicit derivatives of common activations;
- ``nondiff``: outputs that carry no tangent (comparisons, ``*_like`` constructors, ``detach``);
- ``forward-ad``: anything else, through ``torch.func.jvp`` of that one op (PyTorch's own forward AD)
  with the normalisation layers and SDPA decomposed first (their PyTorch formulas are wrong or missing).

In-place ops on a DualTensor, Python control flow on its values (``bool``, ``item``) and ops with
neither a rule nor forward AD raise :class:`DualizeError` naming the op and the module path.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

__all__ = ["DualTensor", "DerivedValue", "DualizeError", "make_dual", "primal", "tangent", "is_dual", "is_traced", "dispatch",
           "op_name"]


class DualizeError(RuntimeError):
    """A network cannot be dualized as written (the message names the op and the module path)."""


@dataclass(slots=True)  # slots: a field not declared here cannot be set
class DualContext:
    """The state of one dual forward, every field declared: created and pushed by
    :func:`sgflow.autodual.call.dual_call` (:func:`dual_context`) for the call's duration, on its thread.

    Outside a dual forward (a block's recomputation in backward, on autograd's thread; plain code) there
    is none: :func:`current` then returns :data:`AT_REST`, whose fields the code only reads.
    """

    report: dict | None = None  # (path, op) -> rule, while the call records a report
    context_fn: Callable | None = None  # checkpoint context_fn of the blocks (selective saving)
    stack: list = field(default_factory=list)  # module paths of the forwards in progress
    in_block: bool = False  # inside a block's checkpointed forward (blocks do not nest)
    last_key: tuple | None = None  # (path, op) of the op being dispatched, for the report's rule entry
    traced: bool = False  # the dual forward is traced (sgflow.autodual.traced): its inputs are traced tensors


class _AtRest(DualContext):
    """The context where no dual forward runs: its fields read as the defaults and cannot be set (a
    write there would leak into every later call on every thread)."""

    __slots__ = ("_frozen",)

    def __init__(self):
        super().__init__(stack=())  # a tuple: nothing can be appended either
        object.__setattr__(self, "_frozen", True)

    def __setattr__(self, name, value):
        if getattr(self, "_frozen", False):
            raise AttributeError(f"sgflow.autodual: no dual forward runs on this thread; cannot set {name}")
        object.__setattr__(self, name, value)


AT_REST = _AtRest()  # the read-only stand-in where no dual forward runs
_LOCAL = threading.local()  # .ctx: this thread's DualContext in use, absent at rest
# .rec: the sgflow.autodual.tails.TailRecorder of the recomputed block running on this thread, if any
_TAILS = threading.local()


def current() -> DualContext:
    """This thread's dual-forward context (:data:`AT_REST` outside one)."""
    return getattr(_LOCAL, "ctx", None) or AT_REST


@contextlib.contextmanager
def dual_context(report: dict | None = None, context_fn: Callable | None = None, traced: bool = False):
    """Push a fresh :class:`DualContext` on this thread for one dual forward; the previous one (an
    enclosing dual call's, or none) is back afterwards."""
    prev = getattr(_LOCAL, "ctx", None)
    ctx = DualContext(report=report, context_fn=context_fn, traced=traced)
    _LOCAL.ctx = ctx
    try:
        yield ctx
    finally:
        _LOCAL.ctx = prev


def current_path() -> str:
    stack = current().stack
    return stack[-1] if stack else "<model>"


class DualTensor(torch.Tensor):
    """A primal tensor (this object aliases it) with its tangent in ``_tangent``; see module doc."""

    _primal: torch.Tensor
    _tangent: torch.Tensor

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return dispatch(func, args, kwargs or {})

    def __repr__(self):  # noqa: D105 - printing a dual tensor must not go through dispatch
        return f"DualTensor(primal={self._primal!r}, tangent={self._tangent!r})"


from torch._subclasses.fake_tensor import FakeTensor as _FakeTensor  # noqa: E402 - both loaded by torch itself
from torch._subclasses.functional_tensor import FunctionalTensor as _FunctionalTensor  # noqa: E402

_TRACE_TYPES = (_FunctionalTensor, _FakeTensor)


class _TracedDual(DualTensor):
    """A DualTensor made while a dual forward is traced (:mod:`sgflow.autodual.traced`): it holds no data, only
    the primal's metadata; every op on it reaches a rule through ``__torch_function__``. One that gets below
    it (to the dispatcher) is an error, never a silent computation on an empty tensor."""

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise DualizeError(f"sgflow.dualize: op {func} reached a traced dual tensor below __torch_function__ "
                           f"(in module '{current_path()}'); please report it with the network")


_VALUE_FUNCS = {getattr(torch.Tensor, n) for n in ("__bool__", "item", "tolist", "__int__", "__float__", "__index__",
                                                   "__complex__", "numpy", "__array__") if hasattr(torch.Tensor, n)}


class DerivedValue(torch.Tensor):
    """A tensor computed from a dual tensor's values without a tangent (a comparison, ``argmax``, a
    mask, ...). It behaves as a plain tensor, and so does everything computed from it, except that
    turning it into a Python value (``bool``, ``item``: an ``if`` on it) raises: the branch would be
    taken by the primal's value alone, and could differ when the block is recomputed in backward."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if any(issubclass(t, DualTensor) for t in types):
            return NotImplemented  # DualTensor's dispatch handles mixed calls (and unwraps this one)
        if func in _VALUE_FUNCS:
            raise fail(func, "Python control flow or a Python number taken from a value computed from a tensor that "
                             "carries a tangent (the branch follows the primal only, and can differ when the block "
                             "is recomputed in backward)",
                       "Compute on tensors (torch.where, masks as weights) or move the check outside the model's forward")
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **kwargs)
        return tree_map(lambda o: o.as_subclass(DerivedValue) if type(o) is torch.Tensor else o, out)


def make_dual(p: torch.Tensor, t: torch.Tensor) -> DualTensor:
    """Wrap primal ``p`` and tangent ``t`` (same shape) as a DualTensor."""
    if isinstance(p, DerivedValue):
        p = primal(p)
    if isinstance(p, DualTensor) or isinstance(t, DualTensor):
        raise DualizeError("nested dual tensors (a dual forward inside another) are not supported")
    if t.shape != p.shape:
        raise DualizeError(f"tangent of shape {tuple(t.shape)} for a primal of shape {tuple(p.shape)}")
    if is_traced(p) or is_traced(t):
        # AOTAutograd's functional tensors cannot be aliased by another subclass: a storage-less wrapper
        # with the primal's metadata (sgflow.autodual.traced).
        d = torch.Tensor._make_wrapper_subclass(_TracedDual, p.shape, strides=p.stride(), storage_offset=p.storage_offset(),
                                                dtype=p.dtype, device=p.device, requires_grad=False)
    else:
        d = p.as_subclass(DualTensor)
    d._primal = p
    d._tangent = t
    return d


def is_traced(x) -> bool:
    """Whether ``x`` is a tensor of a trace (AOTAutograd's functional tensor, dynamo's fake tensor): its values
    are unknown and it cannot be aliased by a DualTensor. Every tensor made inside such a trace is one of the
    two (an isinstance test: this runs twice per dual op)."""
    return isinstance(x, _TRACE_TYPES)


def is_dual(x: Any) -> bool:
    return isinstance(x, DualTensor)


def primal(x: Any) -> Any:
    """The primal of a DualTensor, a DerivedValue as a plain tensor, anything else unchanged."""
    if isinstance(x, DualTensor):
        return x._primal
    if isinstance(x, DerivedValue):
        with torch._C.DisableTorchFunctionSubclass():
            return x.as_subclass(torch.Tensor)
    return x


def tangent(x: Any) -> torch.Tensor | None:
    """The tangent of a DualTensor, None for anything else (a zero tangent)."""
    return x._tangent if isinstance(x, DualTensor) else None


def op_name(func: Callable) -> str:
    """A readable name: ``torch.nn.functional.conv2d``, ``Tensor.view``, ``Tensor.shape.__get__``."""
    self_obj = getattr(func, "__self__", None)
    if isinstance(self_obj, type) and issubclass(self_obj, torch.autograd.Function):
        return f"{self_obj.__qualname__}.apply"
    if func.__name__ == "__get__" and self_obj is not None:  # property getters of Tensor
        return f"Tensor.{getattr(self_obj, '__name__', '?')}"
    qual = getattr(func, "__qualname__", func.__name__)
    mod = getattr(func, "__module__", None) or ""
    if qual.startswith(("Tensor.", "TensorBase.", "_TensorBase.")):
        return "Tensor." + qual.split(".", 1)[1]
    if mod.startswith("torch._C._nn") or mod == "torch.nn.functional":
        return f"F.{func.__name__}"
    if mod.startswith("torch._C._linalg") or mod == "torch.linalg":
        return f"torch.linalg.{func.__name__}"
    if mod.startswith("torch._C._special") or mod == "torch.special":
        return f"torch.special.{func.__name__}"
    return f"torch.{func.__name__}" if mod.startswith("torch") else f"{mod}.{qual}"


# ---------------------------------------------------------------------------------------------
# Dispatch


_RULES: dict[Callable, Callable] = {}
_KIND: dict[Callable, str] = {}


def register(funcs, kind: str):
    """Decorator: ``rule(func, args, kwargs) -> result`` for each function in ``funcs``."""

    def deco(rule):
        for f in funcs:
            if f is None:
                continue
            if getattr(f, "__func__", None) is _apply:  # MyFunction.apply taken while the hook is on
                f = original_apply(f.__self__)
            _RULES[f] = rule
            _KIND[f] = kind
        return rule

    return deco


def rule_for(func) -> tuple[Callable, str]:
    """The rule an op takes and its kind (classified once per function, then cached)."""
    rule = _RULES.get(func)
    if rule is None:
        from sgflow.autodual import rules as _r  # noqa: F401 - importing installs the rule tables

        rule = _RULES.get(func)
        if rule is None:
            rule, kind = _r.classify(func)
            _RULES[func], _KIND[func] = rule, kind
    return rule, _KIND[func]


def dispatch(func, args, kwargs):
    """Route one op on DualTensors to its rule; record (module path, op) -> rule while recording."""
    rule, kind = rule_for(func)
    if kwargs.get("inplace") is True or kwargs.get("out") is not None:
        from sgflow.autodual import rules as _r

        rule, kind = _r.inplace, "in-place"
    ctx = current()
    report = ctx.report
    if report is not None and kind != "meta":
        key = (current_path(), op_name(func))
        old = report.get(key)
        if old is None:
            report[key] = kind
        elif kind not in old.split(" | "):
            report[key] = f"{old} | {kind}"
        ctx.last_key = key
    rec = getattr(_TAILS, "rec", None)
    if rec is not None and rec.recording:  # a recomputed block's forward: which outputs its recomputation needs
        from sgflow.autodual.tails import record

        return record(rec, rule, kind, func, args, kwargs)
    return rule(func, args, kwargs)


def note_rule(kind: str) -> None:
    """Let a rule name the special path it took for the op being dispatched (e.g. a fused op)."""
    ctx = current()
    report, key = ctx.report, ctx.last_key
    if report is not None and key is not None:
        report[key] = kind


def fail(func, why: str, hint: str = "") -> DualizeError:
    msg = f"sgflow.dualize: op {op_name(func)} in module '{current_path()}': {why}"
    return DualizeError(msg + (f". {hint}" if hint else ""))


# ---------------------------------------------------------------------------------------------
# Helpers shared by the rules


def has_dual(args, kwargs=None) -> bool:
    """Whether any leaf of ``(args, kwargs)`` is a DualTensor. Plain tuples, lists and dicts are walked
    here, not with pytree: this runs for every module call and Function.apply of a dual forward."""
    return _has_dual(args) or (bool(kwargs) and _has_dual(kwargs))


def _has_dual(a) -> bool:
    t = type(a)
    if t is tuple or t is list:
        return any(_has_dual(x) for x in a)
    if t is dict:
        return any(_has_dual(x) for x in a.values())
    if isinstance(a, DualTensor):
        return True
    if t is torch.Size or not isinstance(a, (tuple, list, dict)):
        return False
    return any(isinstance(x, DualTensor) for x in tree_flatten(a)[0])  # namedtuples and other containers


def unwrap_primals(tree):
    """``tree`` with every DualTensor replaced by its primal. Plain tuples, lists and dicts are walked
    here (cheaper than pytree for the small argument structures of one op, e.g. a shape tuple);
    other containers (namedtuples, ...) go through pytree."""
    t = type(tree)
    if t is tuple or t is list:
        return t(unwrap_primals(a) for a in tree)
    if t is dict:
        return {k: unwrap_primals(a) for k, a in tree.items()}
    if t is torch.Size or not isinstance(tree, (tuple, list, dict)):
        return primal(tree)
    return tree_map(primal, tree)


def wrap_outputs(out, out_tangent):
    """Pair primal outputs with their tangents (a pytree of the same structure, None = no tangent)."""
    if isinstance(out, torch.Tensor):
        if out_tangent is None or not (out.is_floating_point() or out.is_complex()):
            return out
        return make_dual(out, out_tangent)
    flat_o, spec = tree_flatten(out)
    flat_t, _ = tree_flatten(out_tangent, is_leaf=lambda x: x is None)
    if len(flat_t) != len(flat_o):
        return out
    wrapped = [wrap_outputs(o, t) if isinstance(o, torch.Tensor) else o for o, t in zip(flat_o, flat_t)]
    return tree_unflatten(wrapped, spec)


class _FlatSpec(tuple):
    """The spec of arguments that are already flat: ``(number of positional args, keyword names)``."""


def _flat_leaf(a) -> bool:
    """A leaf pytree would not split, or a tuple/list of plain values (a shape): no tensor inside."""
    t = type(a)
    if t is tuple or t is list or t is torch.Size:
        return not any(isinstance(x, (torch.Tensor, tuple, list, dict)) for x in a)
    return not isinstance(a, (tuple, list, dict))


def dual_leaves(args, kwargs):
    """(flat leaves, spec, indices of the DualTensor leaves). Arguments holding no tensor in a container
    (most ops: tensors, numbers, a shape) are flat already: their spec is a :class:`_FlatSpec` (pytree's
    flatten and unflatten were ~15% of a small network's dual-forward host time)."""
    if all(_flat_leaf(a) for a in args) and all(_flat_leaf(a) for a in kwargs.values()):
        flat = [*args, *kwargs.values()]
        spec = _FlatSpec((len(args), tuple(kwargs)))
    else:
        flat, spec = tree_flatten((args, kwargs))
    idx = [i for i, a in enumerate(flat) if isinstance(a, DualTensor)]
    return flat, spec, idx


def unflatten_args(flat, spec):
    """``(args, kwargs)`` from leaves and a spec of :func:`dual_leaves`."""
    if type(spec) is _FlatSpec:
        n, keys = spec
        return tuple(flat[:n]), dict(zip(keys, flat[n:]))
    return tree_unflatten(flat, spec)


def call_flat(func, flat, spec):
    a, k = unflatten_args(flat, spec)
    return func(*a, **k)


# ---------------------------------------------------------------------------------------------
# Custom autograd Functions: Function.apply does not go through __torch_function__, so a Function
# applied to dual tensors would run its forward on them without a graph (gradients silently lost).

# Whatever object the class holds (a Python classmethod up to torch 2.13, a C classmethod_descriptor
# from 2.14): both are descriptors, so only ``__get__`` is used, never a version's private attribute.
_ORIG_APPLY = torch.autograd.Function.__dict__["apply"]
_HOOK_LOCK = threading.Lock()
_HOOK_DEPTH = 0


def original_apply(cls):
    """``cls.apply`` as PyTorch defines it (the key a rule for a custom Function is registered under)."""
    return _ORIG_APPLY.__get__(None, cls)


def outside_graph(fn):
    """``fn`` run eagerly, never traced by dynamo (a graph break where compiled code calls it), as
    ``torch.compiler.disable(fn)``, but through ``torch._disable_dynamo`` where torch has it: that imports
    ``torch._dynamo`` (seconds) on the first call instead of at ``import sgflow``."""
    lazy = getattr(torch, "_disable_dynamo", None)
    return lazy(fn) if lazy is not None else torch.compiler.disable(fn)


def _call_original(cls, args, kwargs):
    return original_apply(cls)(*args, **kwargs)


if not isinstance(_ORIG_APPLY, classmethod):
    # torch 2.14: dynamo cannot trace ``classmethod_descriptor.__get__`` (an InternalTorchDynamoError when a
    # compiled dual forward applies a Function on plain tensors, e.g. a recomputed layer_norm's); the plain
    # apply then runs eagerly (a graph break inside the network, where breaks are allowed).
    _call_original = outside_graph(_call_original)


def _apply(cls, *args, **kwargs):
    if has_dual(args, kwargs):
        # Its registered rule, or (through the forward-AD rule) its own jvp; an error otherwise.
        return dispatch(original_apply(cls), args, kwargs)
    return _call_original(cls, args, kwargs)


@contextlib.contextmanager
def function_hook():
    """Route ``torch.autograd.Function.apply`` on dual tensors to the dual dispatch while a dual
    forward (or a block's recomputation in backward) runs; plain tensors take the original apply.
    Outside those regions ``Function.apply`` is PyTorch's own (nothing changes for compiled or other
    code). Re-entrant and shared by threads (a depth count under a lock)."""
    global _HOOK_DEPTH
    with _HOOK_LOCK:
        if _HOOK_DEPTH == 0:
            torch.autograd.Function.apply = classmethod(_apply)
        _HOOK_DEPTH += 1
    try:
        yield
    finally:
        with _HOOK_LOCK:
            _HOOK_DEPTH -= 1
            if _HOOK_DEPTH == 0:
                torch.autograd.Function.apply = _ORIG_APPLY
