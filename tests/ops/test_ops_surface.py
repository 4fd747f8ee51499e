"""sgflow.ops has no orphan public names: each is imported by the dual engine or documented as API.

A public name of an ops module is its ``__all__`` (else its public top-level definitions), plus the
package's own ``__all__``. It is *reached* when a module of the engine (python/sgflow/autodual/,
losses/, nn/) imports it (``from sgflow.ops.<mod> import name``, ``from sgflow.ops import name``) or
reads it as an attribute of the imported module (``sgflow.ops.<mod>.name``, ``alias.name``), and
*documented* when README.md or docs/*.md names it in code: a backtick span that starts with the name,
bare or qualified by its module (`` `name(...)` ``, `` `ops.<mod>.name` ``). Prose, comments and
docstrings count for neither. The rule is from issue 20: ``ops/`` is the one home of the dual
Functions and registered ops, and nothing there is kept for no one.
"""
from __future__ import annotations

import ast
import importlib
import pkgutil
import re
from pathlib import Path

import sgflow.ops

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "python" / "sgflow"
ENGINE_DIRS = ("autodual", "losses", "nn")
PREFIX = "sgflow.ops"


def ops_modules() -> list[str]:
    """The submodule names of sgflow.ops (``attention``, ``backend``, ...)."""
    return sorted(m.name for m in pkgutil.iter_modules(sgflow.ops.__path__))


