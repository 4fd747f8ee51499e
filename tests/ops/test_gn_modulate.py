"""GroupNorm -> per-sample modulation -> activation -> convolution as one dual op
(``sgflow.ops.gn_modulate.GNModulateActConvDual``: EDM's ``conv(silu(addcmul(shift, group_norm(x), 1 + scale)))``)
and the dual engine's fusion into it (lazy GroupNorm node -> addcmul -> activation -> conv).

Reference: ``torch.func.jvp`` of the plain ops in float64 for (y, y_dot) and autograd of ``<G, y> + <Gd, y_dot>``
through it for the gradients of every input (x, x_dot, GroupNorm's affine, the modulation and its tangents,
the convolution's weight and bias).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sgflow
import sgflow.autodual.rules.fusions as fusions
from sgflow.memory import saved_tensor_bytes
from sgflow.ops.gn_modulate import gn_modulate_act_conv_dual, gn_modulate_act_conv_dual_ref
from sgflow.testing import rel_err

# (x shape, groups, modulation shape, conv weight shape, conf)
CASES = {
    "b2c6-7x5-pad1": ((2, 6, 7, 5), 3, (2, 6, 1, 1), (9, 6, 3, 3), ([1, 1], [1, 1], [1, 1], False, [0, 0], 1)),
    "batch1-c63-g7-1x1": ((1, 63, 5, 3), 7, (1, 63, 1, 1), (4, 63, 1, 1), ([1, 1], [0, 0], [1, 1], False, [0, 0], 1)),
    "per-channel-m-stride2": ((3, 4, 9, 6), 2, (1, 4, 1, 1), (5, 4, 3, 3), ([2, 2], [1, 1], [1, 1], False, [0, 0], 1)),
    "per-sample-m-1d": ((3, 4, 11), 4, (3, 1, 1), (5, 4, 3), ([1], [1], [1], False, [0], 1)),
    "1x1-image": ((3, 8, 1, 1), 1, (3, 8, 1, 1), (5, 8, 1, 1), ([1, 1], [0, 0], [1, 1], False, [0, 0], 1)),
}
ACTS = {"silu": ("silu", "none"), "gelu_tanh": ("gelu", "tanh")}


def _inputs(case, seed, shift=True, tangents=True):
    xshape, groups, mshape, wshape, conf = CASES[case]
    g = torch.Generator().manual_seed(seed)

    def rnd(*s, scale=1.0):
        return torch.randn(*s, generator=g, dtype=torch.float64) * scale

    c = xshape[1]
    x, x_dot = rnd(*xshape, scale=2.0) + 0.5, rnd(*xshape)
    gn_w, gn_b = 1 + rnd(c, scale=0.2), rnd(c, scale=0.2)
    m, m_dot, s, s_dot = 1 + rnd(*mshape, scale=0.3), rnd(*mshape), rnd(*mshape), rnd(*mshape)
    w, b = rnd(*wshape, scale=0.2), rnd(wshape[0])
    vals = {"x": x, "x_dot": x_dot, "gn_w": gn_w, "gn_b": gn_b, "m": m, "m_dot": m_dot if tangents else None,
            "s": s if shift else None, "s_dot": s_dot if shift and tangents else None, "w": w, "b": b}
    return vals, groups, conf


ORDER = ("x", "x_dot", "gn_w", "gn_b", "m", "m_dot", "s", "s_dot", "w", "b")


def _run(fn, vals, groups, conf, act, gy, gyd, dtype):
    leaves = {k: (None if v is None else v.to(dtype).requires_grad_()) for k, v in vals.items()}
    a = [leaves[k] for k in ORDER]
    name, approx = ACTS[act]
    if fn is gn_modulate_act_conv_dual:
        y, y_dot = fn(*a[:4], groups, 1e-5, *a[4:8], a[8], a[9], conf, act=name, approximate=approx)
    else:
        y, y_dot = fn(*a[:4], groups, 1e-5, *a[4:8], a[8], a[9], conf, name, approx)
    loss = sum((o * c.to(dtype)).sum() for o, c in ((y, gy), (y_dot, gyd)) if c is not None)
    present = [k for k in ORDER if leaves[k] is not None]
    grads = torch.autograd.grad(loss, [leaves[k] for k in present], allow_unused=True, materialize_grads=True)
    return (y, y_dot), dict(zip(present, grads))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("which", ["both", "primal", "tangent"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)], ids=["fp64", "fp32"])
def test_op_matches_jvp_reference(case, act, which, dtype, tol):
    vals, groups, conf = _inputs(case, seed=len(case) + len(act))
    y_ref = gn_modulate_act_conv_dual_ref(*[vals[k] for k in ORDER[:4]], groups, 1e-5,
                                          *[vals[k] for k in ORDER[4:8]], vals["w"], vals["b"], conf, *ACTS[act])[0]
    g = torch.Generator().manual_seed(7)
    gy, gyd = (torch.randn(y_ref.shape, generator=g, dtype=torch.float64) for _ in range(2))
    gy, gyd = (gy if which != "tangent" else None), (gyd if which != "primal" else None)
    ref_out, ref = _run(gn_modulate_act_conv_dual_ref, vals, groups, conf, act, gy, gyd, torch.float64)
    out, got = _run(gn_modulate_act_conv_dual, vals, groups, conf, act, gy, gyd, dtype)
    assert rel_err(out[0], ref_out[0]) < tol and rel_err(out[1], ref_out[1]) < tol
    for k, r in ref.items():
        assert (rel_err(got[k], r) < tol) if r.abs().max() > 0 else got[k].abs().max() == 0, (k, which)


@pytest.mark.parametrize("shift,tangents", [(False, True), (True, False)], ids=["no_shift", "constant_modulation"])
def test_op_without_shift_or_modulation_tangents(shift, tangents):
    """``s`` None (no shift), or plain m, s (no tangents: zero), in float64 against the reference."""
    vals, groups, conf = _inputs("b2c6-7x5-pad1", seed=3, shift=shift, tangents=tangents)
    g = torch.Generator().manual_seed(8)
    gy, gyd = (torch.randn(2, 9, 7, 5, generator=g, dtype=torch.float64) for _ in range(2))
    ref_out, ref = _run(gn_modulate_act_conv_dual_ref, vals, groups, conf, "silu", gy, gyd, torch.float64)
    out, got = _run(gn_modulate_act_conv_dual, vals, groups, conf, "silu", gy, gyd, torch.float64)
    assert rel_err(out[0], ref_out[0]) < 1e-10 and rel_err(out[1], ref_out[1]) < 1e-10
    for k, r in ref.items():
        assert rel_err(got[k], r) < 1e-10, k


def test_gradcheck_and_saved_bytes():
    """gradcheck through every input (float64); the op saves x, x_dot, the weights and the modulation only."""
    vals, groups, conf = _inputs("per-sample-m-1d", seed=5)
    leaves = [vals[k].clone().requires_grad_() for k in ORDER]

    def f(*a):
        return gn_modulate_act_conv_dual(*a[:4], groups, 1e-5, *a[4:8], a[8], a[9], conf)

    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-6, rtol=1e-5)
    leaves32 = [t.detach().float().requires_grad_() for t in leaves]
    saved = saved_tensor_bytes(lambda: sum(o.sum() for o in f(*[t * 1.0 for t in leaves32])))["bytes"]  # not leaves
    small = sum(t.numel() for t in leaves32[2:9]) * 4  # GroupNorm's affine, the modulation, the conv weight
    assert saved == 2 * leaves32[0].numel() * 4 + small


def test_double_backward_raises():
    vals, groups, conf = _inputs("b2c6-7x5-pad1", seed=2)
    leaves = [vals[k].clone().requires_grad_() for k in ORDER]
    y, y_dot = gn_modulate_act_conv_dual(*leaves[:4], groups, 1e-5, *leaves[4:8], leaves[8], leaves[9], conf)
    grads = torch.autograd.grad(y.square().sum() + y_dot.square().sum(), leaves, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grads[0].sum().backward()


def test_bad_input_is_named():
    vals, groups, conf = _inputs("b2c6-7x5-pad1", seed=1)
    a = [vals[k] for k in ORDER]
    with pytest.raises(ValueError, match=r"m of shape \(2, 6, 7, 5\) must be \[B or 1, C or 1, 1, \.\.\.\]"):
        gn_modulate_act_conv_dual(*a[:4], groups, 1e-5, vals["x"], *a[5:8], a[8], a[9], conf)
    with pytest.raises(ValueError, match="x_dot shape"):
        gn_modulate_act_conv_dual(a[0], a[1][:1], *a[2:4], groups, 1e-5, *a[4:8], a[8], a[9], conf)
    with pytest.raises(TypeError, match="s is torch.float32"):
        gn_modulate_act_conv_dual(*a[:4], groups, 1e-5, a[4], a[5], a[6].float(), a[7], a[8], a[9], conf)
    with pytest.raises(ValueError, match="act must be"):
        gn_modulate_act_conv_dual(*a[:4], groups, 1e-5, *a[4:8], a[8], a[9], conf, act="relu")


class _EDMStage(nn.Module):
    """EDM's second half of a block: conv1(dropout(silu(addcmul(shift, norm1(h), scale + 1)))); the scale and
    shift from the embedding by a linear layer."""

    def __init__(self, c=6, emb=5, out=4, p=0.0):
        super().__init__()
        self.norm1, self.affine = nn.GroupNorm(3, c), nn.Linear(emb, 2 * c)
        self.conv1, self.p = nn.Conv2d(c, out, 3, padding=1), p

    def forward(self, h, emb):
        scale, shift = self.affine(emb).unsqueeze(2).unsqueeze(3).chunk(2, dim=1)
        a = F.silu(torch.addcmul(shift, self.norm1(h), scale + 1))
        return self.conv1(F.dropout(a, p=self.p, training=self.training))


class _ADMStage(_EDMStage):
    """ADM's / diffusers' form of the same norm: ``norm(h) * (1 + scale) + shift`` (a mul, then an add; the shift
    on either side)."""

    def __init__(self, shift_first=False, **kw):
        super().__init__(**kw)
        self.shift_first = shift_first

    def forward(self, h, emb):
        scale, shift = self.affine(emb)[..., None, None].chunk(2, dim=1)
        n = self.norm1(h) * (1 + scale)
        a = F.silu(shift + n if self.shift_first else n + shift)
        return self.conv1(F.dropout(a, p=self.p, training=self.training))


def _engine(stage, dtype, fused, seed=11):
    """(y, y_dot, gradients of h, h_dot, emb, emb_dot and the parameters, saved bytes) through the dual engine."""
    g = torch.Generator().manual_seed(seed)
    h, h_dot = (torch.randn(2, 6, 7, 5, generator=g, dtype=torch.float64).to(dtype).requires_grad_() for _ in range(2))
    e, e_dot = (torch.randn(2, 5, generator=g, dtype=torch.float64).to(dtype).requires_grad_() for _ in range(2))
    before = fusions.GN_MODULATE
    fusions.GN_MODULATE = fused
    out = {}
    try:
        def step():
            torch.manual_seed(0)  # one dropout mask for every variant
            y = stage(sgflow.autodual.make_dual(h * 1.0, h_dot * 1.0), sgflow.autodual.make_dual(e * 1.0, e_dot * 1.0))
            out["y"] = (sgflow.autodual.primal(y), sgflow.autodual.tangent(y))
            return (out["y"][0] * 3.0).sum() + (out["y"][1] * out["y"][1]).sum()

        saved = saved_tensor_bytes(step)
        grads = torch.autograd.grad(saved["loss"], [h, h_dot, e, e_dot, *stage.parameters()])
    finally:
        fusions.GN_MODULATE = before
    return [*out["y"], *grads], saved["bytes"]


def _reference(stage):
    g = torch.Generator().manual_seed(11)
    h, h_dot = (torch.randn(2, 6, 7, 5, generator=g, dtype=torch.float64).requires_grad_() for _ in range(2))
    e, e_dot = (torch.randn(2, 5, generator=g, dtype=torch.float64).requires_grad_() for _ in range(2))
    torch.manual_seed(0)
    y, y_dot = torch.func.jvp(lambda a, b: stage(a, b), (h * 1.0, e * 1.0), (h_dot * 1.0, e_dot * 1.0))
    grads = torch.autograd.grad((y * 3.0).sum() + (y_dot * y_dot).sum(), [h, h_dot, e, e_dot, *stage.parameters()])
    return [y, y_dot, *grads]


@pytest.mark.parametrize("form", ["edm_addcmul", "adm_mul_add", "adm_shift_first"])
def test_engine_fuses_the_stage_and_keeps_one_pair(form):
    """Through the dual engine the stage runs as the fused op: values and gradients = the unfused engine's and
    the jvp reference (float64), and it keeps GroupNorm's input pair only, two activation pairs less."""
    torch.manual_seed(12)
    stage = {"edm_addcmul": _EDMStage, "adm_mul_add": _ADMStage,
             "adm_shift_first": lambda: _ADMStage(shift_first=True)}[form]().double()
    fused, fused_bytes = _engine(stage, torch.float64, True)
    plain, plain_bytes = _engine(stage, torch.float64, False)
    ref = _reference(stage)
    for a, b, r in zip(fused, plain, ref):
        assert rel_err(a, r) < 1e-10 and rel_err(b, r) < 1e-10
    pair, modulation = 2 * 2 * 6 * 7 * 5 * 8, 2 * 6 * 8  # float64 [2, 6, 7, 5] pair; one [2, 6, 1, 1] tensor
    assert plain_bytes - fused_bytes == 2 * pair - 4 * modulation  # m, m_dot, s, s_dot saved by the op


@pytest.mark.parametrize("variant", ["dropout", "bf16"])
def test_engine_falls_back_unfused(variant):
    """Dropout with p > 0 between the activation and the conv, or bf16: the ops apart, still = the unfused engine
    (and no fused stage in the report)."""
    torch.manual_seed(13)
    if variant == "dropout":
        stage = _EDMStage(p=0.3).double().train()
        dtype, tol = torch.float64, 1e-12
    else:
        stage = _EDMStage().to(torch.bfloat16)
        dtype, tol = torch.bfloat16, 0.0
    fused, fused_bytes = _engine(stage, dtype, True)
    plain, plain_bytes = _engine(stage, dtype, False)
    assert fused_bytes == plain_bytes
    for a, b in zip(fused, plain):
        assert rel_err(a.double(), b.double()) <= tol
