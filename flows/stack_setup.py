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


def ensure_work_pool(name: str) -> bool:
    """Create the process work pool when missing; True when created."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
            return False
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=name, type="process",
                                                   base_job_template=ProcessWorker.get_default_base_job_template()))
            return True
