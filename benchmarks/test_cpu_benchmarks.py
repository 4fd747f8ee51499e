"""CPU benchmarks (pytest-benchmark) of the pure-PyTorch paths: one training step of each method on the
tiny U-Net, and the dual ops against torch.func.jvp of the same op (forward + backward).

    python -m pytest benchmarks/test_cpu_benchmarks.py --benchmark-json=benchmarks/results/cpu.json

Ratios (printed at the end) are against flow matching for steps and against torch.func.jvp for ops.
"""
import pytest
import torch
import torch.nn.functional as F

import sgflow
from sgflow.nn import build_model
from sgflow.ops import cpp_ext
from sgflow.ops.attention import attention_dual
from sgflow.ops.groupnorm_silu import gn_silu_conv_dual

STEP_METHODS = {
    "flow_matching": sgflow.flow_matching_loss,
    "sgflow_reference": sgflow.sgflow_loss,
    "sgflow_fused": sgflow.fused_loss,
    "meanflow": sgflow.meanflow_loss,
    "meanflow_fused": sgflow.fused_meanflow_loss,
}


@pytest.mark.parametrize("method", list(STEP_METHODS))
def test_training_step_tiny_unet(record, method):
    torch.manual_seed(0)
    model = build_model("tiny", (3, 16, 16))
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x1 = torch.randn(8, 3, 16, 16)
    gen = torch.Generator().manual_seed(0)

    def step():
        opt.zero_grad(set_to_none=True)
        loss, _ = STEP_METHODS[method](model, x1, generator=gen)
        loss.backward()
        opt.step()

    record("step tiny-unet b8 16x16", method, step, reference=method == "flow_matching")


def _fwd_bwd(fn, inputs):
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]

    def run():
        y, y_dot = fn(*leaves)
        torch.autograd.backward((y, y_dot), (torch.ones_like(y), torch.ones_like(y_dot)))

    return run


@pytest.mark.parametrize("impl", ["jvp", "fused"])
def test_gn_silu_conv_stage(record, impl):
    torch.manual_seed(0)
    x, xd = torch.randn(8, 64, 16, 16), torch.randn(8, 64, 16, 16)
    w, b = torch.randn(64), torch.randn(64)
    cw, cb = torch.randn(64, 64, 3, 3) * 0.05, torch.randn(64)
    if impl == "jvp":
        fn = lambda x, xd, w, b, cw, cb: torch.func.jvp(  # noqa: E731
            lambda x: F.conv2d(F.silu(F.group_norm(x, 8, w, b)), cw, cb, padding=1), (x,), (xd,)
        )
    else:
        fn = lambda x, xd, w, b, cw, cb: gn_silu_conv_dual(x, xd, w, b, 8, cw, cb, 1, backend="torch")  # noqa: E731
    record("gn-silu-conv b8 c64 16x16", impl, _fwd_bwd(fn, (x, xd, w, b, cw, cb)), reference=impl == "jvp")


@pytest.mark.parametrize("impl", ["jvp", "fused", pytest.param("fused_cpp", marks=pytest.mark.skipif(
    not cpp_ext.available(), reason="the C++ extension is unavailable"))])
def test_attention(record, impl):
    torch.manual_seed(0)
    ins = [torch.randn(4, 2, 256, 32) for _ in range(6)]
    if impl == "jvp":
        def plain(q, k, v):
            return torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, -1) @ v

        fn = lambda q, k, v, qd, kd, vd: torch.func.jvp(plain, (q, k, v), (qd, kd, vd))  # noqa: E731
    else:
        backend = "cpp" if impl == "fused_cpp" else "torch"
        fn = lambda *a: attention_dual(*a, backend=backend)  # noqa: E731
    record("attention b4 h2 n256 d32", impl, _fwd_bwd(fn, ins), reference=impl == "jvp")


@pytest.mark.parametrize("impl", ["jvp", "product_rule", "fused_aten", pytest.param("fused_cpp", marks=pytest.mark.skipif(
    not cpp_ext.available(), reason="the C++ extension is unavailable"))])
def test_scale(record, impl, monkeypatch):
    """A DiT gate's dual product at [16, 256, 128] x [16, 1, 128]: torch.func.jvp, the product rule's ATen ops
    (what the engine ran before sgflow.ops.scale), and ScaleDual on its ATen and C++ paths."""
    from sgflow.ops import scale as sc

    torch.manual_seed(0)
    ins = [torch.randn(16, 256, 128), torch.randn(16, 256, 128), torch.randn(16, 1, 128), torch.randn(16, 1, 128)]
    if impl == "jvp":
        fn = lambda x, xd, s, sd: torch.func.jvp(torch.mul, (x, s), (xd, sd))  # noqa: E731
    elif impl == "product_rule":
        fn = lambda x, xd, s, sd: (x * s, xd * s + x * sd)  # noqa: E731
    else:
        monkeypatch.setattr(sc, "CPP_KERNELS", impl == "fused_cpp")
        fn = sc.scale_dual
    record("scale b16 n256 c128", impl, _fwd_bwd(fn, ins), reference=impl == "jvp")
