"""``sgflow.dualize(model)``: the :class:`DualizedModel` wrapper with ``dual_forward``, its per-op
:class:`DualReport`, and :func:`as_dual_model`, what the fused losses call (a DualizedModel with default
settings, built once per model and cached on it).

``dual_forward(t, u, x, t_dot, u_dot, x_dot)``: t, u, t_dot, u_dot [B]; x, x_dot [B, *D]; returns
(f~, JVP f~), both [B, *D], by :func:`sgflow.autodual.call.dual_call` with the blocks of
:mod:`sgflow.autodual.blocks` (``blocks="auto"``: chosen on the first training call by
:mod:`sgflow.autodual.plan`). Every name here is importable from :mod:`sgflow.autodual` too.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from sgflow.autodual.blocks import _WRAPPERS, _inner, candidate_blocks, select_blocks
from sgflow.autodual.call import _context_fn, dual_call
from sgflow.autodual import traced
from sgflow.autodual.tensor import outside_graph

__all__ = ["dualize", "DualizedModel", "DualReport", "as_dual_model"]


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


class DualizedModel(nn.Module):
    """A model with ``dual_forward`` through its own forward (see module doc). ``forward`` is the
    model's own; the parameters, buffers and state_dict keys are the model's (under ``module.``).

    Args:
        model: any ``nn.Module`` called as ``model(t, u, x)`` (a ``DistributedDataParallel`` too:
            its forward, and so its gradient sync, runs).
        blocks: which submodules are recomputed in backward (see :func:`dualize` and :func:`select_blocks`).
        budget: ``blocks="auto"``'s target, a fraction of flow matching's peak memory (both peaks estimated
            by the plan's profile).
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
            raise ValueError(f"dualize: budget must be a positive fraction of flow matching's peak memory, got {budget!r}")
        self.budget = float(budget)
        self.plan = None  # sgflow.autodual.plan.BlockPlan, once "auto" has profiled
        self.split_rows = bool(split_rows)
        self.strict_budget = bool(strict_budget)
        self.splits: dict = {}  # path -> RowSplit: recomputed blocks run in row slices (chosen by the plan)
        self.keep: frozenset = frozenset()  # recomputed blocks keeping their attention outputs (the plan's)
        _context_fn(save)  # validates
        self.save = save
        self.last_report: DualReport | None = None
        self._trace_key = traced.register(self)  # how a compiled graph finds this model (autodual/traced.py)

    def __setstate__(self, state):
        # A copy (deepcopy, pickle) registers itself: the original's key would find the original, or nothing.
        super().__setstate__(state)
        self._trace_key = traced.register(self)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def dual_forward(self, t, u, x, t_dot, u_dot, x_dot):
        """(f~(t,u,x), JVP of f~ in direction (t_dot, u_dot, x_dot)); t, u, t_dot, u_dot: [B], x, x_dot: [B, *D].

        Under ``torch.compile`` the dual forward is one node of the graph that AOTAutograd traces to ATen ops
        (:mod:`sgflow.autodual.traced`): no graph break; the plan's blocks are tagged for recomputation there
        (row slices do not apply)."""
        if self.auto and self.plan is None and torch.is_grad_enabled():
            if torch.compiler.is_compiling():
                _make_plan_outside_graph(self, t, u, x, t_dot, u_dot, x_dot)
            else:
                self.make_plan(t, u, x, t_dot, u_dot, x_dot)
        if torch.compiler.is_compiling() and not isinstance(self.module, _WRAPPERS):
            return traced.dual_forward_compiled(self, t, u, x, t_dot, u_dot, x_dot)
        record = self.last_report is None
        rows = {} if record else None
        out = dual_call(self.module, (t, u, x), (t_dot, u_dot, x_dot), self.blocks, rows, getattr(self, "save", None),
                        getattr(self, "splits", None), getattr(self, "keep", ()))
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

        from sgflow.autodual.plan import BudgetWarning, OverBudgetError
        from sgflow.autodual.profile import profile_blocks

        inner = _inner(self.module)
        plan = profile_blocks(inner, (t, u, x), (t_dot, u_dot, x_dot), candidate_blocks(inner),
                              lambda m, i, g: dual_call(m, i, g)[0], self.budget, self.split_rows)
        if not plan.meets_budget:
            msg = (f"dualize({type(inner).__name__}): no choice of recomputed blocks meets the budget of "
                   f"{self.budget}x flow matching's (estimated {plan.estimate() / max(plan.reference, 1):.2f}x); "
                   f"pass a larger budget, blocks=, or a smaller batch. The plan:\n{plan}")
            if self.strict_budget:
                raise OverBudgetError(msg)
            warnings.warn(msg, BudgetWarning, stacklevel=3)
        self.plan = plan
        self.blocks = list(self.plan.blocks)
        self.splits = dict(self.plan.splits)
        self.keep = frozenset(self.plan.keep)
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
            sub-blocks, at any depth, that free the most saved bytes per FLOP of recomputation, until the
            step's estimated peak memory is at most ``budget`` x flow matching's); or fixed, see
            :func:`select_blocks`.
        budget: ``"auto"``'s target, a fraction of flow matching's peak memory (default 0.5; both peaks
            estimated by the profile: :mod:`sgflow.autodual.plan`).
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
        dual = _new_dual_model(model)
    return dual


@outside_graph  # the profile runs the model on real tensors (one graph break, on the first call only)
def _make_plan_outside_graph(dual, *inputs):
    dual.make_plan(*inputs)


@outside_graph  # made outside a compiled graph (one graph break, on a model's first call only)
def _new_dual_model(model: nn.Module):
    dual = DualizedModel(model)
    model.__dict__[_CACHE_ATTR] = dual
    return dual
