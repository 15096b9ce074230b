"""The benchmarks run against the library as it is: every name they import from planner exists (a cheap check
that a refactor did not leave a script behind; the scripts themselves take minutes)."""
import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "benchmarks").glob("*.py"))


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.stem for p in SCRIPTS])
def test_benchmark_imports_resolve(script):
    tree = ast.parse(script.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "planner":
            mod = importlib.import_module(node.module)
            for alias in node.names:
                sub = hasattr(mod, "__path__") and importlib.util.find_spec(f"{node.module}.{alias.name}")
                assert hasattr(mod, alias.name) or sub, \
                    f"{script.name}:{node.lineno} imports {alias.name} from {node.module}, which has none"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "planner":
                    importlib.import_module(alias.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "tinylm":
            import benchmarks.tinylm as tinylm
            assert hasattr(tinylm, node.attr), f"{script.name}:{node.lineno}: tinylm has no {node.attr}"
