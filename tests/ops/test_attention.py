"""Dual attention: reference, torch, C++ (CPU) and Triton backends against torch.func.jvp + autograd.

Triton runs on CPU tensors through the interpreter (TRITON_INTERPRET=1, set by tests/conftest.py);
shapes stay small because the interpreter executes programs one by one. On a GPU machine the same
Triton cases run compiled on CUDA tensors (references stay on the CPU in float64).
"""
from __future__ import annotations

import math

import pytest
import torch

import sgflow.ops.attention as attn_mod
from sgflow.ops.attention import AttentionDual, attention_dual, attention_dual_ref
from sgflow.ops import cpp_ext
from sgflow.ops.backend import triton_available, triton_interpreting
from sgflow.testing import dual_grads, jvp_reference, rel_err

HAS_CUDA = torch.cuda.is_available()
TRITON_CPU = triton_available() and triton_interpreting()
TRITON_OK = triton_available() and (HAS_CUDA or triton_interpreting())
TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"
needs_triton = pytest.mark.skipif(not TRITON_OK, reason="needs triton with CUDA or TRITON_INTERPRET=1")
needs_triton_cpu = pytest.mark.skipif(not TRITON_CPU, reason="needs triton with TRITON_INTERPRET=1")
needs_cpp = pytest.mark.skipif(not cpp_ext.available(), reason=f"C++ extension unavailable: {cpp_ext.reason()}")
CPP = pytest.param("cpp", marks=needs_cpp)


def device_of(backend: str) -> str:
    """Where a backend's cases run: Triton on the GPU when there is one, else everything on the CPU."""
    return TRITON_DEVICE if backend == "triton" else "cpu"
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")

TOL = {torch.float64: 1e-10, torch.float32: 1e-4}
GRAD_NAMES = ("q", "k", "v", "q_dot", "k_dot", "v_dot")

# (B, H, Nq, Nk, D, Dv)
CASES = {
    "b2h3n37d16": (2, 3, 37, 37, 16, 16),
    "b1h2n64d32": (1, 2, 64, 64, 32, 32),
    "n1": (1, 2, 1, 1, 16, 16),
    "cross_nq20_nk33_dv24": (1, 2, 20, 33, 16, 24),
    "d8_n19": (2, 1, 19, 19, 8, 8),
}
CASE_IDS = list(CASES)


