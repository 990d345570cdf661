#!/usr/bin/env python3
"""Write docker/.env for docker/compose.yaml from docker/env.template: every secret generated, the images'
tags and the Docker socket's group filled in, mode 0600. Refuses to replace an existing file (its secrets
are the stack's: the databases and S3 were made with them).

    usage: python3 docker/new_env.py [--out docker/.env] [--image atelier:TAG] [--postgres-image atelier-postgres:TAG] [--docker-gid N]
Standard library only: it runs on a host that has nothing of Atelier's installed."""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
GENERATED = {
    "S3_ACCESS_KEY": lambda: "atelier" + secrets.token_hex(8),
    "PREFECT_AUTH_STRING": lambda: "atelier:" + secrets.token_urlsafe(24),
}


def fill(template: str, given: dict[str, str]) -> str:
    out = []
    for line in template.splitlines():
        name, eq, value = line.partition("=")
        if not eq or line.startswith("#"):
            out.append(line)
            continue
        if name in given:
            value = given[name]
        elif not value:
            value = GENERATED.get(name, lambda: secrets.token_urlsafe(30))()
        out.append(f"{name}={value}")
    return "\n".join(out) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / ".env")
    parser.add_argument("--image", default="atelier:latest")
    parser.add_argument("--postgres-image", default="atelier-postgres:latest")
    parser.add_argument("--project", default="atelier", help="COMPOSE_PROJECT_NAME")
    parser.add_argument("--ports", default="", help="PREFECT,MLFLOW,S3 ports on loopback (default 4200,5000,9000)")
    parser.add_argument("--docker-gid", default=None, help="the Docker socket's group (default: read off /var/run/docker.sock)")
    args = parser.parse_args()
    if args.out.exists():
        print(f"{args.out} exists: it holds the stack's credentials; remove it only with the stack's volumes", file=sys.stderr)
        return 2
    gid = args.docker_gid
    if gid is None:
        try:
            gid = str(os.stat("/var/run/docker.sock").st_gid)
        except FileNotFoundError:
            print(
                "no /var/run/docker.sock: start the Docker engine first (the workers need its group), or give --docker-gid", file=sys.stderr
            )
            return 3
    given = {
        "COMPOSE_PROJECT_NAME": args.project,
        "ATELIER_IMAGE": args.image,
        "ATELIER_POSTGRES_IMAGE": args.postgres_image,
        "ATELIER_TRAINER_IMAGE": args.image.replace("atelier:", "atelier-trainer:", 1),
        "DOCKER_GID": gid,
    }
    if args.ports:
        given.update(zip(("PREFECT_PORT", "MLFLOW_PORT", "S3_PORT"), args.ports.split(","), strict=True))
    text = fill((HERE / "env.template").read_text(), given)
    fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    print(f"wrote {args.out} (0600): keep it; the stack's data is readable only with these credentials")
    return 0


if __name__ == "__main__":
    sys.exit(main())
