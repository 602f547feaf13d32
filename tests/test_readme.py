"""The README's Python examples (and docs/your_model.md's) run and print what they show, to the
printed precision.

A ```python block followed by a ```text block must print that text. Both are split into words and
numbers, and compared token by token:

* **Words** (everything between numbers, up to whitespace) must match exactly.
* **Decimal numbers** (``0.2676``, ``1e-3``) may differ by 2 units of their last written digit
  (``0.2676`` accepts 0.2674–0.2678). The examples print float64 (and float32) results rounded to
  2–4 decimals. On another CPU, BLAS build, thread count or MKL kernel path the unrounded values
  change in their last bits, and a value next to a rounding boundary then prints one unit up or
  down; a second unit is margin. (Measured: perturbing the examples' inputs by 1e-10 relative, or
  the float32 training example's initial weights by 1e-5, changed none of the printed digits.)
* **Integers** (sizes, epochs, counts) must match exactly, except where the README marks a band
  with an HTML comment between the two blocks, e.g. ``<!-- tolerance: iterations ±3 -->``: the
  integer just before the word ``iterations`` may then differ by up to 3. CG's iteration count at
  a tight tolerance is such a number: it depends on rounding. (Measured for the README's solve
  (62 iterations here): 61 on another CPU; 60–64 over 400 runs with the data or every product
  perturbed by 1e-16–1e-12 relative.)
"""

import contextlib
import io
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
#: Documents whose every ```python block is a complete, runnable example.
DOCUMENTS = (README, ROOT / "docs" / "your_model.md")

BLOCK = re.compile(
    r"```python\n(?P<code>.*?)```\s*"
    r"(?:<!--\s*tolerance:(?P<bands>.*?)-->\s*)?"
    r"(?:```text\n(?P<expected>.*?)```)?",
    re.S,
)
# A number: optional sign (not when glued to a word, as in "top-3"), digits, decimals, exponent.
NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?|\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")
BAND = re.compile(r"(\w+)\s*±\s*(\d+)")
LAST_DIGITS = 2  # units of the last written digit a decimal number may move


def examples(document: Path = README) -> list[tuple[str, str, dict[str, int]]]:
    """(```python block, the ```text block right after it or "", its integer bands by label)."""
    out = []
    for m in BLOCK.finditer(document.read_text()):
        bands = {label: int(width) for label, width in BAND.findall(m["bands"] or "")}
        out.append((m["code"], m["expected"] or "", bands))
    return out


def all_examples() -> list:
    return [
        pytest.param(doc, *example, id=f"{doc.name}-{i}")
        for doc in DOCUMENTS
        for i, example in enumerate(examples(doc))
    ]


def tokens(text: str) -> list[str]:
    """Numbers and whitespace-separated words, in order."""
    out: list[str] = []
    pos = 0
    for m in NUMBER.finditer(text):
        out += text[pos : m.start()].split()
        out.append(m.group())
        pos = m.end()
    return out + text[pos:].split()


def is_number(token: str) -> bool:
    return NUMBER.fullmatch(token) is not None


def allowed_difference(expected: str, following: str, bands: dict[str, int]) -> float:
    """How far a printed number may be from the README's ``expected`` (see the module docstring)."""
    mantissa, _, exponent = expected.lower().partition("e")
    if "." in mantissa or exponent:
        decimals = len(mantissa.partition(".")[2])
        return LAST_DIGITS * 10.0 ** (int(exponent or 0) - decimals) * (1 + 1e-9)
    return bands.get(following.strip(",.;:"), 0)


def mismatches(printed: str, expected: str, bands: dict[str, int]) -> list[str]:
    """What differs between printed and expected output beyond the tolerances; [] if nothing."""
    got, want = tokens(printed), tokens(expected)
    if len(got) != len(want):
        return [f"{len(got)} tokens printed, {len(want)} expected"]
    problems = []
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        if is_number(w) and is_number(g):
            following = want[i + 1] if i + 1 < len(want) else ""
            if abs(float(g) - float(w)) > allowed_difference(w, following, bands):
                problems.append(f"{g} printed, {w} expected (before {following!r})")
        elif g != w:
            problems.append(f"{g!r} printed, {w!r} expected")
    return problems


@pytest.mark.parametrize("document,code,expected,bands", all_examples())
def test_readme_example(document: Path, code: str, expected: str, bands: dict[str, int]) -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(document), "exec"), {"__name__": "__readme__"})
    if expected:
        problems = mismatches(out.getvalue(), expected, bands)
        assert not problems, "\n".join(problems) + "\n--- printed:\n" + out.getvalue()


def test_readme_has_examples() -> None:
    assert all(len(examples(doc)) >= 1 for doc in DOCUMENTS)


def test_the_comparison_rule() -> None:
    assert tokens("top-3 x=-0.5 [0.452 ]") == ["top-", "3", "x=", "-0.5", "[", "0.452", "]"]
    readme = "tr Q ≈ 4.1616 ± 0.0071   top-3 eigenvalues=[0.6262 0.452 ]"
    assert mismatches(readme, readme, {}) == []
    # The last digit may move by 2 units, and numpy's padding may change with it.
    assert mismatches("tr Q ≈ 4.1618 ± 0.0069 top-3 eigenvalues=[0.626 0.4521]", readme, {}) == []
    assert mismatches("tr Q ≈ 4.1619 ± 0.0071 top-3 eigenvalues=[0.6262 0.452]", readme, {})
    assert mismatches("x 1.02e-05", "x 1.00e-05", {}) == []
    assert mismatches("x 1.03e-05", "x 1.00e-05", {})
    # Integers are exact unless banded by label; words are always exact.
    bands = {"iterations": 3}
    assert mismatches("CG: 65 iterations, P=195", "CG: 62 iterations, P=195", bands) == []
    assert mismatches("CG: 66 iterations, P=195", "CG: 62 iterations, P=195", bands)
    assert mismatches("CG: 63 iterations, P=195", "CG: 62 iterations, P=195", {})
    assert mismatches("CG: 62 iterations, P=196", "CG: 62 iterations, P=195", bands)
    assert mismatches("converged=False", "converged=True", bands)
    assert mismatches("0.1 0.2", "0.1", bands)
