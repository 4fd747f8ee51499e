r"""``dualize(model, blocks="auto")``: which blocks to recompute, chosen by measurement.

Recomputing a block in backward trades its saved activations (the dual forward keeps primal *and*
tangent intermediates, about twice what flow matching keeps) for its inputs plus one more dual forward
of it. Which blocks are worth it depends on the network and the batch: a 32x32 residual block keeps
many bytes per FLOP, a 4x4 one few; an attention block keeps several activations for little matmul
work. So on the first training call
``"auto"`` profiles the candidates (:func:`sgflow.autodual.candidate_blocks`: blocks at any depth, found
through thin wrappers, ModuleLists inside ModuleLists and ``nn.Sequential`` trunks, with the composite
modules inside them) once, on the real inputs:

- ``kept``: bytes autograd saves inside the candidate on the dual forward (activations, parameters
  excluded, each storage once);
- ``boundary``: bytes of its inputs, primal and tangent (what it keeps when recomputed);
- ``plain``: bytes saved inside it by the plain forward (what flow matching keeps there);
- ``flops``: twice the matmul/convolution FLOPs of its plain forward (:class:`torch.utils.flop_counter.FlopCounterMode`;
  the dual forward runs them on primal and tangent), plus ``ELEMENTWISE_FLOPS_PER_BYTE`` per byte
  kept: the cost of recomputing it.

It then chooses a *frontier* of the candidate tree (no two nested: a block replaces its chosen
descendants) so that the estimated dual saved bytes, plus the largest recomputed block's (its dual
intermediates are live again while its backward runs), are at most ``budget`` times the plain
forward's: for each bound on that largest block, recomputing the eligible candidates in decreasing order
of bytes freed per unit of cost, and keeping the cheapest choice that meets the budget
(:func:`choose_blocks`). Without the bound, the greedy choice recomputes the whole backbone behind a
wrapper (it frees the most bytes) and then holds all of it again in backward: 2.1x flow matching on a
DiT. The default 0.5 leaves room
for what a step's peak holds besides saved tensors: measured peaks of 0.43-0.56x flow matching's on the
cifar10 U-Net, the ADM and EDM U-Nets, the DiT (wrapped or not) and the token-attention MLP of the README.
Where no choice meets the budget, :class:`~sgflow.autodual.DualizedModel` warns once
(:class:`BudgetWarning`, with the plan's table) or, with ``strict_budget=True``, raises
:class:`OverBudgetError`.

Where recomputing every block that pays still leaves the estimate above the budget (a shallow network
at a large batch: one block's dual intermediates are then a large part of the peak), the largest
recomputed blocks are also *split into row slices*: run on 2 (then 4) slices of the batch, each its own
checkpoint, so that only one slice's intermediates are live in backward. Only blocks that map rows to
rows qualify, checked in the profile: run without a graph on the first half of the batch they give the
first half of their output (primal and tangent, to rounding), and they draw no random numbers. Batch
statistics (a batch norm in training mode) fail that check.

The profile runs each candidate with its outputs detached (one candidate's graph alive at a time, so
the profile's memory stays near one block's), on the inner module (no ``DistributedDataParallel``
forward), with the RNG state and buffers (batch-norm statistics) restored afterwards.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.flop_counter import FlopCounterMode

from sgflow.autodual.tensor import DualTensor, make_dual

__all__ = ["BlockCost", "BlockPlan", "RowSplit", "profile_blocks", "choose_blocks", "ELEMENTWISE_FLOPS_PER_BYTE",
           "MAX_ROW_SLICES", "MIN_ROW_SLICE_GAIN", "MIN_PLANNED_BYTES", "ROW_SLICE_OVERHEAD", "BudgetWarning",
           "OverBudgetError"]

# Recomputing a block also re-runs its elementwise ops (norms, activations, the tangent's products),
# which FlopCounterMode does not count; each byte the block keeps is charged this many FLOPs.
ELEMENTWISE_FLOPS_PER_BYTE = 16.0
# Below this many bytes saved by the plain forward nothing is recomputed: such a step is not memory-bound,
# and recomputation's fixed per-op costs dominate (the demo's MLP: +25% step time for ~1 MiB).
MIN_PLANNED_BYTES = 16 * 2**20
# A block is split into at most this many row slices (each slice is a separate checkpoint and a
# separate set of kernel launches; the gain halves with each doubling).
MAX_ROW_SLICES = 4
# ... and only where a doubling frees at least this many bytes: on small activations the extra launches
# and copies cost more than the memory is worth.
MIN_ROW_SLICE_GAIN = 2**20


class BudgetWarning(UserWarning):
    """``dualize(model, blocks="auto")``: no choice of recomputed blocks meets the budget (the message
    holds the plan's table). ``dualize(..., strict_budget=True)`` raises :class:`OverBudgetError` instead."""


class OverBudgetError(RuntimeError):
    """``dualize(model, strict_budget=True)``: no choice of recomputed blocks meets the budget."""


@dataclass(frozen=True)
class RowSplit:
    """How a recomputed block runs on slices of the batch: ``chunks`` slices along dim 0 of the inputs
    at positions ``args`` and keyword names ``kwargs`` (the others, e.g. a table shared by all rows, go
    whole to every slice); the outputs are concatenated along dim 0."""

    chunks: int
    args: tuple = ()
    kwargs: tuple = ()


@dataclass
class BlockCost:
    """What one candidate block keeps and costs (bytes and FLOPs for the profiled inputs)."""

    path: str
    parent: str | None = None  # the nearest candidate it lies in (None at the top), at any depth
    own: int = 0  # bytes saved by the dual forward inside it but outside its child candidates
    kept: int = 0  # bytes saved inside it by the dual forward (children included)
    boundary: int = 0  # bytes of its inputs, primal and tangent
    plain: int = 0  # bytes saved inside it by the plain forward
    flops: int = 0  # matmul/conv FLOPs of its dual forward (2x the plain forward's)
    rows: RowSplit | None = None  # the inputs to slice where it maps rows to rows (chunks=1), else None
    batch: int = 0  # the leading size of those inputs

    @property
    def cost(self) -> float:
        return float(self.flops) + ELEMENTWISE_FLOPS_PER_BYTE * self.kept + 1.0


@dataclass
class BlockPlan:
    """The profile and the choice: ``blocks`` (recomputed paths), ``costs`` per candidate,
    ``outside_kept`` / ``outside_plain`` (saved outside every candidate), and the estimates."""

    blocks: list = field(default_factory=list)
    costs: list = field(default_factory=list)
    outside_kept: int = 0
    outside_plain: int = 0
    budget: float = 0.5
    splits: dict = field(default_factory=dict)  # path -> RowSplit, the recomputed blocks run in row slices

    @property
    def plain_total(self) -> int:
        return self.outside_plain + sum(c.plain for c in self.costs if c.parent is None)

    @property
    def target(self) -> float:
        """The budget in bytes: ``budget`` x the plain forward's saved bytes."""
        return self.budget * self.plain_total

    @property
    def meets_budget(self) -> bool:
        """Whether the estimate is within the budget (always, where the step is not memory-bound)."""
        return self.plain_total < MIN_PLANNED_BYTES or self.estimate() <= self.target

    def cost(self) -> float:
        """What the recomputation costs (:attr:`BlockCost.cost` of the recomputed blocks, a block in
        ``k`` row slices ``1 + ROW_SLICE_OVERHEAD * (k - 1)`` times its own)."""
        by_path = {c.path: c for c in self.costs}
        return sum(by_path[p].cost * (1 + ROW_SLICE_OVERHEAD * ((self.splits[p].chunks if p in self.splits else 1) - 1))
                   for p in self.blocks)

    def estimate(self, chosen=None) -> int:
        """Estimated bytes the dual forward keeps with ``chosen`` recomputed (default: the plan's),
        plus the largest recomputed block's dual intermediates (live again in its backward)."""
        chosen = set(self.blocks if chosen is None else chosen)
        return self._kept(chosen) + max((self._live(c) for c in self.costs if c.path in chosen), default=0)

    def _live(self, c: BlockCost) -> int:
        """A recomputed block's dual intermediates live at once in its backward (one slice's if split)."""
        split = self.splits.get(c.path)
        return c.kept // split.chunks if split is not None else c.kept

    def _kept(self, chosen: set) -> int:
        kept = self.outside_kept
        inside: set = set()  # candidates within a recomputed block (parents are listed before children)
        for c in self.costs:
            if c.parent is not None and (c.parent in chosen or c.parent in inside):
                inside.add(c.path)
                continue  # inside a recomputed block: only the block's inputs are kept
            kept += c.boundary if c.path in chosen else c.own
        return kept

    def __str__(self):
        mib = 2.0 ** -20
        lines = [f"{'block':<32} {'kept MiB':>9} {'inputs MiB':>10} {'plain MiB':>9} {'GFLOP':>8}  recomputed",
                 "-" * 84]
        chosen = set(self.blocks)
        for c in self.costs:
            lines.append(f"{c.path:<32} {c.kept * mib:9.2f} {c.boundary * mib:10.2f} {c.plain * mib:9.2f} "
                         f"{c.flops / 1e9:8.3f}  {'yes' if c.path in chosen else ''}"
                         + (f", in {self.splits[c.path].chunks} row slices" if c.path in self.splits else ""))
        lines.append("-" * 84)
        lines.append(f"outside blocks: kept {self.outside_kept * mib:.2f} MiB, plain {self.outside_plain * mib:.2f} MiB")
        lines.append(f"estimated dual kept {self.estimate() * mib:.2f} MiB = {self.estimate() / max(self.plain_total, 1):.2f}x "
                     f"the plain forward's {self.plain_total * mib:.2f} MiB (budget {self.budget}x); "
                     f"{len(self.blocks)} of {len(self.costs)} blocks recomputed"
                     + (f" (the plain forward keeps under {MIN_PLANNED_BYTES * mib:.0f} MiB: not memory-bound)"
                        if self.plain_total < MIN_PLANNED_BYTES else "")
                     + ("" if self.meets_budget else "; OVER BUDGET: no choice of blocks meets it"))
        return "\n".join(lines)


def choose_blocks(costs: list, outside_kept: int, outside_plain: int, budget: float = 0.5,
                  split_rows: bool = True) -> BlockPlan:
    """The frontier of candidates to recompute (no two nested: a block replaces its chosen descendants),
    over a candidate tree of any depth (``BlockCost.parent``; a parent listed before its children).

    The estimate (:meth:`BlockPlan.estimate`) is what the dual forward keeps plus the largest recomputed
    block's intermediates (live again in its backward). The second term makes a greedy choice by bytes
    freed blind: recomputing the whole backbone frees the most bytes and is live whole again in backward.
    So for each bound ``L`` on that term (the candidates' own sizes, ascending), only candidates keeping
    at most ``L`` are eligible, and among them the greedy choice recomputes the candidate that lowers the
    kept bytes most per unit of added cost (:attr:`BlockCost.cost`; a block replacing its chosen
    descendants) until the estimate is at most ``budget`` x the plain forward's saved bytes. Then, while it
    still exceeds it and ``split_rows``, the recomputed block with the most live intermediates is run in
    twice the row slices, if it maps rows to rows (``BlockCost.rows``), up to :data:`MAX_ROW_SLICES`
    and while a doubling frees at least :data:`MIN_ROW_SLICE_GAIN` bytes. Of the choices that meet the
    budget the cheapest is kept (recomputation cost, a block in ``k`` row slices charged
    ``1 + ROW_SLICE_OVERHEAD * (k - 1)`` times its own); where none does, the one with the lowest estimate
    (``BlockPlan.meets_budget`` is then False; among estimates within :data:`ESTIMATE_TIE` of the
    lowest, the one keeping least outside the live term). Nothing is recomputed where the plain forward keeps less
    than :data:`MIN_PLANNED_BYTES`."""
    costs = list(costs)
    base = BlockPlan(costs=costs, outside_kept=outside_kept, outside_plain=outside_plain, budget=budget)
    if base.plain_total < MIN_PLANNED_BYTES:
        return base
    target = budget * base.plain_total
    if base.estimate([]) <= target:
        return base
    tree = _Tree(costs)
    bounds = sorted({c.kept for c in costs if c.kept > c.boundary})
    if len(bounds) > MAX_PLAN_BOUNDS:  # evenly spaced ranks, the largest included
        bounds = [bounds[(len(bounds) - 1) * i // (MAX_PLAN_BOUNDS - 1)] for i in range(MAX_PLAN_BOUNDS)]
    plans = [base]
    for bound in bounds:
        chosen = tree.greedy({i for i, c in enumerate(costs) if c.kept <= bound}, outside_kept, target)
        plan = BlockPlan(costs=costs, outside_kept=outside_kept, outside_plain=outside_plain, budget=budget,
                         blocks=[c.path for i, c in enumerate(costs) if i in chosen])
        if split_rows:
            _split(plan, target)
        plans.append(plan)
    within = [p for p in plans if p.estimate() <= target]
    if within:
        return min(within, key=BlockPlan.cost)
    # None meets the budget: the lowest estimate; within ESTIMATE_TIE of it, the one keeping least for the
    # whole backward (the largest block's term is live during its own backward only).
    lowest = min(p.estimate() for p in plans)
    return min((p for p in plans if p.estimate() <= lowest * (1 + ESTIMATE_TIE)),
               key=lambda p: (p._kept(set(p.blocks)), p.cost()))


# Estimates within this fraction of each other are a tie (then the choice keeping less for the whole
# backward wins).
ESTIMATE_TIE = 0.01
# At most this many bounds on the largest recomputed block are tried (each one greedy choice).
MAX_PLAN_BOUNDS = 32
# A block run in k row slices is charged 1 + ROW_SLICE_OVERHEAD * (k - 1) times its recomputation cost
# when choices are compared (each slice launches every op of the block again).
ROW_SLICE_OVERHEAD = 0.5


def _split(plan: BlockPlan, target: float) -> None:
    by_path = {c.path: c for c in plan.costs}
    while plan.blocks and plan.estimate() > target:
        top = max((by_path[p] for p in plan.blocks), key=plan._live)
        n = plan.splits[top.path].chunks * 2 if top.path in plan.splits else 2
        if top.rows is None or n > MAX_ROW_SLICES or top.batch < n or plan._live(top) - top.kept // n < MIN_ROW_SLICE_GAIN:
            break
        plan.splits[top.path] = RowSplit(n, top.rows.args, top.rows.kwargs)


class _Tree:
    """The candidates as a tree (indices into ``costs``, parents before children) for the greedy choice."""

    def __init__(self, costs):
        self.costs = costs
        index = {c.path: i for i, c in enumerate(costs)}
        self.parent = [index.get(c.parent) if c.parent is not None else None for c in costs]
        self.children = [[] for _ in costs]
        for i, p in enumerate(self.parent):
            if p is not None:
                self.children[p].append(i)

    def greedy(self, eligible: set, outside_kept: int, target: float) -> set:
        costs, parent, children = self.costs, self.parent, self.children
        n = len(costs)
        chosen: set = set()
        while True:
            # Post-order (children after parents in the list: walk it backwards): what each subtree keeps
            # and what its chosen blocks cost; the largest recomputed block's intermediates.
            contrib = [0] * n
            ccost = [0.0] * n
            for i in range(n - 1, -1, -1):
                c = costs[i]
                if i in chosen:
                    contrib[i], ccost[i] = c.boundary, c.cost
                else:
                    contrib[i] = c.own + sum(contrib[j] for j in children[i])
                    ccost[i] = sum(ccost[j] for j in children[i])
            kept = outside_kept + sum(contrib[i] for i in range(n) if parent[i] is None)
            live = max((costs[i].kept for i in chosen), default=0)
            if kept + live <= target:
                return chosen
            covered = [False] * n
            for i in range(n):
                p = parent[i]
                covered[i] = p is not None and (covered[p] or p in chosen)
            best, best_score = None, 0.0
            for i in eligible:
                if i in chosen or covered[i]:
                    continue
                gain = contrib[i] - costs[i].boundary
                if gain > 0:
                    score = gain / max(costs[i].cost - ccost[i], 1.0)
                    if score > best_score:
                        best, best_score = i, score
            if best is None:
                return chosen
            chosen = {j for j in chosen if not self._inside(j, best)} | {best}

    def _inside(self, j: int, i: int) -> bool:
        p = self.parent[j]
        while p is not None:
            if p == i:
                return True
            p = self.parent[p]
        return False


class _Saved:
    """saved_tensors_hooks that add each saved storage's bytes (once, parameters excluded) to the
    innermost candidate block being profiled (or to ``outside``)."""

    def __init__(self, params: set):
        self.params = params
        self.stack: list[str] = []
        self.bytes: dict[str, int] = {}
        self.seen: dict[str, dict] = {}

    def pack(self, t: torch.Tensor):
        try:
            st = t.untyped_storage()
        except (NotImplementedError, RuntimeError):
            return t
        ref = StorageWeakRef(st)
        if st.data_ptr() != 0 and ref.cdata not in self.params:
            owner = self.stack[-1] if self.stack else ""
            seen = self.seen.setdefault(owner, {})
            if ref.cdata not in seen or seen[ref.cdata].expired():  # a freed storage's address may be reused
                seen[ref.cdata] = ref
                self.bytes[owner] = self.bytes.get(owner, 0) + st.nbytes()
        return t

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)


def _tensor_bytes(args) -> int:
    seen, total = set(), 0
    for a in tree_flatten(args)[0]:
        parts = (a._primal, a._tangent) if isinstance(a, DualTensor) else (a,) if isinstance(a, torch.Tensor) else ()
        for p in parts:
            st = p.untyped_storage()
            if st.data_ptr() not in seen:
                seen.add(st.data_ptr())
                total += st.nbytes()
    return total


def _detach(out):
    """The outputs cut from the candidate's graph (freeing it), as fresh tensors that still require
    grad where they did: what follows saves what it would save in training. A copy of a new leaf, not
    the leaf itself: the forward may modify a block's output in place (``h += 1``), which autograd
    allows on an intermediate and refuses on a leaf."""

    def leaf(a):
        return a.detach().requires_grad_().clone() if a.requires_grad else a.detach()

    def one(a):
        if isinstance(a, DualTensor):
            return make_dual(leaf(a._primal), leaf(a._tangent))
        return leaf(a) if isinstance(a, torch.Tensor) and a.is_floating_point() else a

    return tree_map(one, out)


def _rng_states(args, kwargs) -> list:
    """The CPU RNG state and that of the CUDA devices of the tensor inputs (to see whether a block draws)."""
    devs = {a.device for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor) and a.device.type == "cuda"}
    return [torch.random.get_rng_state()] + [torch.cuda.get_rng_state(d) for d in sorted(devs, key=str)]


def _parts(a):
    return (a._primal, a._tangent) if isinstance(a, DualTensor) else (a,)


def _row_layout(orig, args, kwargs, out):
    """``(RowSplit(1, positions, names), B)`` if the block maps rows to rows, else ``(None, -1)``.

    B is the leading size of the first dual input; every tensor input with that leading size is
    sliced, parameters excluded. The block qualifies when its outputs are tensors (or None) with leading size B and, run
    without a graph on the first half of the sliced inputs, it returns the first half of each output,
    primal and tangent, to rounding (a tolerance of its dtype relative to the output's largest value).
    """
    leaves = tree_flatten((args, kwargs))[0]
    first = next((a for a in leaves if isinstance(a, DualTensor) and a.dim() >= 1), None)
    if first is None or first.shape[0] < 2:
        return None, -1
    B = first.shape[0]

    def rows(a):
        return isinstance(a, torch.Tensor) and not isinstance(a, nn.Parameter) and a.dim() >= 1 and a.shape[0] == B

    outs = tree_flatten(out)[0]
    if not outs or not all(o is None or rows(o) for o in outs):
        return None, -1
    layout = RowSplit(1, tuple(i for i, a in enumerate(args) if rows(a)), tuple(k for k, a in kwargs.items() if rows(a)))
    half = B // 2
    try:
        with torch.no_grad():
            sub = orig(*[a.narrow(0, 0, half) if i in layout.args else a for i, a in enumerate(args)],
                       **{k: a.narrow(0, 0, half) if k in layout.kwargs else a for k, a in kwargs.items()})
    except Exception:  # a block that cannot run on part of the batch is not split
        return None, -1
    subs = tree_flatten(sub)[0]
    if len(subs) != len(outs):
        return None, -1
    for o, q in zip(outs, subs):
        if o is None or q is None:
            if o is not q:
                return None, -1
            continue
        if isinstance(o, DualTensor) != isinstance(q, DualTensor) or q.shape[0] != half:
            return None, -1
        for full, part in zip(_parts(o), _parts(q)):
            full = full.detach().narrow(0, 0, half)
            tol = {torch.float64: 1e-9, torch.float32: 1e-4}.get(full.dtype, 1e-2)
            scale = float(full.abs().max()) if full.numel() else 0.0
            if full.shape != part.shape or not torch.allclose(part, full, rtol=tol, atol=tol * max(scale, 1e-30)):
                return None, -1
    return layout, B


@contextlib.contextmanager
def _preserved_state(model: nn.Module, devices):
    """RNG streams and buffers (batch-norm statistics, counters) as they were before the profile."""
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            with torch.no_grad():
                for b, old in buffers:
                    b.copy_(old)


@contextlib.contextmanager
def _profiling(model: nn.Module, paths, saved: _Saved, costs: dict, dual: bool, row_check=frozenset()):
    """Patch the candidates' forwards: each runs with its own saved bytes, inputs and FLOPs counted,
    and returns detached outputs, so only one candidate's graph is alive at a time. On the dual pass the
    candidates in ``row_check`` are also checked for mapping rows to rows (each check one more forward of
    the candidate on half the batch)."""
    from sgflow.autodual import patched_forwards

    mods = dict(model.named_modules())

    checking = []  # non-empty while a candidate's row check runs: nested candidates just run

    def wrap(orig, path):
        @functools.wraps(orig)
        def forward(*args, **kwargs):
            if checking:
                return orig(*args, **kwargs)
            c = costs[path]
            if dual:
                c.boundary += _tensor_bytes((args, kwargs))
                rng = _rng_states(args, kwargs)
            saved.stack.append(path)
            try:
                if dual:
                    out = orig(*args, **kwargs)
                else:
                    # Counted on the plain pass, outside the dual rules' custom ops, whose FLOPs the
                    # counter does not know. A dual forward runs each
                    # matmul on primal and tangent: twice the plain FLOPs.
                    with FlopCounterMode(display=False) as fc:
                        out = orig(*args, **kwargs)
                    c.flops += 2 * fc.get_total_flops()
            finally:
                saved.stack.pop()
            if dual and c.batch == 0 and path not in row_check:
                c.rows, c.batch = None, -1  # too small to be worth row slices: not checked
            elif dual and c.batch == 0:  # first call of this candidate: does it map rows to rows?
                drew = any(not torch.equal(a, b) for a, b in zip(rng, _rng_states(args, kwargs)))
                checking.append(path)
                try:
                    c.rows, c.batch = (None, -1) if drew else _row_layout(orig, args, kwargs, out)
                finally:
                    checking.pop()
            return _detach(out)

        return forward

    with patched_forwards((mods[p], functools.partial(wrap, path=p)) for p in paths):
        yield


def profile_blocks(model: nn.Module, inputs, tangents, candidates, run_dual, budget: float = 0.5,
                   split_rows: bool = True) -> BlockPlan:
    """Profile ``candidates`` on one plain and one dual forward and choose the blocks to recompute
    (module doc). ``candidates``: ``{path: parent path or None}`` (module paths of ``model``, a child
    listed after its parent), or a list of paths without nesting. ``run_dual(model, inputs, tangents)``
    runs the dual forward without recomputation; ``model`` is the inner module (not a data-parallel
    wrapper)."""
    if not isinstance(candidates, dict):
        candidates = {p: None for p in candidates}
    params = {StorageWeakRef(p.untyped_storage()).cdata for p in model.parameters()}
    costs = {p: BlockCost(p, parent) for p, parent in candidates.items()}
    devices = sorted({x.device.index for x in inputs if isinstance(x, torch.Tensor) and x.device.type == "cuda"})
    with _preserved_state(model, devices):
        state = torch.random.get_rng_state()
        plain = _Saved(params)
        with torch.enable_grad(), plain.hooks(), _profiling(model, list(candidates), plain, costs, dual=False):
            out = model(*inputs)
        del out
        for p, c in costs.items():
            c.plain = plain.bytes.get(p, 0)
        # Row slices of a candidate free about what its plain forward keeps (half its dual intermediates):
        # only those that could free MIN_ROW_SLICE_GAIN are checked.
        subtree = {p: c.plain for p, c in costs.items()}
        for p in reversed(list(costs)):
            if costs[p].parent is not None:
                subtree[costs[p].parent] += subtree[p]
        row_check = {p for p, b in subtree.items() if b >= MIN_ROW_SLICE_GAIN} if split_rows else set()
        torch.random.set_rng_state(state)  # the same dropout draws as the plain pass
        dual = _Saved(params)
        with torch.enable_grad(), dual.hooks(), _profiling(model, list(candidates), dual, costs, dual=True,
                                                           row_check=row_check):
            out = run_dual(model, inputs, tangents)
        del out
        for p, c in costs.items():
            c.own = c.kept = dual.bytes.get(p, 0)
    for c in reversed(list(costs.values())):  # a parent's totals include its descendants' (children listed after)
        if c.parent is not None:
            costs[c.parent].kept += c.kept
            costs[c.parent].plain += c.plain
    return choose_blocks([costs[p] for p in candidates], dual.bytes.get("", 0), plain.bytes.get("", 0), budget,
                         split_rows)
