"""Layering of `lib`: no import cycles, no core module reaching into a task package, a fastai-free inference path,
imports without side effects."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Set

REPO = Path(__file__).resolve().parents[1]
LIB = REPO / "lib"

# Modules outside lib/tasks/ that still import a task package (lib.tasks.<name>...). Each entry is a debt: another
# change moves what they need into the core (or into the task), then the entry goes. Do not add to this list.
TASK_IMPORT_ALLOWED: Set[str] = set()  # every shared module gets label names and weights as arguments


def module_name(path: Path) -> str:
    """lib/a/b.py -> 'lib.a.b'; lib/a/__init__.py -> 'lib.a'."""
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def lib_modules() -> Dict[str, Path]:
    """Every module under lib/, by dotted name."""
    return {module_name(p): p for p in sorted(LIB.rglob("*.py"))}


def _resolve(name: str, known: Dict[str, Path]) -> Optional[str]:
    """The longest known module that `name` (a module or module.attribute) names, or None outside lib."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str, path: Path, known: Dict[str, Path]) -> Set[str]:
    """lib modules imported anywhere in `path` (top level, functions, `if TYPE_CHECKING` blocks alike)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: Set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            # `from lib.x import y`: y is either a submodule (lib.x.y) or an attribute of lib.x
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            hit = _resolve(target, known)
            if hit and hit != module:
                found.add(hit)
    return found


def import_graph() -> Dict[str, Set[str]]:
    """module -> the lib modules it imports."""
    known = lib_modules()
    return {name: imports_of(name, path, known) for name, path in known.items()}


def find_cycle(graph: Dict[str, Set[str]]) -> Optional[List[str]]:
    """One cycle of `graph` as [a, b, ..., a], or None (iterative depth-first search)."""
    state: Dict[str, int] = {}  # 1 = on the stack, 2 = done
    for root in sorted(graph):
        if root in state:
            continue
        stack = [(root, iter(sorted(graph[root])))]
        path = [root]
        state[root] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                state[node] = 2
                stack.pop()
                path.pop()
            elif state.get(child) == 1:
                return path[path.index(child):] + [child]
            elif child not in state:
                state[child] = 1
                path.append(child)
                stack.append((child, iter(sorted(graph.get(child, ())))))
    return None


def run_python(code: str) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter from the repo root."""
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_graph_parser_sees_relative_and_function_imports(tmp_path: Path) -> None:
    """The parser resolves `from . import x`, `from lib.a import b` (submodule) and imports inside functions."""
    known = {"lib": Path("lib/__init__.py"), "lib.a": Path("lib/a/__init__.py"), "lib.a.b": Path("lib/a/b.py"),
             "lib.a.c": Path("lib/a/c.py"), "lib.d": Path("lib/d.py")}
    src = tmp_path / "c.py"
    src.write_text("from . import b\nfrom lib.a import b as bb\ndef f():\n    from ..d import thing\n")
    assert imports_of("lib.a.c", src, known) == {"lib.a.b", "lib.d"}
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle in lib: " + " -> ".join(cycle)


def test_core_does_not_import_task_packages() -> None:
    """Only lib/tasks/ may import a task package (lib.tasks.<name>); the registry `lib.tasks` itself is fine."""
    offenders = {}
    for module, deps in import_graph().items():
        if module.startswith("lib.tasks"):
            continue
        tasks = sorted(d for d in deps if d.startswith("lib.tasks."))
        if tasks:
            offenders[module] = tasks
    new = {m: t for m, t in offenders.items() if m not in TASK_IMPORT_ALLOWED}
    assert not new, f"core modules importing a task package (not in the allow-list): {new}"
    stale = sorted(TASK_IMPORT_ALLOWED - set(offenders))
    assert not stale, f"allow-list entries that no longer import a task package (remove them): {stale}"


def test_kaggle_inference_path_is_fastai_free() -> None:
    """Importing the Kaggle inference module (the ICH kernel's test-only path) loads neither fastai nor the
    training modules."""
    banned = ["fastai", "lib.train.fit", "lib.train.callbacks", "lib.sequence.strategies"]
    proc = run_python("import json, sys; import lib.tasks.ich.infer; "
                      f"print(json.dumps([m for m in {banned!r} if m in sys.modules]))")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []


def test_imports_print_nothing_and_leave_pydicom_settings() -> None:
    """Importing lib and every module under it writes nothing and leaves pydicom's reading validation mode as is."""
    modules = sorted(m for m in lib_modules() if not m.endswith("__main__"))
    code = ("import importlib, sys, pydicom\n"
            "before = pydicom.config.settings.reading_validation_mode\n"
            f"for name in {modules!r}:\n"
            "    importlib.import_module(name)\n"
            "after = pydicom.config.settings.reading_validation_mode\n"
            "sys.stderr.write(f'MODE {before} {after}\\n')\n")
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    mode = [line for line in lines if line.startswith("MODE ")]
    assert mode and mode[0].split()[1] == mode[0].split()[2], f"reading_validation_mode changed at import: {mode}"
    assert lines == mode, "imports wrote to stderr:\n" + "\n".join(line for line in lines if line not in mode)