def plain_attention(q, k, v, scale=None):
    """softmax(scale q k^T) v with an explicit (max-shifted) softmax; forward-AD friendly."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = scale * (q @ k.transpose(-1, -2))
    e = torch.exp(s - s.amax(-1, keepdim=True))
    return (e / e.sum(-1, keepdim=True)) @ v


def make_inputs(shape, seed=0, logit_gain=1.0):
    b, h, n_q, n_k, d, dv = shape
    gen = torch.Generator().manual_seed(seed)

    def rnd(*s):
        return torch.randn(*s, generator=gen, dtype=torch.float64)

    primals = [rnd(b, h, n_q, d) * logit_gain, rnd(b, h, n_k, d), rnd(b, h, n_k, dv)]
    tangents = [rnd(b, h, n_q, d), rnd(b, h, n_k, d), rnd(b, h, n_k, dv)]
    return primals, tangents


def reference(primals, tangents, scale=None, seed=1, cotangents=None):
    return jvp_reference(
        lambda q, k, v: plain_attention(q, k, v, scale), primals, tangents, cotangents=cotangents, seed=seed
    )


def as_zero(g, like):
    return torch.zeros_like(like) if g is None else g


def assert_close_all(out, ref_out, grads, ref_grads, tol, label=""):
    errs = {"o": rel_err(out[0], ref_out[0]), "o_dot": rel_err(out[1], ref_out[1])}
    for name, g, r in zip(GRAD_NAMES, grads, ref_grads):
        errs["d" + name] = rel_err(as_zero(g, r), r)
    worst = max(errs.values())
    assert worst < tol, f"{label}: {errs}"
    return worst


def run_dual(backend, dtype, primals, tangents, cotangents, scale=None):
    def fn(q, k, v, qd, kd, vd):
        return attention_dual(q, k, v, qd, kd, vd, scale=scale, backend=backend)

    dev = device_of(backend)
    cast = [t.to(device=dev, dtype=dtype) for t in (*primals, *tangents)]
    o, od, grads = dual_grads(fn, cast[:3], cast[3:], [], tuple(c.to(device=dev, dtype=dtype) for c in cotangents))
    return (o.cpu(), od.cpu()), [None if g is None else g.cpu() for g in grads]


# --------------------------------------------------------------------------------------------------
# reference
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASE_IDS)
def test_ref_matches_jvp(case):
    primals, tangents = make_inputs(CASES[case])
    y, y_dot, cot, ref_grads = reference(primals, tangents)
    out = dual_grads(attention_dual_ref, primals, tangents, [], cot)
    assert_close_all(out[:2], (y, y_dot), out[2], ref_grads, TOL[torch.float64], case)


# --------------------------------------------------------------------------------------------------
# torch and triton backends vs jvp reference
# --------------------------------------------------------------------------------------------------
BACKEND_CASES = [
    pytest.param(be, dt, c, id=f"{be}-{str(dt)[6:]}-{c}", marks=[needs_cpp] if be == "cpp" else [])
    for be in ("torch", "cpp")
    for dt in (torch.float64, torch.float32)
    for c in CASE_IDS
] + [
    pytest.param("triton", torch.float64, c, id=f"triton-float64-{c}", marks=needs_triton) for c in CASE_IDS
] + [
    pytest.param("triton", torch.float32, c, id=f"triton-float32-{c}", marks=needs_triton)
    for c in ("b2h3n37d16", "cross_nq20_nk33_dv24")
]


@pytest.mark.parametrize("backend,dtype,case", BACKEND_CASES)
def test_dual_matches_jvp(backend, dtype, case):
    primals, tangents = make_inputs(CASES[case], seed=3)
    y, y_dot, cot, ref_grads = reference(primals, tangents, seed=4)
    out, grads = run_dual(backend, dtype, primals, tangents, cot)
    assert out[0].dtype == dtype and out[1].dtype == dtype
    assert all(g.dtype == dtype for g in grads)
    assert_close_all(out, (y, y_dot), grads, ref_grads, TOL[dtype], f"{backend} {dtype} {case}")


SINGLE_CASES = [
    pytest.param(be, which, id=f"{be}-only_{which}",
                 marks={"triton": [needs_triton], "cpp": [needs_cpp]}.get(be, []))
    for be in ("torch", "cpp", "triton")
    for which in ("o", "o_dot")
]


@pytest.mark.parametrize("backend,which", SINGLE_CASES)
def test_single_output_used(backend, which):
    """Only one output reaches the loss, so backward gets None for the other gradient."""
    primals, tangents = make_inputs(CASES["b2h3n37d16"], seed=5)
    gen = torch.Generator().manual_seed(6)
    g = torch.randn(2, 3, 37, 16, generator=gen, dtype=torch.float64)
    zero = torch.zeros_like(g)
    cot = (g, zero) if which == "o" else (zero, g)
    _, _, _, ref_grads = reference(primals, tangents, cotangents=cot)

    leaves = [t.to(device_of(backend)).requires_grad_(True) for t in (*primals, *tangents)]
    o, o_dot = attention_dual(*leaves, backend=backend)
    used = o if which == "o" else o_dot
    grads = torch.autograd.grad((used * g.to(used.device)).sum(), leaves, allow_unused=True)
    grads = [None if x is None else x.cpu() for x in grads]
    if which == "o":
        # o does not depend on the tangents at all
        assert all(x is None or x.abs().max() == 0 for x in grads[3:])
    for name, x, r in zip(GRAD_NAMES, grads, ref_grads):
        assert rel_err(as_zero(x, r), r) < 1e-10, name


@pytest.mark.parametrize(
    "backend",
    ["torch", CPP, pytest.param("triton", marks=needs_triton)],
)
@pytest.mark.parametrize("scale,gain", [(0.3, 1.0), (None, 12.0)], ids=["scale0.3", "peaky_logits"])
def test_scale_and_peaky_softmax(backend, scale, gain):
    """Explicit scale; large logits (near one-hot softmax) stay finite and accurate."""
    primals, tangents = make_inputs((1, 2, 23, 23, 16, 16), seed=7, logit_gain=gain)
    y, y_dot, cot, ref_grads = reference(primals, tangents, scale=scale, seed=8)
    out, grads = run_dual(backend, torch.float64, primals, tangents, cot, scale=scale)
    assert all(torch.isfinite(t).all() for t in (*out, *grads))
    assert_close_all(out, (y, y_dot), grads, ref_grads, 1e-10, f"{backend} scale={scale} gain={gain}")


@pytest.mark.parametrize("cap,expect", [
    (33 * 7, [(slice(h, h + 1), slice(r, min(20, r + 7))) for h in range(2) for r in (0, 7, 14)]),
    (20 * 33, [(slice(0, 1), slice(0, 20)), (slice(1, 2), slice(0, 20))]),
], ids=["row_slices_of_one_head", "one_head_per_block"])
@pytest.mark.parametrize("with_g", [True, False], ids=["g_and_gdot", "gdot_only"])
def test_torch_backend_chunks(monkeypatch, cap, expect, with_g):
    """Forced blocks (row slices of one head, accumulating the key-side gradients; whole heads, writing
    them once) give the reference's outputs and gradients, with or without a gradient of o."""
    primals, tangents = make_inputs(CASES["cross_nq20_nk33_dv24"], seed=9)
    gen = torch.Generator().manual_seed(10)
    g, g_dot = (torch.randn(1, 2, 20, 24, generator=gen, dtype=torch.float64) for _ in range(2))
    y, y_dot, _, ref_grads = reference(primals, tangents, cotangents=(g if with_g else torch.zeros_like(g), g_dot))
    monkeypatch.setattr(attn_mod, "_TORCH_CHUNK_ELEMS", cap)
    monkeypatch.setattr(attn_mod, "_TORCH_CHUNK_MIN_ELEMS", cap)
    b, h, n_q, _ = primals[0].shape
    assert attn_mod._chunks(b * h, n_q, primals[1].shape[2], primals[0].numel()) == expect
    o, o_dot, lse, mu = attn_mod._torch_forward(*primals, *tangents, 16 ** -0.5)
    grads = attn_mod._torch_backward(*primals, *tangents, o, o_dot, lse, mu, g if with_g else None, g_dot, 16 ** -0.5)
    assert_close_all((o, o_dot), (y, y_dot), grads, ref_grads, 1e-10, f"blocks {len(expect)}")


# --------------------------------------------------------------------------------------------------
# the C++ CPU kernel (csrc/attention_dual_cpu_kernels.h): tiles of 4 query rows and blocks of 16 / 64 keys,
# with tails of both; every instruction set; threads
# --------------------------------------------------------------------------------------------------
CPP_TAIL_CASES = {
    "b1_nq7_nk70_d5_dv3": (1, 2, 7, 70, 5, 3),     # 64 keys in one 4-block step + a padded block; a row tail
    "b2_nq9_nk16_d63_dv7": (2, 1, 9, 16, 63, 7),    # one exact block; head dim 63
    "b1_nq4_nk129_d1_dv1": (1, 1, 4, 129, 1, 1),    # one exact row tile; 2 steps of 64 + 1 padded key
}


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("case", list(CPP_TAIL_CASES))
@pytest.mark.parametrize("cot", ["both", "g_only", "gdot_only"])
def test_cpp_kernel_tails_and_cotangents(case, dtype, cot):
    _cpp_matches_reference(CPP_TAIL_CASES[case], dtype, cot, 41, f"cpp {case} {dtype} {cot}")


def _cpp_matches_reference(shape, dtype, cot, seed, label):
    """The C++ op (backend "cpp") on ``shape`` = the jvp reference, with both cotangents or only one of them
    (``cot``: "both", "g_only", "gdot_only"), at the dtype's tolerance."""
    primals, tangents = make_inputs(shape, seed=seed)
    b, h, n_q, _, _, dv = shape
    gen = torch.Generator().manual_seed(seed + 1)
    g = [torch.randn(b, h, n_q, dv, generator=gen, dtype=torch.float64) for _ in range(2)]
    if cot != "both":
        g[1 if cot == "g_only" else 0] = torch.zeros_like(g[0])
    y, y_dot, _, ref_grads = reference(primals, tangents, cotangents=tuple(g))
    leaves = [t.to(dtype).requires_grad_(True) for t in (*primals, *tangents)]
    o, od = attention_dual(*leaves, backend="cpp")
    used = [(o, g[0]), (od, g[1])] if cot == "both" else [(o, g[0])] if cot == "g_only" else [(od, g[1])]
    grads = torch.autograd.grad([u for u, _ in used], leaves, [c.to(dtype) for _, c in used], allow_unused=True)
    assert_close_all([o, od], (y, y_dot), grads, ref_grads, TOL[dtype], label)


