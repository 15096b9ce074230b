"""Build the shipped text that comes from outside the project: the held-out evaluation sets
(planner/data/heldout_*.txt) and the technical half of the default calibration text (calibration_tech.txt).

    python benchmarks/make_heldout_sets.py [--n 600] [--n-calib 1000] [--check]

The shipped calibration, distillation and held-out corpora were written for this project, by one hand and in one
style; quality scored on them runs ahead of quality on anyone else's text. These sets are text this project did
not write, found on any machine that runs planner, of other registers:

  heldout_docs.txt      sentences of the Python standard library's docstrings (technical documentation),
                        Python Software Foundation License 2.0 (PSF-2.0)
  heldout_packages.txt  sentences of the descriptions of installed Python packages whose metadata names a
                        permissive licence (MIT, BSD, Apache-2.0, PSF, ISC), each package credited in
                        planner/data/SOURCES.md

and, for calibration (not evaluation):

  calibration_tech.txt  sentences of the docstrings of planner's own permissively licensed dependencies (numpy,
                        scipy, pandas, torch, transformers, ...: API documentation), none sharing a 5-word run
                        with any held-out set; with the project's calibration.txt it makes the default
                        calibration text, so that the default spans more than one register
  distill_tech.txt      3x as many further such sentences, for recovery's default training text

Each passage is one sentence of 6-40 words, mostly letters (no code, URLs or tables), not shared with the
calibration, distillation or held-out text (no common 5-word run), de-duplicated, and sampled with a fixed seed.
--check rebuilds the sets in memory and says whether the shipped files are what this machine would build (the
package set depends on what is installed, so a mismatch there is expected elsewhere).
"""
from __future__ import annotations

import argparse
import ast
import random
import re
import sysconfig
from importlib import metadata
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "planner" / "data"
PERMISSIVE = re.compile(r"\b(MIT|BSD|Apache|PSF|Python Software Foundation|ISC)\b", re.I)
SENT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def _clean(text: str) -> str:
    text = re.sub(r"`+([^`]*)`+", r"\1", text)                         # rst / markdown code marks
    text = re.sub(r":[a-z]+:", "", text)                               # rst roles
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)               # markdown links
    text = re.sub(r"[*_#>|]+", " ", text)
    return re.sub(r"\s+", " ", text).strip()


def _sentences(text: str) -> list[str]:
    out = []
    for para in re.split(r"\n\s*\n", text):
        para = _clean(para)
        for s in SENT.split(para):
            s = s.strip()
            words = s.split()
            if not (6 <= len(words) <= 40) or not s[0].isupper() or s[-1] not in ".!?":
                continue
            letters = sum(c.isalpha() or c == " " for c in s) / len(s)
            if letters < 0.9 or re.search(r"https?:|www\.|\(\)|=|>>>|\\|[{}<>$@]", s):
                continue
            out.append(s)
    return out


def docstring_sentences(path: Path) -> list[str]:
    """Sentences of every docstring (module, class, function) in the Python file `path`; none if it does not parse."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8", errors="ignore"))
    except (SyntaxError, ValueError):
        return []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                out += _sentences(doc)
    return out


def stdlib_docstrings() -> list[str]:
    """Sentences of every docstring in the standard library's own .py files (no tests, no IDLE, no lib2to3)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root).parts
        if rel[0] in ("test", "idlelib", "lib2to3", "site-packages", "tkinter", "turtledemo", "ensurepip") or \
                "tests" in rel:
            continue
        out += docstring_sentences(p)
    return out


# planner's dependencies (and theirs) whose docstrings make the technical calibration half: (distribution, package)
LIBRARIES = (("numpy", "numpy"), ("scipy", "scipy"), ("pandas", "pandas"), ("torch", "torch"),
             ("transformers", "transformers"), ("click", "click"), ("huggingface_hub", "huggingface_hub"),
             ("safetensors", "safetensors"), ("Jinja2", "jinja2"), ("networkx", "networkx"), ("sympy", "sympy"),
             ("fsspec", "fsspec"), ("packaging", "packaging"), ("PyYAML", "yaml"), ("pytest", "_pytest"))


