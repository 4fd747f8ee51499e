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
  the dual forward runs them on primal and tangent), SDPA counted 3x (the dual's 6 products against 2;
  PyTorch's counter has no formula for the CPU kernel), the backward the profile runs for the candidates
  inside it not counted; plus ``ELEMENTWISE_FLOPS_PER_BYTE`` per byte kept: the cost of recomputing it;

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
in row slices the gradients of the inputs the slices gather). :meth:`BlockPlan.estimate` is the largest
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
in backward: 2.1x flow matching on a DiT. A candidate whose inputs carry no tangent (an embedding of u)
runs a plain forward; recomputed, it is checkpointed like the others (its saved bytes are flow matching's
there). Measured peaks with the default 0.5, x flow matching's (ATen ops of the step with Adam x flow
matching's; ``benchmarks/memory.py``, CPU, 3x32x32, efc1456): ADM channel_mult 1,2,2 batch 8 0.496 (2.1); EDM
channel_mult 1,2,2 batch 8 0.483 (2.0); DiT depth 6 hidden 64 batch 8 0.498 (2.5); diffusers' UNet2DModel
(block_out_channels 64, 128, 128, batch 16) 0.458 (2.2), its DiTTransformer2DModel (6 layers of 4 x 32,
batch 16) 0.487 (2.4); the cifar10 U-Net (sgflow.nn) batch 16 0.494 (1.8). The token-attention MLP (hidden
256, depth 4, batch 4096) is estimated at 0.498 and measures 0.496 (3.6): in the backward of its last
block's last row slice (of 4) the step holds the inputs of the blocks with the embedding every block reads,
the gradients of the block's output and of that embedding, the other slices' input gradients and one
slice's intermediates and backward (86.1 MiB against flow matching's 173.5).
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

A recomputed block may also *keep its dual attention's outputs* (o, o_dot and two per-row statistics): its
recomputation in backward then reruns the projections but not the attention's 6 products, which on a DiT block
are a third of its FLOPs, for two activations of the block's width held (``BlockCost.attn_out`` /
``attn_flops``, measured by the profile). The choice is made with every recomputed block keeping them
(:attr:`BlockPlan.keep_attention`) and without, the blocks of the latter then keeping them where they fit
(``keep_paths``), and the cheaper one within the budget is kept (with :data:`KEEP_ATTENTION` False, never).
The DiT at a budget of 0.75 (3x32x32, batch 16) then recomputes four blocks and one MLP, three of the blocks
keeping them: FLOPs 2.95 -> 2.81x flow matching's, peak 0.69 -> 0.74x (``benchmarks/NOTES.md``, issue 18
part 9, with the step times).

