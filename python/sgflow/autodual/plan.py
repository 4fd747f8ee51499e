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
  kept: the cost of recomputing it;

and, for the estimate, a :class:`Timeline` of each forward (plain and dual): every saved storage in forward
order with the candidate that saved it, each candidate call's window with its inputs' storages, and per
call the backward's own temporaries, measured by running the backward of the call's own graph.

**The estimate is the step's peak.** Backward frees a block's saved tensors once it has passed the block,
so a step's peak is reached in the backward of some block B (or as backward starts). There it holds what
was saved before B in forward order (each storage once, however many tensors or blocks hold it: an
embedding every block reads, a U-Net's skips), the gradients flowing around B (of tensors made up to
B's end and read after it: B's output, the skips, an embedding; a ``cat`` passes its inputs' gradients on
as views that hold its whole output gradient), the parameters' gradients made by then, and B's own
backward: its intermediates (live again if it is recomputed, one slice's in row slices) and what its
backward makes beyond them (the measure; :data:`BACKWARD_SCRATCH` of it for a recomputed block,
:data:`ROW_SLICE_GRADS` for its inputs' gradients in row slices). :meth:`BlockPlan.estimate` is the largest
of these over the blocks not inside a recomputed one. Flow matching's peak is estimated the same way
on the plain forward's timeline (nothing recomputed), and the budget is a fraction of it
(:attr:`BlockPlan.reference`). Estimate / measured peak (the peak tensor bytes of one step with Adam over
what was held before it, as ``benchmarks/memory.py`` measures them; CPU, float32, the networks below):
fused 1.00 on the DiTs, ADM and the token-attention MLP, 1.03 on EDM, 1.05 on diffusers' UNet; flow
matching 0.97-1.01. The estimate of saved bytes it replaces (every recomputed block's inputs added up,
plus the largest block's intermediates) was 0.90x the measured peak on the DiT at batch 8 (28.3 vs 31.4
MiB) and counted the U-Nets' skips and the MLP's embedding once per block reading them.

It then chooses a *frontier* of the candidate tree (no two nested: a block replaces its chosen
descendants) whose estimate is at most ``budget`` times flow matching's: for each bound on the size of
the recomputed blocks, recomputing the eligible candidates in decreasing order of bytes freed per unit
of cost until the estimate meets the budget, then, while it does not, running the recomputed block whose
backward sets it in row slices (below), then dropping what the choice does without (a block whose
backward comes first, the last ones in forward order, often need not be recomputed); the cheapest
choice that meets the budget is kept (:func:`choose_blocks`). Without the bound, the greedy choice
recomputes the whole backbone behind a wrapper (it frees the most bytes) and then holds all of it again
in backward: 2.1x flow matching on a DiT. Only candidates called with a dual input qualify (one whose
inputs carry no tangent runs a plain forward, never checkpointed). Measured peaks with the default 0.5,
x flow matching's (ATen ops of the step with Adam x flow matching's; 3x32x32): DiT depth 6 hidden 64
batch 8 0.486 (2.5), hidden 128 batch 16 0.486 (2.5); EDM channel_mult 1,2,2 batch 8 0.483 (2.0), defaults
batch 16 0.477 (2.6); ADM channel_mult 1,2,2 batch 16 0.495 (2.1); diffusers' UNet2DModel
(block_out_channels 64, 128, 128, batch 16) 0.458 (2.2), its DiTTransformer2DModel (6 layers of 4 x 32,
batch 16) 0.487 (2.4); the cifar10 U-Net (sgflow.nn) batch 16 0.494 (1.8). The token-attention MLP (hidden
256, depth 4, batch 4096) is over budget by its estimate and measures 0.557 (4.0), near what recomputation
and row slices can reach there: in the backward of its third block (in 4 row slices) the step holds the
inputs of the blocks before it and the embedding every block reads (40 MiB) and the intermediates of the
embedding of u (8.5 MiB: u has no tangent, so that branch runs a plain forward, never recomputed), the
gradients of the residual stream, of that embedding and of the later parameters (17.5 MiB), one slice's
intermediates and backward with its parameters' gradients (20 MiB) and the slices' input gradients made
whole (9.6 MiB): 96 MiB
against flow matching's 173.5 MiB; the final LayerNorm's backward (24 MiB of temporaries over what is
held by then) sets 96.7 MiB.
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
the profile's memory stays near one block's), except lazy dual nodes not computed yet (a GroupNorm's
output waiting for its SiLU and conv, which the forward fuses), which it passes on as they are; right
after a candidate's forward it runs that graph's backward (to its inputs and parameters, ``.grad`` left
alone) under :class:`sgflow.memory.PeakTensorBytes`. It runs on the inner module (no
``DistributedDataParallel`` forward), with the RNG state and buffers (batch-norm statistics) restored
afterwards.
"""
from __future__ import annotations

import bisect
import contextlib
import functools
import itertools
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from sgflow.autodual.tensor import DualTensor, has_dual, make_dual

__all__ = ["BlockCost", "BlockPlan", "RowSplit", "Timeline", "profile_blocks", "choose_blocks",
           "ELEMENTWISE_FLOPS_PER_BYTE", "BACKWARD_SCRATCH", "BACKWARD_LIVE_FACTOR", "ROW_SLICE_GRADS",
           "MAX_ROW_SLICES", "MIN_ROW_SLICE_GAIN",
           "MIN_PLANNED_BYTES", "ROW_SLICE_OVERHEAD", "BudgetWarning", "OverBudgetError"]

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
# A block's backward holds, besides its dual intermediates, their gradients and the dual rules' backward
# temporaries. The profile measures them: a backward of each candidate's own graph, the peak of what it
# makes over the intermediates it frees. A kept block's backward is that one; a recomputed block's holds
# BACKWARD_SCRATCH times it (measured 0.82-0.97: 5.8 of 7.1 MiB on a DiT block, 9.7 of 10.1 MiB on its
# final layer, 71 of 81 and 47 of 57 MiB on diffusers ResNet blocks at 32x32, which recompute their
# GroupNorm+SiLU in backward). Where it could not be run (and for costs made by hand, which have no
# measure), BACKWARD_LIVE_FACTOR times the intermediates (the measured ratio: 0-0.3 on U-Net blocks, 0.3
# on a DiT block, 0.4-0.8 on the token-attention MLP's).
BACKWARD_SCRATCH = 0.9
BACKWARD_LIVE_FACTOR = 0.3
# A block run in row slices makes its inputs' gradients whole: a slice's gradient of an input is padded to
# the input's size (a narrow's backward), then added into the input's gradient, which is whole from the
# first slice on. On top of one slice's backward the measured peaks hold this many times the inputs' bytes
# (0.5-0.6 on diffusers ResNet blocks, 0.5-0.9 on the token-attention MLP's blocks, 1.0 on an ADM ResNet
# block, 2.4 on a DiT block's 1 MiB).
ROW_SLICE_GRADS = 0.6


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
    kept: int = 0  # bytes saved inside it by the dual forward (children included; each storage once)
    boundary: int = 0  # bytes of its inputs, primal and tangent
    plain: int = 0  # bytes saved inside it by the plain forward (each storage once)
    flops: int = 0  # matmul/conv FLOPs of its dual forward (2x the plain forward's)
    rows: RowSplit | None = None  # the inputs to slice where it maps rows to rows (chunks=1), else None
    batch: int = 0  # the leading size of those inputs
    dual_inputs: bool = True  # called with a dual input (else never recomputed: it runs a plain forward)

    @property
    def cost(self) -> float:
        return float(self.flops) + ELEMENTWISE_FLOPS_PER_BYTE * self.kept + 1.0


class Call(NamedTuple):
    """One call of a candidate in a profiled forward (bytes; -1: not measured)."""

    start: int  # its window of the profile's clock
    end: int
    inputs: tuple  # the storage ids of its tensor inputs (a dual input's primal and tangent)
    live: int  # bytes saved within it besides its inputs (each storage once): live again if recomputed
    grads: int = 0  # gradients live in its backward besides its own: flowing around it, the parameters'
    slice_grads: int = 0  # what its inputs' gradients add to its backward in row slices (ROW_SLICE_GRADS)
    scratch: int = -1  # what its backward makes beyond its intermediates (its own graph's or an inner call's)
    own_scratch: int = -1  # the same for its own ops (not those of the candidates inside it)
    params: int = 0  # its parameters' bytes: their gradients, in its measure, are whole in row slices too
    inner: int = 0  # its backward's peak over its inner calls', if recomputed (bytes over what it holds)


@dataclass
class Timeline:
    """The dual forward's saved storages in forward order, as the profile saw them: what
    :meth:`BlockPlan.estimate` walks to find what is held when each recomputed block's backward runs.

    ``sizes``: bytes per storage id; ``saves``: ``(time, storage id, owner)`` for every tensor saved for
    backward, in forward order (``owner``: the innermost candidate's path, ``""`` outside every candidate;
    parameters excluded); ``windows``: per candidate path, a :class:`Call` per call; ``plain``: the bytes
    the plain forward saves, each storage once; ``plain_peak``: flow matching's peak, estimated on the
    plain forward's timeline as :meth:`peak` estimates the dual one (nothing recomputed)."""

    sizes: dict = field(default_factory=dict)
    saves: list = field(default_factory=list)
    windows: dict = field(default_factory=dict)
    plain: int = 0
    plain_peak: int = 0  # flow matching's estimated peak: the plain forward's timeline, nothing recomputed

    def peak(self, chosen: set, splits: dict, parents: dict) -> tuple[int, int, str | None]:
        """``(held, peak, where)`` with the candidates in ``chosen`` recomputed: ``held`` the bytes held at
        the end of the forward (every storage once, however many tensors or blocks keep it), ``peak`` the
        estimated peak in backward (:meth:`BlockPlan.estimate`), ``where`` the candidate whose backward sets
        it (None: the end of the forward)."""
        covered: dict = {}
        inside: dict = {}
        for path, parent in parents.items():  # parents listed before their children
            inside[path] = parent is not None and covered[parent]
            covered[path] = path in chosen or inside[path]
        first: dict = {}  # storage id -> when it is first held (a storage is freed by backward after that)
        for time, uid, owner in self.saves:
            if owner and covered[owner]:
                continue  # saved inside a recomputed block: only its inputs are kept
            if uid not in first:
                first[uid] = time
        for path in chosen:
            for call in self.windows.get(path, ()):
                for uid in call.inputs:
                    if first.get(uid, call.start + 1) > call.start:
                        first[uid] = call.start
        items = sorted((t, self.sizes[u]) for u, t in first.items())
        times = [t for t, _ in items]
        cum = list(itertools.accumulate(b for _, b in items))

        def held_at(time):  # what is held up to ``time`` of the forward (freed only by backward after it)
            k = bisect.bisect_right(times, time)
            return cum[k - 1] if k else 0

        held = cum[-1] if cum else 0
        peak, where = held, None
        for path, _call, here in self.terms(chosen, splits, inside, held_at):
            if here > peak:
                peak, where = here, path
        return held, peak, where

    def terms(self, chosen: set, splits: dict, inside: dict, held_at):
        """``(path, call, bytes)``: the estimated peak in the backward of each call not inside a recomputed
        block (``held_at(time)``: what the choice holds up to that time of the forward)."""
        for path, calls in self.windows.items():
            if inside[path]:
                continue
            for call in calls:
                if path in chosen:
                    # Its backward: what was held up to its start (its inputs included; what later blocks
                    # held is freed by then), the gradients around it, its intermediates live again and
                    # what its backward makes (one slice's, the slices' input gradients made whole).
                    k = splits[path].chunks if path in splits else 1
                    scratch = int(BACKWARD_SCRATCH * call.scratch) if call.scratch >= 0 else \
                        int(BACKWARD_LIVE_FACTOR * call.live)
                    own = max(call.live + scratch, call.inner)
                    params = min(call.params, own)
                    # In row slices the parameters' gradients are whole from the first slice on, and each
                    # slice's are added into them.
                    here = held_at(call.start) + call.grads + (own - params) // k + params \
                        + (call.slice_grads + params if k > 1 else 0)
                else:  # kept: what was held up to its end, the gradients around it, its own ops' temporaries
                    here = held_at(call.end) + call.grads + max(call.own_scratch, 0)
                yield path, call, here


