#!/bin/bash
# First start (an empty volume): initdb with the superuser's password, then one role and one database per
# part of the platform, each role owning only its database and no other role able to connect to it.
# Every start: listen on the container's network with scram-sha-256 passwords (no trust, no peer over TCP).
# The passwords come from the environment (docker/.env); they never reach a command line.
set -euo pipefail
PARTS=(prefect mlflow mlflow_auth ledger)
PREFIX=${ATELIER_DB_PREFIX:-atelier}
: "${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD in docker/.env}"
for part in "${PARTS[@]}"; do
  var="ATELIER_DB_PASSWORD_${part^^}"
  [ -n "${!var:-}" ] || { echo "set $var in docker/.env" >&2; exit 2; }
  [[ "${!var}" =~ ^[A-Za-z0-9_.~-]+$ ]] || { echo "$var: use letters, digits and -_.~ only (make compose-env makes one)" >&2; exit 2; }
done
[[ "$PREFIX" =~ ^[a-z][a-z0-9_]*$ ]] || { echo "ATELIER_DB_PREFIX: lower-case letters, digits and _ only" >&2; exit 2; }

if [ ! -s "$PGDATA/PG_VERSION" ]; then
  umask 077
  pwfile=$(mktemp)
  printf '%s' "$POSTGRES_PASSWORD" > "$pwfile"
  initdb -D "$PGDATA" --username=postgres --pwfile="$pwfile" --auth-local=peer --auth-host=scram-sha-256 \
    --encoding=UTF8 --locale=C.UTF-8 >/dev/null
  rm -f "$pwfile"
  printf 'host all all 0.0.0.0/0 scram-sha-256\nhost all all ::/0 scram-sha-256\n' >> "$PGDATA/pg_hba.conf"
  pg_ctl -D "$PGDATA" -o "-c listen_addresses=''" -w start >/dev/null
  {
    echo "REVOKE CONNECT ON DATABASE postgres FROM PUBLIC;"
    for part in "${PARTS[@]}"; do
      var="ATELIER_DB_PASSWORD_${part^^}"
      name="${PREFIX}_${part}"
      echo "CREATE ROLE $name LOGIN PASSWORD '${!var}';"
      echo "CREATE DATABASE $name OWNER $name;"
      echo "REVOKE ALL ON DATABASE $name FROM PUBLIC;"
    done
  } | psql -v ON_ERROR_STOP=1 --quiet --username=postgres --dbname=postgres >/dev/null
  pg_ctl -D "$PGDATA" -m fast -w stop >/dev/null
  echo "postgres: initialised $PGDATA with roles and databases ${PARTS[*]/#/${PREFIX}_}"
fi
for part in "${PARTS[@]}"; do unset "ATELIER_DB_PASSWORD_${part^^}"; done
unset POSTGRES_PASSWORD
exec postgres -D "$PGDATA" -c listen_addresses='*' -c password_encryption=scram-sha-256
