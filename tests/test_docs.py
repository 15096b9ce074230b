"""The README's two commands are the ones CI and users run."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bash_blocks(text: str) -> list[str]:
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, re.S)]


def test_ci_runs_the_readme_test_command_verbatim():
    readme = (ROOT / "README.md").read_text()
    blocks = _bash_blocks(readme[readme.index("## Two commands"):readme.index("## Quick start")])
    assert len(blocks) == 2, "the README gives exactly two commands: the main job and the tests"
    main_job, tests = blocks
    assert "planner run" in main_job and "pytest" in tests
    ci = [l for l in (ROOT / ".ci" / "run").read_text().splitlines() if l and not l.startswith("#")]
    assert tests in ci, "CI runs the README's test command verbatim"
    # CI makes its environments fresh for every run, and every install or test line it runs is in the README
    assert any(l.startswith("rm -rf .ci/env") for l in ci) and "python3 -m venv .ci/env" in ci
    for line in ci:
        if "pytest" in line or "pip install" in line:
            assert line in readme, f"README does not show what CI runs: {line}"