@dataclass
class BlockPlan:
    """The profile and the choice: ``blocks`` (recomputed paths), ``costs`` per candidate,
    ``outside_kept`` / ``outside_plain`` (saved outside every candidate), and the estimates
    (``timeline``: the profile's saved storages in forward order; None for costs made by hand, which are
    then added up: :meth:`estimate`)."""

    blocks: list = field(default_factory=list)
    costs: list = field(default_factory=list)
    outside_kept: int = 0
    outside_plain: int = 0
    budget: float = 0.5
    splits: dict = field(default_factory=dict)  # path -> RowSplit, the recomputed blocks run in row slices
    timeline: Timeline | None = None

    @property
    def plain_total(self) -> int:
        """The bytes the plain forward saves (flow matching's), each storage once."""
        if self.timeline is not None:
            return self.timeline.plain
        return self.outside_plain + sum(c.plain for c in self.costs if c.parent is None)

    @property
    def reference(self) -> int:
        """What the budget is a fraction of: flow matching's estimated peak (the plain forward's timeline
        estimated as :meth:`estimate` estimates the dual one, nothing recomputed), or without a timeline
        the plain forward's saved bytes."""
        return self.timeline.plain_peak if self.timeline is not None else self.plain_total

    @property
    def target(self) -> float:
        """The budget in bytes: ``budget`` x :attr:`reference`."""
        return self.budget * self.reference

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
        """The step's estimated peak memory with ``chosen`` recomputed (default: the plan's).

        With the profile's :class:`Timeline` (:meth:`Timeline.peak`, the module doc): the largest, over
        the blocks not inside a recomputed one, of what the step holds in the block's backward: what was
        saved before it in forward order (each storage once; what later blocks saved is freed by then),
        the gradients around it, and its own backward (its intermediates again if it is recomputed, one
        slice's in row slices, and what its backward makes, measured); at least what is held at the end of
        the forward. For costs made by hand (no timeline): what every block keeps, added up, plus
        ``1 +`` :data:`BACKWARD_LIVE_FACTOR` times the largest recomputed block's intermediates."""
        return self._peak(chosen)[1]

    def peak_block(self, chosen=None) -> str | None:
        """The block (recomputed or not) whose backward sets :meth:`estimate` (None: the end of the forward)."""
        return self._peak(chosen)[2]

    def _peak(self, chosen=None) -> tuple[int, int, str | None]:
        chosen = set(self.blocks if chosen is None else chosen)
        if self.timeline is not None:
            return self.timeline.peak(chosen, self.splits, {c.path: c.parent for c in self.costs})
        held = self._kept(chosen)
        top = max((c for c in self.costs if c.path in chosen), key=self._live, default=None)
        if top is None:
            return held, held, None
        return held, held + int((1 + BACKWARD_LIVE_FACTOR) * self._live(top)), top.path

    def _live(self, c: BlockCost) -> int:
        """A recomputed block's dual intermediates live at once in its backward (one slice's if split)."""
        split = self.splits.get(c.path)
        return c.kept // split.chunks if split is not None else c.kept

    def _kept(self, chosen: set) -> int:
        """What the dual forward holds at its end with ``chosen`` recomputed."""
        if self.timeline is not None:
            return self.timeline.peak(chosen, {}, {c.path: c.parent for c in self.costs})[0]
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
        held, peak, where = self._peak()
        lines.append(f"outside blocks: kept {self.outside_kept * mib:.2f} MiB, plain {self.outside_plain * mib:.2f} "
                     f"MiB; held at the end of the forward {held * mib:.2f} MiB")
        lines.append(f"estimated peak of saved bytes {peak * mib:.2f} MiB "
                     f"({'the end of the forward' if where is None else f'in the backward of {where}'}) = "
                     f"{peak / max(self.reference, 1):.2f}x flow matching's "
                     + (f"estimated peak {self.reference * mib:.2f} MiB (its plain forward saves "
                        f"{self.plain_total * mib:.2f} MiB)" if self.timeline is not None
                        else f"plain forward's saved {self.plain_total * mib:.2f} MiB")
                     + f" (budget {self.budget}x); {len(self.blocks)} of {len(self.costs)} blocks recomputed"
                     + (f" (the plain forward keeps under {MIN_PLANNED_BYTES * mib:.0f} MiB: not memory-bound)"
                        if self.plain_total < MIN_PLANNED_BYTES else "")
                     + ("" if self.meets_budget else "; OVER BUDGET: no choice of blocks meets it"))
        return "\n".join(lines)


