"""The library apart from the app: ``import sgflow`` and a fused loss need torch and numpy only.

The app's packages (extra ``sgflow[app]``: matplotlib, pillow, tqdm, torchdiffeq) are imported where the
CLI, trainer, evaluation or figures use them, never by ``import sgflow``. Each check runs in a fresh
interpreter; the second one hides those packages with a meta-path finder, as if they were not installed.
"""
import subprocess
import sys
import textwrap

import pytest

APP_MODULES = ("matplotlib", "PIL", "tqdm", "torchdiffeq")

# Hides the app's packages as if not installed: importing them (or their submodules) raises
# ModuleNotFoundError and importlib.util.find_spec says None (a None in sys.modules does both).
BLOCKER = textwrap.dedent(f"""
    import sys

    for _name in {APP_MODULES!r}:
        sys.modules[_name] = None
""")


def _run(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc.stdout


def test_import_sgflow_loads_no_app_package():
    # torch itself may import tqdm (torch.hub does when it is installed): count only what sgflow adds.
    out = _run(textwrap.dedent(f"""
        import sys
        import torch
        before = set(sys.modules)
        import sgflow
        sgflow.fused_loss, sgflow.sgflow_loss, sgflow.dualize
        import sgflow.nn, sgflow.ops
        added = sorted(m for m in set(sys.modules) - before if m.split(".")[0] in {APP_MODULES!r})
        assert not added, added
        print("ok")
    """))
    assert out.strip() == "ok"


def test_core_works_without_app_packages():
    out = _run(BLOCKER + textwrap.dedent("""
        import torch
        import sgflow
        from sgflow.nn import MLPFlowMap

        torch.manual_seed(0)
        model = MLPFlowMap(dim=2, hidden=16, depth=2, time_dim=8).double()
        x1 = torch.randn(8, 2, dtype=torch.float64)
        g = torch.Generator().manual_seed(1)
        loss, _ = sgflow.fused_loss(model, x1, generator=g)
        loss.backward()
        fused = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        ref, _ = sgflow.sgflow_loss(model, x1, generator=torch.Generator().manual_seed(1))
        ref.backward()
        assert torch.allclose(loss, ref, rtol=1e-10, atol=1e-12), (loss.item(), ref.item())
        assert all(torch.allclose(a, p.grad, rtol=1e-8, atol=1e-10) for a, p in zip(fused, model.parameters()))
        assert not any(mod is not None and m.split(".")[0] in ("matplotlib", "PIL", "tqdm", "torchdiffeq")
                       for m, mod in sys.modules.items())
        print("ok")
    """))
    assert out.strip() == "ok"


@pytest.mark.parametrize("code, needs", [
    ("import sgflow.plotting", "matplotlib"),
    ("from sgflow.data.mixtures import gaussian_mixture_2d as g; g('ring8').flow_map(0.0, 0.5, __import__('torch').zeros(1, 2))",
     "torchdiffeq"),
])
def test_app_features_name_the_extra(code, needs):
    out = _run(BLOCKER + textwrap.dedent(f"""
        try:
            {code}
        except ImportError as exc:
            print(exc)
        else:
            raise SystemExit("no ImportError")
    """))
    assert needs in out and "sgflow[app]" in out, out


def test_import_sgflow_does_not_import_dynamo():
    # torch._dynamo takes seconds to import: sgflow marks its compile-only functions lazily (outside_graph,
    # traced.register), so `import sgflow` alone does not load it.
    out = _run(textwrap.dedent("""
        import sys
        import sgflow
        sgflow.fused_loss, sgflow.dualize
        import sgflow.nn, sgflow.ops
        assert "torch._dynamo" not in sys.modules
        print("ok")
    """))
    assert out.strip() == "ok"
