"""The cross-tenant request matrix, against any deployment of the stack: `atelier up`'s (test_stack_trust.py)
and docker/compose.yaml's (test_containers.py). Each request must be refused by the server itself."""

from __future__ import annotations

import requests

BUCKET = "atelier"


def mlflow_status(env: dict[str, str], method: str, path: str, auth=None, **kw) -> int:
    url = f"{env['ATELIER_TRACKING_URI']}/api/2.0/mlflow/{path}"
    return requests.request(method, url, auth=auth, timeout=30, **kw).status_code


def s3_client(env: dict[str, str], key: str | None, secret: str | None):
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config

    if key is None:
        return boto3.client(
            "s3", endpoint_url=env["ATELIER_S3_ENDPOINT_URL"], region_name="us-east-1", config=Config(signature_version=UNSIGNED)
        )
    return boto3.client(
        "s3",
        endpoint_url=env["ATELIER_S3_ENDPOINT_URL"],
        aws_access_key_id=key,
        aws_secret_access_key=secret,
        region_name="us-east-1",
    )


def s3_refused(call) -> bool:
    from botocore.exceptions import ClientError

    try:
        call()
    except ClientError as exc:
        return exc.response["Error"]["Code"] in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403")
    return False


def cross_tenant_refusals(env: dict[str, str], tenants: dict, deployment: str, override_command: str) -> dict[str, bool]:
    """Every anonymous and cross-tenant request of the matrix, tried against a stack's MLflow, S3 and Prefect at the URLs
    of `env` (a stack.env): name -> refused. `tenants`: both customers' credentials and acme's model, run and objects;
    `deployment`: a deployment's id, for flow runs that try to choose their command or environment."""
    creds, run, version = tenants["creds"], tenants["acme_run"], tenants["acme_version"]
    model = "dreambooth-acme-robot"
    acme = (creds["acme"]["MLFLOW_TRACKING_USERNAME"], creds["acme"]["MLFLOW_TRACKING_PASSWORD"])
    globex = (creds["globex"]["MLFLOW_TRACKING_USERNAME"], creds["globex"]["MLFLOW_TRACKING_PASSWORD"])
    alias = {"name": model, "alias": "champion", "version": "1"}
    tag = {"name": model, "key": "atelier.customer", "value": "globex"}
    refused: dict[str, bool] = {}
    # MLflow, anonymous: reads and writes alike get 401
    for name, (method, path, body) in {
        "search models": ("GET", "registered-models/search", None),
        "get model": ("GET", f"registered-models/get?name={model}", None),
        "search versions": ("GET", f"model-versions/search?filter=name%3D%27{model}%27", None),
        "download uri": ("GET", f"model-versions/get-download-uri?name={model}&version={version.version}", None),
        "get run": ("GET", f"runs/get?run_id={run}", None),
        "search runs": ("POST", "runs/search", {"experiment_ids": ["0", "1"]}),
        "list artifacts": ("GET", f"artifacts/list?run_id={run}", None),
        "set alias": ("POST", "registered-models/alias", alias),
        "set tag": ("POST", "registered-models/set-tag", tag),
        "create run": ("POST", "runs/create", {"experiment_id": "1"}),
    }.items():
        refused[f"mlflow anonymous {name}"] = mlflow_status(env, method, path, json=body) == 401
    graphql = requests.post(
        f"{env['ATELIER_TRACKING_URI']}/graphql",
        json={"query": f'{{mlflowGetRun(input: {{runId: "{run}"}}) {{run {{info {{runId}}}}}}}}'},
        timeout=30,
    )
    refused["mlflow anonymous graphql"] = graphql.status_code == 401
    refused["mlflow wrong password"] = mlflow_status(env, "GET", f"registered-models/get?name={model}", auth=(acme[0], "not-it")) == 401
    # MLflow, globex against acme's model and run: 403
    for name, (method, path, body) in {
        "get model": ("GET", f"registered-models/get?name={model}", None),
        "get by alias": ("GET", f"registered-models/alias?name={model}&alias=champion", None),
        "get run": ("GET", f"runs/get?run_id={run}", None),
        "list artifacts": ("GET", f"artifacts/list?run_id={run}", None),
        "download uri": ("GET", f"model-versions/get-download-uri?name={model}&version={version.version}", None),
        "set alias": ("POST", "registered-models/alias", alias),
        "set owner tag": ("POST", "registered-models/set-tag", tag),
        "delete model": ("DELETE", "registered-models/delete", {"name": model}),
        "delete version": ("DELETE", "model-versions/delete", {"name": model, "version": version.version}),
        "create run in acme's experiment": ("POST", "runs/create", {"experiment_id": tenants["acme_experiment"]}),
        "squat a name of acme": (
            "POST",
            "registered-models/create",
            {"name": "dreambooth-acme-squat", "tags": [{"key": "atelier.customer", "value": "acme"}]},
        ),
        "pre-create a new customer's experiment": ("POST", "experiments/create", {"name": "atelier-newco"}),
    }.items():
        refused[f"mlflow globex {name}"] = mlflow_status(env, method, path, auth=globex, json=body) == 403
    searched = requests.get(f"{env['ATELIER_TRACKING_URI']}/api/2.0/mlflow/registered-models/search", auth=globex, timeout=30).json()
    refused["mlflow globex search sees no acme model"] = all(
        m["name"].startswith("dreambooth-globex") for m in searched.get("registered_models", [])
    )
    # MLflow, acme on its own model: read-only
    for name, (method, path, body) in {
        "move its own alias": ("POST", "registered-models/alias", alias),
        "tag its own model": ("POST", "registered-models/set-tag", tag),
        "delete its own model": ("DELETE", "registered-models/delete", {"name": model}),
        "create a model": ("POST", "registered-models/create", {"name": "dreambooth-acme-extra"}),
    }.items():
        refused[f"mlflow acme {name}"] = mlflow_status(env, method, path, auth=acme, json=body) == 403
    # S3: no keys, made-up keys, a wrong secret, the other tenant's prefix, anything but reading one's own
    acme_key, globex_key = tenants["acme_object"], tenants["globex_object"]
    a = s3_client(env, creds["acme"]["AWS_ACCESS_KEY_ID"], creds["acme"]["AWS_SECRET_ACCESS_KEY"])
    g = s3_client(env, creds["globex"]["AWS_ACCESS_KEY_ID"], creds["globex"]["AWS_SECRET_ACCESS_KEY"])
    anon, madeup = s3_client(env, None, None), s3_client(env, "AKIAMADEUP", "made-up-secret")
    wrong = s3_client(env, env["AWS_ACCESS_KEY_ID"], "not-the-secret")
    for name, call in {
        "anonymous get": lambda: anon.get_object(Bucket=BUCKET, Key=acme_key),
        "anonymous list": lambda: anon.list_objects_v2(Bucket=BUCKET),
        "anonymous put": lambda: anon.put_object(Bucket=BUCKET, Key="mlflow/acme/x", Body=b"x"),
        "made-up keys list": lambda: madeup.list_objects_v2(Bucket=BUCKET),
        "platform key, wrong secret": lambda: wrong.get_object(Bucket=BUCKET, Key=acme_key),
        "globex reads acme's model": lambda: g.get_object(Bucket=BUCKET, Key=acme_key),
        "globex lists acme's prefix": lambda: g.list_objects_v2(Bucket=BUCKET, Prefix="mlflow/acme/"),
        "acme lists the bucket": lambda: a.list_objects_v2(Bucket=BUCKET),
        "acme reads globex's model": lambda: a.get_object(Bucket=BUCKET, Key=globex_key),
        "acme reads the DVC photos": lambda: a.list_objects_v2(Bucket=BUCKET, Prefix="dvc/"),
        "acme reads Prefect's results": lambda: a.list_objects_v2(Bucket=BUCKET, Prefix="prefect-results/"),
        "acme overwrites its own model": lambda: a.put_object(Bucket=BUCKET, Key=acme_key, Body=b"x"),
        "acme deletes its own model": lambda: a.delete_object(Bucket=BUCKET, Key=acme_key),
    }.items():
        refused[f"s3 {name}"] = s3_refused(call)
    # Prefect: no auth, a wrong one, and a flow run that tries to choose the worker's command or environment
    api, auth = env["ATELIER_PREFECT_API_URL"], tuple(env["ATELIER_PREFECT_API_AUTH_STRING"].split(":", 1))
    refused["prefect anonymous read"] = requests.post(f"{api}/deployments/filter", json={}, timeout=30).status_code == 401
    refused["prefect wrong auth"] = (
        requests.post(f"{api}/deployments/filter", json={}, auth=("atelier", "nope"), timeout=30).status_code == 401
    )
    refused["prefect anonymous flow run"] = (
        requests.post(f"{api}/deployments/{deployment}/create_flow_run", json={}, timeout=30).status_code == 401
    )
    for name, variables in {"command": {"command": override_command}, "env": {"env": {"PYTHONPATH": "/tmp/evil"}}}.items():
        answer = requests.post(
            f"{api}/deployments/{deployment}/create_flow_run",
            json={"job_variables": variables, "state": {"type": "SCHEDULED"}},
            auth=auth,
            timeout=30,
        )
        refused[f"prefect flow run overriding {name}"] = answer.status_code == 422
    return refused