@needs_cpp
@pytest.mark.parametrize("isa", ["base", "avx2", "avx512"])
def test_cpp_kernel_every_instruction_set(isa):
    """Each instruction-set copy of the kernel (GCC vector blocks lowered to SSE, AVX2 or AVX-512) = the
    reference in float64; sets this CPU lacks skip."""
    before = torch.ops.sgflow._cpu_isa()
    try:
        torch.ops.sgflow._cpu_isa(isa)
    except RuntimeError as e:
        pytest.skip(str(e))
    try:
        primals, tangents = make_inputs((2, 2, 11, 37, 8, 8), seed=43)
        y, y_dot, cot, ref_grads = reference(primals, tangents, seed=44)
        out, grads = run_dual("cpp", torch.float64, primals, tangents, cot)
        assert_close_all(out, (y, y_dot), grads, ref_grads, 1e-10, f"cpp {isa}")
    finally:
        torch.ops.sgflow._cpu_isa(before)


# Heads wider than 8 run on the BLAS path (csrc/attention_dual_cpu_blas.cpp: query-row tiles, products on the
# BLAS torch links); torch.ops.sgflow._attention_blas(False) sends them to the vector kernel instead. Nk = 2100
# in float64 makes tiles of 16 query rows: 40 rows are 2 whole tiles and one of 8.
CPP_WIDE_CASES = {
    "tiles_nq40_nk2100_d16_dv12": (1, 1, 40, 2100, 16, 12),
    "b2h3n37d16": (2, 3, 37, 37, 16, 16),
    "cross_nq20_nk33_dv24": (1, 2, 20, 33, 16, 24),
    "b2_nq9_nk16_d63_dv7": (2, 1, 9, 16, 63, 7),
    "d9_dv1": (1, 2, 5, 6, 9, 1),
}


@pytest.fixture(params=["blas", "vector"])
def wide_path(request):
    cpp_ext.load()
    if request.param == "blas" and not cpp_ext.blas_available():
        pytest.skip("no BLAS (sgemm_ / dgemm_) found in this process: the BLAS path is off")
    before = torch.ops.sgflow._attention_blas()
    torch.ops.sgflow._attention_blas(request.param == "blas")
    yield request.param
    torch.ops.sgflow._attention_blas(before)


@needs_cpp
@pytest.mark.parametrize("d", [8, 16], ids=["vector-kernel-d8", "wide-d16"])
def test_cpp_kernel_results_do_not_depend_on_threads(d, wide_path):
    """Heads are split over threads, each computed whole by one: 1 and 2 threads give the same bits (heads of 16:
    on the BLAS path and on the vector kernel)."""
    primals, tangents = make_inputs((2, 3, 13, 21, d, d), seed=45)
    xs = [t.float() for t in (*primals, *tangents)]
    threads = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            o, od, lse, mu = torch.ops.sgflow.attention_dual_fwd_cpu(*xs, 0.3)
            grads = torch.ops.sgflow.attention_dual_bwd_cpu(*xs, o, od, lse, mu, o + 1, od - 1, 0.3)
            outs.append((o, od, lse, mu, *grads))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*outs))


@needs_cpp
@pytest.mark.parametrize("d", [8, 16], ids=["vector-kernel-d8", "wide-d16"])
def test_cpp_kernel_strided_layouts(d, wide_path):
    """Heads split off the channels (B, H strides that merge with nothing) are read in place (on the BLAS path the
    row strides are the leading dimensions); a last dim of stride other than 1 (a transposed view) is copied
    first: both = the contiguous inputs' result, float64."""
    b, h, n = 2, 3, 10
    gen = torch.Generator().manual_seed(46)
    split = [torch.randn(b, n, h * d, generator=gen, dtype=torch.float64).view(b, n, h, d).transpose(1, 2)
             for _ in range(6)]
    cols = [torch.randn(b, h, d, n, generator=gen, dtype=torch.float64).transpose(-1, -2) for _ in range(6)]
    for xs in (split, cols):
        assert not xs[0].is_contiguous()
        got = torch.ops.sgflow.attention_dual_fwd_cpu(*xs, 0.4)
        want = torch.ops.sgflow.attention_dual_fwd_cpu(*[x.contiguous() for x in xs], 0.4)
        assert all(torch.allclose(a, w, rtol=1e-13, atol=1e-13) for a, w in zip(got, want))
        g, gd = torch.randn_like(got[0]), torch.randn_like(got[0])
        got_b = torch.ops.sgflow.attention_dual_bwd_cpu(*xs, *got, g.mT.contiguous().mT, gd, 0.4)
        want_b = torch.ops.sgflow.attention_dual_bwd_cpu(*[x.contiguous() for x in xs], *want, g, gd, 0.4)
        assert all(torch.allclose(a, w, rtol=1e-13, atol=1e-13) for a, w in zip(got_b, want_b))


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("case", list(CPP_WIDE_CASES))
@pytest.mark.parametrize("cot", ["both", "g_only", "gdot_only"])
def test_cpp_wide_heads_both_paths(case, dtype, cot, wide_path):
    """Wide heads on the BLAS path and on the vector kernel = the jvp reference (float64 1e-10, float32 1e-4),
    whichever cotangents are given; tiles with a remainder; heads of 9 to 63, value heads of 1 to 24."""
    _cpp_matches_reference(CPP_WIDE_CASES[case], dtype, cot, 51, f"cpp {wide_path} {case} {dtype} {cot}")


