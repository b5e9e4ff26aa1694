"""The repository's shape: the import graph (scripts/check_imports.py) and claims the README makes about packaging."""
from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import transformers

ROOT = Path(__file__).resolve().parents[2]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_the_import_graph_has_no_cycles_and_the_library_never_imports_its_tooling():
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_imports.py")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "no cycles" in done.stdout


def test_the_readme_states_the_transformers_range_pyproject_admits():
    requirement = next(d for d in _pyproject()["project"]["dependencies"] if d.startswith("transformers"))
    lowest, below = re.fullmatch(r"transformers>=([\d.]+),<([\d.]+)", requirement.split(";")[0].strip()).groups()
    major, minor = below.split(".")
    highest = f"{major}.{int(minor) - 1}"
    assert f"transformers {lowest} to {highest}" in (ROOT / "README.md").read_text()
    installed = tuple(int(part) for part in transformers.__version__.split(".")[:2])
    assert tuple(map(int, lowest.split("."))) <= installed <= tuple(map(int, highest.split(".")))


def test_the_license_is_an_spdx_string():
    assert _pyproject()["project"]["license"] == "Apache-2.0"


def test_kernels_and_policies_install_only_inside_kvtier():
    setuptools = _pyproject()["tool"]["setuptools"]
    assert not {"kernels", "policies"} & set(setuptools["packages"])
    assert setuptools["package-dir"]["kvtier.kernels"] == "kernels"
    assert setuptools["package-dir"]["kvtier.policies"] == "policies"
