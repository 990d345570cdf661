"""Pure ML: trainers, pipelines, validation suites. No Prefect, no MLflow."""
