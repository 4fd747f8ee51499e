"""Data-parallel training with torch.distributed: through DDP's own forward where the loss allows it.

Two ways to average the gradient g <- (1 / W) sum_r g_r over W processes:

- ``DistributedDataParallel``'s forward (:class:`DualDDP`, or a plain ``DistributedDataParallel``):
  for every loss whose network calls all pass through the model's ``__call__`` (the fused losses
  :func:`sgflow.fused_loss` / :func:`sgflow.fused_meanflow_loss`, flow matching, progressive). DDP's
  forward arms its gradient hooks and the all-reduce overlaps the backward pass.
- :func:`allreduce_gradients` after ``backward`` on the plain module: for the losses whose JVP is
  ``torch.func.jvp`` or a double VJP (:func:`sgflow.sgflow_loss`, ``meanflow_loss``,
  ``lagrangian_loss``, ``eulerian_loss``). Run inside a functorch transform, DDP's forward breaks
  (its bucket rebuild on the second iteration: "Cannot access data pointer of Tensor that doesn't
  have storage"; its output ``_DDPSink`` with ``find_unused_parameters`` / ``static_graph``: "must
  override the setup_context staticmethod"), so those losses refuse a DDP model
  (:func:`sgflow.checks.check_not_ddp`). The update is the same: one all-reduce per bucket of
  flattened gradients, divided by W.

Either way parameters and buffers start identical (broadcast from rank 0) and every rank applies the
same averaged gradient with the same optimizer state, so the replicas stay identical
(:func:`state_digest` checks it).

A plain ``DistributedDataParallel(net)`` works with the fused losses: ``sgflow.fused_loss(ddp, x1)``
runs the dual forward as ``ddp(t, u, x)`` with tangent-carrying ``DualTensor`` inputs
(:mod:`sgflow.autodual`), so DDP's forward runs. With ``find_unused_parameters=True`` (and on the first
iteration of ``static_graph=True``) DDP passes its outputs through an ``autograd.Function``
(``_DDPSink``); its dual rule here (:func:`_ddp_sink_rule`, registered on import of this module) passes
the primal and the tangent through it together. That rule needs sgflow.autodual to route
``Function.apply`` on dual tensors to its rules (``Function.apply`` bypasses ``__torch_function__``);
without that routing the DualTensor comes back detached and ``backward`` fails ("element 0 of tensors
does not require grad"). DDP's unused-parameter search starts from the DualTensor output, i.e. from
the primal's graph.

:class:`DualDDP` (what ``sgflow train`` uses) needs neither: it wraps a module whose
``forward(t, u, x, t_dot, u_dot, x_dot)`` *is* the dual forward (:func:`sgflow.dualize`'s, or the
network's own ``dual_forward`` where it defines one) and returns the primal and the tangent as two
plain tensors, so every DDP option works and the unused-parameter search sees both streams (the same
dual computation as in one process).

Launch with ``torchrun --nproc_per_node=N -m sgflow.cli train ...`` (or the ``sgflow`` console
script under torchrun): the process group is initialised from torchrun's environment variables
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``); NCCL on GPUs, gloo on
CPUs.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

_BUCKET_BYTES = 32 * 2**20


class DistributedError(RuntimeError):
    """A misconfigured multi-process launch (missing torchrun variables, bad backend...)."""


@dataclass
class DistInfo:
    """Where this process sits: ``rank`` of ``world_size``, ``local_rank`` on its node, and whether
    this module created the process group (so it also tears it down)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    val = os.environ.get(name)
    if val is None or val == "":
        return default
    try:
        return int(val)
    except ValueError:
        raise DistributedError(f"environment variable {name}={val!r} is not an integer") from None


