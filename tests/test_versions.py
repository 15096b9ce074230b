"""Declared version ranges: read from the installed metadata, one warning line outside them, none inside."""
import subprocess
import sys
import warnings

import torch
import transformers

from planner import versions


def test_declared_ranges_come_from_the_installed_metadata():
    ranges = versions.declared_ranges()
    assert set(ranges) == {"torch", "transformers"}
    # what the suite runs on is inside what planner declares
    assert versions.outside_range({"torch": torch.__version__, "transformers": transformers.__version__}, ranges) == []
    for name, tested in versions.TESTED.items():
        assert versions.outside_range({name: tested[0]}, ranges) == []


def test_outside_the_range_is_one_warning_line_naming_the_fix():
    ranges = {"torch": ">=2.13", "transformers": ">=5.0"}
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        msg = versions.warn_if_outside({"torch": "2.13.0+cpu", "transformers": "4.57.1"}, ranges)
    assert len(got) == 1 and got[0].category is versions.PlannerVersionWarning
    assert "transformers 4.57.1 (planner declares >=5.0)" in msg and "pip install 'transformers>=5.0'" in msg
    assert "torch" not in msg.split(":")[0]                     # torch 2.13.0+cpu is inside >=2.13
    line = warnings.formatwarning(got[0].message, got[0].category, got[0].filename, got[0].lineno)
    assert line.count("\n") == 1                                 # one line, no source line under it
    assert versions.outside_range({"torch": "not-a-version"}, {"torch": ">=2.13"}) == [("torch", "not-a-version",
                                                                                         ">=2.13")]


def test_inside_the_range_import_is_silent():
    r = subprocess.run([sys.executable, "-W", "error::UserWarning", "-c", "import planner"], capture_output=True,
                       text=True)
    assert r.returncode == 0 and r.stderr == "", r.stderr


def test_ci_and_readme_name_the_tested_releases():
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    ci, readme = (root / ".ci" / "run").read_text(), (root / "README.md").read_text()
    oldest = versions.TESTED["transformers"][0]
    assert f"'transformers=={oldest}'" in ci                     # the second pass runs the oldest tested release
    for name, tested in versions.TESTED.items():
        for v in tested:
            assert f"{name} {v}" in readme, f"README does not say {name} {v} was tested"
    for name, spec in versions.declared_ranges().items():
        assert f"{name}{spec}" in readme.replace(" ", ""), f"README does not state the declared {name}{spec}"
