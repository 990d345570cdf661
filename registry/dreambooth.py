"""Log a fine-tuned pipeline to MLflow, register it with its lineage, and alias it `candidate`."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from PIL import Image

from atelier.kernel import interrupts
from atelier.kernel.hashing import tree_hash
from atelier.kernel.settings import Settings
from atelier.registry.client import (
    LINEAGE_HASH_TAG,
    Registered,
    client_for,
    code_paths,
    find_version,
    lineage_tags,
    model_missing,
    quiet_logger,
)
from atelier.registry.gate import CANDIDATE
from atelier.registry.isolation import (
    ensure_experiment,
    grant_customer_read,
    require_owner,
)
from atelier.registry.ledger import open_ledger
from atelier.registry.model_files import DAMAGED_TAG, MANIFEST_TAG, manifest_of, record_manifest, stored_model_files
from atelier.registry.pyfunc import SIGNATURE
from atelier.registry.tracking import abandon_stale_runs
from atelier.registry.training_run import LOSS, run_name, source_tags

PIP_REQUIREMENTS = [
    "torch==2.13.0",
    "diffusers==0.42.1",
    "transformers==5.23.0",
    "accelerate",
    "safetensors",
    "pandas",
    "pillow",
    "mlflow==3.17.2",
]
MODEL_CODE = Path(__file__).parent / "pyfunc_code" / "dreambooth_model.py"


def model_name(customer: str, subject: str) -> str:
    return f"dreambooth-{customer}-{subject}"


def configure(settings: Settings, customer: str) -> MlflowClient:
    """Point MLflow at the tracking URI and use the customer's experiment (own artifact prefix)."""
    client = client_for(settings)
    mlflow.set_experiment(experiment_id=ensure_experiment(client, settings, customer))
    return client


