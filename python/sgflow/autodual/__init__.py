r"""``sgflow.dualize(model)``: the fused SGFlow path for any network, through its own ``forward``.

    dual = sgflow.dualize(model)                  # or just sgflow.fused_loss(model, x1)
    f, f_dot = dual.dual_forward(t, u, x, t_dot, u_dot, x_dot)   # f~ and its JVP

How: the inputs t, u, x become :class:`DualTensor`\ s (the primal, carrying its tangent) and the
model is called as usual — through ``model.__call__``, so forward hooks, adapters living in
``forward``, parameter wrappers and ``DistributedDataParallel.forward`` all run. Every torch op the
forward makes on a DualTensor is routed to a dual rule (:mod:`sgflow.autodual.rules`) that returns
the primal and the tangent as ordinary tensors, so autograd records both and the gradient flows
through the tangent (reverse over forward), as the SGFlow loss needs.

Memory: each recomputed *block* runs under ``torch.utils.checkpoint`` (non-reentrant): it keeps
only its inputs (primal and tangent) and recomputes its dual forward in backward, with the RNG state
(dropout masks) and autocast state of the forward replayed. Which blocks: by default chosen on the
first training call by a profile of the candidates (:mod:`sgflow.autodual.plan`), or fixed with
``blocks=`` (:func:`select_blocks`). Non-reentrant checkpointing finds every tensor
the block reads through autograd itself, so parameters reached through hooks or module attributes
get their gradients without being listed anywhere.

Shapes: t, u, t_dot, u_dot: [B]; x, x_dot: [B, *D]; returns (f~, JVP f~), both [B, *D].
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from sgflow.autodual import rules as _rules  # noqa: F401 - installs the rule tables
from sgflow.autodual.tensor import (
    STATE,
    DualizeError,
    DualTensor,
    is_dual,
    make_dual,
    primal,
    function_hook,
    recording,
    register,
    tangent,
)


__all__ = [
    "dualize", "DualizedModel", "DualizeError", "DualTensor", "DualReport", "select_blocks", "dual_call",
    "register_rule", "make_dual", "primal", "tangent", "is_dual", "as_dual_model", "candidate_blocks",
]

_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict)
_WRAPPERS = (nn.parallel.DistributedDataParallel, nn.DataParallel)


def register_rule(*funcs: Callable, kind: str = "rule:user"):
    """Decorator registering ``rule(func, args, kwargs)`` as the dual rule of ``funcs``.

    The rule receives the op's arguments (DualTensors among them; ``sgflow.autodual.primal`` /
    ``tangent`` unwrap them) and returns the result with ``make_dual(y, y_dot)`` where it has a tangent.
    """
    return register(funcs, kind)


def _inner(model: nn.Module) -> nn.Module:
    while isinstance(model, _WRAPPERS):
        model = model.module
    return model


def _is_plain_container(m: nn.Module) -> bool:
    """ModuleList/ModuleDict, and an exact nn.Sequential of composite modules (a trunk of blocks); a
    Sequential of leaf layers (Linear -> SiLU -> Linear) is one block."""
    if isinstance(m, _CONTAINERS):
        return True
    return type(m) is nn.Sequential and any(any(True for _ in c.children()) for c in m.children())


def select_blocks(model: nn.Module, blocks="auto") -> list[str]:
    """Module paths (relative to the unwrapped model) that are recomputed in backward.

    ``blocks``:
      - ``"all"``: the blocks of the network, found through any nesting: the outermost submodules
        with parameters, looking into plain containers (``nn.ModuleList``/``ModuleDict`` and exact
        ``nn.Sequential`` trunks of composite modules) and through *wrappers* (a composite child
        holding at least :data:`WRAPPER_SHARE` of its parent's parameters is looked into: the backbone
        ``self.net`` of the thin ``forward(t, u, x)`` module around it): residual blocks, attention blocks, transformer blocks, the
        time-embedding MLP, the in/out layers. A wrapper's own small layers are blocks too;
      - ``"auto"``: the same list here; :class:`DualizedModel` replaces it on its first training
        call by the blocks its profile chooses among :func:`candidate_blocks` (any depth;
        :mod:`sgflow.autodual.plan`);
      - ``"none"`` / ``None``: no recomputation (every intermediate is kept: fastest, most memory);
      - a sequence of module types: the outermost submodules of those types;
      - a sequence of module paths (``"blocks.0"``, ``"input_blocks.3"``);
      - a callable ``(path, module) -> bool``: the outermost submodules it accepts.
    """
    model = _inner(model)
    if blocks is None or blocks == "none":
        return []
    if isinstance(blocks, str) and blocks not in ("auto", "all"):
        raise ValueError(f"dualize: blocks must be 'auto', 'all', 'none', a callable, module types or module paths "
                         f"(a list), got {blocks!r}")
    if isinstance(blocks, str):
        return _frontier(model)
    if callable(blocks) and not isinstance(blocks, type):
        accept = blocks
    else:
        items = list(blocks)
        if all(isinstance(b, str) for b in items):
            names = dict(model.named_modules())
            missing = [b for b in items if b not in names or b == ""]
            if missing:
                raise ValueError(f"dualize: blocks {missing} are not submodule paths of {type(model).__name__}")
            return items
        if not all(isinstance(b, type) and issubclass(b, nn.Module) for b in items):
            raise TypeError("dualize: blocks must be 'auto', 'all', 'none', a callable, module types or module paths")
        types = tuple(items)

        def accept(path, m):
            return isinstance(m, types)

    chosen: list[str] = []

    def walk(m: nn.Module, prefix: str):
        for name, child in m.named_children():
            path = f"{prefix}.{name}" if prefix else name
            if accept(path, child):
                chosen.append(path)
            else:
                walk(child, path)

    walk(model, "")
    return chosen


# A composite child holding at least this share of a module's parameters makes the module a wrapper
# (``select_blocks(..., "all")`` looks through it): a thin flow-map wrapper around a backbone (100%), a
# backbone whose block list holds nearly all its weights. A residual block's largest stage holds 40-70%.
WRAPPER_SHARE = 0.9


def _n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _trunk(m: nn.Module, child: nn.Module) -> bool:
    """Whether ``child`` (composite) holds at least :data:`WRAPPER_SHARE` of ``m``'s parameters: ``m`` is
    then a wrapper around it, and the blocks are inside ``child``. (Not asked of a plain container: a
    container whose one block holds all its parameters is a list of that one block.)"""
    total = _n_params(m)
    return total > 0 and any(True for _ in child.children()) and _n_params(child) >= WRAPPER_SHARE * total


def _frontier(model: nn.Module) -> list[str]:
    """``blocks="all"``: the outermost blocks with parameters, looking into plain containers and through
    wrappers (a child holding nearly all its parent's parameters is looked into, not taken whole)."""
    chosen: list[str] = []

    def walk(m: nn.Module, prefix: str):
        for name, child in m.named_children():
            path = f"{prefix}.{name}" if prefix else name
            if not any(True for _ in child.parameters()):
                continue
            if _is_plain_container(child) or (not _is_plain_container(m) and _trunk(m, child)):
                walk(child, path)
            else:
                chosen.append(path)

    walk(model, "")
    return chosen


_LINEAR_MAPS = (nn.Linear, nn.modules.conv._ConvNd, nn.Embedding)


def _auto_accept(path, m) -> bool:
    return not _is_plain_container(m) and any(True for _ in m.parameters())


def candidate_blocks(model: nn.Module) -> dict:
    """What ``blocks="auto"`` chooses from: ``{path: parent}`` at any depth, each candidate followed by
    the candidates inside it (``parent``: the nearest enclosing candidate, ``None`` at the top).

    Candidates: the blocks of ``blocks="all"`` (:func:`select_blocks`: through containers and wrappers),
    the wrappers it looked through (recomputing a whole backbone is a choice too), and every composite
    submodule with parameters inside them (a residual block's stages, a transformer block's attention
    and MLP; through ModuleLists inside ModuleLists and ``nn.Sequential`` trunks), so that the plan can
    recompute a whole block or only the parts of it that pay, and the single layers with parameters
    inside them (a norm layer keeps more than its input), except linear maps (``nn.Linear``,
    convolutions, embeddings: recomputed alone they free nothing, keeping their input either way) where
    they are not blocks of ``"all"``."""
    model = _inner(model)
    frontier = set(_frontier(model))
    out: dict = {}

    def walk(m: nn.Module, prefix: str, parent):
        for name, child in m.named_children():
            path = f"{prefix}.{name}" if prefix else name
            if not any(True for _ in child.parameters()):
                continue
            if (path in frontier or not isinstance(child, _LINEAR_MAPS)) and not _is_plain_container(child):
                out[path] = parent
                walk(child, path, path)
            else:
                walk(child, path, parent)

    walk(model, "", None)
    return out


@dataclass
class DualReport:
    """Which rule each op of the last recorded dual forward took, per module path."""

    rows: dict = field(default_factory=dict)  # (path, op) -> kind
    blocks: list = field(default_factory=list)

    def fallbacks(self) -> list[tuple[str, str]]:
        """(path, op) of the ops that went through PyTorch's forward AD (no sgflow rule)."""
        return sorted(k for k, v in self.rows.items() if v == "forward-ad")

    def kinds(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for v in self.rows.values():
            out[v] = out.get(v, 0) + 1
        return dict(sorted(out.items()))

    def __str__(self):
        lines = [f"{'module':<40} {'op':<36} rule", "-" * 90]
        for (path, op), kind in sorted(self.rows.items()):
            lines.append(f"{path:<40} {op:<36} {kind}")
        lines.append("-" * 90)
        lines.append(f"{len(self.blocks)} recomputed blocks; rules: {self.kinds()}")
        return "\n".join(lines)


@contextlib.contextmanager
def patched_forwards(wrapping):
    """Replace ``module.forward`` by ``make(module.forward)`` on the instances of ``wrapping`` (pairs
    ``(module, make)``) for the duration of the block, then put back exactly what was there (an
    instance attribute of the user's own, or none)."""
    saved = []
    for mod, make in wrapping:
        saved.append((mod, "forward" in mod.__dict__, mod.__dict__.get("forward")))
        mod.forward = make(mod.forward)
    try:
        yield
    finally:
        for mod, had, prev in saved:
            if had:
                mod.forward = prev
            else:
                del mod.forward


@contextlib.contextmanager
def _patched(model: nn.Module, blocks: Sequence[str], splits: dict | None = None):
    """Route every submodule's forward through a wrapper that tracks the module path (for error
    messages and the report) and runs the chosen blocks under non-reentrant checkpointing (in row
    slices where ``splits`` has a :class:`~sgflow.autodual.plan.RowSplit` for them).

    Patches live on the instances only for the duration of one dual forward: a model copied later
    (EMA, deepcopy) never sees them, and the recomputation in backward calls the original forwards.
    """
    inner = _inner(model) if isinstance(model, nn.Module) else None
    block_set = set(blocks)
    modules = inner.named_modules() if inner is not None else ()
    splits = splits or {}
    with patched_forwards((mod, functools.partial(_wrap_forward, path=path or "<model>", is_block=path in block_set,
                                                  split=splits.get(path)))
                          for path, mod in modules):
        yield


def _any_dual(args, kwargs) -> bool:
    from sgflow.autodual.tensor import has_dual

    return has_dual(args, kwargs)


def _wrap_forward(orig, path: str, is_block: bool, split=None):
    @functools.wraps(orig)
    def forward(*args, **kwargs):
        STATE.stack.append(path)
        try:
            if is_block and not getattr(STATE, "in_block", False) and torch.is_grad_enabled() and _any_dual(args, kwargs):
                STATE.in_block = True
                try:
                    slices = _row_slices(split, args, kwargs) if split is not None else None
                    if slices is None:
                        return _checkpointed(orig, args, kwargs)
                    return _cat_rows([_checkpointed(orig, a, k) for a, k in slices], path)
                finally:
                    STATE.in_block = False
            return orig(*args, **kwargs)
        finally:
            STATE.stack.pop()

    return forward


def _checkpointed(orig, args, kwargs):
    """``orig(*args, **kwargs)`` under non-reentrant checkpointing, every DualTensor crossing the checkpoint
    boundary as its two plain tensors (primal, tangent), in and out. Checkpoint keeps its inputs as saved
    tensors: under a saved-tensor hook of the caller's (a memory meter, offloading) a DualTensor came back
    from it as a plain tensor, so the block was recomputed without its tangent (a checkpoint error at
    best)."""
    from torch.utils._pytree import tree_flatten, tree_unflatten

    flat, spec = tree_flatten((args, kwargs))
    plain, layout = _to_plain(flat)
    out_layout = []

    def run(*tensors):
        a, k = tree_unflatten(_from_plain(tensors, layout), spec)
        oflat, ospec = tree_flatten(orig(*a, **k))
        result, olayout = _to_plain(oflat)
        out_layout[:] = [(olayout, ospec)]
        return tuple(result)

    ctx_fn = STATE.context_fn
    extra = {} if ctx_fn is None else {"context_fn": ctx_fn}
    res = checkpoint(_hooked(run), *plain, use_reentrant=False, preserve_rng_state=True, **extra)
    olayout, ospec = out_layout[0]
    return tree_unflatten(_from_plain(res, olayout), ospec)


def _to_plain(flat):
    """Leaves -> (plain tensors, layout): a DualTensor becomes (primal, tangent); non-tensors stay in the
    layout as constants."""
    plain, layout = [], []
    for a in flat:
        if isinstance(a, DualTensor):
            plain += [a._primal, a._tangent]
            layout.append("dual")
        elif isinstance(a, torch.Tensor):
            plain.append(a)
            layout.append("tensor")
        else:
            layout.append(("const", a))
    return plain, tuple(layout)


def _from_plain(tensors, layout):
    it = iter(tensors)
    leaves = []
    for kind in layout:
        if kind == "dual":
            p = next(it)
            leaves.append(make_dual(p, next(it)))
        elif kind == "tensor":
            leaves.append(next(it))
        else:
            leaves.append(kind[1])
    return leaves


def _row_slices(split, args, kwargs):
    """``split.chunks`` pairs (args, kwargs), the inputs ``split`` names sliced along dim 0; None where
    this call does not fit the layout the profile saw (then the block runs whole, as recomputed blocks
    always may)."""
    named = [args[i] for i in split.args if i < len(args)] + [kwargs[k] for k in split.kwargs if k in kwargs]
    if not named or not all(isinstance(a, torch.Tensor) and a.dim() >= 1 for a in named):
        return None
    n = named[0].shape[0]
    if n < split.chunks or any(a.shape[0] != n for a in named):
        return None
    bounds = [n * j // split.chunks for j in range(split.chunks + 1)]
    return [([a.narrow(0, lo, hi - lo) if i in split.args else a for i, a in enumerate(args)],
             {k: a.narrow(0, lo, hi - lo) if k in split.kwargs else a for k, a in kwargs.items()})
            for lo, hi in zip(bounds[:-1], bounds[1:])]


def _cat_rows(outs, path: str):
    """The row slices' outputs (same structure, tensors or None) concatenated along dim 0."""
    from torch.utils._pytree import tree_flatten, tree_unflatten

    flat = [tree_flatten(o) for o in outs]
    spec = flat[0][1]
    if any(f[1] != spec for f in flat):
        raise DualizeError(f"dualize: block {path!r} returned differently structured outputs for two row slices; "
                           f"pass split_rows=False to dualize")
    leaves = []
    for parts in zip(*(f[0] for f in flat)):
        if all(p is None for p in parts):
            leaves.append(None)
        elif all(isinstance(p, torch.Tensor) and p.dim() >= 1 for p in parts):
            leaves.append(torch.cat(list(parts)))
        else:
            raise DualizeError(f"dualize: block {path!r}, run in row slices, returned an output that is not rows "
                               f"of a tensor; pass split_rows=False to dualize")
    return tree_unflatten(leaves, spec)


# ATen ops whose outputs a block keeps with save="matmul" (recomputing them costs FLOPs; the
# elementwise rest of the block is recomputed from them in backward).
_MATMUL_OPS = None


def _matmul_ops():
    global _MATMUL_OPS
    if _MATMUL_OPS is None:
        a = torch.ops.aten
        _MATMUL_OPS = {a.convolution.default, a.mm.default, a.addmm.default, a.bmm.default, a.baddbmm.default,
                       a._scaled_dot_product_flash_attention_for_cpu.default}
    return _MATMUL_OPS


def _save_matmul_policy(ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.MUST_SAVE if op in _matmul_ops() else CheckpointPolicy.PREFER_RECOMPUTE


def _context_fn(save):
    if save is None or save == "none":
        return None
    if save == "matmul":
        from torch.utils.checkpoint import create_selective_checkpoint_contexts

        return functools.partial(create_selective_checkpoint_contexts, _save_matmul_policy)
    raise ValueError(f"dualize: save must be None or 'matmul', got {save!r}")


def _hooked(fn):
    """``fn`` with custom autograd Functions routed to the dual dispatch: in forward the dual call has
    the hook on already; this keeps it on for the block's recomputation in backward."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        with function_hook():
            return fn(*args, **kwargs)

    return run


def _zero_tangent(t: torch.Tensor | None) -> bool:
    """Whether an input's tangent is known to be zero (the input is then passed as a plain tensor).
    Compiled, a zero-valued tangent is carried instead: testing the values is a graph break."""
    if t is None:
        return True
    if t.requires_grad or torch.compiler.is_compiling():
        return False
    return not bool(t.any())


def _check_tangents(inputs, tangents) -> None:
    """Each tangent: None, or a floating tensor of its input's shape on its input's device (another
    floating dtype is cast to the input's). Inputs that are not tensors are left to the forward's checks."""
    if len(inputs) != len(tangents):
        raise ValueError(f"dualize: {len(tangents)} tangents for {len(inputs)} inputs")
    names = ("t", "u", "x") if len(inputs) == 3 else tuple(f"input {i}" for i in range(len(inputs)))
    for name, x, t in zip(names, inputs, tangents):
        if t is None or not isinstance(x, torch.Tensor):
            continue
        dot = f"{name}_dot" if len(name) == 1 else f"the tangent of {name}"
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"dualize: {dot} must be a tensor of {name}'s shape {tuple(x.shape)} or None, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"dualize: {dot} must be a floating-point tensor, got dtype {t.dtype}")
        if t.shape != x.shape:
            raise ValueError(f"dualize: {dot} must have {name}'s shape {tuple(x.shape)}, got {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"dualize: {dot} is on {t.device} but {name} is on {x.device}")


def dual_call(model: nn.Module, inputs: Sequence[torch.Tensor], tangents: Sequence[torch.Tensor | None],
              blocks: Sequence[str] = (), report: dict | None = None, save=None, splits: dict | None = None):
    """``model(*inputs)`` and its JVP along ``tangents`` through the model's own forward.

    Inputs with a zero (or None) tangent are passed as plain tensors. Returns ``(out, out_dot)``;
    ``out_dot`` is zeros when the output does not depend on the dual inputs.
    """
    _check_tangents(inputs, tangents)
    args = [x if _zero_tangent(t) else make_dual(x, t.to(x.dtype)) for x, t in zip(inputs, tangents)]
    prev = STATE.context_fn
    STATE.context_fn = _context_fn(save)
    try:
        with _patched(model, blocks, splits), recording(report), function_hook():
            out = model(*args)
    finally:
        STATE.context_fn = prev
    if isinstance(out, DualTensor):
        return out._primal, out._tangent
    if isinstance(out, torch.Tensor):
        return out, torch.zeros_like(out)
    raise DualizeError(f"dualize: the model must return one tensor, got {type(out).__name__}")


class DualizedModel(nn.Module):
    """A model with ``dual_forward`` through its own forward (see module doc). ``forward`` is the
    model's own; the parameters, buffers and state_dict keys are the model's (under ``module.``).

    Args:
        model: any ``nn.Module`` called as ``model(t, u, x)`` (a ``DistributedDataParallel`` too:
            its forward, and so its gradient sync, runs).
        blocks: which submodules are recomputed in backward (see :func:`dualize` and :func:`select_blocks`).
        budget: ``blocks="auto"``'s target, a fraction of the plain forward's saved bytes.
        split_rows: whether ``blocks="auto"`` may run recomputed blocks in row slices of the batch.
        strict_budget: where no choice of ``blocks="auto"`` meets the budget, raise
            :class:`~sgflow.autodual.plan.OverBudgetError` (default False: one
            :class:`~sgflow.autodual.plan.BudgetWarning` with the plan's table, and the plan with the lowest
            estimate is used).
    """

    def __init__(self, model: nn.Module, blocks="auto", save=None, budget: float = 0.5, split_rows: bool = True,
                 strict_budget: bool = False):
        super().__init__()
        if isinstance(model, DualizedModel):
            model = model.module
        self.module = model
        self.blocks = select_blocks(model, blocks)
        self.auto = isinstance(blocks, str) and blocks == "auto"
        if not (isinstance(budget, (int, float)) and budget > 0):
            raise ValueError(f"dualize: budget must be a positive fraction of the plain forward's saved bytes, got {budget!r}")
        self.budget = float(budget)
        self.plan = None  # sgflow.autodual.plan.BlockPlan, once "auto" has profiled
        self.split_rows = bool(split_rows)
        self.strict_budget = bool(strict_budget)
        self.splits: dict = {}  # path -> RowSplit: recomputed blocks run in row slices (chosen by the plan)
        _context_fn(save)  # validates
        self.save = save
        self.last_report: DualReport | None = None

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def dual_forward(self, t, u, x, t_dot, u_dot, x_dot):
        """(f~(t,u,x), JVP of f~ in direction (t_dot, u_dot, x_dot)); t, u, t_dot, u_dot: [B], x, x_dot: [B, *D]."""
        if self.auto and self.plan is None and torch.is_grad_enabled() and not torch.compiler.is_compiling():
            self.make_plan(t, u, x, t_dot, u_dot, x_dot)
        record = self.last_report is None
        rows = {} if record else None
        out = dual_call(self.module, (t, u, x), (t_dot, u_dot, x_dot), self.blocks, rows, getattr(self, "save", None),
                        getattr(self, "splits", None))
        if record:
            self.last_report = DualReport(rows, list(self.blocks))
        return out

    def make_plan(self, t, u, x, t_dot, u_dot, x_dot):
        """Profile the candidate blocks on these inputs and recompute the ones that pay
        (:mod:`sgflow.autodual.plan`); ``blocks="auto"`` does this on its first training call.
        Returns the :class:`~sgflow.autodual.plan.BlockPlan` (also kept as ``self.plan``).

        Where no choice meets the budget: one :class:`~sgflow.autodual.plan.BudgetWarning` holding the
        plan's table (the plan with the lowest estimate is used), or with ``strict_budget``
        :class:`~sgflow.autodual.plan.OverBudgetError` (no plan is kept)."""
        import warnings

        from sgflow.autodual.plan import BudgetWarning, OverBudgetError, profile_blocks

        inner = _inner(self.module)
        plan = profile_blocks(inner, (t, u, x), (t_dot, u_dot, x_dot), candidate_blocks(inner),
                              lambda m, i, g: dual_call(m, i, g)[0], self.budget, self.split_rows)
        if not plan.meets_budget:
            msg = (f"dualize({type(inner).__name__}): no choice of recomputed blocks meets the budget of "
                   f"{self.budget}x the plain forward's saved bytes (estimated {plan.estimate() / max(plan.plain_total, 1):.2f}x); "
                   f"pass a larger budget, blocks=, or a smaller batch. The plan:\n{plan}")
            if self.strict_budget:
                raise OverBudgetError(msg)
            warnings.warn(msg, BudgetWarning, stacklevel=3)
        self.plan = plan
        self.blocks = list(self.plan.blocks)
        self.splits = dict(self.plan.splits)
        return self.plan

    def report(self, t=None, u=None, x=None) -> DualReport:
        """Per module path, which rule each op took (``forward-ad``: no sgflow rule, PyTorch's own
        forward AD). With example inputs, runs one dual forward to record it; else the first one's."""
        if x is not None:
            self.last_report = None
            t_dot = torch.ones_like(t)
            with torch.no_grad():
                self.dual_forward(t, u, x, t_dot, torch.zeros_like(u), torch.randn_like(x))
        if self.last_report is None:
            raise RuntimeError("no dual forward recorded yet: pass example (t, u, x) to report()")
        return self.last_report


def dualize(model: nn.Module, blocks="auto", save=None, budget: float = 0.5, split_rows: bool = True,
            strict_budget: bool = False) -> DualizedModel:
    """Give any network the fused dual path through its own forward (see :mod:`sgflow.autodual`).

    Args:
        model: an ``nn.Module`` called as ``model(t, u, x) -> f~`` (t, u: [B]; x and f~: [B, *D]),
            built from ``torch.nn`` modules and ``torch.nn.functional`` / tensor ops.
        blocks: which submodules are recomputed in backward. ``"auto"`` (default): chosen by
            measurement on the first training call (:mod:`sgflow.autodual.plan`: the blocks and
            sub-blocks, at any depth, that free the most saved bytes per FLOP of recomputation, until the dual
            forward keeps at most ``budget`` x what the plain forward keeps); or fixed, see
            :func:`select_blocks`.
        budget: ``"auto"``'s target, a fraction of the plain forward's saved bytes (default 0.5).
        split_rows: whether ``"auto"`` may also run the largest recomputed blocks in 2 or 4 row slices of
            the batch (each its own checkpoint, so one slice's intermediates are live in backward),
            where recomputing is not enough for the budget. Only blocks the profile finds to map rows
            to rows, without random draws, are split.
        strict_budget: where no choice of ``"auto"`` meets the budget, raise
            :class:`sgflow.autodual.plan.OverBudgetError` on the first training call; by default one
            :class:`sgflow.autodual.plan.BudgetWarning` (with the plan's table) is issued and the
            choice with the lowest estimate is used.
        save: what a block keeps besides its inputs. ``None``: nothing (its whole dual forward is
            recomputed in backward: least memory); ``"matmul"``: the outputs of its convolutions and
            matrix products (selective checkpointing: backward recomputes only the elementwise ops;
            less time, more memory).

    Returns:
        A :class:`DualizedModel` that ``sgflow.fused_loss``, ``fused_meanflow_loss`` and the trainer
        accept. ``sgflow.fused_loss(model, x1)`` on a plain model does this once per model itself.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"dualize expects an nn.Module, got {type(model).__name__}")
    return DualizedModel(model, blocks, save, budget, split_rows, strict_budget)


_CACHE_ATTR = "_sgflow_dualized"


def as_dual_model(model: nn.Module):
    """What the fused losses call: ``model`` itself if it has ``dual_forward`` (a DualizedModel, or a
    network that defines its own) and is not wrapped for data parallel; otherwise a DualizedModel with
    default settings, built once per model and kept in the model's ``__dict__`` (not a submodule:
    parameters and state_dict are unchanged)."""
    if isinstance(model, DualizedModel):
        return model
    if not isinstance(model, _WRAPPERS) and hasattr(model, "dual_forward"):
        return model
    if not isinstance(model, nn.Module):
        raise TypeError(f"the fused losses need an nn.Module (called as model(t, u, x)), got {type(model).__name__}")
    dual = model.__dict__.get(_CACHE_ATTR)
    if dual is None or dual.module is not model:
        dual = DualizedModel(model)
        model.__dict__[_CACHE_ATTR] = dual
    return dual
