"""diffusers' ``UNet2DModel`` and ``DiTTransformer2DModel`` behind the thin flow-map wrapper users write
(``testnets_diffusers``, issue 18): ``sgflow.dualize`` through diffusers' own forward code.

1. The wrappers: shapes, dtypes, both times matter, ``build`` errors, diffusers imported only to build.
2. Float64: fused (dualized, default plan and row-sliced plans) vs reference SGFlow loss and gradients
   to 1e-10, every parameter with a non-zero reference gradient.
3. The finite-difference audit (``sgflow.check_gradients``) to 1e-6.
4. Memory: the default plan sees through ``self.net`` and the fused step's peak tensor bytes are at most
   0.5x flow matching's at a memory-bound size (float32).

Skipped without diffusers (``pip install -e .[test]`` installs it).
"""
from __future__ import annotations

import ast
import pathlib
import sys

import pytest
import torch

pytest.importorskip("diffusers")

import sgflow  # noqa: E402
import sgflow.autodual.plan as plan_mod  # noqa: E402
import testnets_diffusers  # noqa: E402
from sgflow.memory import peak_tensor_bytes  # noqa: E402
from sgflow.testing import rel_err  # noqa: E402
from testnets_diffusers import NETWORKS, build  # noqa: E402
from audit_checks import audit_network  # noqa: E402

D64 = torch.float64
MiB = 2**20
SEED = 2026

pytestmark = pytest.mark.usefixtures("one_thread")


def _times(batch, seed, dtype=D64):
    gen = torch.Generator().manual_seed(seed)
    t = torch.rand(batch, generator=gen, dtype=dtype)
    return t, t + (1 - t) * torch.rand(batch, generator=gen, dtype=dtype)


# ---------------------------------------------------------------------------------------------------
# 1. The wrappers
# ---------------------------------------------------------------------------------------------------

ONE_PER_NET = [
    pytest.param("diffusers-unet", (3, 6, 10), id="unet-3x6x10"),
    pytest.param("diffusers-dit", (3, 6, 6), id="dit-3x6x6"),
]


def test_registry_names():
    assert set(NETWORKS) == {"diffusers-unet", "diffusers-dit"}


@pytest.mark.parametrize("name,shape", ONE_PER_NET)
def test_output_shape_dtype_and_both_times_matter(name, shape):
    torch.manual_seed(SEED)
    model = build(name, shape).to(D64).eval()
    assert type(model.net).__module__.startswith("diffusers.")
    t, u = _times(3, 1)
    x = torch.randn(3, *shape, dtype=D64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y = model(t, u, x)
        assert y.shape == x.shape and y.dtype == D64 and torch.isfinite(y).all() and y.abs().max() > 0
        assert not torch.allclose(y, model(0.5 * t, u, x))  # t: the diffusers timestep
        assert not torch.allclose(y, model(t, 0.5 * (t + u), x))  # u - t: the extra embedding path


def test_build_uses_shape_and_overrides():
    unet = build("diffusers-unet", (1, 8, 12), block_out_channels=(8, 16, 16), norm_num_groups=4,
                 down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                 up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"), time_scale=10.0)
    cfg = unet.net.config
    assert (cfg.in_channels, cfg.out_channels, tuple(cfg.sample_size), cfg.class_embed_type) == (1, 1, (8, 12), "identity")
    assert unet.time_scale == 10.0
    deeper = build("diffusers-unet", (3, 8, 8), block_out_channels=(8, 16, 16), norm_num_groups=4)  # no block types
    assert deeper.net.config.down_block_types == ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D")
    assert deeper.net.config.up_block_types == ("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D")
    dit = build("diffusers-dit", (2, 12, 12), patch_size=4, num_layers=1)
    assert (dit.net.config.in_channels, dit.net.out_channels, dit.net.config.sample_size) == (2, 2, 12)
    assert len(dit.net.transformer_blocks) == 1
    assert isinstance(dit.net.transformer_blocks[0].norm1.emb.class_embedder, testnets_diffusers.StepEmbedding)


@pytest.mark.parametrize("name,shape,overrides,match", [
    pytest.param("unet", (3, 8, 8), {}, "diffusers-dit.*diffusers-unet", id="unknown-name"),
    pytest.param("diffusers-unet", (3, 7, 8), {}, "divisible by 2", id="unet-odd-size"),
    pytest.param("diffusers-unet", (3, 8, 8), {"block_out_channels": (8, 8, 8, 8, 8)}, "divisible by 16", id="unet-too-deep"),
    pytest.param("diffusers-dit", (3, 8, 10), {}, "square", id="dit-not-square"),
    pytest.param("diffusers-dit", (3, 9, 9), {}, "patch_size", id="dit-not-divisible"),
    pytest.param("diffusers-dit", (16,), {}, r"\(C, H, W\)", id="flat-shape"),
    pytest.param("diffusers-unet", (3, 8, 8), {"in_channels": 1}, "contradicts", id="conflicting-override"),
])
def test_build_errors(name, shape, overrides, match):
    with pytest.raises(ValueError, match=match):
        build(name, shape, **overrides)


def test_diffusers_imported_only_to_build(monkeypatch):
    """The module imports torch only (at the top level); without diffusers, building says what to install."""
    tree = ast.parse(pathlib.Path(testnets_diffusers.__file__).read_text())
    top = sorted({a.name for node in tree.body if isinstance(node, ast.Import) for a in node.names}
                 | {node.module for node in tree.body if isinstance(node, ast.ImportFrom)})
    assert top == ["__future__", "torch", "torch.nn"]
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers -> ImportError
    with pytest.raises(ImportError, match="pip install diffusers"):
        build("diffusers-unet", (3, 8, 8))


# ---------------------------------------------------------------------------------------------------
# 2. Float64: fused vs reference
# ---------------------------------------------------------------------------------------------------


def _batch(shape, seed, both_terms=False):
    """x1 and explicit noise / t / u / split (float64), as tests/test_dualize.py draws them; rows 0 / 1
    take terms 1 / 2."""
    g = torch.Generator().manual_seed(seed)
    n = shape[0]
    x1 = torch.randn(shape, dtype=D64, generator=g)
    noise = torch.randn(shape, dtype=D64, generator=g)
    t = torch.rand(n, dtype=D64, generator=g) * 0.7
    u = torch.clamp(t + 0.1 + torch.rand(n, dtype=D64, generator=g) * 0.5, max=1.0)
    kw = dict(noise=noise, t=t, u=u)
    if both_terms:
        kw["both_terms"] = True
    else:
        split = torch.rand(n, generator=g) < 0.5
        split[0] = True
        if n > 1:
            split[1] = False
        kw["split"] = split
    return x1, kw


def _flat(grads, params):
    return torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for g, p in zip(grads, params)])