def register_dreambooth(
    settings: Settings,
    customer: str,
    subject: str,
    pipeline_dir: Path,
    lineage: dict,
    params: dict,
    losses: list[float],
    metrics: dict[str, float],
    samples: list[Path],
    grid: Path,
    sampler: str,
    steps: int,
    guidance: float,
    training_run_id: str | None = None,
) -> Registered:
    """One MLflow run with params, loss curve, samples and the pyfunc model; then a registered version.
    `training_run_id` is the run training reported to live (`registry.training_run`): it is resumed
    and ended here, so the run's duration, metrics and datasets are the training's own.

    Registration comes last: if anything before it fails, no version exists.
    """
    from atelier.registry.promotion import (
        record_candidate,  # promotion -> judge -> this module
    )

    client = configure(settings, customer)
    name = model_name(customer, subject)
    require_owner(client, name, customer)
    lineage = {**lineage, "model.sha256": tree_hash(Path(pipeline_dir))}
    tags = lineage_tags(lineage)
    existing = find_version(client, name, "atelier.training.key", lineage.get("training.key"))
    if existing is not None:  # the same training outputs are registered once, however often the flow reruns...
        lost = missing_artifacts(client, existing, Path(pipeline_dir))
        if not lost:
            if not existing.aliases and CANDIDATE not in client.get_registered_model(name).aliases:  # an attempt died before aliasing it
                record_candidate(
                    client,
                    open_ledger(settings),
                    name,
                    str(existing.version),
                    actor=settings.actor,
                    flow_run_id=lineage.get("prefect.flow_run_id"),
                    manifest_sha256=existing.tags.get(MANIFEST_TAG),
                )
            return Registered(name, str(existing.version), existing.run_id, existing.source, reused=True)
        # ...unless its stored files are gone or damaged: never reuse (or re-promote) a version that cannot load;
        # register the same outputs again as a new version, which goes through the gate like any other
        client.set_model_version_tag(
            name,
            existing.version,
            DAMAGED_TAG,
            f"{len(lost)} stored file(s) missing or changed (first: {lost[0]}); re-registered from the training outputs as a newer version",
        )
        if CANDIDATE in (existing.aliases or []):
            client.delete_registered_model_alias(name, CANDIDATE)
    live = _live_run(client, training_run_id, subject, tags.get("atelier.training.key"))
    if tags.get("atelier.training.key"):  # one subject's attempts only: another subject may share the key
        abandon_stale_runs(
            client,
            mlflow.get_experiment_by_name(settings.experiment_for(customer)).experiment_id,
            {"atelier.subject": subject, "atelier.training.key": tags["atelier.training.key"]},
            keep=live,
        )
    with (
        mlflow.start_run(run_id=live) if live else mlflow.start_run(run_name=run_name(customer, subject), tags=source_tags(settings)) as run
    ):
        mlflow.set_tags(tags)
        if not live:  # training did not report live (it was reused from an earlier attempt): its record goes in now
            mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
            client.log_inputs(run.info.run_id, datasets=dataset_inputs(settings, customer, subject, lineage))
            client.log_batch(
                run.info.run_id, metrics=[mlflow.entities.Metric(LOSS, loss, 0, step) for step, loss in enumerate(losses, start=1)]
            )
        mlflow.log_metrics(metrics)
        mlflow.log_dict(lineage, "lineage.json")
        for path in samples:
            mlflow.log_artifact(str(path), "samples")
        mlflow.log_image(Image.open(grid), "sample_grid.png")
        _log_validation_images(Path(pipeline_dir).parent / "validation")
        mlflow.log_figure(_loss_figure(losses), "loss_curve.png")
        with warnings.catch_warnings(), quiet_logger("mlflow.pyfunc"):
            # The model is code (registry/pyfunc_code/), not a pickle: loading it runs that file and nothing
            # the artifact store could have rewritten unnoticed (registry/model_files.py checks every file
            # first). The input example is one image at the model's own settings: MLflow generates it once
            # while logging, so a version that cannot serve its own example says so here rather than in production.
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(MODEL_CODE),
                signature=SIGNATURE,
                pip_requirements=PIP_REQUIREMENTS,
                model_config={
                    "sampler": sampler,
                    "default_steps": steps,
                    "default_guidance": guidance,
                    "pipeline_files": manifest_of(Path(pipeline_dir)),
                },
                artifacts={"pipeline": str(pipeline_dir)},
                input_example=input_example(params, lineage, steps, guidance),
                code_paths=code_paths(),
            )
        _, manifest_sha = record_manifest(client, run.info.run_id, info.model_uri)
    if model_missing(client, name):
        client.create_registered_model(
            name,
            tags={"atelier.customer": customer, "atelier.subject": subject, "atelier.kind": "dreambooth"},
            description=model_description(customer, subject, lineage),
        )
        grant_customer_read(settings, name, customer)
    interrupts.check()  # nothing is registered after a Ctrl-C, even one a finalizer swallowed
    card = version_card(name, lineage, metrics)
    version = client.create_model_version(
        name, info.model_uri, run_id=run.info.run_id, tags={**tags, MANIFEST_TAG: manifest_sha}, model_id=info.model_id, description=card
    )
    # the run's description in the UI: the same card, pointing at the version it became
    client.set_tag(
        run.info.run_id,
        "mlflow.note.content",
        card.replace("- gate: not yet run", f"- registered as `{name}` version {version.version} (its card has the gate's result)").replace(
            f"{name}/VERSION", f"{name}/{version.version}"
        ),
    )
    record_candidate(
        client,
        open_ledger(settings),
        name,
        str(version.version),
        actor=settings.actor,
        flow_run_id=lineage.get("prefect.flow_run_id"),
        manifest_sha256=manifest_sha,
    )
    return Registered(name, str(version.version), run.info.run_id, info.model_uri)


def input_example(params: dict, lineage: dict, steps: int, guidance: float):
    """What a caller sends (the UI's and `mlflow models serve`'s example): one prompt with the subject's
    identifier, a seed and the model's own generation settings (its training resolution; where the run
    recorded none, 0: the pipeline's own size)."""
    import pandas as pd

    size = int(params.get("resolution", 0))
    prompt = f"a {params.get('identifier', 'sks')} {lineage.get('data.class_noun', 'subject')} on the beach"
    return pd.DataFrame(
        {"prompt": [prompt], "seed": [0], "steps": [int(steps)], "guidance_scale": [float(guidance)], "height": [size], "width": [size]}
    )


