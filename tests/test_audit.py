"""sgflow.audit.check_gradients: fused, reference and raw-torch SGFlow gradients against finite
differences (float64, stop-gradient target held fixed)."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sgflow.audit import GradientReport, check_gradients
from set_attention_flowmap import AttentionFlowMap


pytestmark = pytest.mark.usefixtures("one_thread")


def _cat_tu(x, t, u):
    return torch.cat([x, t[:, None], u[:, None]], -1)


class LayerNormMLP(nn.Module):
    """2-layer MLP with LayerNorm: f~(t, u, x) for x [B, d]."""

    def __init__(self, dim=5, hidden=8):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim + 2, hidden), nn.LayerNorm(hidden), nn.SiLU(),
            nn.Linear(hidden, hidden), nn.LayerNorm(hidden), nn.SiLU(),
            nn.Linear(hidden, dim),
        )

    def forward(self, t, u, x):
        return self.net(_cat_tu(x, t, u))


class InstanceNormConv(nn.Module):
    """Conv -> InstanceNorm2d (affine) -> SiLU -> conv on [B, C, 7, 5] images, times as channels."""

    def __init__(self, channels=3, width=6):
        super().__init__()
        self.inp = nn.Conv2d(channels + 2, width, 3, padding=1)
        self.norm = nn.InstanceNorm2d(width, affine=True)
        self.out = nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, t, u, x):
        b, _, h, w = x.shape
        tt = t[:, None, None, None].expand(b, 1, h, w)
        uu = u[:, None, None, None].expand(b, 1, h, w)
        return self.out(F.silu(self.norm(self.inp(torch.cat([x, tt, uu], 1)))))


class BatchNormMLP(nn.Module):
    def __init__(self, dim=4, hidden=8):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim + 2, hidden), nn.BatchNorm1d(hidden), nn.Tanh(), nn.Linear(hidden, dim))

    def forward(self, t, u, x):
        return self.net(_cat_tu(x, t, u))


class SlightlyWrongDual(nn.Module):
    """An MLP whose hand-written dual_forward scales the tangent by 1.001: a wrong fused path."""

    def __init__(self, dim=3):
        super().__init__()
        self.a = nn.Linear(dim + 2, 8)
        self.b = nn.Linear(8, dim)

    def forward(self, t, u, x):
        return self.b(torch.tanh(self.a(_cat_tu(x, t, u))))

    def dual_forward(self, t, u, x, t_dot, u_dot, x_dot):
        out, out_dot = torch.func.jvp(self.forward, (t, u, x), (t_dot, u_dot, x_dot))
        return out, out_dot * 1.001


def _data(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _assert_fused_right(report, tol=1e-6):
    if report.fused.ran:
        assert report.fused.fd_error < tol, report
        assert report.fused_vs_reference < tol, report
    else:  # only the fused column is skipped; the reference / raw-torch assertions stand
        pytest.skip(f"fused_loss could not take this model: {report.fused.error}")


@pytest.mark.parametrize("model_name", ["layernorm-mlp", "instancenorm-conv-7x5"])
def test_audit_catches_torch_norm_defect(model_name):
    torch.manual_seed(0)
    if model_name == "layernorm-mlp":
        model, x1 = LayerNormMLP(), _data(7, 5)
    else:
        model, x1 = InstanceNormConv(), _data(3, 3, 7, 5)
    report = check_gradients(model, x1)
    print(f"\n{model_name}\n{report}")
    assert isinstance(report, GradientReport) and len(report.fd) == 4
    assert report.reference_jvp == "forward"
    assert report.reference.fd_error < 1e-6, report
    assert report.raw_torch.ran and report.raw_torch.fd_error > 1e-2, (
        f"raw torch now agrees with finite differences ({report.raw_torch.fd_error:.1e}): upstream "
        f"pytorch#196700 fixed in torch {torch.__version__}? Update this test.\n{report}"
    )
    # The loss values agree: only torch's gradient formulas are wrong.
    assert abs(report.raw_torch.loss - report.reference.loss) < 1e-12 * max(1.0, abs(report.reference.loss))
    assert not report.zero_grad_params
    table = str(report)
    assert "raw torch" in table and "reference" in table and "fused" in table
    _assert_fused_right(report)
    assert report.ok()


def test_audit_tiny_unet_all_paths_agree():
    from sgflow.nn import build_model

    torch.manual_seed(0)
    model = build_model("tiny", (3, 7, 5), zero_init=False).eval()
    report = check_gradients(model, _data(3, 3, 7, 5), directions=3)
    print(f"\ntiny U-Net 3x7x5\n{report}")
    assert report.reference.grad_norm > 0 and len(report.zero_grad_params) <= 1, report.zero_grad_params
    for path in (report.reference, report.raw_torch, report.fused):
        assert path.ran and path.fd_error < 1e-6, report
    assert report.fused_vs_reference < 1e-6
    assert report.ok()


def test_audit_batchnorm_training_uses_double_vjp():
    """torch.func.jvp refuses BatchNorm's in-place running-statistics update: the reference switches
    to the double-VJP JVP (recorded in the report) and is right; raw torch's error is recorded."""
    torch.manual_seed(0)
    model = BatchNormMLP().train()
    with pytest.warns(UserWarning, match="captured tensor"):
        report = check_gradients(model, _data(6, 4))
    print(f"\nbatchnorm-mlp (train)\n{report}")
    assert report.reference_jvp == "double_vjp" and "captured tensor" in report.forward_ad_failure
    assert report.reference.fd_error < 1e-6, report
    assert not report.raw_torch.ran and "captured Tensor" in report.raw_torch.error
    assert "raised" in str(report)