@needs_cpp
def test_cpp_kernel_names_bad_input():
    q = torch.randn(1, 2, 5, 4)
    op = torch.ops.sgflow.attention_dual_fwd_cpu
    with pytest.raises(RuntimeError, match="float32 or float64 only"):
        op(*[q.bfloat16()] * 6, 0.5)
    with pytest.raises(RuntimeError, match="v_dot is Double"):
        op(q, q, q, q, q, q.double(), 0.5)
    with pytest.raises(RuntimeError, match=r"k_dot has shape \[1, 2, 6, 4\], expected \[1, 2, 5, 4\]"):
        op(q, q, q, q, torch.randn(1, 2, 6, 4), q, 0.5)
    with pytest.raises(RuntimeError, match="must be 4-D"):
        op(q[0], q[0], q[0], q[0], q[0], q[0], 0.5)


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 3e-2), (torch.float16, 4e-3)], ids=["bf16", "fp16"])
def test_torch_backend_low_precision(dtype, tol):
    """Half-precision inputs: the torch backend computes in fp32 and returns o, o_dot and the gradients in
    the inputs' dtype (as its fake says; the statistics lse, mu in fp32), close to float64 on the same
    rounded inputs."""
    primals, tangents = make_inputs(CASES["b2h3n37d16"], seed=15)
    ins = [t.to(dtype) for t in (*primals, *tangents)]
    gen = torch.Generator().manual_seed(16)
    cot = tuple(torch.randn(2, 3, 37, 16, generator=gen, dtype=torch.float64) for _ in range(2))
    o, o_dot, lse, mu = torch.ops.sgflow.attention_dual_fwd_torch(*ins, 0.25)
    assert (o.dtype, o_dot.dtype, lse.dtype, mu.dtype) == (dtype, dtype, torch.float32, torch.float32)
    out, grads = run_dual("torch", dtype, primals, tangents, cot, scale=0.25)
    assert all(g.dtype == dtype for g in grads)
    y, y_dot, _, ref_grads = reference([t.double() for t in ins[:3]], [t.double() for t in ins[3:]], scale=0.25,
                                       cotangents=cot)
    assert_close_all([t.double() for t in out], (y, y_dot), [g.double() for g in grads], ref_grads, tol, str(dtype))


@pytest.mark.parametrize("backend", ["torch", CPP, pytest.param("triton", marks=needs_triton)])
def test_non_contiguous_inputs(backend):
    """q, k, v sliced out of a fused [B, N, 3, H, D] projection (the usual layout) work as is."""
    b, h, n, d = 1, 2, 21, 16
    gen = torch.Generator().manual_seed(11)
    qkv = torch.randn(b, n, 3, h, d, generator=gen, dtype=torch.float64)
    qkv_dot = torch.randn(b, n, 3, h, d, generator=gen, dtype=torch.float64)
    primals = [qkv[:, :, i].transpose(1, 2) for i in range(3)]
    tangents = [qkv_dot[:, :, i].transpose(1, 2) for i in range(3)]
    assert not primals[0].is_contiguous()
    y, y_dot, cot, ref_grads = reference(primals, tangents, seed=12)
    out, grads = run_dual(backend, torch.float64, primals, tangents, cot)
    assert_close_all(out, (y, y_dot), grads, ref_grads, 1e-10, f"{backend} non-contiguous")


@pytest.mark.parametrize("backend", ["torch", CPP, pytest.param("triton", marks=needs_triton)])
def test_kept_outputs_replay_the_call_without_running_it(backend, monkeypatch):
    """``kept``: the first call appends its outputs (o, o_dot, lse, mu); a second call on the same values
    (a recomputed block) runs no forward op and returns the same outputs, and both calls' gradients equal the
    JVP reference (float64). Outputs that do not fit the call are named."""
    b, h, n, d = 2, 2, 13, 8
    dev = device_of(backend)
    primals, tangents = make_inputs((b, h, n, n, d, d), seed=5)
    y, y_dot, cot, ref_grads = reference(primals, tangents, seed=6)
    kept = []
    calls = []
    ops = attn_mod._ops

    def counting(be):
        fwd, bwd = ops(be)
        return (lambda *a: calls.append(be) or fwd(*a)), bwd

    monkeypatch.setattr(attn_mod, "_ops", counting)
    for expect_calls in (1, 1):  # the second call runs no forward op
        xs = [t.to(dev).requires_grad_() for t in (*primals, *tangents)]
        o, od = attention_dual(*xs, backend=backend, kept=kept)
        assert len(calls) == expect_calls and len(kept) == 4
        grads = torch.autograd.grad((o, od), xs, [c.to(dev) for c in cot])
        assert_close_all([o.cpu(), od.cpu()], (y, y_dot), [g.cpu() for g in grads], ref_grads, 1e-10, backend)
    q = primals[0][:, :, :5].to(dev)
    with pytest.raises(RuntimeError, match="do not fit this call"):
        attention_dual(q, *[t.to(dev) for t in primals[1:]], q, *[t.to(dev) for t in tangents[1:]], backend=backend,
                       kept=kept)


