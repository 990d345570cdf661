"""The generated hostile-input suite (tests/hostile.py): every case, as a real command, ends with the
README's exit code for its class (2 bad input, 6 a damaged store), in one line naming the item and the
fix, with no traceback, no hang, no flow run started and nothing stored. One test per class; a failure
lists every case of the class that broke the contract, with its output."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import hostile  # noqa: E402

ATELIER = str(Path(sys.executable).parent / "atelier")


@pytest.fixture(scope="module")
def hostile_workspace(tmp_path_factory) -> Path:
    """A workspace of its own (the cases must not touch the session's): the subject every case names,
    and the registry and ledger databases the store cases damage."""
    root = tmp_path_factory.mktemp("hostile")
    env = {**os.environ, "ATELIER_WORKSPACE": str(root / "ws")}
    from atelier.cli.demo_data import write_demo_photos

    photos = write_demo_photos(root / "photos", count=3, size=256)
    for argv in (
        ["init"],
        ["subject", "add", hostile.CUSTOMER, hostile.SUBJECT, "--class", "toy", *map(str, photos)],
        ["models"],
        ["ledger", "verify"],
    ):
        done = subprocess.run([ATELIER, *argv], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
    return root / "ws"


def _broken(case: hostile.Case, outcome: hostile.Outcome) -> str | None:
    """Why this outcome breaks the contract, or None."""
    lines = [line for line in outcome.output.splitlines() if line.strip()]
    if outcome.code is None:
        return f"still running after {outcome.seconds:.0f} s (a hang, or work started)"
    if "Traceback" in outcome.output or "This is a bug in Atelier" in outcome.output:
        return "a traceback or an unexpected error"
    if outcome.code != case.exit:
        return f"exit {outcome.code}, expected {case.exit}"
    if outcome.code == 2 and re.search(r"Usage: atelier|Invalid value for|No such option", outcome.output):
        return None  # Click's own usage error (a missing path, a value of the wrong type): its panel names the item
    if not lines or not lines[-1].startswith("error: ") or len(lines) > 2:
        return f"{len(lines)} lines where one `error: ...` line was expected"
    if "Fix:" not in lines[-1]:
        return "the message gives no fix"
    if not re.search(case.names, lines[-1]):
        return f"the message does not name {case.names!r}"
    return None


CLASSES = sorted({case.kind for case in hostile.all_cases()})


def _through_the_cli(case: hostile.Case, index: int) -> bool:
    """Every case runs as a process, but of the generated config values (one validator, 150-odd values)
    only every eighth: all of them go through the same loader in process (the next test)."""
    return case.kind != "config" or "=" not in case.name or index % 8 == 0


@pytest.mark.parametrize("kind", CLASSES)
def test_every_hostile_input_is_refused_cleanly(kind, hostile_workspace, tmp_path):
    cases = [case for i, case in enumerate(hostile.all_cases()) if case.kind == kind and _through_the_cli(case, i)]
    before = hostile.snapshot(hostile_workspace)
    session_workspace = os.environ.get("ATELIER_WORKSPACE")

    def one(numbered: tuple[int, hostile.Case]) -> str | None:
        i, case = numbered
        workspace = hostile_workspace
        if case.workspace_copy:
            workspace = tmp_path / f"ws-{i}"
            shutil.copytree(hostile_workspace, workspace, symlinks=True)
        outcome = hostile.run(case, workspace, tmp_path / f"case-{i}", timeout=45)
        why = _broken(case, outcome)
        if why is None and case.workspace_copy:
            shutil.rmtree(workspace, ignore_errors=True)
        return None if why is None else f"{case.id}: {why}\n    {outcome.output.strip()[-400:]}"

    with ThreadPoolExecutor(2) as pool:  # the CI machine's two cores; each case is its own process
        failures = [f for f in pool.map(one, enumerate(cases)) if f]
    assert not failures, f"{len(failures)} of {len(cases)} {kind} case(s) broke the contract:\n" + "\n".join(failures)
    after = hostile.snapshot(hostile_workspace)
    assert after == before, f"the {kind} cases changed the workspace, the registry, the ledger or Prefect's runs"
    assert os.environ.get("ATELIER_WORKSPACE") == session_workspace  # the other tests' workspace is left alone


def test_every_generated_config_value_is_refused_by_the_loader(tmp_path):
    """All the generated config cases, in process: a ConfigError naming the key, never another error."""
    from atelier.kernel.errors import ConfigError
    from atelier.models.dreambooth.config import load_train_config

    wrong = []
    for i, case in enumerate(c for c in hostile.all_cases() if c.kind == "config"):
        folder = tmp_path / f"c{i}"
        folder.mkdir()
        path = case.build(folder)[-1]
        try:
            load_train_config(Path(path))
            wrong.append(f"{case.id}: accepted")
        except ConfigError as exc:
            if not re.search(case.names, str(exc)):
                wrong.append(f"{case.id}: does not name {case.names!r}: {exc}")
        except Exception as exc:  # noqa: BLE001 (any other error is the bug this test is for)
            wrong.append(f"{case.id}: {type(exc).__name__}: {exc}")
    assert not wrong, "\n".join(wrong)


def test_the_generator_covers_every_config_field():
    """A field added to TrainConfig gets hostile values without an edit to the generator."""
    from atelier.models.dreambooth.config import TrainConfig

    covered = {case.name.split("=")[0].split(".")[-1] for case in hostile.all_cases() if case.kind == "config"}
    numeric = {k for k, v in TrainConfig.model_json_schema()["properties"].items() if v.get("type") in ("integer", "number")}
    assert numeric <= covered, numeric - covered
