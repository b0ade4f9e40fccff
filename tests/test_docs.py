"""The docs name the code: every `module.function` that docs/algorithm.md and the README's equation table cite
exists, every section the code points to (docs/algorithm.md, "Stage B") is there, and nothing cites a file the
repository does not have."""
import ast
import os
import re
import subprocess

import pytest
from conftest import ROOT

SECTIONS = ["Notation", "Stage A", "The critic", "Stage B", "Iterating", "Why it works"]


def defined(module: str) -> set[str]:
    tree = ast.parse(open(os.path.join(ROOT, module.replace(".", "/") + ".py"), encoding="utf-8").read())
    names = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    return names | {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}


@pytest.mark.parametrize("page", ["docs/algorithm.md", "README.md"])
def test_every_cited_function_exists(page):
    text = open(os.path.join(ROOT, page), encoding="utf-8").read()
    cited = set(re.findall(r"`((?:plumbing\.)?[a-z_]+\.[A-Za-z_]+)`", text))
    module_file = lambda c: os.path.join(ROOT, c.rsplit(".", 1)[0].replace(".", "/") + ".py")  # noqa: E731
    cited = {c for c in cited if not c.endswith(".py") and os.path.exists(module_file(c))}
    assert len(cited) >= (30 if page == "docs/algorithm.md" else 8)  # the page really names the code
    missing = [c for c in sorted(cited) if c.rsplit(".", 1)[1] not in defined(c.rsplit(".", 1)[0])]
    assert not missing
    for test_file, test in re.findall(r"(tests/\w+\.py)::(\w+)", text):
        assert f"def {test}(" in open(os.path.join(ROOT, test_file), encoding="utf-8").read(), test


def test_the_sections_the_code_points_to_exist():
    text = open(os.path.join(ROOT, "docs/algorithm.md"), encoding="utf-8").read()
    headings = re.findall(r"^## (.+)$", text, flags=re.MULTILINE)
    assert all(s in headings for s in SECTIONS)
    pointers = subprocess.run(["git", "grep", "-h", "-o", r'docs/algorithm.md, "[^"]*"', "--", "*.py",
                               ":!tests/test_docs.py"], cwd=ROOT, capture_output=True, text=True).stdout.split("\n")
    named = {p.split('"')[1] for p in pointers if p}
    assert named and named <= set(SECTIONS)
    assert subprocess.run(["git", "grep", "-q", "ALGORITHM" + ".md"], cwd=ROOT).returncode == 1  # a file users lack


def test_every_test_the_code_cites_exists():
    """A packed computation says which test holds it equal to its plain definition: that test exists."""
    cited = subprocess.run(["git", "grep", "-h", "-o", r"tests/[a-z_]*\.py::[a-z_0-9]*", "--", "*.py"], cwd=ROOT,
                           capture_output=True, text=True).stdout.split()
    assert len(cited) >= 3  # dapo.q_values, dapo.action_logps, critic.action_values
    for test_file, test in (c.split("::") for c in cited):
        assert f"def {test}(" in open(os.path.join(ROOT, test_file), encoding="utf-8").read(), test
