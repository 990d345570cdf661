"""Recent flow runs with the model version each used or made and its outputs (from the run-summary
table artifact every Atelier flow leaves), read from Prefect's API; and orphaned runs marked crashed.

A flow run whose process died (kill -9, a lost machine, a database outage that stopped its last state
change) stays "Running" in Prefect for ever. Every Atelier flow therefore records, when it starts, the
process that runs it (`infrastructure_pid` = `atelier:HOST:PID:START_TIME`), and marks Crashed every
other run still Running on this host whose process is gone. `atelier runs` does the same sweep.
"""

from __future__ import annotations

import json
import os
import re
import socket
from typing import TYPE_CHECKING

from atelier.tasks.common import OUTPUT, SUMMARY_KEY

if TYPE_CHECKING:
    from atelier.tasks.registry import GateDecision

PROCESS_PREFIX = "atelier"


def _this_process() -> str:
    import psutil

    return f"{PROCESS_PREFIX}:{socket.gethostname()}:{os.getpid()}:{psutil.Process().create_time():.2f}"


def _gone(infrastructure_pid: str | None) -> bool:
    """True when the recorded process is on this host and no longer runs (a recycled pid is not it)."""
    import psutil

    parts = (infrastructure_pid or "").split(":")
    if len(parts) != 4 or parts[0] != PROCESS_PREFIX or parts[1] != socket.gethostname():
        return False  # not ours, or another machine's: nothing to decide here
    try:
        proc = psutil.Process(int(parts[2]))
        return abs(proc.create_time() - float(parts[3])) > 1.0 or proc.status() == psutil.STATUS_ZOMBIE
    except (psutil.Error, ValueError):
        return True


def mark_orphans(client, exclude: str | None = None) -> list[str]:
    """Set Crashed on flow runs still Running whose process on this host is gone; returns their ids."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType
    from prefect.states import Crashed

    running = client.read_flow_runs(
        flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING]))), limit=200
    )
    crashed = []
    for run in running:
        if str(run.id) != exclude and _gone(run.infrastructure_pid):
            pid = run.infrastructure_pid.split(":")[2]
            client.set_flow_run_state(
                run.id,
                Crashed(message=f"its process (pid {pid} on {socket.gethostname()}) is gone; marked crashed by a later Atelier run"),
                force=True,
            )
            crashed.append(str(run.id))
    return crashed


def run_tags(parameters: dict) -> list[str]:
    """Searchable tags from a run's parameters: customer, subject and the model it makes or uses."""
    tags = [f"{key}:{parameters[key]}" for key in ("customer", "subject") if parameters.get(key)]
    model = parameters.get("model")
    if not model and parameters.get("customer") and parameters.get("subject"):
        model = f"dreambooth-{parameters['customer']}-{parameters['subject']}"
    if model:  # NAME@ALIAS or NAME/VERSION: the name
        tags.append(f"model:{re.split('[@/]', str(model))[0]}")
    return tags


def run_name() -> str:
    """`acme-rex-1a2b3c4d` for a customer's subject, `ocr-calibrate-1a2b3c4d` otherwise: readable in the
    UI, unique by the run id's first 8 characters (`atelier runs` shows them too)."""
    from prefect.runtime import flow_run

    p = flow_run.parameters or {}
    stem = "-".join(str(p[k]) for k in ("customer", "subject") if p.get(k)) or flow_run.flow_name
    return f"{stem}-{str(flow_run.id)[:8]}"


def claim_and_sweep(flow, flow_run, state) -> None:  # noqa: ARG001 (Prefect's on_running hook signature)
    """On every Atelier flow's start: record this process on the run, then mark earlier orphans crashed."""
    from prefect import get_client
    from prefect.logging import get_logger

    with get_client(sync_client=True) as client:
        client.update_flow_run(
            flow_run.id,
            infrastructure_pid=_this_process(),
            tags=sorted(set(flow_run.tags or []) | set(run_tags(flow_run.parameters or {}))),
        )
        crashed = mark_orphans(client, exclude=str(flow_run.id))
    if crashed:
        get_logger("atelier").warning("marked %d orphaned flow run(s) crashed: %s", len(crashed), ", ".join(crashed))


