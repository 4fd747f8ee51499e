"""``dualize(model, blocks="auto")``: the measured choice of recomputed blocks (sgflow.autodual.plan)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import sgflow
from sgflow import testnets
from sgflow.autodual.plan import BlockCost, RowSplit, choose_blocks
from sgflow.memory import peak_tensor_bytes

MiB = 2**20


pytestmark = pytest.mark.usefixtures("one_thread")


def _cost(path, kept, boundary, plain, gflops, parent=None):
    return BlockCost(path, parent=parent, own=kept * MiB, kept=kept * MiB, boundary=boundary * MiB, plain=plain * MiB,
                     flops=int(gflops * 1e9))


def test_nothing_recomputed_when_the_dual_forward_is_already_within_budget():
    costs = [_cost("a", 10, 2, 10, 1.0), _cost("b", 10, 2, 10, 1.0)]
    plan = choose_blocks(costs, outside_kept=0, outside_plain=0, budget=1.0)
    assert plan.blocks == [] and plan.estimate() == 20 * MiB


def test_cheapest_bytes_first_and_blocks_without_gain_never():
    # a1, a2 and b free the same bytes; b costs 100x the FLOPs; c frees nothing (it keeps only its inputs).
    costs = [_cost("a1", 40, 4, 20, 1.0), _cost("b", 40, 4, 20, 100.0), _cost("a2", 40, 4, 20, 1.0),
             _cost("c", 8, 8, 8, 0.0)]
    plain = 68
    # Kept with a1 and a2 recomputed: their inputs, b and c, plus 40 MiB live again in a backward.
    plan = choose_blocks(costs, 0, 0, budget=(4 + 4 + 40 + 8 + 40) / plain)
    assert plan.blocks == ["a1", "a2"]
    assert plan.estimate() <= plan.budget * plain * MiB
    plan = choose_blocks(costs, 0, 0, budget=0.01)  # unreachable: everything that frees bytes, never c
    assert plan.blocks == ["a1", "b", "a2"]


def test_a_block_replaces_its_chosen_children():
    # p = child q (cheap, frees 30) + child r (expensive, frees 30) + 40 MiB of its own, inputs 4 MiB.
    costs = [
        _cost("p", 0, 4, 60, 10.0),
        _cost("p.q", 34, 4, 20, 1.0, parent="p"),
        _cost("p.r", 34, 4, 20, 9.0, parent="p"),
    ]
    costs[0].own = 40 * MiB
    costs[0].kept = (40 + 34 + 34) * MiB
    plan = choose_blocks(costs, 0, 0, budget=0.2)
    assert plan.blocks == ["p"], plan.blocks  # not p together with a child of p
    assert plan.estimate() == 4 * MiB + 108 * MiB


@pytest.mark.parametrize("name,shape,batch,kw", [
    # The sizes of benchmarks/memory.py's user-network rows (README); at a few KiB per activation the
    # per-parameter temporaries of any fused step, not the activations, set the peak.
    pytest.param("adm", (3, 32, 32), 8, {"channel_mult": [1, 2, 2], "num_res_blocks": 2}, id="adm-3x32x32-b8"),
    pytest.param("dit", (3, 32, 32), 8, {"depth": 6, "hidden_size": 64}, id="dit-3x32x32-b8"),
    # Shallow and wide at a large batch: recomputing every block is not enough (0.76x); row slices are.
    pytest.param("mlp", (2,), 4096, {"hidden": 256, "depth": 4}, id="mlp-2-b4096"),
])
def test_planned_fused_step_peak_within_the_target_of_flow_matching(name, shape, batch, kw):
    """Peak tensor memory of a whole step (loss, backward), measured in one process for flow matching,
    the planned fused path and the fused path with nothing recomputed: planned <= 0.6x flow matching."""
    torch.manual_seed(0)
    model = testnets.build(name, shape, **kw)
    x1 = torch.randn(batch, *shape)

    def step(loss_fn, m):
        def run():
            loss_fn(m, x1, generator=torch.Generator().manual_seed(3))[0].backward()
            model.zero_grad(set_to_none=True)
        return run

    dual = sgflow.dualize(model)
    assert dual.plan is None
    step(sgflow.fused_loss, dual)()
    assert dual.plan is not None and dual.blocks == dual.plan.blocks and dual.blocks
    fm = peak_tensor_bytes(step(sgflow.flow_matching_loss, model))["peak_bytes"]
    fused = peak_tensor_bytes(step(sgflow.fused_loss, dual))["peak_bytes"]
    keep_all = peak_tensor_bytes(step(sgflow.fused_loss, sgflow.dualize(model, blocks="none")))["peak_bytes"]
    print(f"{name}: peak, fused planned {fused / fm:.2f}x flow matching, nothing recomputed {keep_all / fm:.2f}x\n{dual.plan}")
    assert fused <= 0.6 * fm
    assert keep_all > fm  # what the plan had to bring down


class _BNDropNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 16)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.BatchNorm1d(16), nn.SiLU(), nn.Dropout(0.2), nn.Linear(16, 16)) for _ in range(3))
        self.out = nn.Linear(16, 6)

    def forward(self, t, u, x):
        h = self.inp(x) + (u - t)[:, None]
        for b in self.blocks:
            h = h + b(h)
        return self.out(h)


def test_profile_leaves_rng_streams_and_buffers_as_they_were():
    torch.manual_seed(0)
    model = _BNDropNet().double().train()
    dual = sgflow.dualize(model)
    x = torch.randn(5, 6, dtype=torch.float64)
    t, u = torch.rand(5, dtype=torch.float64) * 0.5, torch.rand(5, dtype=torch.float64) * 0.5 + 0.5
    x_dot = torch.randn_like(x)
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    rng = torch.random.get_rng_state()
    plan = dual.make_plan(t, u, x, torch.ones_like(t), torch.zeros_like(u), x_dot)
    assert torch.equal(torch.random.get_rng_state(), rng)
    for n, b in model.named_buffers():
        assert torch.equal(b, buffers[n]), n
    assert [c.path for c in plan.costs if c.parent is None] == ["inp", "blocks.0", "blocks.1", "blocks.2", "out"]
    assert all(c.boundary > 0 and c.plain > 0 for c in plan.costs if c.parent is None)
    assert "estimated dual kept" in str(plan)


def test_plan_made_once_on_the_first_training_call_only():
    torch.manual_seed(0)
    model = testnets.build("mlp", (5,))
    dual = sgflow.dualize(model)
    static = list(dual.blocks)
    x1 = torch.randn(4, 5)
    with torch.no_grad():
        sgflow.fused_loss(dual, x1)
    assert dual.plan is None and dual.blocks == static
    loss, _ = sgflow.fused_loss(dual, x1)
    loss.backward()
    plan = dual.plan
    assert plan is not None
    sgflow.fused_loss(dual, x1)[0].backward()
    assert dual.plan is plan
    fixed = sgflow.dualize(model, blocks="all")
    sgflow.fused_loss(fixed, x1)[0].backward()
    assert fixed.plan is None and fixed.blocks == static


def test_bad_blocks_and_budget_are_named():
    model = testnets.build("mlp", (5,))
    with pytest.raises(ValueError, match="budget"):
        sgflow.dualize(model, budget=0)
    with pytest.raises(ValueError, match="'bogus'"):
        sgflow.dualize(model, blocks="bogus")


def _sgflow_nn_mlp():
    from sgflow.nn import build_model

    return build_model("mlp-small", (2,))


@pytest.mark.parametrize("make", [pytest.param(lambda: testnets.build("mlp", (2,)), id="testnets-mlp"),
                                  pytest.param(_sgflow_nn_mlp, id="sgflow-nn-mlp")])
def test_bad_tangents_of_a_dualized_model_are_named(make):
    dual = sgflow.dualize(make())
    t, x = torch.rand(3), torch.randn(3, 2)
    with pytest.raises(ValueError, match=r"x_dot must have x's shape \(3, 2\), got \(3, 3\)"):
        dual.dual_forward(t, t, x, None, None, torch.randn(3, 3))
    with pytest.raises(TypeError, match="x_dot must be a floating-point tensor"):
        dual.dual_forward(t, t, x, None, None, torch.ones(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"t_dot must have t's shape \(3,\), got \(3, 1\)"):
        dual.dual_forward(t, t, x, torch.ones(3, 1), None, torch.randn(3, 2))
    with pytest.raises(ValueError, match="x_dot is on meta but x is on cpu"):
        dual.dual_forward(t, t, x, None, None, torch.randn(3, 2, device="meta"))
    # A tangent of another floating dtype is cast to its input's (float64 -> float32 here).
    y, y_dot = dual.dual_forward(t, t, x, None, None, torch.randn(3, 2, dtype=torch.float64))
    assert y_dot.dtype == x.dtype


def test_row_slices_only_where_recomputing_is_not_enough_and_only_for_row_maps():
    # Recomputing both leaves a 40 MiB block live in backward: over a 30 MiB target. "a" maps rows to
    # rows (profiled), "b" does not.
    rows = RowSplit(1, (0,), ())
    costs = [_cost("a", 40, 4, 40, 1.0), _cost("b", 20, 4, 20, 1.0)]
    costs[0].rows, costs[0].batch = rows, 64
    plan = choose_blocks(costs, 0, 0, budget=30 / 60)
    assert plan.blocks == ["a", "b"] and plan.splits == {"a": RowSplit(2, (0,), ())}
    assert plan.estimate() == (8 + 20) * MiB and "in 2 row slices" in str(plan)
    # Tighter: "a" goes to 4 slices, then "b" (20 MiB, not a row map) is the largest: stop there.
    plan = choose_blocks(costs, 0, 0, budget=0.1)
    assert plan.splits == {"a": RowSplit(4, (0,), ())} and plan.estimate() == (8 + 20) * MiB
    assert choose_blocks(costs, 0, 0, budget=0.1, split_rows=False).splits == {}
    small = [_cost("a", 1.5, 0.1, 1.5, 1.0)]  # halving frees 0.75 MiB: not worth the slices
    small[0].rows, small[0].batch = rows, 64
    assert choose_blocks(small, 0, 0, budget=0.1).splits == {}
    costs[0].batch = 3  # fewer rows than slices
    assert choose_blocks(costs, 0, 0, budget=0.1).splits == {"a": RowSplit(2, (0,), ())}


class _RowNet(nn.Module):
    """Blocks of every kind for the profile's row check: row maps (LayerNorm MLP, one with a shared [8, 16]
    table as a second input), batch statistics (BatchNorm in training), random draws (dropout)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 16)
        self.ln = nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 16), nn.SiLU(), nn.Linear(16, 16))
        self.table = nn.Parameter(torch.randn(8, 16))
        self.mix = _TableBlock()
        self.bn = nn.Sequential(nn.BatchNorm1d(16), nn.Linear(16, 16))
        self.drop = nn.Sequential(nn.Dropout(0.3), nn.Linear(16, 16))
        self.out = nn.Linear(16, 6)

    def forward(self, t, u, x):
        h = self.inp(x) + (u - t)[:, None]
        h = h + self.ln(h)
        h = h + self.mix(h, 2 * self.table)  # a computed [8, 16] table, not a parameter
        h = h + self.bn(h)
        h = h + self.drop(h)
        return self.out(h)