def test_audit_sdpa_model_raw_torch_cannot_run():
    torch.manual_seed(0)
    report = check_gradients(AttentionFlowMap(width=8, causal=True), _data(3, 5, 2), directions=3)
    print(f"\nattention-mlp\n{report}")
    assert report.reference_jvp == "forward"  # the decomposition has forward AD
    assert report.reference.fd_error < 1e-6, report
    assert not report.raw_torch.ran and "forward AD" in report.raw_torch.error
    _assert_fused_right(report)


def test_audit_flags_a_wrong_fused_path():
    torch.manual_seed(0)
    report = check_gradients(SlightlyWrongDual(), _data(6, 3), include_raw_torch=False)
    assert report.raw_torch is None
    assert report.reference.fd_error < 1e-6
    assert report.fused.fd_error > 1e-4 and report.fused_vs_reference > 1e-4
    assert not report.ok()


def test_audit_leaves_model_alone_and_is_reproducible():
    torch.manual_seed(0)
    model = LayerNormMLP().train()
    before = copy.deepcopy(model.state_dict())
    x1 = _data(5, 5)
    a = check_gradients(model, x1, directions=2, seed=3, both_terms=True, include_raw_torch=False)
    b = check_gradients(model, x1, directions=2, seed=3, both_terms=True, include_raw_torch=False)
    c = check_gradients(model, x1, directions=2, seed=4, both_terms=True, include_raw_torch=False)
    assert a.fd == b.fd and a.reference.directional == b.reference.directional
    assert a.fd != c.fd
    assert model.training and next(model.parameters()).dtype == torch.float32
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.1)), id="nn.Dropout"),
        pytest.param(lambda: nn.MultiheadAttention(4, 2, dropout=0.2), id="MultiheadAttention-dropout"),
    ],
)
def test_audit_refuses_active_dropout(make):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = make()
            self.lin = nn.Linear(5, 3)

        def forward(self, t, u, x):
            return self.lin(_cat_tu(x, t, u))

    model = Net().train()
    with pytest.raises(ValueError, match=r"model\.eval\(\)"):
        check_gradients(model, _data(4, 3))
    report = check_gradients(model.eval(), _data(4, 3), directions=1, include_raw_torch=False)
    assert report.reference.fd_error < 1e-6


def test_audit_dropout_scan_does_not_call_getattr_fallbacks():
    """diffusers' models (ConfigMixin) answer a missing attribute such as ``dropout`` from their config
    through ``__getattr__``, with a FutureWarning on every audit; the scan reads attributes statically
    (a ``dropout`` rate set on the module is still refused)."""
    import warnings

    class ConfigLike(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(5, 3)

        def __getattr__(self, name):
            if name == "dropout":
                warnings.warn("Accessing config attribute `dropout` directly is deprecated", FutureWarning)
                return 0.0
            return super().__getattr__(name)

        def forward(self, t, u, x):
            return self.lin(_cat_tu(x, t, u))

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        report = check_gradients(ConfigLike().train(), _data(4, 3), directions=1, include_raw_torch=False)
    assert report.reference.fd_error < 1e-6
    model = ConfigLike().train()
    model.dropout = 0.2  # a rate of its own: refused as before
    with pytest.raises(ValueError, match="dropout p=0.2"):
        check_gradients(model, _data(4, 3))


def test_audit_detects_hidden_randomness():
    class Noisy(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(5, 3)

        def forward(self, t, u, x):  # functional dropout, no module attribute to scan
            return F.dropout(self.lin(_cat_tu(x, t, u)), 0.2, training=True)

    with pytest.raises(RuntimeError, match="not deterministic"):
        check_gradients(Noisy(), _data(4, 3), directions=1, include_raw_torch=False)


def test_audit_refuses_sgflow_unet_dropout_in_training_mode():
    from sgflow.nn import build_model

    model = build_model("tiny", (3, 7, 5), dropout=0.1).train()
    with pytest.raises(ValueError, match="dropout"):
        check_gradients(model, _data(2, 3, 7, 5))
