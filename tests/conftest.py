import os
import shutil
import sys

# The third-party-style test networks (testnets.py) live at the repository root, outside the sgflow package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Kernels are tested on CPU through Triton's interpreter; the flag must be set before triton is imported.
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a test of a minute or more (deselect with -m 'not slow')")


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of small problems (float64 checks, tracing on tiny tensors): as
    fast, and it does not stall when other processes share the cores (oversubscribed OpenMP threads made
    such tests 10-50x slower). Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _plan_small_networks(monkeypatch):
    """Tests run small networks: let ``dualize(blocks="auto")`` recompute blocks at any size, so that the
    recomputation paths are what the equivalence tests exercise (in use, a step whose plain forward keeps
    under 16 MiB recomputes nothing; tests/test_plan.py checks that default)."""
    import sgflow.autodual.plan as plan

    monkeypatch.setattr(plan, "MIN_PLANNED_BYTES", 0)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield

