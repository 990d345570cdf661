"""Recent flow runs with the model version each used or made and its outputs (from the run-summary
table artifact every Atelier flow leaves), read from Prefect's API; and orphaned runs marked crashed.

A flow run whose process died (kill -9, a lost machine, a database outage that stopped its last state
change) stays "Running" in Prefect for ever. Every Atelier flow therefore records, when it starts, the
process that runs it (`infrastructure_pid` = `atelier:HOST:PID:START_TIME`), and marks Crashed every
other run still Running on this host whose process is gone. `atelier runs` does the same sweep.

The filter endpoints are called with explicit JSON bodies: with fastapi 0.154 (the pin Prefect 3.8.8
needs) the server rejects the `null` sub-filters that the client's typed read_* methods send.
"""

from __future__ import annotations

import json
import os
import socket

from tasks.common import SUMMARY_KEY

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
    from prefect.states import Crashed

    http = client._client  # noqa: SLF001 - see the module docstring
    running = http.post("/flow_runs/filter", json={"flow_runs": {"state": {"type": {"any_": ["RUNNING"]}}},
                                                   "limit": 200, "offset": 0}).raise_for_status().json()
    crashed = []
    for run in running:
        if run["id"] != exclude and _gone(run.get("infrastructure_pid")):
            pid = run["infrastructure_pid"].split(":")[2]
            client.set_flow_run_state(run["id"], Crashed(message=f"its process (pid {pid} on {socket.gethostname()}) is gone; "
                                                                   "marked crashed by a later Atelier run"), force=True)
            crashed.append(run["id"])
    return crashed


def claim_and_sweep(flow, flow_run, state) -> None:  # noqa: ARG001 (Prefect's on_running hook signature)
    """On every Atelier flow's start: record this process on the run, then mark earlier orphans crashed."""
    from prefect import get_client
    from prefect.logging import get_logger

    with get_client(sync_client=True) as client:
        client.update_flow_run(flow_run.id, infrastructure_pid=_this_process())
        crashed = mark_orphans(client, exclude=str(flow_run.id))
    if crashed:
        get_logger("atelier").warning("marked %d orphaned flow run(s) crashed: %s", len(crashed), ", ".join(crashed))


def recent_runs(limit: int = 20, flow_name: str | None = None) -> list[dict]:
    from prefect import get_client

    with get_client(sync_client=True) as client:
        mark_orphans(client)
        http = client._client  # noqa: SLF001 - see the module docstring
        body: dict = {"sort": "EXPECTED_START_TIME_DESC", "limit": limit, "offset": 0}
        if flow_name:
            body["flows"] = {"name": {"any_": [flow_name]}}
        runs = http.post("/flow_runs/filter", json=body).raise_for_status().json()
        ids = [r["id"] for r in runs]
        flows = {fid: client.read_flow(fid).name for fid in {r["flow_id"] for r in runs}}
        deps = {did: client.read_deployment(did).name for did in {r["deployment_id"] for r in runs if r["deployment_id"]}}
        arts = http.post("/artifacts/filter", json={"artifacts": {"key": {"any_": [SUMMARY_KEY]}, "flow_run_id": {"any_": ids}},
                                                    "sort": "CREATED_DESC", "limit": 200, "offset": 0}).raise_for_status().json() if ids else []
    summary = {}
    for a in arts:
        data = json.loads(a["data"]) if isinstance(a["data"], str) else a["data"]
        if data and a["flow_run_id"] not in summary:
            summary[a["flow_run_id"]] = data[0]
    rows = []
    for r in runs:
        s = summary.get(r["id"], {})
        rows.append({"id": r["id"], "name": r["name"], "flow": flows.get(r["flow_id"], "?"), "deployment": deps.get(r["deployment_id"]),
                     "state": r.get("state_name") or "", "start": r.get("start_time") or r.get("expected_start_time"),
                     "model": s.get("model"), "outputs": s.get("outputs"), "note": s.get("note")})
    return rows