def env_world_size() -> int:
    """WORLD_SIZE from the environment (1 when not launched by torchrun) or of an existing group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return _env_int("WORLD_SIZE", 1)


def init_distributed(device: str = "auto") -> DistInfo:
    """Join (or create from the torchrun environment) the default process group.

    Returns a single-process :class:`DistInfo` when WORLD_SIZE is unset or 1. ``device`` picks the
    backend: NCCL when training on CUDA, gloo otherwise. On CUDA each process uses GPU LOCAL_RANK.
    """
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0), owns_group=False)
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return DistInfo()
    if not dist.is_available():
        raise DistributedError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
    if missing:
        raise DistributedError(f"WORLD_SIZE={world} but {', '.join(missing)} not set: launch with torchrun")
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    use_cuda = uses_cuda(device)
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise DistributedError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPU(s) visible")
        torch.cuda.set_device(local_rank)
    backend = "nccl" if use_cuda else "gloo"
    dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world)
    return DistInfo(rank, world, local_rank, owns_group=True)


def uses_cuda(device: str) -> bool:
    """Whether a device string ("auto", "cpu", "cuda", "cuda:1") means training on a GPU."""
    if device == "auto":
        return torch.cuda.is_available()
    return str(device).startswith("cuda")


def resolve_device(device: str, info: DistInfo) -> torch.device:
    """"auto" -> this rank's GPU if there is one, else the CPU; "cuda" -> cuda:LOCAL_RANK."""
    if uses_cuda(device):
        if not torch.cuda.is_available():
            raise DistributedError(f"device {device!r} asked for but CUDA is not available")
        if device in ("auto", "cuda"):
            return torch.device("cuda", info.local_rank if info.enabled else torch.cuda.current_device())
        return torch.device(device)
    return torch.device("cpu")


def cleanup(info: DistInfo, wait: bool = False) -> None:
    """Destroy the process group if :func:`init_distributed` created it.

    ``wait=True`` (a normal end) first meets the other ranks at a barrier: a rank that tears its gloo
    connections down while a peer is still finishing its last collective can abort that peer at exit
    ("terminate called without an active exception"). Never wait on an error path: the failed peer
    would never arrive.
    """
    if info.owns_group and dist.is_initialized():
        if wait and dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers to every rank (in place)."""
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src)


def _buckets(tensors, limit=_BUCKET_BYTES):
    bucket, size = [], 0
    for t in tensors:
        if bucket and (size + t.numel() * t.element_size() > limit or t.dtype != bucket[0].dtype):
            yield bucket
            bucket, size = [], 0
        bucket.append(t)
        size += t.numel() * t.element_size()
    if bucket:
        yield bucket


def allreduce_gradients(params, world_size: int) -> None:
    """Average ``p.grad`` over all ranks in place: g <- sum_r g_r / world_size.

    A parameter without a gradient on this rank contributes zeros, so every rank sends buckets of
    the same layout (ranks whose batch happened not to touch a parameter cannot desynchronise).
    """
    if world_size <= 1:
        return
    params = [p for p in params if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    for bucket in _buckets(grads):
        flat = _flatten_dense_tensors(bucket)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat.div_(world_size)
        for g, reduced in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
            g.copy_(reduced)


class _DualForward(nn.Module):
    """The module :class:`DualDDP` hands to ``DistributedDataParallel``.

    ``forward(t, u, x)`` is the network; ``forward(t, u, x, t_dot, u_dot, x_dot)`` is its dual
    forward ``(f~, JVP f~)`` as two plain tensors ([B, *D] each): the network's own ``dual_forward``
    when it has one, else :func:`sgflow.dualize`'s through its ``forward`` (built once per network).
    """

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, t, u, x, *tangents):
        if not tangents:
            return self.module(t, u, x)
        if len(tangents) != 3:
            raise TypeError(f"the dual forward takes (t, u, x, t_dot, u_dot, x_dot); got {3 + len(tangents)} tensors")
        from sgflow.dual import dual_forward

        return dual_forward(self.module, t, u, x, *tangents)


class DualDDP(nn.Module):
    """``DistributedDataParallel`` for flow maps: its forward (and so its gradient sync) runs for the
    plain calls ``model(t, u, x)`` *and* for the dual forward of the fused losses.

        model = sgflow.distributed.DualDDP(net, find_unused_parameters=True)   # any DDP option
        loss, info = sgflow.fused_loss(model, x1)      # or fused_meanflow_loss, flow_matching_loss, ...
        loss.backward()                                # gradients averaged over the ranks

    Args:
        module: the network ``net(t, u, x) -> f~`` (with or without its own ``dual_forward``),
            already on this rank's device.
        **ddp_kwargs: passed to ``torch.nn.parallel.DistributedDataParallel`` (``device_ids``,
            ``find_unused_parameters``, ``static_graph``, ``bucket_cap_mb``, ...).

    ``dual_forward(t, u, x, t_dot, u_dot, x_dot)`` runs ``DDP(...)(t, u, x, t_dot, u_dot, x_dot)``
    (see :class:`_DualForward`), whose outputs are two plain tensors, so every DDP option works; a plain
    ``DistributedDataParallel(net)`` given to the fused losses works with DDP's default options only (see
    the module doc). ``module`` is the plain network (save its ``state_dict``); ``ddp`` the
    ``DistributedDataParallel`` (``no_sync()`` for gradient accumulation). The JVP losses that refuse a
    DDP model (``sgflow_loss``, ``meanflow_loss``, ``lagrangian_loss``, ``eulerian_loss``) refuse this
    too: give them ``model.module`` and :func:`allreduce_gradients`.
    """

    def __init__(self, module: nn.Module, **ddp_kwargs):
        super().__init__()
        if isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel, DualDDP)):
            raise TypeError(f"DualDDP wraps the plain network, not a {type(module).__name__}: pass its .module")
        if not isinstance(module, nn.Module):
            raise TypeError(f"DualDDP wraps an nn.Module, got {type(module).__name__}")
        self.ddp = nn.parallel.DistributedDataParallel(_DualForward(module), **ddp_kwargs)

    @property
    def module(self) -> nn.Module:
        """The plain network (parameters shared with the DDP replica)."""
        return self.ddp.module.module

    def forward(self, t, u, x):
        return self.ddp(t, u, x)

    def dual_forward(self, t, u, x, t_dot, u_dot, x_dot):
        """(f~(t,u,x), JVP of f~ in direction (t_dot, u_dot, x_dot)) through DDP's forward; all [B] / [B, *D]."""
        return self.ddp(t, u, x, t_dot, u_dot, x_dot)

    def no_sync(self):
        """DDP's ``no_sync()``: accumulate gradients locally in the backward passes run inside it."""
        return self.ddp.no_sync()


