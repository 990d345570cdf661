"""Typed errors. Each names the item at fault and how to fix it, so the CLI can print one line."""

from __future__ import annotations


class AtelierError(Exception):
    """Base of every error Atelier raises on purpose; `item` is what is wrong, `fix` what to do."""

    exit_code = 2
    transient = False  # True: a second try may pass (a server restarting); tasks retry only these

    def __init__(self, item: str, problem: str, fix: str) -> None:
        self.item = item
        self.problem = problem
        self.fix = fix
        super().__init__(f"{item}: {problem}. Fix: {fix}")


class InvalidIdentifier(AtelierError):
    """A customer or subject id that is not a slug."""


class ConfigError(AtelierError):
    """Settings or a training config that does not validate."""


class DataValidationError(AtelierError):
    """A data set failed its Great Expectations suite. `failures` lists (file, rule, detail)."""

    def __init__(self, item: str, failures: list[tuple[str, str, str]], report_dir: str | None = None) -> None:
        self.failures = failures
        self.report_dir = report_dir
        lines = "; ".join(f"{f} fails {rule} ({detail})" for f, rule, detail in failures)
        where = f"; report: {report_dir}" if report_dir else ""
        rules = {rule for _, rule, _ in failures}
        fix = "replace or remove the named files, then add the subject again"
        if rules == {"count"}:  # too few or too many photos: no file is at fault
            fix = "give the number of photos the message names (pass the files, or a folder holding them)"
        elif "count" in rules:
            fix += ", with the number of photos the message names"
        super().__init__(item, f"{len(failures)} problem(s): {lines}{where}", fix)


class ModelFormatError(AtelierError):
    """A directory that is not the kind of model it was given as."""


class NotFound(AtelierError):
    """A customer, subject, model or file that does not exist."""


class WorkspaceError(AtelierError):
    """The workspace is missing or not initialised."""


class GateRefused(AtelierError):
    """The promotion gate refused a candidate; the champion was left alone."""

    exit_code = 3


class ServiceUnavailable(AtelierError):
    """A server (MLflow, Prefect, S3, PostgreSQL) did not answer. Worth a retry: it may be restarting."""

    exit_code = 6
    transient = True


class DiskError(AtelierError):
    """The disk under a store is full or read-only. Exit code 6, like a server that is away: the input
    was fine, and the same command passes once there is room (writes are atomic, so nothing stored was
    lost or half-written)."""

    exit_code = 6


class PartlyDone(AtelierError):
    """A batch (or a folder of documents) finished, but some of its items were not done: each one is
    named on stderr and in the report, and the rest were done and kept. Exit code 7, so a script can
    tell "all done" (0) and "nothing done" (2) from "fix these items and run again" (a rerun does only them)."""

    exit_code = 7


def schema_problems(errors: list) -> tuple[str, str]:
    """A schema's errors (pydantic's `ValidationError.errors()`) in the project's words, all of them at
    once: ("N problem(s): key 'a.b': what it must be; ...", the fix). Unknown keys are named as such."""

    def words(error: dict) -> str:
        message = str(error["msg"])
        for prefix in ("Value error, ", "Assertion failed, "):
            message = message.removeprefix(prefix)
        if error["type"] == "finite_number":
            return "must be a finite number (not nan or inf)"
        if error["type"] == "extra_forbidden":
            return "is not a setting"
        if error["type"] in ("dict_type", "model_type", "model_attributes_type"):
            return "must be a mapping of `key: value` entries"
        return message.lower()

    said = "; ".join(f"key {'.'.join(str(p) for p in e['loc']) or '(the whole file)'!r}: {words(e)}" for e in errors)
    unknown = any(e["type"] == "extra_forbidden" for e in errors)
    fix = "remove unknown keys or check their spelling" if unknown else "correct the values named"
    return f"{len(errors)} problem(s): {said}", fix


def yaml_problem(exc: Exception) -> str:
    """A YAML parser's error on one line: what it found and where ("found unexpected end of stream at line
    2, column 1"), not PyYAML's multi-line excerpt with a caret under the column."""
    mark = getattr(exc, "problem_mark", None)
    what = getattr(exc, "problem", None) or exc.__class__.__name__
    return f"{what} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else what
