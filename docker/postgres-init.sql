-- The stack's databases (what `atelier up` creates when missing); runs once, on an empty volume.
CREATE DATABASE atelier_prefect;
CREATE DATABASE atelier_mlflow;
CREATE DATABASE atelier_mlflow_auth;
CREATE DATABASE atelier_ledger;