def library_docstrings() -> tuple[list[str], dict[str, str]]:
    """Sentences of the docstrings in LIBRARIES' installed .py files (no tests), permissive licences only; and
    {distribution: licence}."""
    out, credits = [], {}
    for dist_name, pkg in LIBRARIES:
        try:
            dist = metadata.distribution(dist_name)
        except metadata.PackageNotFoundError:
            continue
        md = dist.metadata
        lic = " ".join(filter(None, [md.get("License-Expression"), md.get("License"),
                                     *[c for c in md.get_all("Classifier") or [] if c.startswith("License")]]))
        root = Path(str(dist.locate_file(pkg)))
        if not PERMISSIVE.search(lic or "") or not root.is_dir():
            continue
        got = []
        for p in sorted(root.rglob("*.py")):
            if {"tests", "test", "testing"} & set(p.relative_to(root).parts):
                continue
            got += docstring_sentences(p)
        if got:
            out += got
            credits[md["Name"]] = PERMISSIVE.search(lic).group(1)
    return out, credits


def package_descriptions() -> tuple[list[str], dict[str, str]]:
    """Sentences of installed packages' descriptions (permissive licences only), and {package: licence}."""
    out, credits = [], {}
    for dist in sorted(metadata.distributions(), key=lambda d: (d.metadata["Name"] or "").lower()):
        md = dist.metadata
        name = md["Name"]
        lic = " ".join(filter(None, [md.get("License-Expression"), md.get("License"),
                                     *[c for c in md.get_all("Classifier") or [] if c.startswith("License")]]))
        if not name or name.lower() == "planner" or not PERMISSIVE.search(lic or ""):
            continue
        body = (md.get("Summary") or "") + ".\n\n" + (md.get_payload() or md.get("Description") or "")
        got = _sentences(body)
        if got:
            out += got
            credits[name] = PERMISSIVE.search(lic).group(1)
    return out, credits


def _runs(text: str, n: int = 5) -> set[tuple[str, ...]]:
    w = re.findall(r"[a-z0-9']+", text.lower())
    return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}


def build(n: int, n_calib: int = 1000, seed: int = 0) -> dict[str, list[str]]:
    ours = set()
    for name in ("calibration.txt", "distill.txt", "heldout.txt"):
        ours |= _runs((DATA / name).read_text())
    docs = stdlib_docstrings()
    pkgs, credits = package_descriptions()
    sets = {}
    for name, lines in (("heldout_docs.txt", docs), ("heldout_packages.txt", pkgs)):
        uniq = sorted(set(lines))
        uniq = [s for s in uniq if not (_runs(s) & ours)]
        random.Random(seed).shuffle(uniq)
        sets[name] = uniq[:n]
    sets["_credits"] = [f"{k}: {v}" for k, v in sorted(credits.items())]
    # the calibration half: nothing in common with any held-out text (built above, or the project's own)
    held = _runs((DATA / "heldout.txt").read_text())
    for name in ("heldout_docs.txt", "heldout_packages.txt"):
        held |= _runs("\n".join(sets[name]))
    libs, lib_credits = library_docstrings()
    uniq = sorted(set(libs) - set(docs) - set(pkgs))
    uniq = [s for s in uniq if not (_runs(s) & held)]
    random.Random(seed + 1).shuffle(uniq)
    sets["calibration_tech.txt"] = uniq[:n_calib]
    sets["distill_tech.txt"] = uniq[n_calib:n_calib + 3 * n_calib]     # recovery's: the next ones, disjoint
    sets["_lib_credits"] = [f"{k}: {v}" for k, v in sorted(lib_credits.items())]
    return sets


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=600, help="passages per set")
    ap.add_argument("--n-calib", type=int, default=1000, help="passages of the technical calibration half")
    ap.add_argument("--check", action="store_true", help="compare with the shipped files instead of writing")
    a = ap.parse_args()
    sets = build(a.n, a.n_calib)
    for name in ("heldout_docs.txt", "heldout_packages.txt", "calibration_tech.txt", "distill_tech.txt"):
        text = "\n".join(sets[name]) + "\n"
        if a.check:
            same = (DATA / name).exists() and (DATA / name).read_text() == text
            print(f"{name}: {'as shipped' if same else 'differs from the shipped file'} ({len(sets[name])} passages)")
        else:
            (DATA / name).write_text(text)
            print(f"wrote {DATA / name}: {len(sets[name])} passages")
    if not a.check:
        print(f"{len(sets['_credits'])} packages credited")
        (DATA / "heldout_packages.credits").write_text("\n".join(sets["_credits"]) + "\n")
        (DATA / "calibration_tech.credits").write_text("\n".join(sets["_lib_credits"]) + "\n")


if __name__ == "__main__":
    main()