class _TableBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 16)

    def forward(self, h, table):
        return self.lin(h) + torch.softmax(h @ table.t(), -1) @ table


def _inputs(b, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, 6, generator=g, dtype=dtype)
    t = torch.rand(b, generator=g, dtype=dtype) * 0.5
    u = t + torch.rand(b, generator=g, dtype=dtype) * 0.5
    return t, u, x, torch.ones_like(t), torch.zeros_like(u), torch.randn(b, 6, generator=g, dtype=dtype)


def test_profile_finds_which_blocks_map_rows_to_rows():
    torch.manual_seed(0)
    model = _RowNet().double().train()
    plan = sgflow.dualize(model).make_plan(*_inputs(6))
    rows = {c.path: c.rows for c in plan.costs if c.parent is None}
    assert rows["ln"] == RowSplit(1, (0,), ()) and rows["out"] == RowSplit(1, (0,), ())
    assert rows["mix"] == RowSplit(1, (0,), ())  # the table (8 rows) goes whole to every slice
    assert rows["bn"] is None  # batch statistics
    assert rows["drop"] is None  # draws a mask
    # At batch 8 the table has the batch's leading size: slicing it changes the result, so no slices.
    plan = sgflow.dualize(model).make_plan(*_inputs(8))
    assert {c.path: c.rows for c in plan.costs}["mix"] is None
    model.eval()  # batch norm on running statistics, dropout off: both map rows to rows
    plan = sgflow.dualize(model).make_plan(*_inputs(8))
    rows = {c.path: c.rows for c in plan.costs if c.parent is None}
    assert rows["bn"] is not None and rows["drop"] is not None


