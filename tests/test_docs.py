"""README's table reference is generated from schemas/: it must match the code."""

from pathlib import Path

from schemas.docs import BEGIN, END, render

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_table_reference_is_current():
    text = README.read_text(encoding="utf-8")
    block = text[text.index(BEGIN) : text.index(END) + len(END)]
    assert block == render(), "run `python -m schemas.docs --write README.md`"


def test_readme_shows_the_two_commands():
    text = README.read_text(encoding="utf-8")
    assert "make demo" in text and "make test" in text