def _ddp_sink_rule(func, args, kwargs):
    """Dual rule of DDP's output sink ``_DDPSink.apply(ddp_ref, *outputs)``, which DDP applies with
    ``find_unused_parameters=True`` and on the first iteration of ``static_graph=True`` (identity forward;
    its backward hands the gradients on and, for a static graph, queues DDP's delayed all-reduce). One call
    on the primals and the tangents together: both streams pass through it and its backward runs once."""
    from sgflow.autodual import is_dual, make_dual, primal, tangent

    ref, *outs = args
    duals = [i for i, o in enumerate(outs) if is_dual(o)]
    res = func(ref, *[primal(o) for o in outs], *[tangent(outs[i]) for i in duals], **kwargs)
    n = len(outs)
    out = list(res[:n])
    for j, i in enumerate(duals):
        out[i] = make_dual(res[i], res[n + j])
    return tuple(out)


def _register_ddp_sink_rule() -> None:
    """Give a plain ``DistributedDataParallel`` with any option a dual forward: where sgflow.autodual routes
    ``autograd.Function.apply`` on dual tensors to its rules, DDP's sink gets :func:`_ddp_sink_rule`."""
    try:
        from torch.nn.parallel.distributed import _DDPSink

        from sgflow.autodual import register_rule
    except ImportError:  # a torch without the sink (or sgflow without autodual): nothing to do
        return
    register_rule(_DDPSink.apply, kind="rule:ddp-sink")(_ddp_sink_rule)


_register_ddp_sink_rule()


def state_digest(module) -> str:
    """A hash of every parameter and buffer of a module, or of a state dict (names, dtypes, shapes and
    bytes), to check that the replicas of a data-parallel run are identical (cheap next to a checkpoint
    write). A module and its ``state_dict()`` hash alike."""
    state = module.state_dict(keep_vars=True) if isinstance(module, nn.Module) else module
    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(state.items()):
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def allreduce_mean(values: dict, world_size: int, device) -> dict:
    """Average a dict of Python floats over ranks (for logging); returns a new dict."""
    if world_size <= 1 or not values:
        return dict(values)
    keys = sorted(values)
    vec = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(vec, op=dist.ReduceOp.SUM)
    vec /= world_size
    return dict(zip(keys, vec.tolist()))


def gather_objects(obj, info: DistInfo) -> list:
    """Every rank's ``obj`` as a list indexed by rank (``[obj]`` without a process group)."""
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, info: DistInfo, src: int = 0):
    """Rank ``src``'s ``obj`` on every rank."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()
