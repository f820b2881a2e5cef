"""Packaging checks: environment.yml and pyproject.toml agree; README and CI agree."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONDA_TO_PYPI = {"pytorch": "torch"}  # conda-forge names that differ from PyPI


def _split(req: str) -> tuple[str, str]:
    m = re.match(r"\s*([A-Za-z0-9_.-]+)\s*(.*)", req)
    return m.group(1).lower().replace("_", "-"), m.group(2).replace(" ", "")


def _pyproject_deps() -> dict[str, str]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return dict(_split(r) for r in data["project"]["dependencies"])


def _environment_deps() -> dict[str, str]:
    deps = {}
    text = (ROOT / "environment.yml").read_text()
    for line in text[text.index("dependencies:"):].splitlines():
        m = re.match(r"\s*-\s+(.+?)\s*$", line)
        if not m or line.strip().startswith("#") or m.group(1).endswith(":"):
            continue
        item = m.group(1)
        if item.startswith("-e") or item == "pip" or item.startswith("python"):
            continue
        name, spec = _split(item)
        deps[CONDA_TO_PYPI.get(name, name)] = spec
    return deps


def test_environment_yml_names_the_same_dependencies_as_pyproject():
    assert _environment_deps() == _pyproject_deps()


def test_torch_is_pinned_to_a_cpu_friendly_range():
    assert _pyproject_deps()["torch"] == ">=2.4,<2.14"


def test_environment_yml_installs_the_project_itself():
    assert re.search(r"^\s*-\s+-e\s+\.\s*$", (ROOT / "environment.yml").read_text(), re.M)


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    # The second Quick start command installs dev extras and runs the tests.
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", readme, re.S)
    assert "python prepare.py" in blocks[0] and "python train.py" in blocks[0]
    block = blocks[1]
    assert 'pip install -e ".[dev]"' in block and "python -m pytest -q" in block
    assert 'pip install -q -e ".[dev]"' in ci and "python3 -m pytest -q" in ci
