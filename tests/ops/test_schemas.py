"""The op schemas are written three times: in C++ (csrc/sgflow_ops.cpp, ``TORCH_LIBRARY``), as Python strings for
the torch-backend custom ops (ops/gn_silu_library.py) and as annotations of the Triton ops (``triton_op`` infers
its schema from them). The backends are interchangeable only while these agree: names, types, defaults and
aliasing of every argument and the return types.

Differences by design, listed here: a Triton op cannot return None, so ``gn_silu_dual_bwd_triton`` returns
``Tensor`` where the others return ``Tensor? g_x_dot`` (an empty tensor stands for None); ``triton_op`` does not
name its returns, infers ``SymInt`` for an ``int`` annotation and numbers its alias sets (``Tensor(a8!)``): types
are compared with SymInt read as int, aliasing as "written or not". There is no Triton ``gn_silu_dual_bwd_out``.
"""
from __future__ import annotations

import pytest
import torch

import sgflow.ops.attention as attention
import sgflow.ops.groupnorm_silu as gn
from sgflow.ops import cpp_ext

GN_OPS = ("gn_silu_dual_fwd", "gn_silu_dual_fwd_out", "gn_silu_dual_bwd", "gn_silu_dual_bwd_out")
GN_TRITON_OPS = GN_OPS[:3]
# (op, return index) where the Triton op returns Tensor for the others' Tensor? (see the module docstring).
TRITON_NON_OPTIONAL_RETURNS = {("gn_silu_dual_bwd", 1)}


def _schema(name):
    return getattr(torch.ops.sgflow, name).default._schema


def _type(t) -> str:
    return str(t).replace("SymInt", "int")


def _args(schema):
    return [(a.name, _type(a.type), a.default_value, a.alias_info.is_write if a.alias_info else None, a.kwarg_only)
            for a in schema.arguments]


def _returns(schema, named=True):
    return [((r.name if named else None), _type(r.type)) for r in schema.returns]


def _triton_available():
    try:
        import triton  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure means: no Triton here
        return False, f"triton unavailable: {e}"
    return True, ""


@pytest.mark.skipif(not cpp_ext.available(), reason=f"C++ extension unavailable: {cpp_ext.reason()}")
@pytest.mark.parametrize("op", GN_OPS)
def test_cpp_schema_equals_the_python_declared_one(op):
    cpp_ext.available()  # loads sgflow._C, which defines the C++ schemas
    cpp, py = _schema(op), _schema(f"{op}_torch")
    assert _args(cpp) == _args(py), f"{op}: C++ {cpp} vs Python {py}"
    assert _returns(cpp) == _returns(py), f"{op}: C++ {cpp} vs Python {py}"


@pytest.mark.skipif(not _triton_available()[0], reason=_triton_available()[1])
@pytest.mark.parametrize("op", GN_TRITON_OPS)
def test_triton_schema_equals_the_python_declared_one(op):
    gn._triton_ops()
    tri, py = _schema(f"{op}_triton"), _schema(f"{op}_torch")
    assert _args(tri) == _args(py), f"{op}: Triton {tri} vs Python {py}"
    want = [(None, "Tensor" if (op, i) in TRITON_NON_OPTIONAL_RETURNS and ty == "Optional[Tensor]" else ty)
            for i, (_, ty) in enumerate(_returns(py))]
    assert _returns(tri, named=False) == want, f"{op}: Triton {tri} vs Python {py}"


@pytest.mark.skipif(not _triton_available()[0], reason=_triton_available()[1])
@pytest.mark.parametrize("op", ("attention_dual_fwd", "attention_dual_bwd"))
def test_attention_triton_schema_equals_the_torch_one(op):
    attention._triton_ops()
    tri, py = _schema(f"{op}_triton"), _schema(f"{op}_torch")
    assert _args(tri) == _args(py), f"{op}: Triton {tri} vs torch {py}"
    assert _returns(tri, named=False) == _returns(py, named=False)


@pytest.mark.skipif(not cpp_ext.available(), reason=f"C++ extension unavailable: {cpp_ext.reason()}")
@pytest.mark.parametrize("op", ("attention_dual_fwd", "attention_dual_bwd"))
def test_attention_cpp_schema_equals_the_torch_one(op):
    cpp_ext.available()  # loads sgflow._C, which defines the C++ schemas
    cpp, py = _schema(f"{op}_cpu"), _schema(f"{op}_torch")
    assert _args(cpp) == _args(py), f"{op}: C++ {cpp} vs torch {py}"
    assert _returns(cpp, named=False) == _returns(py, named=False)


def test_the_comparison_sees_a_difference():
    """The helpers above compare what they claim: a changed default, type or alias shows."""
    parse = torch._C.parse_schema
    base = parse("f(Tensor x, Tensor(a!) out, float eps=1.0) -> Tensor")
    for other in ("f(Tensor x, Tensor(a!) out, float eps=2.0) -> Tensor", "f(Tensor x, Tensor(a!) out, int eps=1) -> Tensor",
                  "f(Tensor x, Tensor out, float eps=1.0) -> Tensor", "f(Tensor y, Tensor(a!) out, float eps=1.0) -> Tensor",
                  "f(Tensor x, Tensor(a) out, float eps=1.0) -> Tensor", "f(Tensor x, Tensor(a!) out, *, float eps=1.0) -> Tensor"):
        assert _args(parse(other)) != _args(base), other
    assert _args(parse("f(SymInt n) -> Tensor")) == _args(parse("f(int n) -> Tensor"))  # read alike, by design
    assert _returns(parse("f(Tensor x) -> Tensor?")) != _returns(parse("f(Tensor x) -> Tensor"))
