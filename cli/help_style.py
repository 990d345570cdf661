"""Help in the conventions of Click and of most command lines: `--out PATH`, `--count INTEGER`, flags
with no type, arguments in capitals (`Usage: atelier ocr [OPTIONS] PATHS...`).

Typer 0.29 prints Python annotations instead (`<bool>`, `<list[Path]>`, `{customer}`), which reads as
a program's internals. `apply()` replaces the display methods of the pinned Typer's parameter
classes; tests/test_cli.py asserts the result, so a Typer upgrade that moves them is noticed."""

from __future__ import annotations

from pathlib import Path

NAMES = {bool: None, int: "INTEGER", float: "FLOAT", str: "TEXT", Path: "PATH"}


def _metavar(param) -> str | None:
    if getattr(param, "is_flag", False):
        return None
    desc = param.type_descriptor
    if desc.is_choice:
        return "[" + "|".join(str(c) for c in desc.choices or ()) + "]"
    annotation = desc.annotation
    if desc.is_list:
        annotation = (getattr(annotation, "__args__", None) or (str,))[0]
    if desc.is_path:
        return "PATH"
    return NAMES.get(annotation, "VALUE")


def apply() -> None:
    from typer import core

    option, argument = getattr(core, "TyperOption", None), getattr(core, "TyperArgument", None)
    if option is None or argument is None or not hasattr(argument, "_usage_display_name"):
        return  # another Typer: its own help stays

    def display_type(self, ctx):
        return _metavar(self)

    def usage_name(self) -> str:
        name = self.metavar or self.name.upper()
        name = name if self.required else f"[{name}]"
        return name + ("..." if self.nargs != 1 else "")

    option.display_type = display_type
    argument.display_type = display_type
    argument._usage_display_name = usage_name
    argument.display_name_raw = property(lambda self: self.metavar or self.name.upper())
