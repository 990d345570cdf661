"""MLflow registry: pyfunc packaging, lineage tags, promotion policy. No Prefect."""
