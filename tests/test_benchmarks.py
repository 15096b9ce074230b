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


def test_bench_scale_runs_every_stage_on_a_tiny_shape(tmp_path):
    import json
    import subprocess
    import sys
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_scale.py"), "--shape", "tiny", "--work",
                        str(tmp_path / "w"), "--out", str(tmp_path / "o"), "--threads", "1", "--tokens", "1024"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    got = json.loads((tmp_path / "o" / "scale.json").read_text())
    stages = {s["stage"]: s for s in got["stages"]}
    assert list(stages) == ["load", "calibration", "database", "dp", "apply"]
    assert all(s["wall_s"] >= 0 and s["peak_rss_bytes"] > 0 for s in stages.values())
    # on disk: per block the packed upper triangles of one 256- and one 704-wide float32 Hessian, and the orders
    c = got["conditions"]
    packed = 4 * sum(n * (n + 1) // 2 for n in (c["hidden"], c["ffn"])) * c["blocks"]
    assert packed < stages["database"]["disk_bytes"] < 1.05 * packed
    assert "| database |" in r.stdout and c["kept"] == {"heads": 0.5, "ffn": 0.5}
