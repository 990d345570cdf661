"""Flow runs in containers: the Docker work pool of docker/compose.yaml.

The pool's base job template names the image, the compose network and the workspace volume, and
admits no job variable (`docker_job_template`): a deployment or a flow run cannot choose the image,
the command, the mounts or the environment, as with the process pool (stack_setup.locked_job_template).
The credentials a flow needs are not in the template either (it lives in Prefect's database, readable
through its API): `AtelierDockerWorker` hands each flow-run container its own worker's platform
settings (`FLOW_ENVIRONMENT`), as the process worker's child processes inherit them."""

from __future__ import annotations

import os
import warnings

from prefect_docker.worker import DockerWorker, DockerWorkerJobConfiguration

# what a flow-run container takes from its worker's environment: the platform's client settings
# (ATELIER_*, the S3 keys) and the offline switches; Prefect's own settings come from Prefect
FLOW_ENVIRONMENT_PREFIXES = ("ATELIER_", "AWS_")
FLOW_ENVIRONMENT_NAMES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "MLFLOW_S3_ENDPOINT_URL", "TZ")
WORKSPACE_MOUNT = "/workspace"


def flow_environment(environ: dict[str, str] | None = None) -> dict[str, str]:
    environ = dict(os.environ if environ is None else environ)
    return {k: v for k, v in environ.items() if k.startswith(FLOW_ENVIRONMENT_PREFIXES) or k in FLOW_ENVIRONMENT_NAMES}


def docker_job_template(image: str, network: str, volume: str, gpus: bool = False) -> dict:
    """A Docker pool's base job template that takes nothing from a deployment or a flow run: every
    container runs `image` (never pulled: it is built on the worker's machine) on `network` with the
    workspace volume at /workspace, unprivileged, removed when it ends; with `gpus`, given every GPU."""
    devices = {"device_requests": [{"driver": "nvidia", "count": -1, "capabilities": [["gpu"]]}]} if gpus else None
    return {
        "job_configuration": {
            "image": image,
            "image_pull_policy": "Never",
            "networks": [network],
            "volumes": [f"{volume}:{WORKSPACE_MOUNT}"],
            "auto_remove": True,
            "privileged": False,
            "stream_output": True,
            "command": None,
            "container_create_kwargs": devices,
        },
        "variables": {"type": "object", "properties": {}, "additionalProperties": False},
    }


class AtelierDockerJobConfiguration(DockerWorkerJobConfiguration):
    def prepare_for_flow_run(self, flow_run, deployment=None, flow=None, work_pool=None, worker_name=None, worker_id=None):
        super().prepare_for_flow_run(flow_run, deployment, flow, work_pool, worker_name, worker_id=worker_id)
        # the worker's own settings last: nothing stored in Prefect replaces them
        self.env = {**self.env, **flow_environment()}


with warnings.catch_warnings():  # it replaces prefect-docker's worker as the "docker" type in this process, on purpose
    warnings.simplefilter("ignore", UserWarning)

    class AtelierDockerWorker(DockerWorker):
        """prefect-docker's worker, with each flow-run container given the worker's platform settings."""

        type = "docker"
        job_configuration = AtelierDockerJobConfiguration


async def run_docker_worker(pool: str, limit: int, name: str) -> None:
    async with AtelierDockerWorker(name=name, work_pool_name=pool, limit=limit, create_pool_if_not_found=False) as worker:
        await worker.start()