def _live_run(client: MlflowClient, run_id: str | None, subject: str, training_key: str | None) -> str | None:
    """`run_id` when it is the still-open run of this very training (same subject and training key)
    and no registration has begun in it, else None: a run that ended, one of other inputs, or one
    that a registration attempt died in (half its artifacts logged) is never written into; that one
    is abandoned and the registration starts a run of its own."""
    if not run_id:
        return None
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException:
        return None
    tags = run.data.tags
    same = tags.get("atelier.subject") == subject and tags.get("atelier.training.key") == training_key
    return run_id if same and run.info.status == "RUNNING" and LINEAGE_HASH_TAG not in tags else None


def _log_validation_images(folder: Path) -> None:
    """The samples taken during training, as MLflow images with their step (the run's Images view
    steps through them), instead of files left on the training machine."""
    for step_dir in sorted(folder.glob("step-*")) if folder.is_dir() else []:
        step = int(step_dir.name.split("-")[1])
        for i, png in enumerate(sorted(step_dir.glob("*.png"))):
            with Image.open(png) as img:
                mlflow.log_image(img.convert("RGB"), key=f"validation_{i}", step=step)


def dataset_inputs(settings: Settings, customer: str, subject: str, lineage: dict) -> list:
    """The run's training data as MLflow dataset inputs (the UI's Datasets column): the subject's photos
    at their DVC revision and the class priors, each with its content hash as the digest."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    def local(path: Path):
        with warnings.catch_warnings():  # a file:// URI fits two registered kinds of source; both are the local one
            warnings.simplefilter("ignore")
            return resolve_dataset_source(path.as_uri())

    def entry(dataset: MetaDataset, context: str, tags: dict[str, str]) -> DatasetInput:
        return DatasetInput(
            dataset=dataset._to_mlflow_entity(),
            tags=[InputTag(k, v) for k, v in tags.items()] + [InputTag(MLFLOW_DATASET_CONTEXT, context)],
        )

    rev = str(lineage.get("data.rev", ""))
    photos = MetaDataset(
        local(settings.subject_dir(customer, subject)),
        name=f"photos {customer}/{subject}@{rev[:12]}",
        digest=str(lineage.get("data.dvc_md5", ""))[:36] or None,
    )
    inputs = [
        entry(
            photos,
            "training",
            {"dvc_md5": str(lineage.get("data.dvc_md5", "")), "data_rev": rev, "files": str(len(lineage.get("data.files") or {}))},
        )
    ]
    key = lineage.get("class_priors.key")
    if key and key != "none":
        priors = MetaDataset(
            local(settings.priors_cache / key), name=f"class priors {key}", digest=str(lineage.get("class_priors.sha256", ""))[:36] or None
        )
        inputs.append(entry(priors, "prior preservation", {"sha256": str(lineage.get("class_priors.sha256", ""))}))
    return inputs


def model_description(customer: str, subject: str, lineage: dict) -> str:
    """The registered model's description in the MLflow UI: what it is and how to use it."""
    name = model_name(customer, subject)
    return (
        f"DreamBooth subject model of **{customer}/{subject}**, fine-tuned by Atelier from "
        f"`{lineage.get('base_model.id', '?')}`.\n\n"
        f"- `champion` is the version in production, `candidate` the newest that awaits or failed the gate; "
        f"every move is a row in Atelier's ledger (`atelier ledger show {name}`).\n"
        f'- Generate: `atelier generate {name}@champion --prompt "a {(lineage.get("params") or {}).get("identifier", "sks")} '
        f'{lineage.get("data.class_noun", "subject")} on the beach"`, '
        f"or serve it over HTTP: `atelier serve {name}@champion` and POST a `prompt` column to `/invocations` "
        "(with MLflow alone: set `MLFLOW_TRACKING_URI` and your credentials, then "
        f"`mlflow models serve -m models:/{name}@champion --env-manager local`).\n"
        f"- Lineage of a version: `atelier lineage {name}/VERSION`, or its run's `lineage.json`."
    )


