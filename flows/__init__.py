"""Prefect flows: orchestration only. Parameters in, tasks chained, no ML code."""