def _assert_fused_equals_reference(dual, model, batch, tol=1e-10):
    """fused_loss(dual) vs sgflow_loss(model) (torch.func.jvp through sgflow.decompose): loss, both terms,
    the full gradient (``tol`` relative), each tensor within 1e3 * tol, and a non-zero reference gradient
    for every parameter tensor but the attention key biases. Their gradient is zero in exact arithmetic
    (adding ``q . b_k`` to every score of a row leaves the softmax unchanged), so both paths give
    rounding-level values (~1e-17) whose relative difference means nothing: they are checked against the
    gradient's norm instead. Returns the gradient's relative error."""
    x1, kw = batch
    names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad])
    loss_ref, info_ref = sgflow.sgflow_loss(model, x1, **kw)
    g_ref = torch.autograd.grad(loss_ref, params, allow_unused=True)
    loss_f, info_f = sgflow.fused_loss(dual, x1, **kw)
    g_f = torch.autograd.grad(loss_f, params, allow_unused=True)
    missing = [n for n, g in zip(names, g_f) if g is None]
    assert missing == [], f"fused path gave no gradient to {missing}"
    assert rel_err(loss_f, loss_ref) <= tol
    for key in ("term1", "term2"):
        assert rel_err(info_f[key], info_ref[key]) <= tol, key
    full_ref = _flat(g_ref, params)
    err = rel_err(_flat(g_f, params), full_ref)
    assert err <= tol, f"fused vs reference gradient: {err:.3e}"
    rounding = 1e-12 * float(full_ref.norm())
    zero = [n for n, g in zip(names, g_ref) if g is None or not g.norm() > rounding]
    key_biases = [n for n in names if n.endswith("to_k.bias")]
    assert zero == key_biases, f"reference gradient zero (to rounding) for {sorted(set(zero) - set(key_biases))}"
    assert all(g.norm() <= rounding for n, g in zip(names, g_f) if n in key_biases)
    per_tensor = {n: rel_err(a, b) for n, a, b in zip(names, g_f, g_ref) if n not in key_biases}
    worst = max(per_tensor, key=per_tensor.get)
    assert per_tensor[worst] <= 1e3 * tol, (worst, per_tensor[worst])
    return err


