#!/bin/bash
# One PostgreSQL server, one role and one database each for radloop, Prefect, MLflow and
# Orthanc. The postgres image runs this once, on an empty data directory, as POSTGRES_USER.
# Passwords come from the environment and reach SQL as psql variables, never spliced into it.
# The same script is inlined in deploy/kubernetes/postgres.yaml (tests/test_deploy.py).
set -euo pipefail

create() {
  psql -v ON_ERROR_STOP=1 --no-psqlrc --username "${POSTGRES_USER:-postgres}" \
    --dbname postgres --set=name="$1" --set=password="$2" <<'SQL'
CREATE ROLE :"name" LOGIN PASSWORD :'password';
CREATE DATABASE :"name" OWNER :"name";
REVOKE ALL ON DATABASE :"name" FROM PUBLIC;
SQL
}

create radloop "${PG_RADLOOP_PASSWORD:?set PG_RADLOOP_PASSWORD}"
create prefect "${PG_PREFECT_PASSWORD:?set PG_PREFECT_PASSWORD}"
create mlflow "${PG_MLFLOW_PASSWORD:?set PG_MLFLOW_PASSWORD}"
create orthanc "${PG_ORTHANC_PASSWORD:?set PG_ORTHANC_PASSWORD}"
