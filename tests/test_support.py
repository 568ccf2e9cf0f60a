"""The tested version range is stated once (adamoe_kernels/support.py) and repeated exactly by
pyproject.toml and the README; the check the GPU script logs flags what lies outside it."""

import re
import tomllib
from pathlib import Path

from adamoe_kernels import support

ROOT = Path(__file__).resolve().parent.parent


def _bound(requirements: list[str], name: str) -> str:
    for r in requirements:
        m = re.fullmatch(rf"{name}\s*>=\s*([\d.]+)", r.strip())
        if m:
            return m.group(1)
    raise AssertionError(f"no '{name}>=' bound in {requirements}")


def test_pyproject_states_the_tested_lower_bounds():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["requires-python"] == f">={support.OLDEST['python']}"
    assert _bound(project["dependencies"], "torch") == support.OLDEST["torch"]
    assert _bound(project["dependencies"], "triton") == support.OLDEST["triton"]
    for extra in ("hf", "dev"):
        assert _bound(project["optional-dependencies"][extra], "transformers") == \
            support.OLDEST["transformers"]


def test_readme_states_the_tested_range():
    readme = (ROOT / "README.md").read_text()
    line = " ".join(readme.split("**Supported versions**", 1)[1].split("\n\n", 1)[0].split())
    for name, version in [("Python", support.OLDEST["python"]), ("torch", support.OLDEST["torch"]),
                          ("triton", support.OLDEST["triton"]),
                          ("transformers", support.OLDEST["transformers"])]:
        assert f"{name} >= {version}" in line, (name, line)


def test_check_versions_flags_what_is_older_or_missing(monkeypatch):
    found = {"python": "3.12.1", "torch": "2.10.0+cu128", "triton": "3.6.0", "transformers": None}
    monkeypatch.setattr(support, "_found", found.get)
    rows = {r["name"]: r for r in support.check_versions()}
    assert rows["python"]["ok"] and rows["triton"]["ok"]
    assert not rows["torch"]["ok"] and not rows["transformers"]["ok"]
    text = support.describe(list(rows.values()))
    assert "torch 2.10.0+cu128 (>= 2.11.0 UNTESTED)" in text and "triton 3.6.0 (>= 3.6.0 ok)" in text


def test_this_environment_is_inside_the_tested_range():
    """CI runs the suite in both tested environments: each must pass its own check."""
    assert all(r["ok"] for r in support.check_versions()), support.describe()