def version_card(name: str, lineage: dict, metrics: dict[str, float]) -> str:
    """A version's model card (its description in the MLflow UI): data, base model, training; the gate's
    outcome and the judge's scores are added by `record_gate_on_card`."""
    params = lineage.get("params") or {}
    files = lineage.get("data.files") or {}
    lines = [
        f"**{lineage.get('customer')}/{lineage.get('subject')}**: {len(files)} photos at data revision "
        f"`{str(lineage.get('data.rev', '?'))[:12]}` (DVC md5 `{str(lineage.get('data.dvc_md5', '?'))[:12]}`)",
        f"- base model: `{lineage.get('base_model.id')}` (sha256 `{str(lineage.get('base_model.sha256', ''))[:16]}`)",
        f"- training: {params.get('max_train_steps', '?')} steps, lr {params.get('learning_rate', '?')}, prior preservation "
        f"{'on' if params.get('with_prior_preservation') else 'off'} (class priors `{lineage.get('class_priors.key', 'none')}`), "
        f"final loss {metrics.get('validation/health_final_loss', float('nan')):.4f} (mean of the last 10% of steps)",
        f"- code: `{str(lineage.get('code.git_sha', '?'))[:12]}`, Prefect flow run `{lineage.get('prefect.flow_run_id')}`",
    ]
    lines.append("- gate: not yet run")  # record_gate_on_card fills it in
    lines.append(f"- generate: `atelier generate {name}/VERSION --prompt ...`")
    return "\n".join(lines)


def record_gate_on_card(client: MlflowClient, name: str, version: str, gate: dict) -> None:
    """Put the gate's outcome (and the judge's scores, when a judge ran) on the version's model card."""
    import re

    mv = client.get_model_version(name, version)
    line = f"- gate: {'**passed**' if gate.get('passed') else '**REFUSED**: ' + '; '.join(gate.get('reasons') or [])}"
    judged = mv.tags.get("atelier.eval.judge")
    if judged:
        summary = json.loads(judged)
        scores = {k: v for k, v in summary.items() if "score" in k and isinstance(v, (int, float)) and not isinstance(v, bool)}
        calibrated = "" if summary.get("calibrated", True) else " (uncalibrated judge: recorded, not enforced)"
        line += (
            "\n- judge: "
            + (", ".join(f"{k} {v:.3g}" for k, v in scores.items()) or "no scores")
            + f" over {summary.get('images', '?')} images{calibrated}"
        )
    text = (mv.description or "").replace(f"{name}/VERSION", f"{name}/{version}")
    gate_line = re.compile(r"^- gate: .*$", flags=re.M)
    text = gate_line.sub(lambda _: line, text, count=1) if gate_line.search(text) else f"{text}\n{line}".strip()
    client.update_model_version(name, version, description=text)


def missing_artifacts(client: MlflowClient, mv, pipeline_dir: Path) -> list[str]:
    """What of the model `mv` should have in the artifact store is not there, or has another size: its
    MLmodel, its wrapper's code, and every file of the pipeline it was registered from."""
    stored = stored_model_files(client, mv)
    expected: dict[str, int | None] = {"MLmodel": None, MODEL_CODE.name: None}
    for path in sorted(Path(pipeline_dir).rglob("*")):
        if path.is_file():
            expected[f"artifacts/pipeline/{path.relative_to(pipeline_dir).as_posix()}"] = path.stat().st_size
    return [p for p, size in expected.items() if p not in stored or (size is not None and stored[p] not in (None, size))]


def _loss_figure(losses: list[float]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot(range(1, len(losses) + 1), losses, linewidth=1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (instance + prior)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    plt.close(fig)
    return fig
