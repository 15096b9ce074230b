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
    ci = [l for l in (ROOT / ".ci" / "run").read_text().splitlines() if l and not l.startswith(("#", "set ", "cd ",
                                                                                                "export "))]
    assert ci == [tests]
