"""The package's layers, checked on every import statement (function-level ones too): algorithms <- adapters <-
stages <- reporting <- jobs <- api <- cli. A module may import its own layer and the layers below, never above.
The shared modules (configs, results, errors, IO, timing, data) sit at the bottom; the remote model files, which
are copied next to saved weights, import nothing from planner but each other."""
import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "planner"

# layer of every module, by its dotted name under planner ("" = the package's __init__)
SHARED = {"config", "errors", "io", "types", "timing", "hardware", "data", "progress", "versions"}
LAYERS = ["remote", "shared", "algorithms", "adapters", "stages", "reporting", "jobs", "api", "top"]


def layer_of(mod: str) -> str:
    parts = mod.split(".")
    if parts[:2] == ["adapters", "remote"]:
        return "remote"
    if parts[0] in SHARED:
        return "shared"
    if parts[0] in ("algorithms", "adapters", "stages", "reporting", "jobs", "api"):
        return parts[0]
    if mod in ("", "cli"):
        return "top"
    raise AssertionError(f"planner.{mod} belongs to no layer: add it to tests/test_layering.py")


def modules():
    for p in sorted(PKG.rglob("*.py")):
        rel = p.relative_to(PKG).with_suffix("")
        parts = list(rel.parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        yield ".".join(parts), is_pkg, p


def imports(mod: str, is_pkg: bool, path: Path):
    """Every planner module `mod` imports, as dotted names under planner (relative imports resolved)."""
    here = mod.split(".") if mod else []
    pkg = here if is_pkg else here[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[: len(pkg) - (node.level - 1)] if node.level > 1 else pkg
                target = [*base, *(node.module.split(".") if node.module else [])]
            elif node.module and node.module.split(".")[0] == "planner":
                target = node.module.split(".")[1:]
            else:
                continue
            for alias in node.names:                 # `from . import x` may name a module
                sub = [*target, alias.name]
                yield ".".join(sub) if (PKG / Path(*sub)).with_suffix(".py").exists() or (PKG / Path(*sub)).is_dir() \
                    else ".".join(target), node.lineno
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "planner":
                    yield ".".join(alias.name.split(".")[1:]), node.lineno


def test_every_import_runs_down_the_layers():
    bad = []
    for mod, is_pkg, path in modules():
        mine = LAYERS.index(layer_of(mod))
        for target, line in imports(mod, is_pkg, path):
            theirs = LAYERS.index(layer_of(target))
            if theirs > mine:
                bad.append(f"planner/{path.relative_to(PKG)}:{line} ({layer_of(mod)}) imports planner.{target} "
                           f"({layer_of(target)})")
    assert not bad, "imports that run up the layers:\n" + "\n".join(bad)


def test_remote_files_import_only_each_other():
    """Saved checkpoints carry these files and load them where planner is not installed."""
    for mod, is_pkg, path in modules():
        if layer_of(mod) == "remote":
            assert all(layer_of(t) == "remote" for t, _ in imports(mod, is_pkg, path)), path


def test_algorithms_know_no_model_and_write_no_files():
    """Pure numbers and tensors: no adapter, no transformers, no file IO."""
    for mod, is_pkg, path in modules():
        if layer_of(mod) != "algorithms":
            continue
        src = path.read_text()
        tree = ast.parse(src)
        names = {a.name for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
        mods = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert "transformers" not in names | mods, path
        assert not {"io", "write_json", "read_json"} & names, path
        assert "open(" not in src and ".write_text(" not in src, path


def test_the_layer_test_sees_a_wrong_import(tmp_path):
    """The walk itself: a stage importing a job is caught."""
    f = tmp_path / "x.py"
    f.write_text("def f():\n    from ..jobs import run\n")
    got = list(imports("stages.x", False, f))
    assert got == [("jobs.run", 2)] and LAYERS.index(layer_of("jobs.run")) > LAYERS.index(layer_of("stages.x"))


def test_the_profiler_and_stages_know_no_family():
    """Model knowledge lives in the adapters: no stage names a family's modules."""
    family_names = ("feed_forward_chunk", "layer.attention", "intermediate.dense", "self_attn", "mlp.down_proj",
                    "c_attn", "fc1")
    for mod, is_pkg, path in modules():
        if layer_of(mod) in ("stages", "jobs", "algorithms", "reporting"):
            src = path.read_text()
            assert not [n for n in family_names if n in src], (path, [n for n in family_names if n in src])
