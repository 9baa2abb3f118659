-- Run once by the postgres image on an empty data volume (/docker-entrypoint-initdb.d), as $POSTGRES_USER.
-- MLflow and Prefect each get their OWN database: both keep their schema version in Alembic's
-- `alembic_version` table, so sharing one database would make each see the other's migrations.
CREATE DATABASE mlflow;
CREATE DATABASE prefect;

-- Prefect's migrations create pg_trgm themselves; doing it here lets the server run as a non-superuser later.
\connect prefect
CREATE EXTENSION IF NOT EXISTS pg_trgm;