@pytest.mark.parametrize("batch", [pytest.param(7, id="b7-uneven"), pytest.param(2, id="b2")])
def test_row_sliced_blocks_give_the_reference_gradients(batch, monkeypatch):
    """A plan with every row-map block recomputed in 4 row slices: loss and gradients equal the JVP
    reference to 1e-10 (float64); dropout blocks are never sliced; parameters reached as a module
    attribute (the table) get their gradient."""
    import sgflow.autodual.plan as plan_mod

    monkeypatch.setattr(plan_mod, "MIN_ROW_SLICE_GAIN", 0)  # slice even these few-KiB blocks
    torch.manual_seed(0)
    model = _RowNet().double().eval()
    dual = sgflow.dualize(model, budget=1e-6)
    x1 = torch.randn(batch, 6, dtype=torch.float64)

    def grads(m):
        model.zero_grad(set_to_none=True)
        loss, _ = sgflow.fused_loss(m, x1, generator=torch.Generator().manual_seed(2)) if m is not None else \
            sgflow.sgflow_loss(model, x1, generator=torch.Generator().manual_seed(2))
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    grads(dual)  # the first call profiles and plans
    assert dual.splits and all(s.chunks in (2, 4) for s in dual.splits.values()), dual.plan
    loss, got = grads(dual)
    ref_loss, ref = grads(None)
    assert torch.allclose(loss, ref_loss, rtol=1e-12, atol=0)
    for n in ref:
        assert ref[n].abs().max() > 0, n
        err = (got[n] - ref[n]).norm() / ref[n].norm()
        assert err <= 1e-10, (n, float(err))


def test_small_steps_recompute_nothing_by_default(monkeypatch):
    """Under MIN_PLANNED_BYTES saved by the plain forward (the demo's MLP keeps ~1 MiB), recomputation
    costs time for no memory that matters: nothing is recomputed; the same costs over it are planned."""
    import sgflow.autodual.plan as plan_mod

    monkeypatch.setattr(plan_mod, "MIN_PLANNED_BYTES", 16 * MiB)  # the library's default (conftest lowers it)
    costs = [_cost("a", 10, 1, 5, 1.0), _cost("b", 10, 1, 5, 1.0)]
    plan = choose_blocks(costs, 0, 0, budget=0.5)
    assert plan.blocks == [] and "not memory-bound" in str(plan)
    big = [_cost("a", 40, 1, 20, 1.0), _cost("b", 40, 1, 20, 1.0)]
    assert choose_blocks(big, 0, 0, budget=0.5).blocks
    torch.manual_seed(0)
    from sgflow.nn import build_model

    model = build_model("mlp-small", (2,))
    dual = sgflow.dualize(model)
    sgflow.fused_loss(dual, torch.randn(256, 2))[0].backward()
    assert dual.plan is not None and dual.blocks == [] and dual.splits == {}