# (name, data shape, batch, both_terms): odd batches, non-square and odd token grids (DiT 6x6 / 10x10
# with patch 2: 9 / 25 tokens).
EQUIVALENCE = [
    pytest.param("diffusers-unet", (3, 6, 10), 3, False, id="unet-3x6x10-b3"),
    pytest.param("diffusers-unet", (1, 8, 12), 1, True, id="unet-1x8x12-b1-both-terms"),
    pytest.param("diffusers-dit", (3, 6, 6), 3, False, id="dit-3x6x6-b3"),
    pytest.param("diffusers-dit", (2, 10, 10), 1, True, id="dit-2x10x10-b1-both-terms"),
]


@pytest.mark.parametrize("name,shape,batch,both_terms", EQUIVALENCE)
def test_fused_equals_reference_float64(name, shape, batch, both_terms):
    """sgflow.dualize(model), default plan (tests/conftest.py lets it recompute at any size): the chosen
    blocks lie inside the wrapper's ``self.net`` (or are the wrapper's own step embedding)."""
    torch.manual_seed(SEED)
    model = build(name, shape).double()
    dual = sgflow.dualize(model)
    err = _assert_fused_equals_reference(dual, model, _batch((batch, *shape), seed=11, both_terms=both_terms))
    assert dual.plan is not None and dual.blocks, dual.plan
    assert "net" not in dual.blocks and all(p.startswith(("net.", "step_embed")) for p in dual.blocks), dual.blocks
    assert dual.last_report.fallbacks() == [], dual.last_report.fallbacks()  # every op has a rule
    print(f"{name}: fused vs reference {err:.2e}; recomputed {dual.blocks}")


def test_skip_block_unet_with_its_in_place_sum_equals_reference_float64():
    """diffusers' skip-block U-Net (the NCSN++ layout: SkipDownBlock2D, AttnSkipUpBlock2D, ...) ends with
    ``sample += skip_sample``, an in-place op on a tensor carrying a tangent, whose primal and tangent are the
    two halves of the fused GroupNorm-SiLU-conv op's output buffer (a DualizeError before): the out-of-place
    sum swapped into the tensor (sgflow.autodual.rules.inplace). Loss and full gradient = reference, default
    plan and every block recomputed."""
    torch.manual_seed(SEED)
    model = build("diffusers-unet", (3, 8, 8), block_out_channels=(32, 64), norm_num_groups=32, layers_per_block=1,
                  down_block_types=("SkipDownBlock2D", "AttnSkipDownBlock2D"),
                  up_block_types=("AttnSkipUpBlock2D", "SkipUpBlock2D")).double()
    x1, kw = _batch((2, 3, 8, 8), seed=11)
    params = [p for p in model.parameters() if p.requires_grad]
    loss_ref, _ = sgflow.sgflow_loss(model, x1, **kw)
    g_ref = _flat(torch.autograd.grad(loss_ref, params, allow_unused=True), params)
    for blocks in ("auto", "all"):
        loss_f, _ = sgflow.fused_loss(sgflow.dualize(model, blocks=blocks), x1, **kw)
        g_f = _flat(torch.autograd.grad(loss_f, params, allow_unused=True), params)
        assert rel_err(loss_f, loss_ref) <= 1e-10, blocks
        assert rel_err(g_f, g_ref) <= 1e-10, (blocks, rel_err(g_f, g_ref))


@pytest.mark.parametrize("name,shape", [
    pytest.param("diffusers-unet", (3, 6, 10), id="unet-3x6x10-b5"),
    pytest.param("diffusers-dit", (3, 6, 6), id="dit-3x6x6-b5"),
])
def test_row_sliced_plan_equals_reference_float64(name, shape, monkeypatch):
    """A budget nothing meets, row slices allowed at any size: diffusers blocks (the UNet backbone with its
    ``class_labels`` keyword, the DiT's transformer blocks with ``timestep`` / ``class_labels``) run in
    row slices of an uneven batch of 5, with the reference gradients."""
    monkeypatch.setattr(plan_mod, "MIN_ROW_SLICE_GAIN", 0)
    torch.manual_seed(SEED)
    model = build(name, shape).double()
    dual = sgflow.dualize(model, budget=1e-6)
    with pytest.warns(plan_mod.BudgetWarning):
        dual.make_plan(*_plan_inputs(5, shape))
    assert dual.splits and all(s.chunks in (2, 4) for s in dual.splits.values()), dual.plan
    _assert_fused_equals_reference(dual, model, _batch((5, *shape), seed=12))


