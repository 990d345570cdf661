"""Every `atelier ...` command the README and the docs show exists as written: its subcommand, each
option it names, and no more positional arguments than the command takes. A renamed option or a
removed command breaks this test, not a user pasting from the README. (The commands that can run here
without a flow are also run, by test_cli and the hostile suite; the README's two `make` commands are
what CI runs.)"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import typer

from atelier.cli.main import app

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
COMMAND = re.compile(r"(?:^|[\s;&|(`])(?:\.venv/bin/)?atelier\s+(?!-?-?help\b)([a-z][^\n#`]*)")
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)


def _commands(page: Path) -> list[tuple[str, str]]:
    """(where, command line) for each `atelier` command in the page's code blocks."""
    found = []
    for block in FENCE.finditer(page.read_text()):
        first_line = page.read_text()[: block.start()].count("\n") + 1
        for offset, line in enumerate(block.group(1).splitlines(), start=1):
            if line.lstrip().startswith(("registered ", "gate ", "ocr version", "promoted", "error:")):
                continue  # output shown in the block, not a command
            for match in COMMAND.finditer(line):
                text = re.split(r"\s(?:&&|\|\||\||;)\s|\s>\s?\S", match.group(1))[0].strip()
                found.append((f"{page.relative_to(ROOT)}:{first_line + offset}", text))
    return found


CASES = [case for page in PAGES for case in _commands(page)]


def _resolve(words: list[str]) -> tuple[Any, list[str], str]:
    """The Click command a command line names (Typer carries its own Click: duck-typed), the words left."""
    command = typer.main.get_command(app)
    path = "atelier"
    while hasattr(command, "list_commands") and words and not words[0].startswith("-"):
        sub = command.commands.get(words[0])
        if sub is None:
            raise AssertionError(f"`{path} {words[0]}` is not a command (commands: {', '.join(sorted(command.commands))})")
        command, path, words = sub, f"{path} {words[0]}", words[1:]
    return command, words, path


def test_the_docs_show_commands():
    assert len(CASES) > 40, CASES  # the pattern still finds the README's day of commands


@pytest.mark.parametrize("where,line", CASES, ids=[where for where, _ in CASES])
def test_each_documented_command_parses(where, line):
    words = shlex.split(re.sub(r"[][]", " ", line.replace("...", "X")), comments=True)  # [--option VALUE] in a synopsis is the option
    command, rest, path = _resolve(words)
    options = {opt: p for p in command.params if p.param_type_name == "option" for opt in (*p.opts, *p.secondary_opts)}
    arguments = [p for p in command.params if p.param_type_name == "argument"]
    positional = 0
    skip = False
    for word in rest:
        if skip:
            skip = False
            continue
        if word.startswith("-") and len(word) > 1 and not word[1].isdigit():
            name = word.split("=", 1)[0]
            assert name in options, f"{where}: `{path}` has no option {name} (it has {', '.join(sorted(options))})"
            skip = "=" not in word and not options[name].is_flag and not options[name].count
            continue
        positional += 1
    unbounded = any(p.nargs < 0 for p in arguments)
    assert unbounded or positional <= sum(p.nargs for p in arguments), (
        f"{where}: `{path}` takes {len(arguments)} arguments, the docs give {positional}: {line}"
    )
    required = sum(p.nargs for p in arguments if p.required and p.nargs > 0)
    assert positional >= required, f"{where}: `{path}` needs {required} arguments, the docs give {positional}: {line}"
