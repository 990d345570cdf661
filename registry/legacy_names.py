"""Models registered before the one import root (0.1 layouts) ship code that imports Atelier's parts
by their old top-level names: `models.dreambooth.pipeline`, `registry.pyfunc`, `atelier.storage`.

Loading one of them runs this process's own Atelier code under those names: each old name is an
alias of the module under `atelier.` (the same module object, not a second copy), found before the
model's `code/` folder on sys.path. So a version registered before the upgrade still loads, with the
platform's checked, installed code (its files were checked against the ledger's manifest all the same).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

PARTS = ("cli", "flows", "tasks", "registry", "models")
KERNEL_MODULES = ("errors", "gitinfo", "hashing", "objectstore", "outages", "progress", "settings", "storage", "workspace")


def current_name(fullname: str) -> str | None:
    """The module an old name stands for now, or None for a name that was never Atelier's."""
    head, _, rest = fullname.partition(".")
    if head in PARTS:
        return f"atelier.{fullname}"
    if head == "atelier" and rest.partition(".")[0] in KERNEL_MODULES:
        return f"atelier.kernel.{rest}"
    return None


class _LegacyAliases(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        target_name = current_name(fullname)
        if target_name is None or importlib.util.find_spec(target_name) is None:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        return importlib.import_module(current_name(spec.name) or spec.name)  # the module itself, under its old name too

    def exec_module(self, module) -> None:
        pass  # already executed under its current name


_ALIASES = _LegacyAliases()


def is_legacy_layout(code_dir) -> bool:
    """A model's `code/` folder from before the one import root: top-level `models/`, no `atelier/kernel/`."""
    return (code_dir / "models").is_dir() and not (code_dir / "atelier" / "kernel").is_dir()


def install() -> None:
    """Answer the old names from now on in this process (idempotent)."""
    if _ALIASES not in sys.meta_path:
        sys.meta_path.insert(0, _ALIASES)
