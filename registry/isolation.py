"""Per-customer isolation in the registry: every registered model names its customer, and with
MLflow's basic-auth server each customer's user may READ its own registered models and nothing else.
"""

from __future__ import annotations

import secrets

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from atelier.errors import AtelierError, NotFound
from atelier.settings import Settings
from atelier.storage import check_slug

CUSTOMER_TAG = "atelier.customer"


class AccessDenied(AtelierError):
    """A customer reached for another customer's data or model."""


def owner_of(client: MlflowClient, name: str) -> str | None:
    try:
        return client.get_registered_model(name).tags.get(CUSTOMER_TAG)
    except MlflowException:
        return None


def require_owner(client: MlflowClient, name: str, customer: str) -> None:
    """Refuse when `name` exists and belongs to another customer."""
    owner = owner_of(client, name)
    if owner is not None and owner != customer:
        raise AccessDenied(f"model {name}", f"belongs to customer {owner!r}, not {customer!r}",
                           "use a model of this customer; customers never share models")


def auth_client(settings: Settings):
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


def grant_customer_read(settings: Settings, name: str, customer: str) -> bool:
    """With basic auth on, give the customer's user READ on `name` and on its experiment (where the
    model's artifacts live), if the user exists."""
    if not auth_enabled(settings):
        return False
    auth = auth_client(settings)
    if not _user_exists(auth, customer):
        return False
    auth.grant_user_permission(customer, "registered_model", name, "READ")
    _grant_experiment(settings, auth, customer)
    return True


def _grant_experiment(settings: Settings, auth, customer: str) -> None:
    experiment = MlflowClient(settings.resolved_tracking_uri).get_experiment_by_name(settings.experiment_for(customer))
    if experiment is not None:
        auth.grant_user_permission(customer, "experiment", experiment.experiment_id, "READ")


def add_customer(settings: Settings, customer: str, password: str | None = None) -> tuple[str, list[str]]:
    """Create the customer's MLflow user and give it READ on its registered models. Returns (password, models)."""
    check_slug(customer, "customer")
    if not auth_enabled(settings):
        raise NotFound("MLflow basic auth", f"is not in use at {settings.resolved_tracking_uri}",
                       "start `mlflow server --app-name basic-auth` and set ATELIER_TRACKING_URI, ATELIER_TRACKING_USERNAME and ATELIER_TRACKING_PASSWORD")
    auth = auth_client(settings)
    password = password or secrets.token_urlsafe(18)
    if _user_exists(auth, customer):
        auth.update_user_password(customer, password)
    else:
        auth.create_user(customer, password)
    client = MlflowClient(settings.resolved_tracking_uri)
    models = [m.name for m in client.search_registered_models(f"tags.`{CUSTOMER_TAG}` = '{customer}'")]
    for name in models:
        auth.grant_user_permission(customer, "registered_model", name, "READ")
    _grant_experiment(settings, auth, customer)
    return password, models
