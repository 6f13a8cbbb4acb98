"""The test suite's own layout (issue 20 item 5): every test module sits in a tier folder, and every fixture name is
defined once (a fixture defined twice shadows the other for some tests and not for others)."""

from __future__ import annotations

import ast
from collections import defaultdict

from tests.helpers import REPO

TESTS = REPO / "tests"
TIERS = ("unit", "integration", "cluster", "gpu")


def _is_fixture(node: ast.AST) -> bool:
    return isinstance(node, ast.FunctionDef) and any("fixture" in ast.unparse(d) for d in node.decorator_list)


def test_every_test_module_is_in_a_tier():
    stray = [p.relative_to(REPO) for p in TESTS.rglob("test_*.py") if p.relative_to(TESTS).parts[0] not in TIERS]
    assert not stray, f"test modules outside tests/{{{','.join(TIERS)}}}/: {stray}"


def test_no_fixture_name_is_defined_twice():
    where = defaultdict(list)
    for path in sorted(TESTS.rglob("*.py")):
        if "fixtures" in path.relative_to(TESTS).parts:
            continue
        for node in ast.parse(path.read_text()).body:
            if _is_fixture(node):
                where[node.name].append(str(path.relative_to(REPO)))
    twice = {name: paths for name, paths in where.items() if len(paths) > 1}
    assert not twice, f"fixtures defined more than once (one shadows the other): {twice}"