def test_torch_backend_reads_heads_split_inputs_in_place_whatever_the_chunks(monkeypatch):
    """q, k, v with heads split off the channels (``x.view(B, N, H, D).transpose(1, 2)``: diffusers'
    attention processors) have B and H strides that a batched matmul cannot merge: every chunk's
    ``q_i @ k^T``, ``p @ v`` copied the whole k, k_dot, v, v_dot again (9 copies per chunk, 72x the input
    bytes at 8 chunks; quadratic in the batch at real sizes, where the chunk count grows with it: at
    B=16, 16 heads of 8, 256 tokens, one thread, forward 376 -> 178 ms, backward 716 -> 483 ms once
    fixed). Then each input was made dense once per call (a fifth of the forward at a DiT's sizes); now the
    products read the strided heads in place: no copies but the per-row statistics (heads of at most
    ``_PAIR_MAX_HEAD_DIM`` are paired, one copy each: their values are checked by the cases above)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CopiedElements(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.aten.clone.default:
                self.n += out.numel()
            elif func is torch.ops.aten.copy_.default:
                self.n += args[0].numel()
            return out

    b, h, n, d = 3, 4, 40, 24  # wider than _PAIR_MAX_HEAD_DIM: read in place
    gen = torch.Generator().manual_seed(13)
    primals = [torch.randn(b, n, h * d, generator=gen, dtype=torch.float64).view(b, n, h, d).transpose(1, 2)
               for _ in range(3)]
    tangents = [torch.randn(b, n, h * d, generator=gen, dtype=torch.float64).view(b, n, h, d).transpose(1, 2)
                for _ in range(3)]
    y, y_dot, cot, ref_grads = reference(primals, tangents, seed=14)
    monkeypatch.setattr(attn_mod, "_TORCH_CHUNK_ELEMS", n * 5)  # 5 rows per block: 8 blocks per head
    monkeypatch.setattr(attn_mod, "_TORCH_CHUNK_MIN_ELEMS", 1)
    assert len(attn_mod._chunks(b * h, n, n, primals[0].numel())) == b * h * 8
    with CopiedElements() as fwd:
        o, o_dot, lse, mu = attn_mod._torch_forward(*primals, *tangents, d ** -0.5)
    g, g_dot = (c.transpose(1, 2).contiguous().transpose(1, 2) for c in cot)  # the gradients' layout too
    with CopiedElements() as bwd:
        attn_mod._torch_backward(*primals, *tangents, o, o_dot, lse, mu, g, g_dot, d ** -0.5)
    size = primals[0].numel()
    assert fwd.n <= 2 * b * h * n, fwd.n / size  # the per-row lse and mu only: no input once per chunk or call
    assert bwd.n == 0, bwd.n / size  # g, g_dot neither
    out, grads = run_dual("torch", torch.float64, primals, tangents, cot)
    assert_close_all(out, (y, y_dot), grads, ref_grads, 1e-10, "heads-split layout, 8 chunks")


@needs_triton
@pytest.mark.parametrize("block_m,block_n", [(32, 16), (16, 64)], ids=["bm32_bn16", "bm16_bn64"])
def test_triton_launchers_block_sizes(block_m, block_n):
    """Launchers with non-default tiles (uneven M/N tiles, one tile larger than N) match the torch path."""
    from sgflow_kernels.attention import attention_dual_bwd, attention_dual_fwd

    primals, tangents = make_inputs((1, 2, 37, 29, 32, 16), seed=13)
    args = tuple(t.to(TRITON_DEVICE) for t in (*primals, *tangents))
    scale = 32 ** -0.5
    gen = torch.Generator().manual_seed(14)
    g = torch.randn(1, 2, 37, 16, generator=gen, dtype=torch.float64).to(TRITON_DEVICE)
    gd = torch.randn(1, 2, 37, 16, generator=gen, dtype=torch.float64).to(TRITON_DEVICE)
    ref_fwd = attn_mod._torch_forward(*args, scale)
    fwd = attention_dual_fwd(*args, scale, block_m=block_m, block_n=block_n)
    for a, r in zip(fwd, ref_fwd):
        assert rel_err(a, r) < 1e-12
    ref_bwd = attn_mod._torch_backward(*args, *ref_fwd, g, gd, scale)
    bwd = attention_dual_bwd(*args, *fwd, g, gd, scale, block_m=block_m, block_n=block_n)
    for name, a, r in zip(GRAD_NAMES, bwd, ref_bwd):
        assert rel_err(a, r) < 1e-12, name


# --------------------------------------------------------------------------------------------------
# Tile choice: triton.autotune with a per-call prune (GPU tables checked here without a GPU)
# --------------------------------------------------------------------------------------------------
def _prune(K, kind, dtype, d, **extra):
    """The tuples the Autotuner of ``kind`` keeps for a call with head dim ``d`` (as Triton calls it)."""
    tuner = K._TUNED[kind]
    meta = dict(BLOCK_D=d, BLOCK_DV=d, DOT_PRECISION="tf32", **extra)
    kept = tuner.early_config_prune(tuner.configs, {"Q_ptr": torch.empty(0, dtype=dtype)}, **meta)
    return [K._as_tuple(c) for c in kept]


@pytest.mark.skipif(not triton_available(), reason="needs triton")
def test_triton_tile_prune_default_first_all_when_autotuning(monkeypatch):
    import sgflow_kernels.attention as K

    if triton_interpreting():
        assert _prune(K, "fwd", torch.float32, 64) == [K._INTERPRETER_CONFIG]
    monkeypatch.setattr(K, "_interpreting", lambda: False)  # the GPU tables
    monkeypatch.setattr(K, "_REJECTED", set())
    for dtype, table in ((torch.float16, K._HALF_CONFIGS), (torch.bfloat16, K._HALF_CONFIGS),
                         (torch.float32, K._FP32_CONFIGS), (torch.float64, K._FP32_CONFIGS)):
        for kind, buckets in table.items():
            for d, cands in buckets.items():
                shipped = cands + ([K._LAST_RESORT] if K._LAST_RESORT not in cands else [])
                monkeypatch.delenv("SGFLOW_ATTENTION_AUTOTUNE", raising=False)
                assert _prune(K, kind, dtype, d) == [cands[0]]  # the offline default, nothing timed
                monkeypatch.setenv("SGFLOW_ATTENTION_AUTOTUNE", "1")
                assert _prune(K, kind, dtype, d) == shipped  # all of them, table order
    monkeypatch.setenv("SGFLOW_ATTENTION_AUTOTUNE", "1")
    monkeypatch.setitem(K._FORCED_CONFIGS, "bwd_dq", (16, 64, 8, 1))
    assert _prune(K, "bwd_dq", torch.float16, 128, HAS_G=True, HAS_GD=True) == [(16, 64, 8, 1)]


@needs_triton_cpu
def test_triton_autotuner_uses_interpreter_config_and_follows_env(monkeypatch):
    """Under the interpreter the Autotuners run the fixed small tile; their cached picks are dropped when
    the inputs of the prune that are not in Triton's key (SGFLOW_ATTENTION_AUTOTUNE here) change."""
    import sgflow_kernels.attention as K

    primals, tangents = make_inputs((1, 2, 19, 23, 16, 16), seed=18)
    monkeypatch.delenv("SGFLOW_ATTENTION_AUTOTUNE", raising=False)
    K.attention_dual_fwd(*primals, *tangents, 0.5)
    tuner = K._TUNED["fwd"]
    assert K._as_tuple(tuner.best_config) == K._INTERPRETER_CONFIG
    (key,) = [k for k in tuner.cache if k[:2] == (19, 23)]
    assert "torch.float64" in key  # Triton appends the tensor dtypes to the key
    monkeypatch.setenv("SGFLOW_ATTENTION_AUTOTUNE", "1")
    K.attention_dual_fwd(*primals, *tangents, 0.5)  # one config after the prune: nothing to time
    assert list(tuner.cache) == [key]  # the cache was cleared, then refilled