def choose_blocks(costs: list, outside_kept: int, outside_plain: int, budget: float = 0.5,
                  split_rows: bool = True, timeline: Timeline | None = None) -> BlockPlan:
    """The frontier of candidates to recompute (no two nested: a block replaces its chosen descendants),
    over a candidate tree of any depth (``BlockCost.parent``; a parent listed before its children).

    The estimate (:meth:`BlockPlan.estimate`, on the profile's ``timeline`` where there is one) is the
    step's peak: in some block's backward, what is held then plus that block's backward (a recomputed
    block's intermediates live again). That second term makes a greedy choice by bytes freed blind:
    recomputing the whole backbone frees the most bytes and is live whole again in backward. So for each
    bound ``L`` on the blocks' size (the candidates' own sizes, ascending), only candidates keeping at
    most ``L`` (and called with a dual input: ``BlockCost.dual_inputs``) are eligible, and among them the
    greedy choice recomputes the candidate that lowers the kept bytes most per unit of added cost
    (:attr:`BlockCost.cost`; a block replacing its chosen descendants) until the estimate is at most
    ``budget`` x flow matching's (:attr:`BlockPlan.target`). Then, while it
    still exceeds it and ``split_rows``, the recomputed block whose backward sets the estimate is run in
    twice the row slices, if it maps rows to rows (``BlockCost.rows``), up to :data:`MAX_ROW_SLICES`
    and while a doubling frees at least :data:`MIN_ROW_SLICE_GAIN` bytes. A choice that meets the budget
    then drops the recomputed blocks (most expensive first) and row slices it can do without. Of the
    choices that meet the budget the cheapest is kept (recomputation cost, a block in ``k`` row slices
    charged ``1 + ROW_SLICE_OVERHEAD * (k - 1)`` times its own); where none does, the one with the lowest
    estimate (``BlockPlan.meets_budget`` is then False; among estimates within :data:`ESTIMATE_TIE` of the
    lowest, the one holding least at the end of the forward). Nothing is recomputed where the plain
    forward keeps less than :data:`MIN_PLANNED_BYTES`."""
    costs = list(costs)

    def new_plan(blocks=()):
        return BlockPlan(costs=costs, outside_kept=outside_kept, outside_plain=outside_plain, budget=budget,
                         blocks=list(blocks), timeline=timeline)

    base = new_plan()
    if base.plain_total < MIN_PLANNED_BYTES:
        return base
    target = base.target
    if base.estimate([]) <= target:
        return base
    tree = _Tree(costs)
    bounds = sorted({c.kept for c in costs if c.kept > c.boundary})
    if len(bounds) > MAX_PLAN_BOUNDS:  # evenly spaced ranks, the largest included
        bounds = [bounds[(len(bounds) - 1) * i // (MAX_PLAN_BOUNDS - 1)] for i in range(MAX_PLAN_BOUNDS)]
    plans = [base]
    for bound in bounds:
        chosen = tree.greedy({i for i, c in enumerate(costs) if c.kept <= bound and c.dual_inputs},
                             lambda ch: base.estimate(costs[i].path for i in ch), target)
        plan = new_plan(c.path for i, c in enumerate(costs) if i in chosen)
        if split_rows:
            _split(plan, target)
        if plan.estimate() <= target:
            _prune(plan, target)
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
        where = plan.peak_block()
        if where not in plan.blocks:  # the end of the forward or a kept block sets it: slices cannot lower it
            break
        top = by_path[where]
        n = plan.splits[top.path].chunks * 2 if top.path in plan.splits else 2
        if top.rows is None or n > MAX_ROW_SLICES or top.batch < n or plan._live(top) - top.kept // n < MIN_ROW_SLICE_GAIN:
            break
        plan.splits[top.path] = RowSplit(n, top.rows.args, top.rows.kwargs)


def _prune(plan: BlockPlan, target: float) -> None:
    """Drop what a choice within the budget does without: each recomputed block (most expensive first),
    then each block's row slices (halving them), where the estimate stays within ``target``."""
    by_path = {c.path: c for c in plan.costs}
    for path in sorted(plan.blocks, key=lambda p: -by_path[p].cost):
        split = plan.splits.pop(path, None)
        plan.blocks.remove(path)
        if plan.estimate() > target:
            plan.blocks.append(path)
            if split is not None:
                plan.splits[path] = split
    order = {p: i for i, p in enumerate(by_path)}
    plan.blocks.sort(key=order.__getitem__)
    for path in sorted(plan.splits, key=lambda p: -by_path[p].cost):
        while path in plan.splits:
            split = plan.splits[path]
            if split.chunks > 2:
                plan.splits[path] = RowSplit(split.chunks // 2, split.args, split.kwargs)
            else:
                del plan.splits[path]
            if plan.estimate() > target:
                plan.splits[path] = split
                break


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

    def greedy(self, eligible: set, estimate, target: float) -> set:
        """Recompute eligible candidates, best bytes freed per unit of added cost first, until
        ``estimate(chosen)`` is at most ``target`` (or nothing eligible frees bytes)."""
        costs, parent, children = self.costs, self.parent, self.children
        n = len(costs)
        chosen: set = set()
        while True:
            if estimate(chosen) <= target:
                return chosen
            # Post-order (children after parents in the list: walk it backwards): what each subtree keeps
            # and what its chosen blocks cost.
            contrib = [0] * n
            ccost = [0.0] * n
            for i in range(n - 1, -1, -1):
                c = costs[i]
                if i in chosen:
                    contrib[i], ccost[i] = c.boundary, c.cost
                else:
                    contrib[i] = c.own + sum(contrib[j] for j in children[i])
                    ccost[i] = sum(ccost[j] for j in children[i])
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
    """saved_tensors_hooks that record each saved storage (parameters excluded) with the innermost
    candidate block being profiled (``""`` outside every candidate), in forward order: ``events`` of
    ``(time, storage id, owner)``, ``sizes`` per storage id. The candidates' calls are recorded as
    windows of that clock (:meth:`tick`). A storage id is one storage for its lifetime (an address freed
    and reused is a new id)."""

    def __init__(self, params: set):
        self.params = params
        self.param_uses: dict = {}  # parameter storage address -> (last time saved, bytes)
        self.stack: list[str] = []
        self.ids: dict = {}  # storage address -> (weak ref, id)
        self.refs: dict = {}  # id -> weak ref
        self.sizes: dict[int, int] = {}
        self.events: list[tuple[int, int, str]] = []
        self.windows: dict[str, list] = {}  # path -> [(start, end, input storage ids, backward scratch)]
        self.clock = 0
        self.checking = False  # a candidate's row check runs (its ops are no part of the forward)

    def tick(self) -> int:
        self.clock += 1
        return self.clock

    def storage_id(self, st) -> int | None:
        ref = StorageWeakRef(st)
        if st.data_ptr() == 0 or ref.cdata in self.params:
            return None
        known = self.ids.get(ref.cdata)
        if known is not None and not known[0].expired():
            return known[1]
        uid = len(self.sizes)
        self.ids[ref.cdata] = (ref, uid)
        self.refs[uid] = ref
        self.sizes[uid] = st.nbytes()
        return uid

    def pack(self, t: torch.Tensor):
        try:
            st = t.untyped_storage()
        except (NotImplementedError, RuntimeError):
            return t
        uid = self.storage_id(st)
        if uid is not None:
            self.events.append((self.tick(), uid, self.stack[-1] if self.stack else ""))
        elif StorageWeakRef(st).cdata in self.params:
            self.param_uses[StorageWeakRef(st).cdata] = (self.tick(), st.nbytes())
        return t

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)

    def input_ids(self, args) -> tuple:
        """The storage ids of the tensors in ``args`` (a DualTensor's primal and tangent), each once."""
        out = []
        for a in tree_flatten(args)[0]:
            if _lazy(a):  # nothing computed yet: no storage of its own
                continue
            for p in (a._primal, a._tangent) if isinstance(a, DualTensor) else (a,) if isinstance(a, torch.Tensor) else ():
                try:
                    uid = self.storage_id(p.untyped_storage())
                except (NotImplementedError, RuntimeError):
                    continue
                if uid is not None and uid not in out:
                    out.append(uid)
        return tuple(out)

    def unique_bytes(self, uids) -> int:
        return sum(self.sizes[u] for u in set(uids))

    def in_windows(self, windows) -> set:
        """The storage ids saved within any of ``windows`` (``(start, end, ...)``)."""
        times = [e[0] for e in self.events]  # increasing
        out: set = set()
        for start, end, *_ in windows:
            out.update(e[1] for e in self.events[bisect.bisect_right(times, start):bisect.bisect_left(times, end)])
        return out

    def owned(self, owner: str) -> int:
        return self.unique_bytes(e[1] for e in self.events if e[2] == owner)


class _Uses(TorchDispatchMode):
    """Every op of the profiled dual forward, as a dispatch mode on ``saved``'s clock: when each storage
    is made and when it is last read by an op while requiring grad. Its gradient is live in backward from
    that last reader's backward to its maker's (the skips of a U-Net, an embedding every block reads),
    whatever is recomputed: :meth:`grads_across` gives those bytes per call. A ``cat``/``stack`` passes
    its inputs' gradients on as views of its output's, which hold that whole gradient until the earliest
    input's maker has run its backward."""

    sgflow_observer = True  # holds no op outputs (sgflow's fused ops may still write into them in place)

    _PINNING = ("aten.cat.default", "aten.stack.default")

    def __init__(self, saved: _Saved):
        super().__init__()
        self.saved = saved
        self.made: dict[int, int] = {}  # storage id -> time of the op that made it
        self.read: dict[int, int] = {}  # storage id -> last time an op read it (requiring grad)
        self.pinned: dict[int, int] = {}  # a cat's output -> when the earliest of its inputs was made

    def _ids(self, tensors):
        for a in tensors:
            if isinstance(a, torch.Tensor) and not isinstance(a, DualTensor) and a.layout == torch.strided \
                    and a.device.type != "meta":
                try:
                    uid = self.saved.storage_id(a.untyped_storage())
                except (NotImplementedError, RuntimeError):
                    continue
                if uid is not None:
                    yield a, uid

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.saved.checking:
            return out
        now = self.saved.tick()
        outs = [uid for _, uid in self._ids(tree_flatten(out)[0])]
        for uid in outs:
            self.made.setdefault(uid, now)
        reads = [uid for a, uid in self._ids(tree_flatten((args, kwargs))[0])
                 if a.requires_grad and a.is_floating_point()]
        if reads and str(func) in self._PINNING and len(outs) == 1:
            self.pinned[outs[0]] = min(self.made.get(u, now) for u in reads)
            return out
        for uid in reads:
            self.read[uid] = now
        return out

    def slice_grads(self, inputs) -> int:
        """What a call's inputs' gradients add to its backward when it runs in row slices (each slice's
        gradient of an input padded to the input's size, added into the input's gradient, whole from the
        first slice on): :data:`ROW_SLICE_GRADS` x the inputs' bytes (those that take a gradient)."""
        return int(ROW_SLICE_GRADS * sum(self.saved.sizes[u] for u in inputs if u in self.read))

    def grads_across(self, calls) -> list[int]:
        """Per call ``(start, end, ...)``: the bytes of the gradients live in its backward that flow
        around it: of storages made up to its end and read after it (its outputs included)."""
        spans = sorted((self.pinned.get(u, self.made.get(u, 0)), r, self.saved.sizes[u]) for u, r in self.read.items())
        made = [m for m, _, _ in spans]
        return [sum(g for _, r, g in spans[:bisect.bisect_right(made, end)] if r > end) for _start, end, *_ in calls]


def _backward_scratch(saved: _Saved, start: int, end: int, inputs: tuple, args, out, module: nn.Module) -> int:
    """What the backward of a profiled call's own graph (from its outputs to its tensor inputs and
    parameters, without touching ``.grad``) makes beyond the intermediates it frees: the peak of those
    intermediates still held plus what the backward made and holds (its parameters' gradients among it),
    less the intermediates (bytes; -1 where it could not be run). Its graph is spent (its outputs are
    detached next)."""
    from sgflow.memory import PeakTensorBytes

    def tensors(tree):
        return [p for a in tree_flatten(tree)[0] if not _lazy(a) for p in _parts(a)
                if isinstance(p, torch.Tensor) and p.requires_grad]

    outs = [o for o in tensors(out) if o.grad_fn is not None]
    wrt = list({id(t): t for t in tensors(args) + [p for p in module.parameters() if p.requires_grad]}.values())
    if not outs or not wrt:
        return 0
    intermediates = {u for u in saved.in_windows([(start, end)]) if u not in inputs}
    grads = [torch.ones_like(o) for o in outs]
    meter = PeakTensorBytes()
    for u in intermediates:
        ref = saved.refs[u]
        if not ref.expired():
            meter._counted[ref.cdata] = (ref, saved.sizes[u])
            meter.current += saved.sizes[u]
    held = meter.current
    saved.checking = True  # no part of the forward
    try:
        with meter:
            torch.autograd.grad(outs, wrt, grads, allow_unused=True)
    except Exception:  # a backward that cannot run alone here: the estimate falls back to a ratio
        return -1
    finally:
        saved.checking = False
    return max(meter.peak - held, 0)


def _detach(out):
    """The outputs cut from the candidate's graph (freeing it), as fresh tensors that still require
    grad where they did: what follows saves what it would save in training. A copy of a new leaf, not
    the leaf itself: the forward may modify a block's output in place (``h += 1``), which autograd
    allows on an intermediate and refuses on a leaf."""

    def leaf(a):
        return a.detach().requires_grad_().clone() if a.requires_grad else a.detach()

    def one(a):
        if _lazy(a):  # passed on lazy, as the forward does: what follows may fuse it (GroupNorm + SiLU + conv)
            return a
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


def _lazy(a) -> bool:
    """A lazy dual node not computed yet (a GroupNorm's output waiting for its SiLU and conv, attention
    scores waiting for their softmax): reading its primal or tangent would compute it, unfused."""
    from sgflow.autodual.attention import LazyDual

    return isinstance(a, LazyDual) and a._cache is None


def _any_lazy(tree) -> bool:
    return any(_lazy(a) for a in tree_flatten(tree)[0])


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
    """Patch the candidates' forwards: each runs with its own saved bytes, inputs and FLOPs counted (its
    call recorded as a window of ``saved``'s clock, with its inputs), and returns detached outputs, so only
    one candidate's graph is alive at a time. On the dual pass the candidates in ``row_check`` are also
    checked for mapping rows to rows (each check one more forward of the candidate on half the batch)."""
    from sgflow.autodual import patched_forwards

    mods = dict(model.named_modules())

    checking = []  # non-empty while a candidate's row check runs: nested candidates just run

    def wrap(orig, path):
        @functools.wraps(orig)
        def forward(*args, **kwargs):
            if checking:
                return orig(*args, **kwargs)
            c = costs[path]
            inputs = saved.input_ids((args, kwargs))
            start = saved.tick()
            if dual:
                c.boundary += saved.unique_bytes(inputs)
                c.dual_inputs = c.dual_inputs or has_dual(args, kwargs)
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
            end = saved.tick()
            if dual and c.batch == 0 and (path not in row_check or _any_lazy(out)):
                c.rows, c.batch = None, -1  # too small to be worth row slices: not checked
            elif dual and c.batch == 0:  # first call of this candidate: does it map rows to rows?
                drew = any(not torch.equal(a, b) for a, b in zip(rng, _rng_states(args, kwargs)))
                checking.append(path)
                saved.checking = True
                try:
                    c.rows, c.batch = (None, -1) if drew else _row_layout(orig, args, kwargs, out)
                finally:
                    checking.pop()
                    saved.checking = False
            scratch = _backward_scratch(saved, start, end, inputs, (args, kwargs), out, mods[path])
            saved.windows.setdefault(path, []).append((start, end, inputs, scratch))
            return _detach(out)

        return forward

    with patched_forwards((mods[p], functools.partial(wrap, path=p)) for p in paths):
        yield


def _timeline(saved: _Saved, uses: _Uses, paths, params: dict) -> Timeline:
    """A profiled forward's :class:`Timeline`. In a call's backward, besides what is held: the gradients
    flowing around it, and those of the parameters read after it (made by then, kept to the end of the
    step; its own parameters' are in its measure)."""
    param_uses = sorted(saved.param_uses.values())
    timeline = Timeline(sizes=saved.sizes, saves=saved.events)
    calls = [(p, w) for p in paths for w in saved.windows.get(p, [])]
    grads = dict(zip([id(w) for _, w in calls], uses.grads_across([w for _, w in calls])))
    pgrads = {id(w): sum(b for t, b in param_uses if t > w[1]) for _, w in calls}
    times = [e[0] for e in saved.events]
    for p in paths:
        timeline.windows[p] = []
        for w in saved.windows.get(p, []):
            start, end, ins, scratch = w
            inner = [v for _, v in calls if start < v[0] and v[1] < end]
            timeline.windows[p].append(Call(
                start, end, ins, saved.unique_bytes(saved.in_windows([(start, end)]) - set(ins)),
                grads[id(w)] + pgrads[id(w)], uses.slice_grads(ins),
                # A call's backward runs those of the calls inside it: the largest of their measures.
                max([v[3] for v in inner] + [scratch]) if scratch >= 0 else -1, scratch, params[p],
                _inner_peak(saved, times, w, inner, grads, pgrads)))
    return timeline


def _inner_peak(saved: _Saved, times: list, call, inner: list, grads: dict, pgrads: dict) -> int:
    """The peak of a call's backward over its inner calls, as if nothing inside it were recomputed: in the
    backward of an inner call, what the call saved up to that call's end, the gradients flowing around that
    call inside this one (skips of a U-Net recomputed whole) and its own ops' measure."""
    start, end, ins, _ = call
    seen, held, peak = set(ins), 0, 0
    events = saved.events[bisect.bisect_right(times, start):bisect.bisect_left(times, end)]
    k = 0
    for v in sorted(inner, key=lambda v: v[1]):
        while k < len(events) and events[k][0] <= v[1]:
            uid = events[k][1]
            if uid not in seen:
                seen.add(uid)
                held += saved.sizes[uid]
            k += 1
        around = max(grads[id(v)] - grads[id(call)], 0) + max(pgrads[id(v)] - pgrads[id(call)], 0)
        peak = max(peak, held + around + max(v[3], 0))
    return peak


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
    costs = {p: BlockCost(p, parent, dual_inputs=False) for p, parent in candidates.items()}
    devices = sorted({x.device.index for x in inputs if isinstance(x, torch.Tensor) and x.device.type == "cuda"})
    with _preserved_state(model, devices):
        state = torch.random.get_rng_state()
        plain = _Saved(params)
        plain_uses = _Uses(plain)
        with torch.enable_grad(), plain.hooks(), _profiling(model, list(candidates), plain, costs, dual=False), \
                plain_uses:
            out = model(*inputs)
        del out
        for p, c in costs.items():  # each storage once, however many blocks inside it save it
            c.plain = plain.unique_bytes(plain.in_windows(plain.windows.get(p, ())))
        # Row slices of a candidate free about what its plain forward keeps (half its dual intermediates):
        # only those that could free MIN_ROW_SLICE_GAIN are checked.
        row_check = {p for p, c in costs.items() if c.plain >= MIN_ROW_SLICE_GAIN} if split_rows else set()
        torch.random.set_rng_state(state)  # the same dropout draws as the plain pass
        dual = _Saved(params)
        uses = _Uses(dual)
        with torch.enable_grad(), dual.hooks(), _profiling(model, list(candidates), dual, costs, dual=True,
                                                           row_check=row_check), uses:
            out = run_dual(model, inputs, tangents)
        del out
    for p, c in costs.items():
        c.own = dual.owned(p)
        c.kept = dual.unique_bytes(dual.in_windows(dual.windows.get(p, [])))
    mods = dict(model.named_modules())
    param_bytes = {p: sum(q.numel() * q.element_size() for q in mods[p].parameters() if q.requires_grad)
                   for p in candidates}
    timeline = _timeline(dual, uses, candidates, param_bytes)
    flow = _timeline(plain, plain_uses, candidates, param_bytes)
    timeline.plain = flow.plain = plain.unique_bytes(e[1] for e in plain.events)
    timeline.plain_peak = flow.peak(set(), {}, candidates)[1]
    return choose_blocks([costs[p] for p in candidates], dual.owned(""), plain.owned(""), budget, split_rows, timeline)
