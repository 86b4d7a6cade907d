"""The root helper stays auditable in one sitting: no function in helpers/ is longer than MAX_LINES, and the
package ships its type information (py.typed)."""

from __future__ import annotations

import ast
from importlib.resources import files
from pathlib import Path

HELPERS = Path(__file__).resolve().parents[1] / "helpers"
MAX_LINES = 60


def long_functions(source: str) -> list[tuple[str, int]]:
    """(name, lines) of every function or method in `source` longer than MAX_LINES, decorators included."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            assert node.end_lineno is not None
            if node.end_lineno - first + 1 > MAX_LINES:
                out.append((node.name, node.end_lineno - first + 1))
    return out


def test_no_function_in_the_helper_is_longer_than_60_lines() -> None:
    found = {str(p.relative_to(HELPERS)): long_functions(p.read_text()) for p in sorted(HELPERS.rglob("*.py"))}
    assert {p: f for p, f in found.items() if f} == {}


def test_the_length_check_counts_a_long_method() -> None:
    body = "".join(f"        x = {i}\n" for i in range(MAX_LINES - 1))
    assert long_functions(f"class C:\n    def f(self):\n{body}") == []
    assert long_functions(f"class C:\n    def f(self):\n{body}        x = 0\n") == [("f", MAX_LINES + 1)]


def test_the_installed_helper_ships_py_typed() -> None:
    assert files("autoglm_helper").joinpath("py.typed").is_file()
