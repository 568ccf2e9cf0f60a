"""The package's layers, kept true (docs/architecture.md).

An AST walk over ``adamoe_kernels/`` collects every import, the ones inside functions too. The
tests check that imports only point downwards in ``LAYERS``, that there are no import cycles, that
every import names a module or name that exists, that the oracle imports only the contract and
that ``kernels/`` holds only ``@triton.jit`` code. Each module is imported first in a fresh
interpreter, and the call path in docs/architecture.md must exist and call what it says.
No dependency beyond the standard library.
"""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
import tomllib
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "adamoe_kernels"
PKG_DIR = ROOT / PACKAGE
DOC = ROOT / "docs" / "architecture.md"

# Module prefix -> layer; the longest matching prefix wins, and PACKAGE itself matches only the
# package __init__. A module that no prefix matches fails test_every_module_has_a_layer: place it.
LAYERS = {
    f"{PACKAGE}.kernels": 0,      # @triton.jit functions only
    f"{PACKAGE}.ops": 1,          # backend choice, launchers, autograd, torch.library, C++ autograd
    f"{PACKAGE}._C": 1,           # the C++ extension (setup.py builds it; no Python source)
    f"{PACKAGE}._contract": 2,    # Routing + input checks, shared by the API and the oracle
    f"{PACKAGE}.reference": 2,    # the oracle
    f"{PACKAGE}.routing": 2,      # public functional API
    f"{PACKAGE}.moe": 2,
    f"{PACKAGE}.lora": 2,
    f"{PACKAGE}.losses": 2,
    f"{PACKAGE}.support": 2,      # the tested version range (standard library only)
    f"{PACKAGE}.integrations": 3,  # models: nn.Modules, load dial, transformers
    f"{PACKAGE}.training": 4,     # fine-tuning command, expert parallelism
    PACKAGE: 5,                   # __init__: re-exports the public names, imported by nobody inside
}
EXTENSION_MODULES = {f"{PACKAGE}._C"}
# The oracle must not depend on the fused path it is the reference for.
ORACLE = f"{PACKAGE}.reference"
ORACLE_MAY_IMPORT = {f"{PACKAGE}._contract"}


# ---- the import graph ---------------------------------------------------------------------------

def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@lru_cache(maxsize=None)
def sources() -> dict[str, Path]:
    """``{module name: file}`` for every Python file of the package."""
    return {_module_name(p): p for p in sorted(PKG_DIR.rglob("*.py")) if "__pycache__" not in p.parts}


def modules() -> set[str]:
    return set(sources()) | EXTENSION_MODULES


@lru_cache(maxsize=None)
def tree(module: str) -> ast.Module:
    return ast.parse(sources()[module].read_text(), filename=str(sources()[module]))


def _is_package(module: str) -> bool:
    return sources()[module].name == "__init__.py"


