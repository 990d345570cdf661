"""Per-customer isolation in the registry.

Ownership is what only the platform can write. On the stack, MLflow runs the `atelier-auth` app
(registry/auth_app.py): customers are read-only users, so every experiment, registered model and tag
was created by the platform's own identity, and `atelier.customer` on a registered model or experiment
is the platform's word. A name that exists without that tag was not made by the platform (a squatter
on a server without that app, or a hand-made object): Atelier refuses to register into it, to serve
it for a customer, or to grant anyone access to it. Each customer's user gets READ on its own
experiment and registered models; on the stack it also gets S3 keys that read only its own artifact
prefix, so it can load its models, and nothing else.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from atelier.kernel.errors import AtelierError, NotFound
from atelier.kernel.settings import Settings
from atelier.kernel.storage import check_customer, write_secret_file

CUSTOMER_TAG = "atelier.customer"


class AccessDenied(AtelierError):
    """A customer reached for another customer's data or model, or a name the platform did not create."""


def _registered_model(client: MlflowClient, name: str):
    try:
        return client.get_registered_model(name)
    except MlflowException as exc:
        if "RESOURCE_DOES_NOT_EXIST" in str(exc) or "not found" in str(exc).lower():
            return None
        raise


def require_owner(client: MlflowClient, name: str, customer: str) -> None:
    """Refuse when `name` exists and is not the platform's model of this customer."""
    model = _registered_model(client, name)
    if model is None:
        return
    owner = model.tags.get(CUSTOMER_TAG)
    if owner is None:
        raise AccessDenied(
            f"model {name}",
            "exists but was not created by the platform (it has no atelier.customer tag)",
            "an operator should inspect and delete it (`mlflow` UI or client as the operations user); "
            "customers are never given a name someone else made",
        )
    if owner != customer:
        raise AccessDenied(
            f"model {name}",
            f"belongs to customer {owner!r}, not {customer!r}",
            "use a model of this customer; customers never share models",
        )


# the MLflow UI opens an experiment of this kind on its training runs, not on the GenAI traces view
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"


def ensure_experiment(client: MlflowClient, settings: Settings, customer: str) -> str:
    """The customer's experiment, created by the platform (with its own artifact prefix) when missing.
    Refuses an experiment of that name that the platform did not create for this customer."""
    name = settings.experiment_for(customer)
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        return client.create_experiment(
            name,
            artifact_location=settings.artifact_root_for(customer),
            tags={CUSTOMER_TAG: customer, EXPERIMENT_KIND_TAG: EXPERIMENT_KIND},
        )
    owner = experiment.tags.get(CUSTOMER_TAG)
    if owner != customer:
        raise AccessDenied(
            f"experiment {name}",
            f"was not created by the platform for customer {customer!r} (owner tag: {owner!r})",
            "an operator should inspect and delete it, then rerun; its runs would otherwise be visible to its creator",
        )
    if experiment.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:  # made before the tag existed
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return experiment.experiment_id


def auth_client(settings: Settings):
    import warnings

    with warnings.catch_warnings():  # importing MLflow's server app warns about starlette's WSGI middleware
        warnings.simplefilter("ignore")
        from mlflow.server import get_app_client

        return get_app_client("basic-auth", tracking_uri=settings.resolved_tracking_uri)


def auth_enabled(settings: Settings) -> bool:
    return settings.resolved_tracking_uri.startswith("http") and bool(settings.tracking_username)


def _user_exists(auth, username: str) -> bool:
    try:
        auth.get_user(username)
        return True
    except MlflowException:
        return False


def _grant_read(auth, customer: str, resource_type: str, resource_id: str) -> bool:
    """READ for the customer's user; a grant it already has is done, not an error (`customer add` resets).
    False where the customer has no user yet (`customer add` grants everything when it makes one)."""
    try:
        auth.grant_user_permission(customer, resource_type, resource_id, "READ")
    except MlflowException as exc:
        if "RESOURCE_DOES_NOT_EXIST" in str(exc) or exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False
        if "RESOURCE_ALREADY_EXISTS" not in str(exc):
            raise
    return True


