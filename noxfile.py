"""Developer sessions. `nox -s demo` and `nox -s tests` are the README's set-up commands.

Sessions:
    tests      the test suite (doctests included); extra args go to pytest
    lint       ruff check and ruff format --check
    typecheck  mypy --strict on src
    demo       python -m maskparam: the four use cases, trained and verified
    bench      benchmarks/run.py (quick by default; `nox -s bench -- --full` for the full set)
"""

from __future__ import annotations

import nox

# The CPU wheel of this version lies on the project's machines; an unpinned torch would pull a
# CUDA build of several GB. pyproject.toml keeps the honest supported range instead.
TORCH = "torch==2.13.0"
# Linters pinned so that a new release cannot turn a green main red overnight.
RUFF = "ruff==0.17.6"
MYPY = "mypy==2.4.1"

nox.options.sessions = ["lint", "typecheck", "tests"]
nox.options.default_venv_backend = "venv"


@nox.session
def tests(session: nox.Session) -> None:
    """Run the test suite."""
    session.install(TORCH, "-e", ".[test]")
    session.run("pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """Lint and check formatting."""
    session.install(RUFF)
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict on src."""
    session.install(TORCH, "-e", ".", MYPY)
    session.run("mypy")


@nox.session
def demo(session: nox.Session) -> None:
    """Run the demo on its embedded model and data."""
    session.install(TORCH, "-e", ".")
    session.run("python", "-m", "maskparam")


@nox.session
def bench(session: nox.Session) -> None:
    """Run the benchmarks and write benchmarks/results/."""
    session.install(TORCH, "-e", ".[examples,test]")
    # SparseProp (C++ kernels) for its row of the sparse-training table: optional, built here
    # from its source; the table leaves the row out where it does not build.
    session.install("pybind11", "scipy")
    try:
        session.install("--no-build-isolation", "--no-deps", "sparseprop")
    except nox.command.CommandFailed:
        session.warn("sparseprop did not install: its benchmark row is left out")
    # Torch-Pruning for its rows of the channel-pruning tables (pure Python; --no-deps: its
    # torchvision requirement would bring a CUDA build of torch).
    session.install("--no-deps", "torch-pruning")
    session.run("python", "benchmarks/run.py", *session.posargs)
