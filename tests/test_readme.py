"""Every python snippet in the README runs, in order, in one namespace; so does every docs page's.

Each page of docs/ runs on its own (one namespace per page), so a page's snippets carry their
own imports and set-up. Relative links in the README and the docs point at files that exist.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]

_SNIPPET = re.compile(r"```python\n(.*?)```", flags=re.DOTALL)
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _snippets(page: Path) -> list[str]:
    """The page's python snippets, each padded with blank lines so that a traceback's line
    numbers are the page's."""
    text = page.read_text(encoding="utf-8")
    return [
        "\n" * text.count("\n", 0, match.start(1)) + match.group(1)
        for match in _SNIPPET.finditer(text)
    ]


def _run_snippets(page: Path) -> None:
    namespace: dict[str, object] = {"__name__": page.stem.replace("-", "_")}
    for snippet in _snippets(page):
        if any(
            f"import {extra}" in snippet and importlib.util.find_spec(extra) is None
            for extra in ("transformers", "lightning")
        ):
            continue  # the integration extra is not installed here
        # dont_inherit: a snippet runs as a reader's script would, without this module's
        # `from __future__ import annotations` (a dataclass in a snippet needs real annotations).
        code = compile(snippet, str(page), "exec", dont_inherit=True)
        exec(code, namespace)  # noqa: S102 - our own docs


def test_readme_has_snippets():
    assert len(_snippets(README)) >= 5


def test_readme_is_a_front_door():
    assert len(README.read_text(encoding="utf-8").splitlines()) <= 300


def test_there_are_docs_pages():
    assert DOCS


@pytest.mark.slow  # the snippets train
def test_readme_snippets_run(capsys):
    _run_snippets(README)
    assert "trainable entries" in capsys.readouterr().out  # the summary printed


@pytest.mark.slow  # the snippets train, and one imports transformers
@pytest.mark.parametrize("page", DOCS, ids=[page.name for page in DOCS])
def test_docs_snippets_run(page):
    _run_snippets(page)


def _anchors(page: Path) -> set[str]:
    """The anchors GitHub gives the page's headings (code blocks left out)."""
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.DOTALL)
    headings = re.findall(r"^#{1,6} +(.+?) *$", text, flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


@pytest.mark.parametrize("page", PAGES, ids=[page.name for page in PAGES])
def test_relative_links_resolve(page):
    broken = []
    for target in _LINK.findall(page.read_text(encoding="utf-8")):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):
            continue  # a URL
        path, _, anchor = target.partition("#")
        linked = (page.parent / path) if path else page
        if not linked.exists() or (anchor and anchor not in _anchors(linked)):
            broken.append(target)
    assert broken == []


def test_readme_set_up_commands_are_the_nox_sessions():
    text = README.read_text(encoding="utf-8")
    noxfile = (ROOT / "noxfile.py").read_text(encoding="utf-8")
    assert "python -m pip install nox && nox -s demo\nnox -s tests\n" in text
    for session in ("demo", "tests", "lint", "typecheck", "bench"):
        assert f"def {session}(" in noxfile
