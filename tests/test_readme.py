"""The README's Python examples run and print what the README shows."""

import contextlib
import io
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def examples() -> list[tuple[str, str]]:
    """Pairs of (```python block, the ```text block right after it, or "")."""
    text = README.read_text()
    pattern = re.compile(r"```python\n(.*?)```\s*(?:```text\n(.*?)```)?", re.S)
    return [(m.group(1), m.group(2) or "") for m in pattern.finditer(text)]


@pytest.mark.parametrize("code,expected", examples())
def test_readme_example(code: str, expected: str) -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(README), "exec"), {"__name__": "__readme__"})
    if expected:
        assert out.getvalue().split() == expected.split()


def test_readme_has_examples() -> None:
    assert len(examples()) >= 1
