"""Test modules share code only through ``tests.support``.

A test module that imports another test module (or conftest) runs that module's import-time
code, collects nothing from it yet depends on its private names; a change to one test file
then breaks another. Shared code lives in ``tests/support/``, fixtures in ``conftest.py``.
"""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def forbidden(module: str) -> bool:
    """Whether ``module`` is a test module or conftest, which tests must not import."""
    parts = module.split(".")
    if parts[0] != "tests" or len(parts) < 2:
        return False
    return parts[1] == "conftest" or parts[1].startswith("test_")


def imported_modules(tree: ast.AST, package: str = "tests") -> list[tuple[int, str]]:
    """Every module an ``import`` names, at any depth (function-local imports included).

    ``from tests import test_x`` counts as importing ``tests.test_x``; relative imports are
    resolved against ``package``, the package of the file the tree was parsed from.
    """
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            if "." in base:
                found.append((node.lineno, base))
            else:  # a package: what it gives may be modules
                found.extend((node.lineno, f"{base}.{alias.name}") for alias in node.names)
    return sorted(found)


def checked_files() -> list[Path]:
    """The test modules, and what they share: conftest and the support package."""
    return sorted([*TESTS.glob("test_*.py"), TESTS / "conftest.py", *TESTS.glob("support/*.py")])


def package_of(path: Path) -> str:
    return ".".join(path.relative_to(TESTS.parent).parent.parts)


def test_forbidden_names_what_it_should() -> None:
    assert forbidden("tests.test_delivery")
    assert forbidden("tests.conftest")
    assert not forbidden("tests.support.peers")
    assert not forbidden("tests")
    assert not forbidden("pytest")
    tree = ast.parse("def f():\n    from tests import conftest\n\nfrom .. import test_x\n")
    assert [m for _, m in imported_modules(tree, "tests.support") if forbidden(m)] == [
        "tests.conftest",
        "tests.test_x",
    ]


def test_test_modules_import_neither_each_other_nor_conftest() -> None:
    offences = [
        f"{path.relative_to(TESTS)}:{line}: imports {module}"
        for path in checked_files()
        for line, module in imported_modules(ast.parse(path.read_text(), path), package_of(path))
        if forbidden(module)
    ]
    assert not offences, "move shared code to tests/support/:\n" + "\n".join(offences)
