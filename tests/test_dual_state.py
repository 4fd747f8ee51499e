"""The dual forward's state is one declared context object (``sgflow.autodual.tensor.DualContext``) pushed by
``dual_call`` for the call's duration: nothing undeclared can be set on it, the state at rest cannot be
written, nested calls get their own and give the outer one back, and a thread the model starts itself gets
its own."""
import dataclasses
import threading

import pytest
import torch
from torch import nn

import sgflow
import testnets
from sgflow.autodual import tensor as dual_tensor
from sgflow.autodual.tensor import AT_REST, DualContext, current, dual_context

FIELDS = {f.name for f in dataclasses.fields(DualContext)}


def test_context_declares_its_fields_and_nothing_else_can_be_set():
    ctx = DualContext()
    assert FIELDS == {"report", "context_fn", "stack", "in_block", "last_key", "traced"}
    with pytest.raises(AttributeError):
        ctx.in_blok = True  # a typo cannot create a field


def test_at_rest_cannot_be_written():
    assert current() is AT_REST
    with pytest.raises(AttributeError, match="no dual forward runs"):
        AT_REST.in_block = True
    with pytest.raises(AttributeError):
        AT_REST.stack.append("x")  # a tuple
    assert AT_REST.report is None and AT_REST.in_block is False and AT_REST.stack == ()


def test_a_dual_step_pushes_one_context_and_leaves_none(monkeypatch):
    # Every context made during a step is collected (the blocks' recomputation in backward may run on
    # autograd's own thread: it must find no context there, i.e. the state at rest).
    made, orig = [], dual_tensor.dual_context
    seen_in_backward = []

    def spy(*args, **kwargs):
        cm = orig(*args, **kwargs)
        made.append(cm)
        return cm

    monkeypatch.setattr("sgflow.autodual.call.dual_context", spy)
    torch.manual_seed(0)
    model = testnets.build("adm", (3, 8, 8), channel_mult=[1, 2], num_res_blocks=1, model_channels=16).double()
    dual = sgflow.dualize(model, blocks="auto")
    x1 = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    loss, _ = sgflow.fused_loss(dual, x1)
    assert dual.blocks, "no recomputed block: the backward would not test the recomputation"
    assert made, "dual_call pushed no context"
    assert current() is AT_REST

    handle = model.register_forward_pre_hook(lambda *_: seen_in_backward.append(current()))
    loss.backward()  # the blocks' recomputation runs the model's modules again
    handle.remove()
    assert current() is AT_REST
    assert all(c is AT_REST for c in seen_in_backward)


def test_nested_and_report_contexts():
    report = {}
    with dual_context(report=report) as outer:
        assert current() is outer and outer.report is report
        with dual_context() as inner:
            assert current() is inner and inner is not outer and inner.report is None
        assert current() is outer
    assert current() is AT_REST

    # A dual call records into the report it was given, by (module path, op).
    from sgflow.autodual.call import dual_call

    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh())
    dual_call(model, [torch.randn(2, 3)], [torch.randn(2, 3)], report=report)
    assert {path for path, _ in report} >= {"0", "1"}, report
    assert current() is AT_REST


class _Threaded(nn.Module):
    """Runs its child in a thread of its own, as nn.DataParallel runs its replicas."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(3, 3)

    def forward(self, x):
        out = []
        th = threading.Thread(target=lambda: out.append(self.inner(x)))
        th.start()
        th.join()
        return out[0]


def test_a_thread_of_the_models_own_gets_its_own_context():
    from sgflow.autodual.call import dual_call

    torch.manual_seed(0)
    model = _Threaded().double()
    x, xd = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    y, yd = dual_call(model, [x], [xd])
    torch.testing.assert_close(y, model.inner(x))
    torch.testing.assert_close(yd, xd @ model.inner.weight.t())
    assert current() is AT_REST and AT_REST.stack == ()


@pytest.mark.parametrize("case", ["flat", "shape_tuple", "list_of_tensors", "tuple_with_tensor", "nested_kwargs"])
def test_dual_leaves_fast_path_agrees_with_pytree(case):
    """Flat arguments skip pytree (a _FlatSpec); anything holding a tensor in a container goes through it.
    Either way the leaves, the DualTensor indices and the round trip are pytree's."""
    from torch.utils._pytree import tree_flatten

    from sgflow.autodual.tensor import _FlatSpec, dual_leaves, make_dual, unflatten_args

    x = make_dual(torch.randn(2, 3), torch.randn(2, 3))
    y = torch.randn(2, 3)
    args, kwargs = {
        "flat": ((x, y, 2.0), {"alpha": 0.5}),
        "shape_tuple": ((x, (3, 2)), {}),
        "list_of_tensors": (([x, y],), {"dim": 0}),
        "tuple_with_tensor": (((y, x), 1), {}),
        "nested_kwargs": ((x,), {"other": [y, x]}),
    }[case]
    flat, spec, idx = dual_leaves(args, kwargs)
    assert (type(spec) is _FlatSpec) == (case in ("flat", "shape_tuple"))
    ref_flat, _ = tree_flatten((args, kwargs))
    assert [i for i, a in enumerate(ref_flat) if isinstance(a, type(x))] == idx
    assert [flat[i] is ref_flat[i] for i in idx] == [True] * len(idx)
    a, k = unflatten_args(flat, spec)
    assert a == args and k == kwargs