def grant_customer_read(settings: Settings, name: str, customer: str) -> bool:
    """With basic auth on, give the customer's user READ on `name` and on its experiment (where the
    model's artifacts live), if the user exists. The platform's worker identity may do this: it
    manages every model, though it may not create or look up users."""
    if not auth_enabled(settings):
        return False
    auth = auth_client(settings)  # the worker may not look users up (only the admin may): the grant itself says
    if not _grant_read(auth, customer, "registered_model", name):
        return False
    _grant_experiment(settings, auth, customer)
    return True


def _grant_experiment(settings: Settings, auth, customer: str) -> None:
    experiment = MlflowClient(settings.resolved_tracking_uri).get_experiment_by_name(settings.experiment_for(customer))
    if experiment is not None and experiment.tags.get(CUSTOMER_TAG) == customer:
        _grant_read(auth, customer, "experiment", experiment.experiment_id)


@dataclass(frozen=True)
class CustomerAccess:
    customer: str
    password: str
    models: list[str]
    s3_access_key: str | None = None
    env: dict[str, str] = field(default_factory=dict)  # what the customer's client sets


# grant(identity name, bucket prefix, access key, secret key): make the keys a reader of that prefix only;
# False where this machine runs no S3 of its own. The command line passes the stack's (cli/stack_processes.py).
S3ReaderGrant = Callable[[str, str, str, str], bool]


def add_customer(
    settings: Settings, customer: str, password: str | None = None, grant_s3_reader: S3ReaderGrant | None = None
) -> CustomerAccess:
    """Create (or reset) the customer's MLflow user with READ on its experiment and registered models;
    the platform creates the experiment first, so nobody else can. With `grant_s3_reader` (on `atelier
    up`'s stack), also S3 keys that read the customer's artifact prefix only."""
    check_customer(customer)
    if not auth_enabled(settings):
        raise NotFound(
            "MLflow basic auth",
            f"is not in use at {settings.resolved_tracking_uri}",
            "run `atelier up` and use its stack.env, or start `mlflow server --app-name atelier-auth` and set "
            "ATELIER_TRACKING_URI, ATELIER_TRACKING_USERNAME and ATELIER_TRACKING_PASSWORD",
        )
    client = MlflowClient(settings.resolved_tracking_uri)
    ensure_experiment(client, settings, customer)
    auth = auth_client(settings)
    password = password or secrets.token_urlsafe(18)
    if _user_exists(auth, customer):
        auth.update_user_password(customer, password)
    else:
        auth.create_user(customer, password)
    models = [m.name for m in client.search_registered_models(f"tags.`{CUSTOMER_TAG}` = '{customer}'")]
    for name in models:
        _grant_read(auth, customer, "registered_model", name)
    _grant_experiment(settings, auth, customer)
    env = {
        "MLFLOW_TRACKING_URI": settings.resolved_tracking_uri,
        "MLFLOW_TRACKING_USERNAME": customer,
        "MLFLOW_TRACKING_PASSWORD": password,
    }
    access_key = _s3_reader(settings, customer, env, grant_s3_reader) if grant_s3_reader else None
    return CustomerAccess(customer, password, models, access_key, env)


def _s3_reader(settings: Settings, customer: str, env: dict[str, str], grant: S3ReaderGrant) -> str | None:
    """Read-only S3 keys on the customer's artifact prefix, where this machine runs the stack's S3."""
    root = settings.artifact_root_for(customer)
    if not root.startswith(f"s3://{settings.stack.bucket}/"):
        return None
    access_key, secret_key = f"{customer}-{secrets.token_hex(6)}", secrets.token_urlsafe(30)
    prefix = root.split("/", 3)[3]
    if not grant(f"customer-{customer}", prefix, access_key, secret_key):
        return None
    env.update(
        {
            "AWS_ACCESS_KEY_ID": access_key,
            "AWS_SECRET_ACCESS_KEY": secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
            "MLFLOW_S3_ENDPOINT_URL": settings.s3_endpoint_url or "",
        }
    )
    return access_key


def write_customer_env(path: Path, access: CustomerAccess) -> Path:
    """The customer's credentials as an env file (0600): hand it over, never print it."""
    lines = [
        f"# Atelier customer {access.customer}: MLflow READ on its own models"
        + (", S3 read on its own artifacts" if access.s3_access_key else "")
        + ". Keep it secret.",
        *(f"{k}={v}" for k, v in access.env.items()),
    ]
    return write_secret_file(path, "\n".join(lines) + "\n")
