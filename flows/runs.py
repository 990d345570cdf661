"""Recent flow runs with the model version each used or made and its outputs (from the run-summary
table artifact every Atelier flow leaves), read from Prefect's API.

The filter endpoints are called with explicit JSON bodies: with fastapi 0.154 (the pin Prefect 3.8.8
needs) the server rejects the `null` sub-filters that the client's typed read_* methods send.
"""

from __future__ import annotations

import json

from tasks.common import SUMMARY_KEY


def recent_runs(limit: int = 20, flow_name: str | None = None) -> list[dict]:
    from prefect import get_client

    with get_client(sync_client=True) as client:
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