The profile itself (hooks, dispatch-mode record, each candidate's backward measured) is
:mod:`sgflow.autodual.profile`.
"""
from __future__ import annotations

import bisect
import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import NamedTuple

__all__ = ["BlockCost", "BlockPlan", "Call", "RowSplit", "Timeline", "choose_blocks",
           "ELEMENTWISE_FLOPS_PER_BYTE", "BACKWARD_SCRATCH", "BACKWARD_LIVE_FACTOR",
           "MAX_ROW_SLICES", "MIN_ROW_SLICE_GAIN",
           "MIN_PLANNED_BYTES", "ROW_SLICE_OVERHEAD", "KEEP_ATTENTION", "BudgetWarning", "OverBudgetError"]

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
# Whether a plan may have its recomputed blocks keep their dual attention's outputs (False: never; the
# benchmarks' A/B of the two).
KEEP_ATTENTION = True


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
    # Of those, the ones read again after the block (positions and names: an embedding every later block
    # reads): narrowed per slice just before it runs, not gathered by one split (call._row_slices).
    shared: tuple = ()


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
    # It changed one of its inputs in place (``SiLU(inplace=True)`` first): never recomputed (checkpoint's
    # backward would find that input modified). DualTensor inputs cannot be: the dual dispatch refuses.
    mutates_inputs: bool = False
    attn_out: int = 0  # bytes of the dual attention outputs made inside it (o, o_dot, lse, mu; each storage once)
    attn_flops: int = 0  # FLOPs of those dual attention forwards (6 products each, 3x the plain attention's)

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
    slice_grads: int = 0  # bytes of its inputs that row slices gather (RowSplit: sliced, not shared), taking a gradient
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
    # ``(time, storage id, owner)`` of every dual attention output (o, o_dot, lse, mu): what a recomputed block
    # holds besides its inputs when it keeps them (``keeps``).
    attention: tuple | list = ()  # (a class-level default: a timeline pickled before it existed reads it)

    def peak(self, chosen: set, splits: dict, parents: dict, keeps=None) -> tuple[int, int, str | None]:
        """``(held, peak, where)`` with the candidates in ``chosen`` recomputed (those for which
        ``keeps(path)`` is true keeping the outputs of their dual attention): ``held`` the bytes held at the
        end of the forward (every storage once, however many tensors or blocks keep it), ``peak`` the
        estimated peak in backward (:meth:`BlockPlan.estimate`), ``where`` the candidate whose backward sets
        it (None: the end of the forward)."""
        covered: dict = {}
        inside: dict = {}
        cover: dict = {}  # the recomputed block a candidate lies in (itself if chosen), None if none
        for path, parent in parents.items():  # parents listed before their children
            inside[path] = parent is not None and covered[parent]
            covered[path] = path in chosen or inside[path]
            cover[path] = cover[parent] if inside[path] else path if path in chosen else None
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
        if keeps is not None:
            for time, uid, owner in self.attention:
                if owner and covered[owner] and keeps(cover[owner]) and first.get(uid, time + 1) > time:
                    first[uid] = time
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
                    # In row slices the parameters' gradients are whole from the first slice on, each
                    # slice's added into them, and the slices' gradients of the inputs one split gathers are
                    # held until the last slice has run: (k-1)/k of them during it. (A shared input's slices'
                    # gradients go into its accumulating gradient slice by slice; the gathering itself,
                    # after the last slice, has freed the slices and the output's gradient: not the peak.)
                    here = held_at(call.start) + call.grads + (own - params) // k + params \
                        + (call.slice_grads * (k - 1) // k + params if k > 1 else 0)
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
    # Recomputed blocks keeping the outputs of their dual attention (held through the step, not recomputed in
    # backward: ``BlockCost.attn_out`` / ``attn_flops``): every one (``keep_attention``), or those in
    # ``keep_paths`` (what fitted into a plan chosen without: :func:`_keep_where_it_fits`).
    keep_attention: bool = False
    keep_paths: frozenset = frozenset()

    @property
    def keep(self) -> list:
        """The recomputed blocks that keep their attention outputs (those with a dual attention inside)."""
        by_path = {c.path: c for c in self.costs}
        return [p for p in self.blocks if self._keeps(p) and by_path[p].attn_out > 0]

    def _keeps(self, path) -> bool:
        return self.keep_attention or path in self.keep_paths

    def _cost(self, c: BlockCost) -> float:
        """What recomputing ``c`` costs in this plan: :attr:`BlockCost.cost`, less its attention's forward
        where that is kept (never below its elementwise part: a hand-written attention counts 4 products on
        the plain pass, its dual 6)."""
        if not self._keeps(c.path):
            return c.cost
        return max(c.cost - c.attn_flops, ELEMENTWISE_FLOPS_PER_BYTE * c.kept + 1.0)

    def _boundary(self, c: BlockCost) -> int:
        """What ``c`` keeps when recomputed: its inputs, and its attention outputs where those are kept."""
        return c.boundary + (c.attn_out if self._keeps(c.path) else 0)

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
        """What the recomputation costs (:meth:`_cost` of the recomputed blocks: :attr:`BlockCost.cost`, less
        a kept attention's forward; a block in ``k`` row slices ``1 + ROW_SLICE_OVERHEAD * (k - 1)`` times its
        own)."""
        by_path = {c.path: c for c in self.costs}
        return sum(self._cost(by_path[p]) * (1 + ROW_SLICE_OVERHEAD * ((self.splits[p].chunks if p in self.splits else 1) - 1))
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
            return self.timeline.peak(chosen, self.splits, {c.path: c.parent for c in self.costs}, self._keeps)
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
            return self.timeline.peak(chosen, {}, {c.path: c.parent for c in self.costs}, self._keeps)[0]
        kept = self.outside_kept
        inside: set = set()  # candidates within a recomputed block (parents are listed before children)
        for c in self.costs:
            if c.parent is not None and (c.parent in chosen or c.parent in inside):
                inside.add(c.path)
                continue  # inside a recomputed block: only the block's inputs are kept
            kept += self._boundary(c) if c.path in chosen else c.own
        return kept

    def __str__(self):
        mib = 2.0 ** -20
        lines = [f"{'block':<32} {'kept MiB':>9} {'inputs MiB':>10} {'plain MiB':>9} {'GFLOP':>8}  recomputed",
                 "-" * 84]
        chosen, keep = set(self.blocks), set(self.keep)
        for c in self.costs:
            lines.append(f"{c.path:<32} {c.kept * mib:9.2f} {c.boundary * mib:10.2f} {c.plain * mib:9.2f} "
                         f"{c.flops / 1e9:8.3f}  {'yes' if c.path in chosen else ''}"
                         + (f", in {self.splits[c.path].chunks} row slices" if c.path in self.splits else "")
                         + (", keeping its attention outputs" if c.path in keep else ""))
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
        if self.keep:
            by_path = {c.path: c for c in self.costs}
            lines.append(f"{len(self.keep)} recomputed blocks keep their attention outputs "
                         f"({sum(by_path[p].attn_out for p in self.keep) * mib:.2f} MiB, "
                         f"{sum(by_path[p].attn_flops for p in self.keep) / 1e9:.3f} GFLOP not recomputed)")
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
    most ``L`` (and not changing an input in place: ``BlockCost.mutates_inputs``) are eligible, and among them the
    greedy choice recomputes the candidate that lowers the kept bytes most per unit of added cost
    (:attr:`BlockCost.cost`; a block replacing its chosen descendants) until the estimate is at most
    ``budget`` x flow matching's (:attr:`BlockPlan.target`). Then, while it
    still exceeds it and ``split_rows``, the recomputed block whose backward sets the estimate is run in
    twice the row slices, if it maps rows to rows (``BlockCost.rows``), up to :data:`MAX_ROW_SLICES`
    and while a doubling frees at least :data:`MIN_ROW_SLICE_GAIN` bytes. A choice that meets the budget
    then drops the recomputed blocks (most expensive first) and row slices it can do without. Of the
    choices that meet the budget the cheapest is kept (recomputation cost, a block in ``k`` row slices
    charged ``1 + ROW_SLICE_OVERHEAD * (k - 1)`` times its own), its blocks then replaced by one of their
    parts where the part alone is enough (:func:`_refine`); where none does, the one with the lowest
    estimate (``BlockPlan.meets_budget`` is then False; among estimates within :data:`ESTIMATE_TIE` of the
    lowest, the one holding least at the end of the forward). Nothing is recomputed where the plain
    forward keeps less than :data:`MIN_PLANNED_BYTES`.

    Where the candidates run a dual attention, the choice is made twice: with the recomputed blocks keeping
    their attention outputs (:attr:`BlockPlan.keep_attention`: each such block keeps them besides its inputs
    and its recomputation skips the attention's 6 products; on a DiT that recomputes every block for less
    than five of six whole ones cost) and without, the recomputed blocks of the latter then keeping them where
    the estimate stays within the budget (:func:`_keep_where_it_fits`); the cheaper choice that meets the
    budget is kept, else the lower estimate."""
    costs = list(costs)
    plans = [_choose(costs, outside_kept, outside_plain, budget, split_rows, timeline, keep)
             for keep in ((True, False) if KEEP_ATTENTION and any(c.attn_out > 0 for c in costs) else (False,))]
    within = [p for p in plans if p.meets_budget]
    if within:
        return min(within, key=BlockPlan.cost)
    return min(plans, key=BlockPlan.estimate)


def _choose(costs: list, outside_kept: int, outside_plain: int, budget: float, split_rows: bool,
            timeline: Timeline | None, keep: bool) -> BlockPlan:
    """:func:`choose_blocks` for one setting of :attr:`BlockPlan.keep_attention`."""

    def new_plan(blocks=()):
        return BlockPlan(costs=costs, outside_kept=outside_kept, outside_plain=outside_plain, budget=budget,
                         blocks=list(blocks), timeline=timeline, keep_attention=keep)

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
        chosen = tree.greedy({i for i, c in enumerate(costs) if c.kept <= bound and not c.mutates_inputs},
                             lambda ch: base.estimate(costs[i].path for i in ch), target, base._boundary, base._cost)
        plan = new_plan(c.path for i, c in enumerate(costs) if i in chosen)
        if split_rows:
            _split(plan, target)
        if plan.estimate() <= target:
            _prune(plan, target)
        plans.append(plan)
    within = [p for p in plans if p.estimate() <= target]
    if within:
        best = min(within, key=BlockPlan.cost)
        _refine(best, target)
        if not keep and KEEP_ATTENTION:
            _keep_where_it_fits(best, target)
        return best
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
        plan.splits[top.path] = dataclasses.replace(top.rows, chunks=n)


def _prune(plan: BlockPlan, target: float) -> None:
    """Drop what a choice within the budget does without: each recomputed block (most expensive first),
    then each block's row slices (halving them), where the estimate stays within ``target``."""
    by_path = {c.path: c for c in plan.costs}
    for path in sorted(plan.blocks, key=lambda p: -plan._cost(by_path[p])):
        split = plan.splits.pop(path, None)
        plan.blocks.remove(path)
        if plan.estimate() > target:
            plan.blocks.append(path)
            if split is not None:
                plan.splits[path] = split
    _in_candidate_order(plan)
    for path in sorted(plan.splits, key=lambda p: -plan._cost(by_path[p])):
        while path in plan.splits:
            split = plan.splits[path]
            if split.chunks > 2:
                plan.splits[path] = dataclasses.replace(split, chunks=split.chunks // 2)
            else:
                del plan.splits[path]
            if plan.estimate() > target:
                plan.splits[path] = split
                break


def _refine(plan: BlockPlan, target: float) -> None:
    """Replace recomputed blocks by one of their parts where that part alone keeps the estimate within
    ``target`` for less cost: the greedy choice takes the best bytes freed per FLOP, a whole block where the
    last few bytes needed were freed by its MLP alone (a DiT at a budget of 0.75: five whole blocks where four
    and one MLP do). Most expensive blocks first, each part tried cheapest first, repeated into the part."""
    by_path = {c.path: c for c in plan.costs}
    children: dict = {}
    for c in plan.costs:
        if c.parent is not None:
            children.setdefault(c.parent, []).append(c)
    todo = sorted(plan.blocks, key=lambda p: -plan._cost(by_path[p]))
    while todo:
        path = todo.pop(0)
        if path not in plan.blocks:
            continue
        split = plan.splits.pop(path, None)
        i = plan.blocks.index(path)
        for part in sorted(children.get(path, ()), key=plan._cost):
            if part.mutates_inputs or part.kept <= plan._boundary(part) or plan._cost(part) >= plan._cost(by_path[path]):
                continue
            plan.blocks[i] = part.path
            if plan.estimate() <= target:
                todo.insert(0, part.path)
                break
        else:
            plan.blocks[i] = path
            if split is not None:
                plan.splits[path] = split
    _in_candidate_order(plan)


def _in_candidate_order(plan: BlockPlan) -> None:
    """The plan's blocks sorted as the candidates are listed (forward order, parents first)."""
    order = {c.path: k for k, c in enumerate(plan.costs)}
    plan.blocks.sort(key=order.__getitem__)


def _keep_where_it_fits(plan: BlockPlan, target: float) -> None:
    """Have recomputed blocks of a plan chosen without kept attention outputs keep them where the estimate
    stays within ``target``: most attention FLOPs saved per byte held first (an attention block a diffusers
    UNet recomputes at a budget of 1.0: its outputs are small, its dual forward 3x a plain one)."""
    by_path = {c.path: c for c in plan.costs}
    for path in sorted((p for p in plan.blocks if by_path[p].attn_out > 0),
                       key=lambda p: -by_path[p].attn_flops / by_path[p].attn_out):
        before, plan.keep_paths = plan.keep_paths, plan.keep_paths | {path}
        if plan.estimate() > target:
            plan.keep_paths = before


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

    def greedy(self, eligible: set, estimate, target: float, boundary, cost) -> set:
        """Recompute eligible candidates, best bytes freed per unit of added cost first, until
        ``estimate(chosen)`` is at most ``target`` (or nothing eligible frees bytes); ``boundary(c)`` /
        ``cost(c)``: what a recomputed candidate keeps and costs (:meth:`BlockPlan._boundary` / ``_cost``)."""
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
                    contrib[i], ccost[i] = boundary(c), cost(c)
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
                gain = contrib[i] - boundary(costs[i])
                if gain > 0:
                    score = gain / max(cost(costs[i]) - ccost[i], 1.0)
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
