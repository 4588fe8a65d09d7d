"""The engine stays readable: short functions in the algorithm, no back channels, no patched privates."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAX_LINES = 80


def _code_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines of a function without its docstring."""
    first = node.body[0]
    start = node.lineno
    if (
        isinstance(first, ast.Expr)
        and isinstance(first.value, ast.Constant)
        and isinstance(first.value.value, str)
    ):
        return node.end_lineno - node.lineno + 1 - (first.end_lineno - first.lineno + 1)
    return node.end_lineno - start + 1


# The algorithm and the workflows built on it (slice, RFT, evaluation): where every improvement passes.
SHORT_PACKAGES = ("slicing", "workflows")


def test_no_function_of_the_algorithm_or_the_workflows_is_longer_than_80_lines() -> None:
    long = []
    paths = [
        path for package in SHORT_PACKAGES for path in sorted((REPO / "hf_slicegpt" / package).glob("*.py"))
    ]
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _code_lines(node) > MAX_LINES:
                long.append(f"{path.name}:{node.lineno} {node.name} ({_code_lines(node)} lines)")
    assert not long, long


def test_no_context_variable_back_channel_and_no_patched_private_methods() -> None:
    sources = [*(REPO / "hf_slicegpt").rglob("*.py"), *(REPO / "benchmarks").rglob("*.py")]
    offending = []
    for path in sources:
        text = path.read_text()
        if "ContextVar" in text or "_Slicer" in text:
            offending.append(f"{path.relative_to(REPO)}: back channel")
        # an assignment to a private attribute of an imported module or class, e.g. `slicing._X.y = ...`
        if path.is_relative_to(REPO / "benchmarks") and re.search(r"^\s*\w+\.\w*\._\w+\s*=", text, re.M):
            offending.append(f"{path.relative_to(REPO)}: patches a private name")
    assert not offending, offending
