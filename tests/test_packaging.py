"""One import root: the distribution installs `atelier` and nothing beside it, with every package of
the source tree under it (pyproject.toml lists them by installed name)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_source_package_is_listed_under_the_atelier_root():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {name: folder for name, folder in config["package-dir"].items()}
    found = {"atelier"}
    for name, folder in folders.items():
        if name == "atelier":
            continue
        for d in [ROOT / folder, *(ROOT / folder).rglob("*")]:
            if d.is_dir() and "__pycache__" not in d.parts and any(d.glob("*.py")):
                found.add(".".join([name, *d.relative_to(ROOT / folder).parts]))
    assert set(config["packages"]) == found


def test_no_generic_top_level_module_outside_the_repository(tmp_path):
    """From anywhere but the source tree, `models`, `tasks`, `registry`, `flows`, `cli` are not Atelier's."""
    code = (
        "import importlib.util, atelier.flows, atelier.kernel.errors;"
        "print([n for n in ('models', 'tasks', 'registry', 'flows', 'cli', 'kernel') if importlib.util.find_spec(n)])"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
    assert importlib.util.find_spec("atelier.models.dreambooth.trainer") is not None