def imports(module: str) -> list[tuple[str, str | None, int]]:
    """``(target module, imported name or None, line)`` for every package-internal import in
    ``module``, wherever it stands (module level, functions, branches)."""
    out = []
    for node in ast.walk(tree(module)):
        if isinstance(node, ast.Import):
            out += [(a.name, None, node.lineno) for a in node.names
                    if a.name == PACKAGE or a.name.startswith(PACKAGE + ".")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module if _is_package(module) else module.rpartition(".")[0]
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            if base != PACKAGE and not base.startswith(PACKAGE + "."):
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.append((sub, None, node.lineno) if sub in modules()
                           else (base, alias.name, node.lineno))
    return out


def import_graph() -> dict[str, set[str]]:
    return {mod: {target for target, _, _ in imports(mod) if target != mod} for mod in sources()}


def layer_of(module: str) -> int | None:
    for prefix in sorted(LAYERS, key=len, reverse=True):
        if module == prefix or (prefix != PACKAGE and module.startswith(prefix + ".")):
            return LAYERS[prefix]
    return None


def upward_imports(graph: dict[str, set[str]], layer=layer_of) -> list[str]:
    return [f"{mod} (layer {layer(mod)}) imports {dep} (layer {layer(dep)})"
            for mod, deps in sorted(graph.items()) for dep in sorted(deps)
            if layer(mod) is not None and layer(dep) is not None and layer(dep) > layer(mod)]


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def defined_names(module: str) -> set[str]:
    """Top-level names of ``module`` (definitions, assignments, imports; inside if/try too)."""
    names = set()

    def collect(body):
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for t in targets:
                    names.update(n.id for n in ast.walk(t) if isinstance(n, ast.Name))
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names.update((a.asname or a.name).split(".")[0] for a in node.names)
            elif isinstance(node, (ast.If, ast.Try, ast.With)):
                collect(node.body)
                collect(getattr(node, "orelse", []))
                collect(getattr(node, "finalbody", []))
                for handler in getattr(node, "handlers", []):
                    collect(handler.body)

    collect(tree(module).body)
    return names


# ---- the checker itself -------------------------------------------------------------------------

def test_checker_finds_upward_imports_and_cycles():
    layers = {"low": 0, "mid": 1, "high": 2}.get
    assert upward_imports({"low": {"high"}, "high": {"low"}}, layers) == [
        "low (layer 0) imports high (layer 2)"]
    assert upward_imports({"high": {"mid"}, "mid": {"low"}}, layers) == []
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []


def test_checker_resolves_relative_and_lazy_imports():
    assert (f"{PACKAGE}._C", None) in {(t, n) for t, n, _ in imports(f"{PACKAGE}.ops.backend")}
    lazy = {t for t, _, _ in imports(f"{PACKAGE}.routing")}  # imported inside route()
    assert {f"{PACKAGE}.ops.routing", f"{PACKAGE}.ops.cpu"} <= lazy
    assert layer_of(f"{PACKAGE}.ops.grouped_mlp") == 1 and layer_of(f"{PACKAGE}.nowhere") is None


# ---- the rules ----------------------------------------------------------------------------------

def test_every_module_has_a_layer():
    missing = sorted(m for m in modules() if layer_of(m) is None)
    assert not missing, f"place these modules in LAYERS (and docs/architecture.md): {missing}"


def test_imports_point_downwards():
    bad = upward_imports(import_graph())
    assert not bad, "imports that go up a layer:\n" + "\n".join(bad)


def test_no_import_cycles():
    cycles = import_cycles(import_graph())
    assert not cycles, f"modules that import each other (directly or through others): {cycles}"


def test_package_init_is_imported_by_nobody():
    users = sorted(m for m, deps in import_graph().items() if PACKAGE in deps)
    assert not users, f"these modules import the package __init__ (import the module instead): {users}"


def test_imports_resolve():
    bad = []
    for mod in sorted(sources()):
        for target, name, line in imports(mod):
            if target not in modules():
                bad.append(f"{mod}:{line}: no module {target}")
            elif name is not None and target in sources() and name not in defined_names(target):
                bad.append(f"{mod}:{line}: {target} defines no {name}")
    assert not bad, "\n".join(bad)


def test_oracle_imports_only_the_contract():
    deps = import_graph()[ORACLE]
    assert deps <= ORACLE_MAY_IMPORT, f"reference.py imports {sorted(deps - ORACLE_MAY_IMPORT)}"


def test_kernels_hold_only_triton_jit():
    bad = []
    for mod in sorted(m for m in sources() if layer_of(m) == 0):
        for node in tree(mod).body:
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
                continue  # docstring
            if isinstance(node, ast.Import) and all(a.name.split(".")[0] == "triton"
                                                    for a in node.names):
                continue
            if isinstance(node, ast.ImportFrom) and node.module == "__future__":
                continue
            if isinstance(node, ast.FunctionDef) and any(
                    ast.unparse(d) in ("triton.jit", "jit") for d in node.decorator_list):
                continue
            bad.append(f"{mod}:{node.lineno}: {ast.unparse(node).splitlines()[0]}")
    assert not bad, "kernels/ holds only @triton.jit functions:\n" + "\n".join(bad)


# ---- fresh interpreters -------------------------------------------------------------------------

# The package __init__ is replaced by an empty package, so the module under test really is the
# first one imported: an order-dependent cycle cannot hide behind the __init__'s import order.
_FIRST_IMPORT = """
import importlib, sys, types
name = sys.argv[1]
if name != {pkg!r}:
    pkg = types.ModuleType({pkg!r})
    pkg.__path__ = [{pkg_dir!r}]
    sys.modules[{pkg!r}] = pkg
module = importlib.import_module(name)
assert module.__file__.startswith({pkg_dir!r}), module.__file__
"""


def _needs_extension(mod: str) -> bool:
    """Imports the C++ extension at module level, outside a ``try`` (``ops/cpu.py``)."""
    return any(isinstance(node, ast.ImportFrom) and {f"{PACKAGE}._C"} & {
        t for t, _, line in imports(mod) if line == node.lineno} for node in tree(mod).body)


@pytest.mark.slow
@pytest.mark.parametrize("module", sorted(sources()))
def test_module_imports_first_in_fresh_interpreter(module):
    if _needs_extension(module):
        from adamoe_kernels.ops.backend import cpu_extension_available

        if not cpu_extension_available():
            pytest.skip("the C++ extension adamoe_kernels._C is not built")
    code = _FIRST_IMPORT.format(pkg=PACKAGE, pkg_dir=str(PKG_DIR))
    proc = subprocess.run([sys.executable, "-c", code, module], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_package_import_loads_no_kernels():
    """docs/architecture.md: ``import adamoe_kernels`` loads neither Triton kernels nor launchers."""
    code = ("import sys, adamoe_kernels; print(sorted(m for m in sys.modules if m == 'triton' or "
            "m.startswith(('adamoe_kernels.kernels', 'adamoe_kernels.ops.'))))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["['adamoe_kernels.ops.backend']"], proc.stdout


# ---- public names -------------------------------------------------------------------------------

def test_public_names_importable():
    import adamoe_kernels as ak

    assert ak.__file__.startswith(str(PKG_DIR))
    missing = [name for name in ak.__all__ if not hasattr(ak, name)]
    assert not missing
    for dotted in ("reference.route", "reference.moe_mlp", "reference.null_aware_aux_loss",
                   "load_control.reset_null_bias", "load_control.set_target_load",
                   "distributed.ExpertParallelMoE"):
        obj = ak
        for part in dotted.split("."):
            obj = getattr(obj, part)


def test_console_scripts_resolve():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert "adamoe-finetune" in scripts
    for target in scripts.values():
        module, _, attr = target.partition(":")
        assert module in sources(), target
        assert callable(getattr(importlib.import_module(module), attr)), target


# ---- docs/architecture.md -----------------------------------------------------------------------

PAIR = re.compile(r"(\w+(?:/\w+)+\.py)::([\w.]+)")  # repo-relative paths only
STEP = re.compile(r"^(?P<indent> *)(?:(?P<arrow>->|~>) )?(?P<file>[\w/]+\.py)::(?P<name>[\w.]+)"
                  r"\s*(?:#.*)?$")


def _definition(path: str, qualname: str):
    """The ``def``/``class`` node of ``qualname`` (``Class.method`` allowed) in ``path``."""
    file = ROOT / path
    assert file.is_file(), f"docs/architecture.md names {path}, which does not exist"
    body = ast.parse(file.read_text()).body
    node = None
    for part in qualname.split("."):
        node = next((n for n in body if isinstance(n, (ast.FunctionDef, ast.ClassDef))
                     and n.name == part), None)
        assert node is not None, f"docs/architecture.md names {path}::{qualname}: no {part} there"
        body = node.body
    return node


def _referenced_names(node) -> set[str]:
    names = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Name):
            names.add(n.id)
        elif isinstance(n, ast.Attribute):
            names.add(n.attr)
        elif isinstance(n, ast.alias):
            names.update(filter(None, (n.name.rpartition(".")[2], n.asname)))
    return names


def _call_path_steps() -> list[list[tuple[int, str, str, str]]]:
    blocks = re.findall(r"```callpath\n(.*?)```", DOC.read_text(), flags=re.S)
    assert blocks, "docs/architecture.md has no ```callpath block"
    out = []
    for block in blocks:
        steps = []
        for line in block.splitlines():
            if not line.strip():
                continue
            m = STEP.match(line)
            assert m, f"not a call-path line: {line!r}"
            steps.append((len(m["indent"]), m["arrow"] or "", m["file"], m["name"]))
        assert steps[0][1] == "" and all(s[1] for s in steps[1:]), block
        out.append(steps)
    return out


def test_doc_names_only_existing_functions():
    pairs = PAIR.findall(DOC.read_text())
    assert pairs
    for path, qualname in pairs:
        _definition(path, qualname)


def test_doc_call_path_is_true():
    steps = [s for block in _call_path_steps() for s in block]
    named = {(f, n) for _, _, f, n in steps}
    assert ("adamoe_kernels/integrations/hf_models.py", "convert_model") in named
    assert ("adamoe_kernels/kernels/grouped_gemm.py", "grouped_gemm_kernel") in named
    for block in _call_path_steps():
        parents: list[tuple[int, str, str]] = []  # (indent, file, name) of the open callers
        for indent, arrow, file, name in block:
            while parents and parents[-1][0] >= indent:
                parents.pop()
            callee = _definition(file, name)
            if parents and arrow == "->":
                _, caller_file, caller_name = parents[-1]
                caller = _definition(caller_file, caller_name)
                short = name.rpartition(".")[2]
                assert short in _referenced_names(caller), \
                    f"docs/architecture.md: {caller_file}::{caller_name} does not call {name}"
                caller_mod, callee_mod = (_module_name(ROOT / f) for f in (caller_file, file))
                if caller_mod != callee_mod:
                    assert callee_mod in import_graph()[caller_mod], \
                        f"docs/architecture.md: {caller_mod} does not import {callee_mod}"
            assert callee is not None
            parents.append((indent, file, name))


def test_doc_places_every_layer():
    text = DOC.read_text()
    for prefix in LAYERS:
        if prefix == PACKAGE:
            continue
        rel = prefix.replace(".", "/")
        assert f"`{rel}/`" in text or f"`{rel}.py`" in text or f"`{rel}`" in text \
            or f"`{rel.rpartition('/')[2]}.py`" in text, f"docs/architecture.md does not place {prefix}"
