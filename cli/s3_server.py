"""`atelier s3-server`: the S3 service of docker/compose.yaml. SeaweedFS configured exactly as `atelier up`
configures its own (cli/stack_config.py: the platform's identity, signed requests only, JWT keys and
mutual TLS on the master, volume and filer), with its keys from the container's environment and its
data under ATELIER_WORKSPACE (the service's volume). It runs `weed` as its child and watches the readers
file (`stack.s3_readers_file`) that `atelier customer add` writes in another container: on a change it
rewrites the identities and makes SeaweedFS reload them (SIGHUP), so a new customer's keys work within
seconds and no one has to restart S3."""

from __future__ import annotations

import json
import os
import signal
import subprocess

from atelier.cli.common import cli_settings, friendly
from atelier.kernel.errors import ConfigError, ServiceUnavailable

# secrets.json's names for the S3 server's keys, and the variables compose gives it
SECRET_VARIABLES = {
    "s3_access_key": "AWS_ACCESS_KEY_ID",
    "s3_secret_key": "AWS_SECRET_ACCESS_KEY",
    "s3_jwt_write": "ATELIER_S3_JWT_WRITE",
    "s3_jwt_read": "ATELIER_S3_JWT_READ",
    "s3_jwt_filer_write": "ATELIER_S3_JWT_FILER_WRITE",
    "s3_jwt_filer_read": "ATELIER_S3_JWT_FILER_READ",
}
BIND = "0.0.0.0"  # noqa: S104 (a container's own interfaces; compose publishes the S3 port on loopback only)
WATCH_SECONDS = 1.0


def _mtime(path) -> float | None:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return None


@friendly
def s3_server_cmd() -> None:
    """Run SeaweedFS's S3 server in this container (docker/compose.yaml's s3 service), reloading the
    customers' readers when `atelier customer add` writes them. Stop with SIGTERM."""
    from atelier.cli.stack_config import prepare_s3, read_s3_readers, s3_dir, seaweed_argv, secrets_file, write_s3_config
    from atelier.kernel.storage import write_secret_file

    settings = cli_settings()
    missing = [var for var in SECRET_VARIABLES.values() if not os.environ.get(var)]
    if missing:
        raise ConfigError(", ".join(missing), "are not set", "put them in docker/.env (`make compose-env` writes one)")
    readers = settings.stack.s3_readers_file
    if readers is None:
        raise ConfigError(
            "ATELIER_STACK__S3_READERS_FILE", "is not set", "name the readers file on the volume `atelier customer add` writes"
        )
    secrets_file(settings).parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # private, as `atelier up` keeps it
    # the keys are compose's (.env): kept where prepare_s3 reads them, rewritten each start so a rotated key takes
    write_secret_file(secrets_file(settings), json.dumps({name: os.environ[var] for name, var in SECRET_VARIABLES.items()}, indent=1))
    seen = _mtime(readers)
    prepare_s3(settings, read_s3_readers(readers))
    for var in SECRET_VARIABLES.values():  # weed needs none of them: its configuration files hold what it uses
        os.environ.pop(var, None)
    proc = subprocess.Popen(seaweed_argv(settings, bind=BIND), cwd=s3_dir(settings), umask=0o077)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: proc.send_signal(signum))
    while True:
        try:
            code = proc.wait(timeout=WATCH_SECONDS)
        except subprocess.TimeoutExpired:
            now = _mtime(readers)
            if now != seen:
                seen = now
                customers = read_s3_readers(readers)
                write_s3_config(settings, customers)
                proc.send_signal(signal.SIGHUP)
                print(f"s3-server: reloaded {len(customers)} customer reader(s)", flush=True)
            continue
        if code not in (0, -signal.SIGTERM, -signal.SIGINT):
            raise ServiceUnavailable("SeaweedFS (weed server)", f"exited with code {code}", "read the lines above")
        return
