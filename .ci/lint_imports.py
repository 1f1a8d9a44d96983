"""Run import-linter (``lint-imports``, contracts in pyproject.toml) on loom.

import-linter finds a package's modules under its folder, but loom's
subpackages live in folders of their own, mapped into the ``loom`` namespace
by ``[tool.setuptools.package-dir]``.  This script lays the sources out as one
``loom/`` tree in a temporary directory (copies of the .py files, as the
mapping says), puts it first on PYTHONPATH and runs ``lint-imports`` there.
Exit status: lint-imports'.
"""
from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def main() -> int:
    pyproject = ROOT / "pyproject.toml"
    package_dir = tomllib.loads(pyproject.read_text())["tool"]["setuptools"]["package-dir"]
    with tempfile.TemporaryDirectory(prefix="loom-imports-") as view:
        for package, folder in package_dir.items():
            target = pathlib.Path(view, *package.split("."))
            target.mkdir(parents=True, exist_ok=True)
            for source in (ROOT / folder).glob("*.py"):
                shutil.copy2(source, target / source.name)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([view, os.environ.get("PYTHONPATH", "")])}
        lint = shutil.which("lint-imports", path=os.path.dirname(sys.executable)) or "lint-imports"
        return subprocess.run([lint, "--config", str(pyproject)], env=env, cwd=view).returncode


if __name__ == "__main__":
    sys.exit(main())