@needs_triton_cpu
def test_triton_out_of_resources_falls_back_to_next_candidate(monkeypatch):
    """Default (untimed) mode on a GPU: the pruned default failing to compile for resources is remembered
    and the next shipped candidate launched. Simulated: GPU tables, CPU tensors through the interpreter."""
    from triton.runtime.errors import OutOfResources

    import sgflow_kernels.attention as K

    monkeypatch.setattr(K, "_interpreting", lambda: False)
    monkeypatch.setattr(K, "_check", lambda *a: None)
    monkeypatch.setattr(K, "_REJECTED", set())
    monkeypatch.delenv("SGFLOW_ATTENTION_AUTOTUNE", raising=False)
    tuner = K._TUNED["fwd"]
    first, second = K._candidates("fwd", 16, 16, torch.float64)[:2]
    run = tuner.fn.run
    tried = []

    def run_or_fail(*args, **kw):
        cfg = (kw["BLOCK_M"], kw["BLOCK_N"], kw["num_warps"], kw["num_stages"])
        tried.append(cfg)
        if cfg == first:
            raise OutOfResources(300000, 232448, "shared memory")
        return run(*args, **kw)

    monkeypatch.setattr(tuner.fn, "run", run_or_fail)
    primals, tangents = make_inputs((1, 2, 37, 29, 16, 16), seed=19)
    out = K.attention_dual_fwd(*primals, *tangents, 0.25)
    for a, r in zip(out, attn_mod._torch_forward(*primals, *tangents, 0.25)):
        assert rel_err(a, r) < 1e-12
    assert tried == [first, second] and K._as_tuple(tuner.best_config) == second
    K.attention_dual_fwd(*primals, *tangents, 0.25)  # cached: the rejected one is not tried again
    assert tried == [first, second, second]
    monkeypatch.setitem(K._FORCED_CONFIGS, "fwd", first)  # a forced config is not replaced
    with pytest.raises(OutOfResources):
        K.attention_dual_fwd(*primals, *tangents, 0.25)


_TRACE_SCRIPT = """
import torch
from torch.fx.experimental.proxy_tensor import make_fx
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
import sgflow_kernels.attention as K
K._check = lambda *a: None  # fake CPU tensors stand in for CUDA ones: nothing is launched
xs = [torch.randn(1, 2, 40, 64, dtype=torch.float16) for _ in range(6)]
o, lse = torch.empty(1, 2, 40, 64, dtype=torch.float16), torch.empty(1, 2, 40)
gm = make_fx(lambda *a: (K.attention_dual_fwd(*a[:6], 0.5), K.attention_dual_bwd(*a, 0.5)),
             tracing_mode="fake")(*xs, o, o, lse, lse, o, o)
for n in gm.graph.nodes:
    if "triton_kernel_wrapper" in str(n.target):
        ker = kernel_side_table.get_kernel(n.kwargs["kernel_idx"])
        if hasattr(ker, "configs"):
            print([K._as_tuple(c) for c in ker.configs], list(n.kwargs["grid"][0]))
"""


@pytest.mark.skipif(not triton_available(), reason="needs triton")
def test_triton_autotuned_kernels_trace_through_wrap_triton():
    """torch.compile's path (make_fx of the launchers with wrap_triton enabled, compiled Triton, no GPU
    needed to trace): torch runs the early_config_prune at trace time and records the default config."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SGFLOW_ATTENTION_AUTOTUNE")}
    out = subprocess.run([sys.executable, "-c", _TRACE_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split("\n")[:3] == [
        "[(64, 64, 4, 2)] [1, 2, 1]", "[(32, 32, 8, 1)] [2, 2, 1]", "[(64, 32, 8, 2)] [1, 2, 1]",
    ], out.stdout


# --------------------------------------------------------------------------------------------------
# gradcheck, memory, API
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "backend,shape",
    [
        ("torch", (1, 2, 5, 4, 3, 2)),
        ("torch", (2, 1, 3, 3, 4, 4)),
        pytest.param("cpp", (1, 2, 5, 4, 3, 2), marks=needs_cpp),
        pytest.param("cpp", (2, 1, 6, 6, 4, 4), marks=needs_cpp),
        pytest.param("triton", (1, 1, 3, 4, 3, 2), marks=needs_triton),
    ],
    ids=["torch-cross", "torch-self", "cpp-cross", "cpp-self", "triton-cross"],
)
def test_gradcheck(backend, shape):
    primals, tangents = make_inputs(shape, seed=15)
    leaves = [t.to(device_of(backend)).requires_grad_(True) for t in (*primals, *tangents)]
    assert torch.autograd.gradcheck(
        lambda *xs: AttentionDual.apply(*xs, 0.7, backend), leaves, eps=1e-6, atol=1e-7, rtol=1e-5
    )


@pytest.mark.parametrize("backend", ["torch", CPP, pytest.param("triton", marks=needs_triton)])
def test_saved_memory_is_linear_in_n(backend):
    """The Function saves inputs, outputs and two [B, H, N] statistics, never an N x N tensor."""
    b, h, n, d = 1, 2, 48, 16
    primals, tangents = make_inputs((b, h, n, n, d, d), seed=16)
    leaves = [t.float().to(device_of(backend)).requires_grad_(True) for t in (*primals, *tangents)]

    def saved_bytes(fn):
        sizes = []

        def pack(t):
            sizes.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = fn()
        return sum(sizes), max(sizes), out

    total, biggest, (o, o_dot) = saved_bytes(lambda: attention_dual(*leaves, backend=backend))
    elem = 4
    expected = 8 * b * h * n * d * elem + 2 * b * h * n * elem
    assert total == expected
    assert biggest == b * h * n * d * elem
    # For contrast, differentiating through torch.func.jvp of the plain op stores N x N tensors.
    plain_total, plain_biggest, _ = saved_bytes(
        lambda: torch.func.jvp(plain_attention, tuple(leaves[:3]), tuple(leaves[3:]))
    )
    assert plain_biggest >= b * h * n * n * elem
    assert plain_total > total
    (o.sum() + o_dot.sum()).backward()  # the saved tensors suffice


@needs_triton_cpu  # sgflow.memory counts CPU tensors; on a GPU the benchmarks measure the peak instead
def test_triton_peak_memory_of_forward_and_backward_is_linear_in_n():
    """Whole forward + backward peak (every tensor made, temporaries included; sgflow.memory): doubling the
    sequence doubles the Triton path's peak, while differentiating through torch.func.jvp quadruples."""
    from sgflow.memory import peak_tensor_bytes

    def peaks(n):
        primals, tangents = make_inputs((1, 2, n, n, 16, 16), seed=17)
        leaves = [t.float().requires_grad_(True) for t in (*primals, *tangents)]

        def fused():
            o, o_dot = attention_dual(*leaves, backend="triton")
            (o.square().sum() + o_dot.square().sum()).backward()

        def through_jvp():
            o, o_dot = torch.func.jvp(plain_attention, tuple(leaves[:3]), tuple(leaves[3:]))
            (o.square().sum() + o_dot.square().sum()).backward()

        return peak_tensor_bytes(fused)["peak_bytes"], peak_tensor_bytes(through_jvp)["peak_bytes"]

    (f64, j64), (f128, j128) = peaks(64), peaks(128)
    assert f128 / f64 < 2.2, (f64, f128)
    assert j128 / j64 > 3.0, (j64, j128)
    assert f128 < j128 / 4


