"""The dual forward's per-thread state (sgflow.autodual.tensor.STATE) is one declared object: a dual call, its
block checkpoints and their recomputation in backward (autograd's own thread) set no attribute it does not
declare, and it is back to its resting values afterwards."""
import threading

import torch

import sgflow
import testnets
from sgflow.autodual.tensor import STATE, _State


def test_a_dual_step_sets_only_declared_fields(monkeypatch):
    # Every thread's STATE is collected as it is created (autograd may run backward, and so the blocks'
    # recomputation, on a thread of its own).
    seen, orig = [], _State.__init__

    def init(self):
        orig(self)
        seen.append(self)

    monkeypatch.setattr(_State, "__init__", init)
    torch.manual_seed(0)
    model = testnets.build("adm", (3, 8, 8), channel_mult=[1, 2], num_res_blocks=1, model_channels=16).double()
    x1 = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    loss, _ = sgflow.fused_loss(sgflow.dualize(model, blocks="auto"), x1)
    loss.backward()
    states = [STATE, *seen]
    for st in states:
        assert set(vars(st)) <= set(_State.FIELDS), set(vars(st)) - set(_State.FIELDS)
    # At rest after the step: no module path on the stack, no block open, no report recording.
    assert STATE.stack == [] and STATE.in_block is False and STATE.report is None


def test_a_new_thread_starts_from_the_declared_defaults():
    got = {}

    def read():
        got.update({f: getattr(STATE, f) for f in _State.FIELDS})

    t = threading.Thread(target=read)
    t.start()
    t.join()
    assert got == {"stack": [], "report": None, "context_fn": None, "in_block": False, "last_key": None}
