"""Atelier: workflow-orchestrated MLOps for vision models.

The one import root of the installed distribution. Its parts live in the repository's top-level
folders and install under this name (pyproject.toml's package-dir):

    atelier.cli       cli/        the command line (the top floor: nothing imports it)
    atelier.flows     flows/      Prefect flows: orchestration only
    atelier.tasks     tasks/      Prefect tasks: thin, versioned adapters
    atelier.registry  registry/   MLflow registry, lineage, promotion, the signed ledger
    atelier.models    models/     pure ML: no Prefect, no MLflow
    atelier.kernel    kernel/     settings, storage, hashing, errors: imports no other part

docs/design.md is the map; checks/layers.py keeps the imports pointing down.
"""

__version__ = "0.1.0"