def _plan_inputs(batch, shape):
    t, u = _times(batch, 3)
    x = torch.randn(batch, *shape, dtype=D64, generator=torch.Generator().manual_seed(4))
    return t, u, x, torch.ones_like(t), torch.zeros_like(u), torch.randn_like(x)


# ---------------------------------------------------------------------------------------------------
# 3. Finite-difference audit
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,shape,batch", [
    pytest.param("diffusers-unet", (3, 6, 10), 3, id="unet-3x6x10-b3"),
    pytest.param("diffusers-dit", (3, 6, 6), 3, id="dit-3x6x6-b3"),
])
def test_audit_against_finite_differences(name, shape, batch):
    torch.manual_seed(SEED)
    model = build(name, shape)
    x1 = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(12), dtype=D64)
    audit_network(model, x1)


# ---------------------------------------------------------------------------------------------------
# 4. Memory
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,shape,batch,kw", [
    pytest.param("diffusers-unet", (3, 32, 32), 8, {}, id="unet-3x32x32-b8"),
    # Four blocks of 4 x 16-dimensional heads (256 tokens). With two blocks the peak is 0.52x: the
    # step's fixed temporaries weigh more against fewer blocks' activations.
    pytest.param("diffusers-dit", (3, 32, 32), 8, {"num_layers": 4, "num_attention_heads": 4, "attention_head_dim": 16},
                 id="dit-3x32x32-b8"),
])
def test_default_plan_peak_at_most_half_of_flow_matching(name, shape, batch, kw, monkeypatch):
    """sgflow.dualize(model) as users call it (float32, the library's MIN_PLANNED_BYTES): the plan sees
    through the wrapper's ``self.net`` (blocks inside it, never the whole backbone), meets its budget, and a
    whole step's peak tensor bytes (loss, backward), measured in one process, are at most 0.5x flow
    matching's; with nothing recomputed they are above it."""
    monkeypatch.setattr(plan_mod, "MIN_PLANNED_BYTES", 16 * MiB)  # the library's default (conftest lowers it)
    torch.manual_seed(0)
    model = build(name, shape, **kw)
    x1 = torch.randn(batch, *shape)

    def step(loss_fn, m):
        def run():
            loss_fn(m, x1, generator=torch.Generator().manual_seed(3))[0].backward()
            model.zero_grad(set_to_none=True)
        return run

    dual = sgflow.dualize(model)
    step(sgflow.fused_loss, dual)()  # the first training call plans
    plan = dual.plan
    assert plan is not None and plan.meets_budget and plan.plain_total >= 16 * MiB, plan
    assert dual.blocks and "net" not in dual.blocks, plan
    assert all(p.startswith(("net.", "step_embed")) for p in dual.blocks), plan
    assert any(p.startswith("net.") for p in dual.blocks), plan
    fm = peak_tensor_bytes(step(sgflow.flow_matching_loss, model))["peak_bytes"]
    fused = peak_tensor_bytes(step(sgflow.fused_loss, dual))["peak_bytes"]
    keep_all = peak_tensor_bytes(step(sgflow.fused_loss, sgflow.dualize(model, blocks="none")))["peak_bytes"]
    print(f"{name}: peak, flow matching {fm / MiB:.1f} MiB, fused planned {fused / fm:.3f}x, "
          f"nothing recomputed {keep_all / fm:.2f}x\n{plan}")
    assert fused <= 0.5 * fm
    assert keep_all > fm  # what the plan had to bring down


def test_memory_benchmark_takes_the_diffusers_networks(tmp_path, capsys):
    """benchmarks/memory.py --network diffusers-unet / diffusers-dit (--net-kw to the diffusers constructor)."""
    import importlib.util
    import json

    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "memory.py"
    spec = importlib.util.spec_from_file_location("sgflow_benchmark_memory_diffusers", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    for name, kw in (("diffusers-dit", '{"num_layers": 1}'),):  # the UNet takes the same path (build)
        out = tmp_path / name
        bench.main(["--device", "cpu", "--network", name, "--shape", "3,8,8", "--net-kw", kw, "--batch", "2",
                    "--steps", "1", "--warmup", "0", "--methods", "flow_matching,sgflow_fused", "--out", str(out)])
        result = json.loads(out.with_suffix(".json").read_text())
        rows = {r["method"]: r for r in result["rows"]}
        assert result["meta"]["config"] == name and set(rows) == {"flow_matching", "sgflow_fused"}
        assert all(r["tracked_peak_bytes"] > 0 and r["aten_ops"] > 0 for r in rows.values())
    assert "sgflow_fused" in capsys.readouterr().out
