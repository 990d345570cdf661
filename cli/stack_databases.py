"""The stack's PostgreSQL databases: `<prefix>_prefect`, `_mlflow`, `_mlflow_auth` and `_ledger`, created
by `atelier up` where missing and dropped by `atelier down --drop-databases`."""

from __future__ import annotations

from atelier.cli.stack_config import database_names
from atelier.kernel.errors import ServiceUnavailable
from atelier.kernel.settings import Settings


def _maintenance_connection(settings: Settings):
    """An autocommit connection to the server's `postgres` database (CREATE/DROP DATABASE)."""
    import psycopg2
    from sqlalchemy.engine import make_url

    url = make_url(settings.stack.postgres_url)
    try:
        conn = psycopg2.connect(
            host=url.host or "127.0.0.1",
            port=url.port or 5432,
            user=url.username or "postgres",
            password=url.password,
            dbname="postgres",
            connect_timeout=5,
        )
    except psycopg2.OperationalError as exc:
        raise ServiceUnavailable(
            f"PostgreSQL at {url.host}:{url.port or 5432}",
            f"did not answer ({' '.join(str(exc).split())})",
            "start it (pg_ctlcluster, or `docker compose up postgres`) or set ATELIER_STACK__POSTGRES_URL",
        ) from None
    conn.autocommit = True
    return conn


def _create_or_drop(settings: Settings, create: bool) -> list[str]:
    conn = _maintenance_connection(settings)
    changed = []
    try:
        with conn.cursor() as cur:
            for name in database_names(settings).values():  # names match ^[a-z][a-z0-9_]*$ (settings)
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                if (cur.fetchone() is None) == create:
                    cur.execute(f'CREATE DATABASE "{name}"' if create else f'DROP DATABASE "{name}" WITH (FORCE)')
                    changed.append(name)
    finally:
        conn.close()
    return changed


def ensure_databases(settings: Settings) -> list[str]:
    """Create the stack's databases where missing; returns the ones created."""
    return _create_or_drop(settings, create=True)


def drop_databases(settings: Settings) -> list[str]:
    """Drop the stack's databases (their sessions are ended first); returns the ones that existed."""
    return _create_or_drop(settings, create=False)
