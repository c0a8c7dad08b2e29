"""Every python snippet in the README runs, in order, in one namespace."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.DOTALL)


def test_readme_has_snippets():
    assert len(_snippets()) >= 5


@pytest.mark.slow  # the snippets train, and one imports transformers
def test_readme_snippets_run(capsys):
    namespace: dict[str, object] = {"__name__": "readme"}
    for snippet in _snippets():
        if "import transformers" in snippet and importlib.util.find_spec("transformers") is None:
            continue  # the integration extra is not installed here
        exec(compile(snippet, str(README), "exec"), namespace)  # noqa: S102 - our own README
    assert "trainable entries" in capsys.readouterr().out  # the summary printed


def test_readme_set_up_commands_are_the_nox_sessions():
    text = README.read_text(encoding="utf-8")
    noxfile = (README.parent / "noxfile.py").read_text(encoding="utf-8")
    assert "python -m pip install nox && nox -s demo\nnox -s tests\n" in text
    for session in ("demo", "tests", "lint", "typecheck", "bench"):
        assert f"def {session}(" in noxfile