def recent_runs(limit: int = 20, flow_name: str | None = None, upcoming: int = 5) -> list[dict]:
    """The next `upcoming` scheduled runs (soonest first), then the `limit` most recent others (newest first):
    a schedule's many future runs never push the past ones out of the list."""
    from prefect import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterKey,
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import ArtifactSort, FlowRunSort

    def state(**kind) -> FlowRunFilter:
        return FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(**kind)))

    with get_client(sync_client=True) as client:
        mark_orphans(client)
        flows_filter = FlowFilter(name=FlowFilterName(any_=[flow_name])) if flow_name else None
        ahead = (
            client.read_flow_runs(
                flow_filter=flows_filter,
                flow_run_filter=state(any_=[StateType.SCHEDULED]),
                sort=FlowRunSort.EXPECTED_START_TIME_ASC,
                limit=upcoming,
            )
            if upcoming
            else []
        )
        runs = [
            *ahead,
            *client.read_flow_runs(
                flow_filter=flows_filter,
                flow_run_filter=state(not_any_=[StateType.SCHEDULED]),
                sort=FlowRunSort.EXPECTED_START_TIME_DESC,
                limit=limit,
            ),
        ]
        ids = [r.id for r in runs]
        flows = {fid: client.read_flow(fid).name for fid in {r.flow_id for r in runs}}
        deps = {did: client.read_deployment(did).name for did in {r.deployment_id for r in runs if r.deployment_id}}
        arts = (
            client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[SUMMARY_KEY]), flow_run_id=ArtifactFilterFlowRunId(any_=ids)),
                sort=ArtifactSort.CREATED_DESC,
                limit=200,
            )
            if ids
            else []
        )
    summary = {}
    for a in arts:
        data = json.loads(a.data) if isinstance(a.data, str) else a.data
        if data and a.flow_run_id not in summary:
            summary[a.flow_run_id] = data[0]
    rows = []
    for r in runs:
        s = summary.get(r.id, {})
        rows.append(
            {
                "id": str(r.id),
                "name": r.name,
                "flow": flows.get(r.flow_id, "?"),
                "deployment": deps.get(r.deployment_id),
                "state": r.state_name or "",
                "start": (r.start_time or r.expected_start_time),
                "model": s.get("model"),
                "outputs": _outputs(s),
                "note": _note(s.get("note"), r),
                "tags": list(r.tags),
            }
        )
    return rows


def _note(summary_note: str | None, run) -> str | None:
    """The run's summary note, and for a run that failed, crashed or was refused its state's message too:
    the reason, also when the run died before writing its summary."""
    reason = run.state.message if run.state is not None and run.state_name in ("Failed", "Crashed", "Refused") else None
    if summary_note and reason and (reason in summary_note or summary_note in reason):
        return reason if len(reason) > len(summary_note) else summary_note  # a refused gate says it once
    return "; ".join(x for x in (summary_note, reason) if x) or None


def _outputs(summary: dict) -> str | None:
    """A run summary's outputs as one JSON string: from its `output: NAME` columns, or (summaries written
    before those columns) its `outputs` cell."""
    columns = {k.removeprefix(OUTPUT): v for k, v in summary.items() if k.startswith(OUTPUT)}
    return json.dumps(columns, sort_keys=True) if columns else summary.get("outputs")


def run_logs(run: str, limit: int = 2000) -> dict:
    """A flow run's log lines, oldest first, and its final state with its message. `run` is a flow run's
    id, the start of one (as `atelier runs` shows it) or its name."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName, LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import FlowRunSort, LogSort

    from atelier.kernel.errors import NotFound

    with get_client(sync_client=True) as client:
        found = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[run])), limit=2)
        if not found:
            recent = client.read_flow_runs(sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=200)  # the server's most
            found = [r for r in recent if str(r.id).startswith(run.lower())] if len(run) >= 4 else []
        if len(found) != 1:
            raise NotFound(
                f"flow run {run!r}",
                "matches no flow run" if not found else "matches more than one flow run",
                "pass an id (or its first 8 characters) or a name from `atelier runs`",
            )
        flow_run = found[0]
        logs: list = []
        while len(logs) < limit:  # the server answers at most 200 a page
            page = client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run.id])),
                sort=LogSort.TIMESTAMP_ASC,
                limit=200,
                offset=len(logs),
            )
            logs.extend(page)
            if len(page) < 200:
                break
        flow = client.read_flow(flow_run.flow_id).name
    return {
        "id": str(flow_run.id),
        "name": flow_run.name,
        "flow": flow,
        "state": flow_run.state_name or "",
        "message": (flow_run.state.message if flow_run.state else "") or "",
        "lines": [{"time": str(line.timestamp), "level": line.level, "logger": line.name, "message": line.message} for line in logs],
    }


def finished(result: dict, gate: GateDecision):
    """The flow's end state: Completed when the gate passed; a Completed named `Refused`, with the
    gate's reasons as its message, when it refused (the UI shows it at a glance; the caller still
    gets `result`)."""
    if gate.passed:
        return result
    from prefect.states import Completed

    reasons = "; ".join(gate.reasons) or "see the version's atelier.gate tag"
    return Completed(name="Refused", message=f"gate refused {result['model']} version {result['version']}: {reasons}"[:500], data=result)
