"""The version range CI tests, and a check of an environment against it.

``.ci/run`` proves two environments on every submission:

* **newest**: whatever pip resolves today (the whole suite);
* **oldest**: the GPU image's stack (Python 3.12, torch 2.11.0, triton 3.6.0, transformers 5.17.0)
  with numpy 2.3: the AOT compile of every kernel for sm_80/sm_90, ``bench/gpu_check.py --dry-run``
  and the transformers integration tests. numpy 2.3 because Triton 3.6's *interpreter* converts
  one-element arrays to Python scalars, which numpy 2.4 made an error; compiled kernels (a GPU) do
  not run the interpreter and work with numpy 2.5.

``pyproject.toml`` and the README state the same lower bounds; ``tests/test_support.py`` keeps the
three in step.
"""

from __future__ import annotations

import importlib.metadata
import platform
import re

#: Lowest tested version of each requirement (the "oldest" CI environment).
OLDEST = {"python": "3.11", "torch": "2.11.0", "triton": "3.6.0", "transformers": "5.17.0"}
#: numpy under the Triton 3.6 interpreter: below this (see the module docstring).
INTERPRETER_NUMPY_BELOW_TRITON_3_9 = "2.4"


def _key(version: str) -> tuple[int, ...]:
    """``"2.11.0+cu130"`` -> ``(2, 11, 0)``: the release numbers only."""
    return tuple(int(x) for x in re.findall(r"\d+", version.split("+")[0])[:3])


def _found(name: str) -> str | None:
    if name == "python":
        return platform.python_version()
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def check_versions() -> list[dict]:
    """One row per requirement: ``{"name", "found", "oldest", "ok"}`` (``ok`` is False when the
    package is missing or older than the oldest tested version)."""
    rows = []
    for name, oldest in OLDEST.items():
        found = _found(name)
        ok = found is not None and _key(found) >= _key(oldest)
        rows.append({"name": name, "found": found, "oldest": oldest, "ok": ok})
    return rows


def describe(rows: list[dict] | None = None) -> str:
    """One line: ``torch 2.11.0+cu130 (>= 2.11.0 ok), ...``."""
    rows = check_versions() if rows is None else rows
    return ", ".join(f"{r['name']} {r['found']} (>= {r['oldest']} {'ok' if r['ok'] else 'UNTESTED'})"
                     for r in rows)