def test_double_backward_raises():
    """lse/mu are saved without a graph, so differentiating the backward must fail loudly."""
    primals, tangents = make_inputs((1, 1, 5, 5, 4, 4))
    leaves = [t.clone().requires_grad_(True) for t in (*primals, *tangents)]
    o, o_dot = attention_dual(*leaves, backend="torch")
    grads = torch.autograd.grad(o.square().sum() + o_dot.square().sum(), leaves, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grads[0].sum().backward()


def test_default_backend_on_cpu_matches_ref(monkeypatch):
    monkeypatch.delenv("SGFLOW_BACKEND", raising=False)
    primals, tangents = make_inputs((1, 1, 5, 5, 4, 4))
    o, o_dot = attention_dual(*primals, *tangents)
    r, r_dot = attention_dual_ref(*primals, *tangents)
    assert rel_err(o, r) < 1e-12 and rel_err(o_dot, r_dot) < 1e-12


def test_no_grad_forward_matches_ref():
    primals, tangents = make_inputs(CASES["cross_nq20_nk33_dv24"])
    with torch.no_grad():
        o, o_dot = attention_dual(*primals, *tangents, backend="torch")
    r, r_dot = attention_dual_ref(*primals, *tangents)
    assert rel_err(o, r) < 1e-12 and rel_err(o_dot, r_dot) < 1e-12


def _good():
    return make_inputs((2, 2, 6, 7, 4, 5))


def _set(*pairs):
    """Mutation replacing argument i (0..5 = q, k, v, q_dot, k_dot, v_dot) by f(old)."""

    def mutate(args):
        for i, f in pairs:
            args[i] = f(args[i])

    return mutate


def _both(i, f):
    return _set((i, f), (i + 3, f))


BAD_INPUTS = {
    "non4d": (_both(0, lambda t: t[0]), ValueError, "4-D"),
    "tangent_q_shape": (_set((3, lambda t: t[..., :3])), ValueError, "q_dot shape"),
    "tangent_v_shape": (_set((5, lambda t: t[:, :, :6])), ValueError, "v_dot shape"),
    "qk_head_dim": (_both(1, lambda t: t[..., :3]), ValueError, "head dims differ"),
    "kv_len": (_both(2, lambda t: t[:, :, :6]), ValueError, "sequence lengths differ"),
    "batch_head": (_both(1, lambda t: t[:1]), ValueError, "batch and head"),
    "empty": (_both(0, lambda t: t[:, :, :0]), ValueError, "empty"),
    "dtype": (_set((4, lambda t: t.float())), TypeError, "dtype mismatch"),
    "integer": (_set(*[(i, lambda t: t.long()) for i in range(6)]), TypeError, "floating point"),
    "device": (_set((2, lambda t: t.to("meta"))), ValueError, "device mismatch"),
    "not_tensor": (_set((1, lambda t: t.tolist())), TypeError, "torch.Tensor"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_inputs_raise(name):
    mutate, exc, match = BAD_INPUTS[name]
    primals, tangents = _good()
    args = [*primals, *tangents]
    mutate(args)
    with pytest.raises(exc, match=match):
        attention_dual(*args, backend="torch")


def test_unknown_backend_raises():
    primals, tangents = _good()
    with pytest.raises(ValueError, match="unknown sgflow backend"):
        attention_dual(*primals, *tangents, backend="bogus")


# --------------------------------------------------------------------------------------------------
# GPU
# --------------------------------------------------------------------------------------------------
GPU_TOL = {torch.float32: 1e-4, torch.float16: 1.5e-2, torch.bfloat16: 6e-2}


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("n", [256, 1024])
@pytest.mark.parametrize("d", [64, 128])
def test_gpu_triton_matches_fp64(dtype, n, d):
    primals, tangents = make_inputs((2, 2, n, n, d, d), seed=20)
    primals = [t.cuda() for t in primals]
    tangents = [t.cuda() for t in tangents]
    gen = torch.Generator().manual_seed(21)
    cot = tuple(torch.randn(2, 2, n, d, generator=gen, dtype=torch.float64).cuda() for _ in range(2))
    ref_out, ref_grads = run_dual("torch", torch.float64, primals, tangents, cot)
    out, grads = run_dual("triton", dtype, primals, tangents, cot)
    assert_close_all(out, ref_out, grads, ref_grads, GPU_TOL[dtype], f"gpu {dtype} n={n} d={d}")


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize(
    "shape", [(2, 1, 256, 256, 256, 256), (2, 3, 200, 77, 96, 40)], ids=["d256", "cross_odd"]
)
def test_gpu_triton_large_and_odd_dims(dtype, shape):
    primals, tangents = make_inputs(shape, seed=22)
    primals = [t.cuda() for t in primals]
    tangents = [t.cuda() for t in tangents]
    gen = torch.Generator().manual_seed(23)
    cot = tuple(torch.randn(*shape[:3], shape[5], generator=gen, dtype=torch.float64).cuda() for _ in range(2))
    ref_out, ref_grads = run_dual("torch", torch.float64, primals, tangents, cot)
    out, grads = run_dual("triton", dtype, primals, tangents, cot)
    assert_close_all(out, ref_out, grads, ref_grads, GPU_TOL[dtype], f"gpu {dtype} {shape}")


@needs_cuda
@pytest.mark.parametrize("which", ["o", "o_dot"])
def test_gpu_triton_single_output(which):
    primals, tangents = make_inputs((2, 2, 256, 256, 64, 64), seed=24)
    leaves = [t.cuda().half().requires_grad_(True) for t in (*primals, *tangents)]
    ref_leaves = [t.detach().double().requires_grad_(True) for t in leaves]
    g = torch.randn(2, 2, 256, 64, device="cuda", dtype=torch.float64)
    grads = torch.autograd.grad(
        (attention_dual(*leaves, backend="triton")[int(which == "o_dot")].double() * g).sum(), leaves, allow_unused=True
    )
    ref = torch.autograd.grad(
        (attention_dual(*ref_leaves, backend="torch")[int(which == "o_dot")] * g).sum(), ref_leaves, allow_unused=True
    )
    for name, x, r in zip(GRAD_NAMES, grads, ref):
        if r is None:
            assert x is None or x.abs().max() == 0, name
        else:
            assert rel_err(as_zero(x, r), r) < GPU_TOL[torch.float16], name


# --------------------------------------------------------------------------------------------------
# Half precision: the tangent's row-constant part must cancel before rounding
# --------------------------------------------------------------------------------------------------
KEY_MEAN_DTYPES = [torch.float16] + ([torch.bfloat16] if HAS_CUDA else [])  # the interpreter's bf16 dots are not usable


@pytest.mark.skipif(not (HAS_CUDA or TRITON_CPU), reason="needs CUDA or triton with TRITON_INTERPRET=1")
@pytest.mark.parametrize("dtype", KEY_MEAN_DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_triton_tangent_accuracy_does_not_degrade_with_key_mean(dtype):
    """Keys with a non-zero mean add a per-row constant to S_dot (q_dot . k_mean), which the softmax
    tangent P (S_dot - mu) cancels. Rounding P S_dot to half precision before that cancellation made the
    o_dot error grow with the key mean (fp16, interpreter: 3.0e-4, 3.4e-4, 5.7e-4 at means 0, 1, 3);
    centring by the running mu keeps it flat (2.7e-4, 2.7e-4, 2.8e-4). Errors are against float64 on the
    same rounded inputs."""
    device = "cuda" if HAS_CUDA else "cpu"
    n = 256 if HAS_CUDA else 48
    primals, tangents = make_inputs((2, 2, n, n, 16, 16), seed=30)
    errs = {}
    for mean in (0.0, 1.0, 3.0):
        k = primals[1] + mean
        ins = [t.to(device=device, dtype=dtype) for t in (primals[0], k, primals[2], *tangents)]
        _, od_ref = attention_dual_ref(*[t.double() for t in ins])
        _, od = attention_dual(*ins, backend="triton")
        _, od_torch = attention_dual(*ins, backend="torch")
        errs[mean] = rel_err(od.double(), od_ref)
        # The torch backend forms P (S_dot - mu) in fp32: the bound a half-precision kernel can approach.
        assert errs[mean] < 2.0 * rel_err(od_torch.double(), od_ref), (mean, errs[mean])
    assert errs[3.0] < 1.2 * errs[0.0] and errs[1.0] < 1.2 * errs[0.0], errs


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["half-table", "fp32-table"])
def test_gpu_every_shipped_tile_config_runs_and_matches(dtype, monkeypatch):
    """Each (BLOCK_M, BLOCK_N, warps, stages) candidate the launchers ship, for every kernel and head-dim
    bucket of its table, compiled and run on the GPU: it either matches the float64 torch backend or is
    rejected by the compiler for resources (then the launcher falls back to the next candidate); the
    default (first) candidate of every bucket must run."""
    from triton.runtime.errors import OutOfResources

    import sgflow_kernels.attention as K

    table = K._HALF_CONFIGS if dtype == torch.float16 else K._FP32_CONFIGS
    rejected = []
    for kind, buckets in table.items():
        for d, cands in buckets.items():
            primals, tangents = make_inputs((1, 2, 96, 80, d, d), seed=40)
            gen = torch.Generator().manual_seed(41)
            cot = tuple(torch.randn(1, 2, 96, d, generator=gen, dtype=torch.float64) for _ in range(2))
            ref_out, ref_grads = run_dual("torch", torch.float64, primals, tangents, cot)
            for i, cfg in enumerate(cands):
                # the Autotuner of `kind` runs exactly cfg (no fallback); the other kernels keep their defaults
                monkeypatch.setitem(K._FORCED_CONFIGS, kind, cfg)
                try:
                    out, grads = run_dual("triton", dtype, primals, tangents, cot)
                except OutOfResources:
                    assert i > 0, f"default {kind} config {cfg} at D={d} does not fit the GPU"
                    rejected.append((kind, d, cfg))
                    continue
                assert K._as_tuple(K._TUNED[kind].best_config) == cfg
                tol = GPU_TOL[dtype] if dtype != torch.float32 else 1e-4
                assert_close_all(out, ref_out, grads, ref_grads, tol, f"{kind} D={d} {cfg}")
    print("rejected for resources:", rejected)


@pytest.mark.parametrize("with_g,with_gd", [(True, True), (True, False), (False, True), (False, False)],
                         ids=["g_and_gdot", "g_only", "gdot_only", "neither"])
@pytest.mark.parametrize("shape", [(2, 3, 7, 5, 4, 6), (1, 1, 9, 9, 8, 8)], ids=["q7_k5_d4_dv6", "b1_h1_n9"])
def test_flop_formulas_count_the_products_the_torch_backend_runs(shape, with_g, with_gd):
    """FlopCounterMode counts the dual attention ops by registered formulas (it cannot see inside a
    custom op): they equal the products of the torch backend's forward and backward, counted by the same
    mode on the functions themselves (in-place baddbmm_ added: PyTorch's counter has no formula for it)."""
    from torch.utils.flop_counter import FlopCounterMode

    def baddbmm_flop(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs):
        return 2 * math.prod(a_shape) * b_shape[-1]

    b, h, n_q, n_k, d, dv = shape
    g = torch.Generator().manual_seed(0)
    qs = [torch.randn(b, h, n, w, generator=g) for n, w in ((n_q, d), (n_k, d), (n_k, dv))] * 2
    go = [torch.randn(b, h, n_q, dv, generator=g) for _ in range(2)]
    g_o, gd = (go[0] if with_g else None), (go[1] if with_gd else None)

    def counted(fn):
        with FlopCounterMode(display=False, custom_mapping={torch.ops.aten.baddbmm_: baddbmm_flop}) as fc:
            out = fn()
        return out, fc.get_total_flops()

    (o, od, lse, mu), fwd_inner = counted(lambda: attn_mod._torch_forward(*qs, 0.5))
    _, bwd_inner = counted(lambda: attn_mod._torch_backward(*qs, o, od, lse, mu, g_o, gd, 0.5))
    fwd_op, bwd_op = attn_mod._ops("torch")
    outs, fwd_formula = counted(lambda: fwd_op(*qs, 0.5))
    _, bwd_formula = counted(lambda: bwd_op(*qs, *outs, g_o, gd, 0.5))
    assert fwd_formula == fwd_inner > 0
    assert bwd_formula == bwd_inner and (bwd_inner > 0) == (with_g or with_gd)
