"""Run mypy --strict over the product packages under their import names (``fedgen.*``).

The wheel installs the folders ``coordinator/``, ``edge_client/``, ``export/``, ``fedcore/`` and
``proto/fedgen/`` as one namespace (pyproject's ``[tool.setuptools] package-dir``). An editable
install serves that mapping through an import hook, which mypy cannot follow, so this script
builds the same mapping as a tree of symbolic links under ``build/typecheck/`` (read from
pyproject, so it is declared once) and runs mypy on it with the settings in pyproject.

    python tools/typecheck.py            # exit status is mypy's
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TREE = ROOT / "build" / "typecheck"


def link_tree() -> Path:
    """``build/typecheck/fedgen/...``: links to the folders that pyproject maps into the namespace."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping: dict[str, str] = setuptools["package-dir"]
    shutil.rmtree(TREE, ignore_errors=True)
    root_package = TREE / "fedgen"
    root_package.mkdir(parents=True)
    top = ROOT / mapping["fedgen"]
    for entry in top.iterdir():  # fedgen/__init__.py and fedgen/v1 live in proto/fedgen
        if entry.name != "__pycache__":
            (root_package / entry.name).symlink_to(entry)
    for name, folder in mapping.items():
        if name != "fedgen":
            target = TREE / Path(*name.split("."))
            target.symlink_to(ROOT / folder, target_is_directory=True)
    return TREE


def main() -> int:
    tree = link_tree()
    command = [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"), "-p", "fedgen"]
    return subprocess.run(command, cwd=tree, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
