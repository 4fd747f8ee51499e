"""Which submodules ``sgflow.dualize`` recomputes in backward: the ``blocks=`` argument resolved to module
paths (:func:`select_blocks`) and the candidates that ``blocks="auto"`` chooses from (:func:`candidate_blocks`).

Module paths are relative to the unwrapped model (``DistributedDataParallel`` / ``DataParallel`` looked
through): ``"blocks.0"``, ``"input_blocks.3.1"``. ``blocks="all"``: the outermost submodules with
parameters, looking into plain containers and through wrappers (a composite child holding at least
:data:`WRAPPER_SHARE` of its parent's parameters). Which candidates ``"auto"`` recomputes is measured by
:mod:`sgflow.autodual.plan`. Every name here is importable from :mod:`sgflow.autodual` too (where
``WRAPPER_SHARE`` reads and sets this module's).
"""
from __future__ import annotations

from torch import nn

__all__ = ["select_blocks", "candidate_blocks", "WRAPPER_SHARE"]

_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict)
_WRAPPERS = (nn.parallel.DistributedDataParallel, nn.DataParallel)


def _inner(model: nn.Module) -> nn.Module:
    while isinstance(model, _WRAPPERS):
        model = model.module
    return model


def _is_plain_container(m: nn.Module) -> bool:
    """ModuleList/ModuleDict, and an exact nn.Sequential of composite modules (a trunk of blocks); a
    Sequential of leaf layers (Linear -> SiLU -> Linear) is one block."""
    if isinstance(m, _CONTAINERS):
        return True
    return type(m) is nn.Sequential and any(any(True for _ in c.children()) for c in m.children())


def select_blocks(model: nn.Module, blocks="auto") -> list[str]:
    """Module paths (relative to the unwrapped model) that are recomputed in backward.

    ``blocks``:
      - ``"all"``: the blocks of the network, found through any nesting: the outermost submodules
        with parameters, looking into plain containers (``nn.ModuleList``/``ModuleDict`` and exact
        ``nn.Sequential`` trunks of composite modules) and through *wrappers* (a composite child
        holding at least :data:`WRAPPER_SHARE` of its parent's parameters is looked into: the backbone
        ``self.net`` of the thin ``forward(t, u, x)`` module around it): residual blocks, attention blocks, transformer blocks, the
        time-embedding MLP, the in/out layers. A wrapper's own small layers are blocks too;
      - ``"auto"``: the same list here; :class:`DualizedModel` replaces it on its first training
        call by the blocks its profile chooses among :func:`candidate_blocks` (any depth;
        :mod:`sgflow.autodual.plan`);
      - ``"none"`` / ``None``: no recomputation (every intermediate is kept: fastest, most memory);
      - a sequence of module types: the outermost submodules of those types;
      - a sequence of module paths (``"blocks.0"``, ``"input_blocks.3"``);
      - a callable ``(path, module) -> bool``: the outermost submodules it accepts.
    """
    model = _inner(model)
    if blocks is None or blocks == "none":
        return []
    if isinstance(blocks, str) and blocks not in ("auto", "all"):
        raise ValueError(f"dualize: blocks must be 'auto', 'all', 'none', a callable, module types or module paths "
                         f"(a list), got {blocks!r}")
    if isinstance(blocks, str):
        return _frontier(model)
    if callable(blocks) and not isinstance(blocks, type):
        accept = blocks
    else:
        items = list(blocks)
        if all(isinstance(b, str) for b in items):
            names = dict(model.named_modules())
            missing = [b for b in items if b not in names or b == ""]
            if missing:
                raise ValueError(f"dualize: blocks {missing} are not submodule paths of {type(model).__name__}")
            return items
        if not all(isinstance(b, type) and issubclass(b, nn.Module) for b in items):
            raise TypeError("dualize: blocks must be 'auto', 'all', 'none', a callable, module types or module paths")
        types = tuple(items)

        def accept(path, m):
            return isinstance(m, types)

    chosen: list[str] = []

    def walk(m: nn.Module, prefix: str):
        for name, child in m.named_children():
            path = f"{prefix}.{name}" if prefix else name
            if accept(path, child):
                chosen.append(path)
            else:
                walk(child, path)

    walk(model, "")
    return chosen


# A composite child holding at least this share of a module's parameters makes the module a wrapper
# (``select_blocks(..., "all")`` looks through it): a thin flow-map wrapper around a backbone (100%), a
# backbone whose block list holds nearly all its weights. A residual block's largest stage holds 40-70%.
WRAPPER_SHARE = 0.9


def _n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _trunk(m: nn.Module, child: nn.Module) -> bool:
    """Whether ``child`` (composite) holds at least :data:`WRAPPER_SHARE` of ``m``'s parameters: ``m`` is
    then a wrapper around it, and the blocks are inside ``child``. (Not asked of a plain container: a
    container whose one block holds all its parameters is a list of that one block.)"""
    total = _n_params(m)
    return total > 0 and any(True for _ in child.children()) and _n_params(child) >= WRAPPER_SHARE * total


def _frontier(model: nn.Module) -> list[str]:
    """``blocks="all"``: the outermost blocks with parameters, looking into plain containers and through
    wrappers (a child holding nearly all its parent's parameters is looked into, not taken whole)."""
    chosen: list[str] = []

    def walk(m: nn.Module, prefix: str):
        for name, child in m.named_children():
            path = f"{prefix}.{name}" if prefix else name
            if not any(True for _ in child.parameters()):
                continue
            if _is_plain_container(child) or (not _is_plain_container(m) and _trunk(m, child)):
                walk(child, path)
            else:
                chosen.append(path)

    walk(model, "")
    return chosen


_LINEAR_MAPS = (nn.Linear, nn.modules.conv._ConvNd, nn.Embedding)


def _auto_accept(path, m) -> bool:
    return not _is_plain_container(m) and any(True for _ in m.parameters())


def candidate_blocks(model: nn.Module) -> dict:
    """What ``blocks="auto"`` chooses from: ``{path: parent}`` at any depth, each candidate followed by
    the candidates inside it (``parent``: the nearest enclosing candidate, ``None`` at the top).

    Candidates: the blocks of ``blocks="all"`` (:func:`select_blocks`: through containers and wrappers),
    the wrappers it looked through (recomputing a whole backbone is a choice too), and every composite
    submodule with parameters inside them (a residual block's stages, a transformer block's attention
    and MLP; through ModuleLists inside ModuleLists and ``nn.Sequential`` trunks), so that the plan can
    recompute a whole block or only the parts of it that pay, and the single layers with parameters
    inside them (a norm layer keeps more than its input), except linear maps (``nn.Linear``,
    convolutions, embeddings: recomputed alone they free nothing, keeping their input either way) where
    they are not blocks of ``"all"``."""
    model = _inner(model)
    frontier = set(_frontier(model))
    out: dict = {}

    def walk(m: nn.Module, prefix: str, parent):
        for name, child in m.named_children():
            path = f"{prefix}.{name}" if prefix else name
            if not any(True for _ in child.parameters()):
                continue
            if (path in frontier or not isinstance(child, _LINEAR_MAPS)) and not _is_plain_container(child):
                out[path] = parent
                walk(child, path, path)
            else:
                walk(child, path, parent)

    walk(model, "", None)
    return out

