#!/usr/bin/env python3
"""mypy over the kernel and the registry, by their installed names (atelier.kernel, atelier.registry).

The parts live in top-level folders that install under one root (pyproject.toml's package-dir), which
mypy cannot follow on its own: this lays the root out in a temporary folder of links and checks it there.

usage: python3 checks/typecheck.py [PACKAGE ...]   (default: atelier.kernel atelier.registry)
"""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("cli", "flows", "tasks", "registry", "models", "kernel")
DEFAULT = ("atelier.kernel", "atelier.registry")


def main(packages: list[str]) -> int:
    with tempfile.TemporaryDirectory(prefix="atelier-mypy-") as tmp:
        root = Path(tmp) / "atelier"
        root.mkdir()
        os.symlink(ROOT / "atelier" / "__init__.py", root / "__init__.py")
        for part in PARTS:
            os.symlink(ROOT / part, root / part)
        args = [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"), "--cache-dir", str(ROOT / ".mypy_cache")]
        for package in packages or DEFAULT:
            args += ["-p", package]
        return subprocess.run(args, cwd=tmp).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
