"""The workspace's DVC pipeline files that Atelier keeps: subjects.yaml (one finetune stage per
subject), params.yaml's class_priors (one priors stage per class noun) and the machine-local
launcher `.atelier/bin/atelier` that the stages run.

Each fine-tune depends on the priors of its own class only, so adding a subject of a new class adds a
priors stage and leaves every other subject's stage up to date.
"""

from __future__ import annotations

import hashlib
import re
import shlex
import sys
from pathlib import Path

import yaml

from atelier.kernel.storage import write_bytes_atomic, write_text_atomic

SUBJECTS_FILE = "subjects.yaml"
PARAMS_FILE = "params.yaml"
LAUNCHER = Path(".atelier") / "bin" / "atelier"
# a class the workspace has not seen gets the settings of the classes it has (same base model), or these
DEFAULT_PRIORS = {"count": 8, "resolution": 64, "seed": 0, "sampler": "dpmsolver++", "steps": 8, "guidance": 5.0, "batch_size": 8}


def class_key(class_noun: str) -> str:
    """The priors stage's key for a class noun: "red backpack" -> "red-backpack"; a noun with no
    ASCII letter or digit gets a stable hash ("class-1a2b3c4d")."""
    key = re.sub(r"[^a-z0-9]+", "-", class_noun.lower()).strip("-")[:48]
    return key or f"class-{hashlib.sha256(class_noun.encode()).hexdigest()[:8]}"


def list_subject(ws: Path, customer: str, subject: str, class_noun: str) -> list[str]:
    """List the subject in subjects.yaml with its class's priors, and give a new class its priors entry
    in params.yaml; returns the files to commit (none for a workspace made before the stages existed)."""
    path = ws / SUBJECTS_FILE
    if not path.is_file():
        return []
    text = path.read_text()
    listed = dict((yaml.safe_load(text) or {}).get("subjects") or {})
    listed[f"{customer}.{subject}"] = {"customer": customer, "subject": subject, "class_priors": class_key(class_noun)}
    for entry in listed.values():  # entries written before classes had stages of their own
        if "class_priors" not in entry:
            entry["class_priors"] = class_key(_class_of(ws, entry["customer"], entry["subject"]))
    header = "".join(line for line in text.splitlines(keepends=True) if line.startswith("#"))
    write_text_atomic(path, header + yaml.safe_dump({"subjects": dict(sorted(listed.items()))}, sort_keys=False, allow_unicode=True))
    return [
        SUBJECTS_FILE,
        *_add_class_priors(ws, {e["class_priors"]: _noun(ws, e, customer, subject, class_noun) for e in listed.values()}),
    ]


def unlist_subject(ws: Path, customer: str, subject: str) -> list[str]:
    """Take the subject out of subjects.yaml (its finetune stage goes with it); its class's priors stay,
    other subjects may share them. Returns the files to commit."""
    path = ws / SUBJECTS_FILE
    if not path.is_file():
        return []
    text = path.read_text()
    listed = dict((yaml.safe_load(text) or {}).get("subjects") or {})
    if listed.pop(f"{customer}.{subject}", None) is None:
        return []
    header = "".join(line for line in text.splitlines(keepends=True) if line.startswith("#"))
    write_text_atomic(path, header + yaml.safe_dump({"subjects": dict(sorted(listed.items()))}, sort_keys=False, allow_unicode=True))
    return [SUBJECTS_FILE]


def _class_of(ws: Path, customer: str, subject: str) -> str:
    meta = ws / "data" / "subjects" / customer / f"{subject}.yaml"
    return str((yaml.safe_load(meta.read_text()) or {}).get("class_noun", "")) if meta.is_file() else ""


def _noun(ws: Path, entry: dict, customer: str, subject: str, class_noun: str) -> str:
    if (entry["customer"], entry["subject"]) == (customer, subject):
        return class_noun
    return _class_of(ws, entry["customer"], entry["subject"])


def _add_class_priors(ws: Path, nouns: dict[str, str]) -> list[str]:
    """Add a class_priors entry for each class key params.yaml lacks, as text under `class_priors:`
    so that the file's comments stay."""
    path = ws / PARAMS_FILE
    if not path.is_file():
        return []
    text = path.read_text()
    params = yaml.safe_load(text) or {}
    known = dict(params.get("class_priors") or {})
    missing = {k: n for k, n in nouns.items() if k not in known and n}
    if not missing or "class_priors" not in params:
        return []
    template = {k: v for k, v in (next(iter(known.values())) if known else DEFAULT_PRIORS).items() if k != "prompt"}
    block = yaml.safe_dump(
        {k: {"prompt": f"a photo of {n}", **template} for k, n in sorted(missing.items())}, sort_keys=False, allow_unicode=True
    )
    indented = "".join(f"  {line}\n" for line in block.splitlines())
    lines = text.splitlines(keepends=True)
    at = next(i for i, line in enumerate(lines) if line.rstrip() == "class_priors:" or line.startswith("class_priors:"))
    if lines[at].rstrip() != "class_priors:":  # `class_priors: {}`: the block replaces the empty mapping
        lines[at] = "class_priors:\n"
    lines.insert(at + 1, indented)
    write_text_atomic(path, "".join(lines))
    return [PARAMS_FILE]


def write_launcher(ws: Path) -> Path:
    """dvc.yaml's stages run `.atelier/bin/atelier` (from the workspace, DVC's cwd): a launcher of the
    `atelier` of the environment this Atelier runs from, so `dvc repro` works without an activated
    virtual environment. It is machine-local (the git-ignored .atelier/), so dvc.lock records the same
    command on every machine; every command that changes the workspace refreshes it."""
    exe = Path(sys.executable).parent / "atelier"
    command = shlex.quote(str(exe)) if exe.is_file() else shlex.join([sys.executable, "-m", "atelier.cli"])
    text = f'#!/bin/sh\n# written by Atelier: the atelier that dvc.yaml\'s stages run on this machine\nexec {command} "$@"\n'
    path = ws / LAUNCHER
    if not path.is_file() or path.read_text() != text:
        write_bytes_atomic(path, text.encode(), mode=0o755)
    return path
