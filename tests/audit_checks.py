"""The finite-difference audit of a whole network, with the assertions every network's audit test makes
(imported by tests/test_dualize.py and tests/test_diffusers_networks.py)."""
import sgflow


def audit_network(model, x1):
    """``sgflow.check_gradients`` of ``model`` on ``x1`` (two directions, seed 3, float64 expected): every
    finite-difference value non-zero, every parameter with a gradient, fused and reference within 1e-6 of
    the finite differences and within 1e-10 of each other. Returns the report."""
    report = sgflow.check_gradients(model, x1, directions=2, seed=3, include_raw_torch=False)
    print(report)
    assert all(v != 0.0 for v in report.fd)
    assert report.zero_grad_params == []
    assert report.fused.ran, report.fused.error
    assert report.fused.fd_error <= 1e-6
    assert report.reference.fd_error <= 1e-6
    assert report.fused_vs_reference <= 1e-10
    assert report.ok(1e-6)
    return report
