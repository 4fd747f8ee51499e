"""Data-parallel training with torch.distributed, without the DDP wrapper.

Why no ``DistributedDataParallel``: the SGFlow loss differentiates *through* a forward-mode JVP
(``torch.func.jvp``), which does not pass through DDP's forward hooks, so the loss is computed on the
bare module and gradients are averaged here explicitly after ``backward``:

    g <- (1 / W) sum_r g_r        (one all-reduce per bucket of flattened gradients)

which is exactly what DDP would do. Parameters and buffers are broadcast from rank 0 once at the
start; from then on every rank applies the same averaged gradient with the same optimizer state, so
the replicas stay identical.

Launch with ``torchrun --nproc_per_node=N -m sgflow.cli train ...`` (or the ``sgflow`` console
script under torchrun): the process group is initialised from torchrun's environment variables
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``); NCCL on GPUs, gloo on
CPUs.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
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


def cleanup(info: DistInfo) -> None:
    """Destroy the process group if :func:`init_distributed` created it."""
    if info.owns_group and dist.is_initialized():
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
