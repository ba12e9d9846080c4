"""The pipeline package has no import cycles, counting imports inside functions too: a cycle hidden
behind a late import is still a design knot (the engine factory once imported the run directory code,
which imported the engine)."""
import ast
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO_ROOT

PACKAGE = REPO_ROOT / "pipeline"


def imported_pipeline_modules(path: Path) -> set:
    """Dotted names, below `pipeline`, of what `path` imports from the package, anywhere in the file
    (a name may be a module or a name inside one: `import_graph` keeps the modules)."""
    package = ".".join(path.relative_to(PACKAGE).parent.parts)  # "" for pipeline/x.py, "rl" for pipeline/rl/x.py
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:  # from .x import y / from . import x
                base = ".".join(part for part in (package, node.module) if part)
                found.update(f"{base}.{alias.name}" if base else alias.name for alias in node.names)
                found.add(base)
            elif node.level == 0 and node.module and node.module.startswith("pipeline."):
                base = node.module.split(".", 1)[1]
                found.update({base, *(f"{base}.{alias.name}" for alias in node.names)})
            elif node.level == 0 and node.module == "pipeline":
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name.split(".", 1)[1] for alias in node.names if alias.name.startswith("pipeline."))
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "__import__" and node.args:
            target = node.args[0]
            if isinstance(target, ast.Constant) and str(target.value).startswith("pipeline."):
                found.add(str(target.value).split(".", 1)[1])
    return found


def import_graph() -> dict:
    """{module: the modules it imports}, modules named by their dotted path below `pipeline`."""
    modules = {".".join(path.relative_to(PACKAGE).with_suffix("").parts): path for path in PACKAGE.rglob("*.py")
               if path.stem != "__init__"}
    return {name: imported_pipeline_modules(path) & set(modules) - {name} for name, path in modules.items()}


def find_cycle(graph: dict):
    """One cycle as a list of modules (first == last), or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for child in sorted(graph[node]):
            if state.get(child) == "open":
                return stack[stack.index(child):] + [child]
            if child not in state:
                cycle = visit(child)
                if cycle:
                    return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_graph_sees_real_imports():
    graph = import_graph()
    assert "engine" in graph["loop"] and "optim" in graph["engine"] and "checkpoint" in graph["rundir"]
    assert {"rl.algos", "rl.models", "loop"} <= graph["rl.stage"] and "rl.algos" in graph["models"]


def test_pipeline_has_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_engine_factory_writes_no_files():
    source = (PACKAGE / "engine.py").read_text(encoding="utf-8")
    assert not any(call in source for call in ("write_text", "open(", "mkdir", "rmtree", "save_config"))


def test_a_cycle_is_found_when_there_is_one():
    assert find_cycle({"engine": {"run"}, "run": {"checkpoint"}, "checkpoint": {"engine"}}) == [
        "checkpoint", "engine", "run", "checkpoint"]
    assert find_cycle({"engine": {"config"}, "config": set()}) is None


def test_the_policy_arithmetic_imports_without_deepspeed_trl_or_transformers():
    # A fresh interpreter: this one has long imported all three.
    loaded = subprocess.run([sys.executable, "-c", "import sys, pipeline.rl.algos; "
                             "print(sorted(m for m in ('deepspeed', 'trl', 'transformers') if m in sys.modules))"],
                            cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]"
