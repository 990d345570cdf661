"""Configure a running Prefect server for Atelier (idempotent): S3 result storage as the server's
default, and the process work pool that `atelier deploy` targets. `atelier up` and `atelier
stack-init` call this; so does docker/compose.yaml's one-shot `setup` service."""

from __future__ import annotations

RESULTS_BLOCK = "atelier-results"


def configure_result_storage(url: str, endpoint_url: str | None) -> str:
    """Save a RemoteFileSystem block on `url` (s3://bucket/prefix, written through s3fs) and make it
    the server's default result storage, so every client of this server persists task results there
    without settings of its own. Credentials come from the environment, never from the block."""
    from prefect.client.orchestration import get_client
    from prefect.filesystems import RemoteFileSystem

    options = {"client_kwargs": {"endpoint_url": endpoint_url}} if endpoint_url else {}
    block_id = RemoteFileSystem(basepath=url.rstrip("/"), settings=options).save(RESULTS_BLOCK, overwrite=True)
    with get_client(sync_client=True) as client:
        client.update_server_default_result_storage(block_id)
    return f"remote-file-system/{RESULTS_BLOCK}"


def locked_job_template() -> dict:
    """A process pool's base job template that takes nothing from a deployment or a flow run.

    Prefect's default template lets whoever creates a flow run set `command` (a shell command the
    worker runs) and `env` (merged into the run's environment). Here the variables schema admits no
    property at all, so the server answers 422 to any job variable, and the job configuration names
    no variable and no `env` (Prefect merges a dict `env` with the caller's), so a value that got past
    the server would still not reach the process. The worker builds its own command."""
    return {
        "job_configuration": {"command": None, "stream_output": True, "working_dir": None},
        "variables": {"type": "object", "properties": {}, "additionalProperties": False},
    }


def ensure_work_pool(name: str, docker: dict | None = None) -> bool:
    """Create the work pool with its locked job template when missing (and lock an existing one that
    is not); True when created. A process pool by default; with `docker` (image, network, volume) a
    Docker pool whose flow runs each get a container of that image (flows/docker_worker.py)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectNotFound

    from atelier.kernel.errors import ConfigError

    kind = "docker" if docker else "process"
    if docker:
        from atelier.flows.docker_worker import docker_job_template

        template = docker_job_template(docker["image"], docker["network"], docker["volume"], bool(docker.get("gpus")))
    else:
        template = locked_job_template()
    with get_client(sync_client=True) as client:
        try:
            pool = client.read_work_pool(name)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=name, type=kind, base_job_template=template))
            return True
        if pool.type != kind:
            raise ConfigError(
                f"work pool {name!r}", f"is a {pool.type} pool, not a {kind} pool", "name another pool (ATELIER_WORK_POOL) or delete it"
            )
        if pool.base_job_template != template:
            client.update_work_pool(name, WorkPoolUpdate(base_job_template=template))
        return False


def work_pool_type(name: str) -> str | None:
    """The pool's type (process, docker) on the configured Prefect server; None when it does not exist."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            return client.read_work_pool(name).type
        except ObjectNotFound:
            return None
