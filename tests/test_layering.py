"""The package's import layering, checked on the source with `ast` (nothing is imported).

Layers, bottom-up; a module may import only from its own layer or lower ones:

    0  lmkiln (__init__), lmkiln.errors, lmkiln.assets
    1  lmkiln.formats   bytes on disk: safetensors, HF checkpoints, the engine, AWQ-GEMM,
                        packing, QTensor, the tokenizer beside every output, atomic outputs
    2  lmkiln.convert   architecture table, HF config mapping, transforms, rope, HF -> engine
    3  lmkiln.quant
    4  lmkiln.runtime
    5  lmkiln.export, lmkiln.verify   (independent of each other)
    6  lmkiln.inspect_model, lmkiln.cli, lmkiln.__main__

Every import counts: module level, inside functions, under TYPE_CHECKING, relative, and
attribute access through an imported lmkiln module (`import lmkiln.x as m; m.f`). No
module may take a `_private` name (or a `_private` module) from another lmkiln module.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

PKG = "lmkiln"
SRC = Path(__file__).resolve().parent.parent / "src"

LAYERS = {
    "lmkiln": 0, "lmkiln.errors": 0, "lmkiln.assets": 0,
    "lmkiln.formats": 1,
    "lmkiln.convert": 2,
    "lmkiln.quant": 3,
    "lmkiln.runtime": 4,
    "lmkiln.export": 5, "lmkiln.verify": 5,
    "lmkiln.inspect_model": 6, "lmkiln.cli": 6, "lmkiln.__main__": 6,
}
# Units on one layer that must not import each other.
APART = {frozenset({"lmkiln.export", "lmkiln.verify"})}


@dataclass(frozen=True)
class Source:
    module: str
    path: str  # as shown in failure messages
    text: str
    is_package: bool  # an __init__.py


@dataclass(frozen=True)
class Use:
    line: int
    target: str  # the lmkiln module depended on
    name: str | None  # the name taken from it (None: the module itself)
    text: str  # the statement or expression, for the report


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([PKG, *parts])


def package_sources(root: Path = SRC) -> list[Source]:
    return [
        Source(module_name(p, root), str(p.relative_to(root.parent)), p.read_text(encoding="utf-8"), p.name == "__init__.py")
        for p in sorted(root.rglob("*.py"))
    ]


def unit(module: str) -> str:
    """The layer-table key of a module: `lmkiln` itself, else its top-level subpackage/module."""
    parts = module.split(".")
    return PKG if parts == [PKG] else ".".join(parts[:2])


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def is_lmkiln(module: str | None) -> bool:
    return module is not None and (module == PKG or module.startswith(PKG + "."))


def uses(src: Source, known: set[str]) -> list[Use]:
    """Every dependency of `src` on an lmkiln module, with the name it takes (if any)."""
    tree = ast.parse(src.text, filename=src.path)
    package = src.module if src.is_package else src.module.rpartition(".")[0]
    found: list[Use] = []
    bound: dict[str, str] = {}  # local name -> the lmkiln module an import bound to it
    inner: set[int] = set()  # attribute nodes that are part of a longer chain

    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute):
            inner.add(id(node.value))
        if isinstance(node, ast.Import):
            for a in node.names:
                if is_lmkiln(a.name):
                    found.append(Use(node.lineno, a.name, None, ast.unparse(node)))
                    if a.asname:
                        bound[a.asname] = a.name
                    else:  # `import lmkiln.x.y` binds `lmkiln`
                        bound[a.name.split(".")[0]] = PKG
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, node.module] if node.module else anchor)
            if not is_lmkiln(base):
                continue
            for a in node.names:
                sub = f"{base}.{a.name}"
                if sub in known:  # `from lmkiln.x import submodule`
                    found.append(Use(node.lineno, sub, None, ast.unparse(node)))
                    bound[a.asname or a.name] = sub
                else:
                    found.append(Use(node.lineno, base, a.name, ast.unparse(node)))

    # Attribute access through an imported module: `lmkiln.runtime.engine_model._merge`.
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or id(node) in inner:
            continue
        attrs, root = [], node
        while isinstance(root, ast.Attribute):
            attrs.insert(0, root.attr)
            root = root.value
        if not isinstance(root, ast.Name) or root.id not in bound:
            continue
        target = bound[root.id]
        while attrs and f"{target}.{attrs[0]}" in known:
            target, attrs = f"{target}.{attrs[0]}", attrs[1:]
        name = attrs[0] if attrs else None
        if target != bound[root.id] or (name is not None and is_private(name)):
            found.append(Use(node.lineno, target, name, ast.unparse(node)))
    return found


def violations(sources: list[Source]) -> dict[str, list[str]]:
    """Violations by kind, each as 'path:line: statement (why)'."""
    known = {s.module for s in sources}
    out: dict[str, list[str]] = {"unlayered": [], "upward": [], "apart": [], "private": []}
    for src in sources:
        u = unit(src.module)
        if u not in LAYERS:
            out["unlayered"].append(f"{src.path}: module {src.module} ({u} has no layer)")
        for use in uses(src, known):
            where = f"{src.path}:{use.line}: {use.text}"
            tu = unit(use.target)
            if tu not in LAYERS:
                out["unlayered"].append(f"{where} ({use.target} has no layer)")
            elif u in LAYERS and LAYERS[tu] > LAYERS[u]:
                out["upward"].append(f"{where} ({u} is layer {LAYERS[u]}, {tu} is layer {LAYERS[tu]})")
            if tu != u and frozenset({u, tu}) in APART:
                out["apart"].append(f"{where} ({u} and {tu} must not import each other)")
            if use.target == src.module:
                continue
            # A private module may be imported from inside its own package only.
            private = [
                ".".join(use.target.split(".")[: i + 1])
                for i, part in enumerate(use.target.split("."))
                if is_private(part) and not src.module.startswith(".".join(use.target.split(".")[:i]) + ".")
            ]
            if use.name is not None and is_private(use.name):
                private.append(f"{use.target}.{use.name}")
            if private:
                out["private"].append(f"{where} (private: {', '.join(private)})")
    return {k: list(dict.fromkeys(v)) for k, v in out.items()}  # one line per statement


@pytest.fixture(scope="module")
def found() -> dict[str, list[str]]:
    return violations(package_sources())


def _report(items: list[str], what: str) -> str:
    return f"{len(items)} {what}:\n  " + "\n  ".join(items)


def test_every_module_has_a_layer(found):
    modules = {s.module for s in package_sources()}
    assert {"lmkiln", "lmkiln.formats", "lmkiln.quant", "lmkiln.cli"} <= modules, f"no package found under {SRC}"
    assert not found["unlayered"], _report(found["unlayered"], "modules without a layer (add them to LAYERS)")


def test_no_upward_imports(found):
    assert not found["upward"], _report(found["upward"], "imports from a higher layer")


def test_export_and_verify_are_independent(found):
    assert not found["apart"], _report(found["apart"], "imports between export and verify")


def test_no_private_imports_across_modules(found):
    assert not found["private"], _report(found["private"], "imports of another module's private names")


def test_checker_sees_every_import_form(tmp_path):
    """The checker itself: each form of import is attributed to the right module and line."""
    (tmp_path / "formats").mkdir()
    (tmp_path / "formats" / "__init__.py").write_text("")
    (tmp_path / "formats" / "_bits.py").write_text("")
    (tmp_path / "formats" / "x.py").write_text(
        "import lmkiln.errors\n"                          # 1 fine
        "from lmkiln.quant.awq import f\n"                # 2 upward
        "def g():\n"
        "    from ..runtime import engine_model\n"        # 4 upward, relative, inside a function
        "    import lmkiln.formats.y as y\n"              # 5 fine
        "    return y._h, lmkiln.cli.main\n"              # 6 private; upward by attribute
        "from . import _bits\n"                           # 7 fine: own package's private module
        "from lmkiln.formats.y import _p, q\n"            # 8 private name
    )
    (tmp_path / "formats" / "y.py").write_text("")
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "__init__.py").write_text("from lmkiln.verify import data\nfrom lmkiln.formats import _bits\n")
    (tmp_path / "verify").mkdir()
    (tmp_path / "verify" / "__init__.py").write_text("")
    (tmp_path / "verify" / "data.py").write_text("")
    (tmp_path / "newpkg").mkdir()
    (tmp_path / "newpkg" / "m.py").write_text("")
    for name in ("quant", "runtime"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("")
    (tmp_path / "quant" / "awq.py").write_text("")
    (tmp_path / "runtime" / "engine_model.py").write_text("")
    (tmp_path / "cli.py").write_text("")

    found = violations(package_sources(tmp_path))
    lines = {k: sorted(v.split(": ", 1)[0] for v in vs) for k, vs in found.items()}
    x = f"{tmp_path.name}/formats/x.py"
    assert lines["upward"] == [f"{x}:2", f"{x}:4", f"{x}:6"], found["upward"]
    assert lines["private"] == [f"{tmp_path.name}/export/__init__.py:2", f"{x}:6", f"{x}:8"], found["private"]
    assert lines["apart"] == [f"{tmp_path.name}/export/__init__.py:1"], found["apart"]
    assert lines["unlayered"] == [f"{tmp_path.name}/newpkg/m.py"], found["unlayered"]
