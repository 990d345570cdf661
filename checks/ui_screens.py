"""Look at the MLflow and Prefect UIs the way a user does: headless Chromium screenshots of the pages a
user opens after `make demo` (MLflow's experiments, a customer's runs and a model version, in its
model-training view; Prefect's runs, a flow run with its task graph, the artifacts and the
deployments), logged in with the workspace's own credentials.

    .venv/bin/python checks/ui_screens.py [--out screens/]     # ATELIER_WORKSPACE or ./workspace

Needs Debian's `chromium` (`apt-get install chromium`). Chromium cannot answer a basic-auth prompt from
the command line (and MLflow's UI refuses to fetch from a URL that holds credentials), so each UI is
reached through a small local proxy that adds the Authorization header: the credentials never appear
in an argv. Prefect's UI asks for its auth string in a form of its own when its /ui-settings says
`"auth": "BASIC"`; the proxy answers that setting with no auth (the header is already on every call), so
the pages open as they do after a login. Starts the UIs with `atelier ui` if they are not running; prints one PNG path per page.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-authorization", "host"}


def proxy(upstream: str, authorization: str) -> ThreadingHTTPServer:
    """A local HTTP server that forwards every request to `upstream` with `authorization` added. JSON
    answers that name the upstream's own address (Prefect's /ui-settings gives the UI its API URL) name
    the proxy instead, so the UI's own calls come through it too."""
    target = urlsplit(upstream)
    here: dict[str, bytes] = {}

    class Handler(BaseHTTPRequestHandler):
        def _forward(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) or None
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP | {"accept-encoding"}}  # plain bodies: rewritten below
            headers["Authorization"] = authorization
            conn = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
            try:
                conn.request(self.command, self.path, body=body, headers=headers)
                answer = conn.getresponse()
                data = answer.read()
            finally:
                conn.close()
            if "json" in (answer.getheader("Content-Type") or ""):
                data = data.replace(upstream.rstrip("/").encode(), here["url"])
                if self.path.rstrip("/").endswith("/ui-settings"):
                    data = data.replace(b'"auth":"BASIC"', b'"auth":null')  # logged in: the proxy adds the header
            self.send_response(answer.status)
            for key, value in answer.getheaders():
                if key.lower() not in HOP and key.lower() != "content-length":
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _forward

        def log_message(self, *_args) -> None:  # quiet
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    here["url"] = f"http://127.0.0.1:{server.server_address[1]}".encode()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def shoot(chromium: str, url: str, png: Path) -> None:
    subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1400,900",
         "--virtual-time-budget=12000", f"--screenshot={png}", url],
        capture_output=True, timeout=120, check=False,
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("screens"))
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("chromium is not installed: apt-get install chromium")
    from atelier.cli import local_servers
    from atelier.cli.stack_config import MLFLOW_ADMIN
    from atelier.kernel.settings import load_settings
    from atelier.registry.tracking import ML_VIEW

    settings = load_settings()
    settings.apply_environment()
    mlflow = local_servers.ensure(settings, "mlflow")
    secrets = local_servers.local_secrets(settings)

    def basic(user_password: str) -> str:
        return "Basic " + base64.b64encode(user_password.encode()).decode()

    ml = proxy(mlflow["url"], basic(f"{MLFLOW_ADMIN}:{secrets['mlflow_admin_password']}"))
    ml_url = f"http://127.0.0.1:{ml.server_address[1]}"

    from mlflow import MlflowClient

    client = MlflowClient(settings.resolved_tracking_uri)
    experiments = [e for e in client.search_experiments() if e.tags.get("atelier.customer")]
    models = client.search_registered_models(max_results=1)
    pages = {"mlflow-experiments": f"{ml_url}/#/experiments{ML_VIEW}"}
    if experiments:
        pages["mlflow-runs"] = f"{ml_url}/#/experiments/{experiments[0].experiment_id}/runs{ML_VIEW}"
    if models:
        pages["mlflow-model"] = f"{ml_url}/#/models/{models[0].name}/versions/{models[0].latest_versions[-1].version}{ML_VIEW}"
    prefect = local_servers.ensure(settings, "prefect")
    pf = proxy(prefect["url"], basic(secrets["prefect_auth_string"]))
    pf_url = f"http://127.0.0.1:{pf.server_address[1]}"
    pages.update(
        {"prefect-runs": f"{pf_url}/runs", "prefect-artifacts": f"{pf_url}/artifacts", "prefect-deployments": f"{pf_url}/deployments"}
    )
    flow_run = _latest_flow_run(prefect["url"], basic(secrets["prefect_auth_string"]))
    if flow_run:
        pages["prefect-flow-run"] = f"{pf_url}/runs/flow-run/{flow_run}"
    args.out.mkdir(parents=True, exist_ok=True)
    for name, url in pages.items():
        png = args.out / f"{name}.png"
        shoot(chromium, url, png)
        print(png if png.is_file() else f"{png}: chromium made no screenshot of {url}", flush=True)
    print(json.dumps({"mlflow": mlflow["url"], "prefect": prefect["url"]}))


def _latest_flow_run(url: str, authorization: str) -> str | None:
    """The id of the newest flow run on the Prefect server, or None."""
    import requests

    answer = requests.post(
        f"{url}/api/flow_runs/filter", json={"sort": "START_TIME_DESC", "limit": 1}, headers={"Authorization": authorization}, timeout=30
    )
    answer.raise_for_status()
    runs = answer.json()
    return runs[0]["id"] if runs else None


if __name__ == "__main__":
    main()