def public_names(module: str) -> list[str]:
    """``module.__all__``, else the public names it defines at top level (defs, classes, assignments)."""
    mod = importlib.import_module(f"{PREFIX}.{module}")
    names = getattr(mod, "__all__", None)
    if names is not None:
        return list(names)
    tree = ast.parse(Path(mod.__file__).read_text())
    out = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.append(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            out += [t.id for t in targets if isinstance(t, ast.Name)]
    return [n for n in out if not n.startswith("_")]


def surface() -> dict[str, list[str]]:
    """{module: public names}; the package's ``__all__`` under its defining module."""
    out = {m: public_names(m) for m in ops_modules()}
    for name in getattr(sgflow.ops, "__all__", []):
        home = getattr(sgflow.ops, name).__module__.rpartition(".")[2]
        if name not in out.setdefault(home, []):
            out[home].append(name)
    return out


def _dotted(node: ast.AST) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(node.id)
    return ".".join(reversed(parts))


def engine_references(source: str, modules: list[str]) -> set[tuple[str, str]]:
    """The (module, name) pairs of sgflow.ops that ``source`` imports or reads (module ``""``: a name
    imported from the package itself)."""
    refs: set[tuple[str, str]] = set()
    aliases: dict[str, str] = {}  # local name or dotted path -> ops module
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.startswith(PREFIX + "."):
                mod = node.module[len(PREFIX) + 1:].split(".")[0]
                refs.update((mod, a.name) for a in node.names)
            elif node.module == PREFIX:
                for a in node.names:
                    if a.name in modules:
                        aliases[a.asname or a.name] = a.name
                    else:
                        refs.add(("", a.name))
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith(PREFIX + "."):
                    mod = a.name[len(PREFIX) + 1:].split(".")[0]
                    aliases[a.asname or f"{PREFIX}.{mod}"] = mod
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            path = _dotted(node)
            if path is None:
                continue
            head, _, name = path.rpartition(".")
            if head in aliases:
                refs.add((aliases[head], name))
            elif head.startswith(PREFIX + ".") and head[len(PREFIX) + 1:] in modules:
                refs.add((head[len(PREFIX) + 1:], name))
    return refs


def documented(text: str, module: str, name: str) -> bool:
    """``text`` (Markdown) names ``name`` in a backtick span that starts with it, bare or qualified by
    its module (``ops.<module>.``, ``sgflow.ops.<module>.``, ``<module>.``) or by the package."""
    qual = rf"(?:(?:sgflow\.)?(?:ops\.)?{re.escape(module)}\.|(?:sgflow\.)?ops\.)?"
    return re.search(rf"`{qual}{re.escape(name)}\b", text) is not None


def unreached(names: dict[str, list[str]], engine_sources: list[str], docs: list[str]) -> list[str]:
    """``module.name`` for every public name neither referenced by ``engine_sources`` nor documented
    in ``docs``."""
    modules = sorted(names)
    refs = set()
    for src in engine_sources:
        refs |= engine_references(src, modules)
    missing = []
    for module, module_names in sorted(names.items()):
        for name in module_names:
            if (module, name) in refs or ("", name) in refs:
                continue
            if any(documented(text, module, name) for text in docs):
                continue
            missing.append(f"{module}.{name}")
    return missing


def engine_sources() -> list[str]:
    return [p.read_text() for d in ENGINE_DIRS for p in sorted((PKG / d).rglob("*.py"))]


def docs_texts() -> list[str]:
    return [(ROOT / "README.md").read_text()] + [p.read_text() for p in sorted((ROOT / "docs").glob("*.md"))]


def test_every_public_ops_name_is_used_by_the_engine_or_documented():
    names = surface()
    assert {"recompute", "conv_linear", "pointwise", "attention", "groupnorm_silu"} <= set(names)
    assert sum(len(v) for v in names.values()) > 20  # not vacuous
    missing = unreached(names, engine_sources(), docs_texts())
    assert not missing, (
        f"public names of sgflow.ops used by no engine module and named in no doc: {missing}; "
        "use them from autodual/, losses/ or nn/, document them in docs/DESIGN.md's 'Dual ops' section, "
        "make them private, or delete them")


def test_the_engines_functions_live_in_ops():
    """The Functions the rules apply are defined in sgflow.ops (the rules keep their old names)."""
    from sgflow.autodual import rules

    for old, home in (("_RecomputeOp", "recompute"), ("_DualConv", "conv_linear"),
                      ("_DualLinear", "conv_linear"), ("_PointwiseDual", "pointwise")):
        assert getattr(rules, old).__module__ == f"{PREFIX}.{home}", old
    refs = set()
    for src in engine_sources():
        refs |= engine_references(src, ops_modules())
    assert {("recompute", "recompute_op"), ("conv_linear", "DualConv"), ("conv_linear", "DualLinear"),
            ("pointwise", "PointwiseDual")} <= refs


def test_an_unreached_undocumented_name_is_reported():
    """The check can fail: a fake public name is reported until the engine imports it or a doc names it."""
    names = {"groupnorm": ["GroupNormDual", "frobnicate_dual"], "library": ["once"]}
    engine = ["from sgflow.ops.groupnorm import GroupNormDual\n"]
    docs = ["It runs once per call; `frobnicate` is not `frobnicate_dualx`. # frobnicate_dual\n",
            "`library.once(fn)`\n"]
    assert unreached(names, engine, docs) == ["groupnorm.frobnicate_dual"]
    # prose and a mere mention in the engine's text do not count either
    assert unreached(names, engine + ['"""frobnicate_dual"""\n# sgflow.ops.groupnorm.frobnicate_dual\n'],
                     docs) == ["groupnorm.frobnicate_dual"]
    assert unreached({"library": ["once"]}, [], ["Each op is registered once."]) == ["library.once"]
    # each way of reaching it clears it
    for src in ("def f():\n    from sgflow.ops.groupnorm import frobnicate_dual as _f\n",
                "import sgflow.ops.groupnorm as G\nG.frobnicate_dual\n",
                "import sgflow.ops.groupnorm\nsgflow.ops.groupnorm.frobnicate_dual(1)\n",
                "from sgflow.ops import groupnorm\ngroupnorm.frobnicate_dual\n",
                "from sgflow.ops import frobnicate_dual\n"):
        assert unreached(names, engine + [src], docs) == [], src
    for doc in ("`frobnicate_dual(x, x_dot)`", "`ops.groupnorm.frobnicate_dual`", "`sgflow.ops.frobnicate_dual`"):
        assert unreached(names, engine, docs + [doc]) == [], doc
    # a name qualified by another module is not this one's
    assert unreached(names, engine, docs + ["`attention.frobnicate_dual`"]) == ["groupnorm.frobnicate_dual"]
