"""The `atelier` command line. It sits above every layer: it reads settings, then calls flows."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from atelier.cli import help_style
from atelier.cli import judge as cli_judge
from atelier.cli import ocr as cli_ocr
from atelier.cli import registry as cli_registry
from atelier.cli import serve as cli_serve
from atelier.cli import stack as cli_stack
from atelier.cli import trainer as cli_trainer
from atelier.cli.common import cli_settings, expand_photos, friendly, prefect_ready, quiet_third_parties
from atelier.kernel.errors import ConfigError, GateRefused

help_style.apply()
app = typer.Typer(
    help="Atelier: per-customer DreamBooth fine-tuning on Prefect, DVC, Great Expectations and MLflow.",
    no_args_is_help=True,
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        from atelier.kernel.gitinfo import code_version

        v = code_version()
        state = {True: ", with local changes", False: "", None: ""}[v.dirty]
        typer.echo(f"atelier {v.package_version} (source {v.git_sha[:12]}{state})")
        raise typer.Exit(0)


@app.callback()
def _main(
    show_version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="print Atelier's version and source revision, then exit"
    ),
) -> None:
    quiet_third_parties()


subject_app = typer.Typer(help="Manage customers' subject photo sets (DVC-tracked).", no_args_is_help=True)
app.add_typer(subject_app, name="subject")


@app.command()
@friendly
def init() -> None:
    """Create the workspace: git + DVC repo with a local remote, MLflow and Prefect stores, tiny base model."""
    settings = cli_settings()
    from atelier.kernel.workspace import init_workspace
    from atelier.models.dreambooth.tiny import write_tiny_model

    done = init_workspace(settings)
    if settings.base_model is None and not (settings.tiny_model_dir / "model_index.json").is_file():
        typer.echo("building the embedded tiny Stable Diffusion model (random weights, fixed seed)...")
        write_tiny_model(settings.tiny_model_dir)
        done.append(f"tiny base model in {settings.tiny_model_dir}")
    typer.echo(f"workspace {settings.workspace}: " + (", ".join(done) if done else "already initialised"))


@app.command()
@friendly
def info(as_json: bool = typer.Option(False, "--json", help="print JSON")) -> None:
    """Print where everything lives: workspace, MLflow tracking URI and artifacts, Prefect, DVC remote."""
    settings = cli_settings()
    described = settings.describe()
    described.update(_embedded_auth(settings))
    if as_json:
        typer.echo(json.dumps(described, indent=2))
        return
    width = max(map(len, described))
    for key, value in described.items():
        typer.echo(f"{key:<{width}}  {value}")


def _embedded_auth(settings) -> dict[str, str]:
    """On the embedded default the workspace's own servers ask for credentials too (the background Prefect
    server, the MLflow UI of `atelier ui`): say which and where, not "none"."""
    import os

    from atelier.cli.local_servers import local_dir
    from atelier.cli.stack_config import MLFLOW_ADMIN

    secrets = local_dir(settings) / "secrets.json"
    found = {}
    if not settings.tracking_username and not settings.resolved_tracking_uri.startswith("http"):
        found["MLflow user"] = (
            f"{MLFLOW_ADMIN} for the MLflow UI of `atelier ui` (basic auth; password: mlflow_admin_password in {secrets}); "
            "commands read the workspace's store directly"
        )
    if not settings.prefect_api_url and os.environ.get("ATELIER_PREFECT_SERVER", "background") != "temporary":
        found["Prefect API auth"] = f"the background server asks for an auth string: prefect_auth_string in {secrets}"
    return found


@subject_app.command("add")
@friendly
def subject_add(
    customer: str = typer.Argument(..., help="customer id (slug: a-z, 0-9, '-', '_')"),
    subject: str = typer.Argument(..., help="subject id (slug)"),
    photos: list[Path] = typer.Argument(
        ..., help="3-20 photos of the subject: files, or a folder holding them", exists=True, readable=True
    ),
    class_noun: str = typer.Option(..., "--class", help="what the subject is, e.g. dog, toy, person"),
    replace: bool = typer.Option(False, "--replace", help="replace an existing photo set (history is kept)"),
) -> None:
    """Validate photos, copy them into data/subjects/CUSTOMER/SUBJECT/, track with DVC and commit."""
    import tempfile

    from atelier.kernel.errors import DataValidationError
    from atelier.kernel.storage import check_customer, check_slug
    from atelier.kernel.workspace import add_subject, check_class_noun, require_workspace
    from atelier.models.photos import is_hidden
    from atelier.models.validation.subject_suite import validate_subject_images

    settings = cli_settings()
    require_workspace(settings)
    check_customer(customer)
    check_slug(subject, "subject")
    check_class_noun(class_noun)
    photos = expand_photos(photos)
    hidden = [p.name for p in photos if is_hidden(p)]
    if hidden:
        raise DataValidationError(
            f"photos for {customer}/{subject}",
            [(name, "file_name", "starts with '.', which marks a hidden file, never a photo: rename it") for name in hidden],
        )
    with tempfile.TemporaryDirectory() as tmp:
        report = validate_subject_images(
            Path(tmp), settings.images, None, files=[p.resolve() for p in photos], label=f"{customer}/{subject}"
        )
    if not report.success:
        raise DataValidationError(f"photos for {customer}/{subject}", report.failures)
    rev = add_subject(
        settings,
        customer,
        subject,
        class_noun,
        [p.resolve() for p in photos],
        replace=replace,
        on_wait=lambda: typer.echo("another command is changing the workspace; waiting for it to finish", err=True),
    )
    typer.echo(f"added {len(photos)} photos as {customer}/{subject} (class {class_noun}) at data revision {rev[:12]}")


@subject_app.command("list")
@friendly
def subject_list() -> None:
    """List the workspace's subjects as CUSTOMER/SUBJECT."""
    from atelier.kernel.workspace import list_subjects

    for name in list_subjects(cli_settings()):
        typer.echo(name)


@subject_app.command("remove")
@friendly
def subject_remove(
    customer: str = typer.Argument(..., help="customer id"),
    subject: str = typer.Argument(..., help="subject id"),
) -> None:
    """Take a subject's photos out of the workspace in one commit. They stay in git and DVC history, so
    the lineage of every version trained on them still reaches them; registered models are untouched."""
    from atelier.kernel.workspace import remove_subject, require_workspace

    settings = cli_settings()
    require_workspace(settings)
    rev = remove_subject(
        settings,
        customer,
        subject,
        on_wait=lambda: typer.echo("another command is changing the workspace; waiting for it to finish", err=True),
    )
    typer.echo(f"removed {customer}/{subject} at revision {rev[:12]} (its photos stay in history: `atelier subject add` brings it back)")


def _run_finetune(customer: str, subject: str, base_model: Optional[Path], config: Optional[Path], rev: Optional[str]) -> dict:
    prefect_ready(cli_settings())
    from atelier.flows.subject_finetune import subject_finetune

    return subject_finetune(customer, subject, str(base_model) if base_model else None, str(config) if config else None, rev)


def _print_result(result: dict) -> None:
    gate = result["gate"]
    if result.get("noop"):
        typer.echo(f"\n{result['note']}; gate {'passed' if gate['passed'] else 'refused'} for it")
        return
    typer.echo(
        f"\nregistered {result['model']} version {result['version']} (MLflow run {result['run_id']}), "
        f"data revision {result['data_rev'][:12]}, {result['steps']} steps, final loss {result['final_loss']:.4f} "
        "(mean of the last 10% of steps; MLflow's train/loss has every step)"
    )
    if gate["passed"]:
        typer.secho(f"gate passed: models:/{result['model']}@champion is version {result['version']}", fg=typer.colors.GREEN)
    else:
        typer.secho(
            f"gate refused version {result['version']}: {'; '.join(gate['reasons'])}. "
            f"Champion unchanged ({gate.get('champion') or 'none'}).",
            fg=typer.colors.YELLOW,
        )


def _write_record(path: Path, result: dict) -> None:
    """What the fine-tune made, for DVC to track as the finetune stage's output."""
    from atelier.kernel.storage import write_json_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(
        path,
        {k: result.get(k) for k in ("model", "version", "run_id", "data_rev", "training_key", "steps", "flow_run_id")}
        | {"gate_passed": result["gate"]["passed"], "model_uri": f"models:/{result['model']}/{result['version']}"},
    )


@app.command()
@friendly
def finetune(
    customer: str = typer.Argument(..., help="customer id"),
    subject: str = typer.Argument(..., help="subject id"),
    base_model: Optional[Path] = typer.Option(
        None, "--base-model", help="diffusers SD 1.x/2.x directory (default: settings.base_model or the embedded tiny model)"
    ),
    config: Optional[Path] = typer.Option(None, "--config", help="training YAML (see configs/dreambooth/sd15.yaml)"),
    rev: Optional[str] = typer.Option(None, "--rev", help="workspace git revision of the photos (default: newest)"),
    refresh: bool = typer.Option(False, "--refresh", help="ignore cached task results and recompute"),
    record: Optional[Path] = typer.Option(
        None, "--record", help="write the registered version's record (JSON) here: dvc.yaml's finetune stage output"
    ),
) -> None:
    """Run the subject-finetune flow: pull -> validate -> class priors -> train -> samples -> register -> gate."""
    import os

    settings = cli_settings()
    # Pre-flight: bad input and a server that is down are refused in a second, before a Prefect run starts.
    from atelier.kernel.outages import preflight
    from atelier.kernel.storage import check_customer, check_slug
    from atelier.kernel.workspace import require_workspace, subject_revision
    from atelier.models.dreambooth.base import check_lora_targets, check_sd_directory
    from atelier.models.dreambooth.config import load_train_config

    preflight(settings)
    require_workspace(settings)
    check_customer(customer)
    check_slug(subject, "subject")
    cfg = load_train_config(config) if config is not None else None
    base = check_sd_directory(base_model.resolve() if base_model else settings.resolved_base_model)
    if cfg is not None and cfg.lora is not None:
        check_lora_targets(base, cfg.lora.unet_target_modules, cfg.lora.text_encoder_target_modules)
    subject_revision(settings, customer, subject)
    if rev is not None:
        from atelier.kernel.workspace import check_revision

        check_revision(settings, customer, subject, rev)  # a typo is exit 2 here, not a failed flow run
    if refresh:
        os.environ["PREFECT_TASKS_REFRESH_CACHE"] = "true"
    result = _run_finetune(customer, subject, base_model, config, rev)
    _print_result(result)
    if record is not None:
        _write_record(record, result)
    if not result["gate"]["passed"]:
        raise GateRefused(result["model"], "the promotion gate refused the new version", "see the reasons above")


@app.command()
@friendly
def priors(
    class_prompt: str = typer.Option(..., help="prompt for the class, e.g. 'a photo of dog'"),
    out: Path = typer.Option(..., help="output folder (replaced atomically)"),
    count: int = typer.Option(100),
    resolution: int = typer.Option(512),
    seed: int = typer.Option(0),
    sampler: str = typer.Option("dpmsolver++"),
    steps: int = typer.Option(25),
    guidance: float = typer.Option(7.5),
    batch_size: int = typer.Option(
        8,
        "--batch-size",
        min=1,
        help="images a batch: the fine-tuning config's class_sampling.batch_size (it can round a pixel differently)",
    ),
    base_model: Optional[Path] = typer.Option(None, "--base-model"),
) -> None:
    """Generate class-prior images into OUT (the dvc.yaml class_priors stage calls this). The images
    come from the fine-tuning flow's content-addressed cache when it holds the same set (same
    function, same seeds), so reproducing the stage after a fine-tune costs a copy; made here, they
    match the flow's when the batch size is the flow's."""
    import shutil

    from atelier.cli.progress import Progress
    from atelier.kernel.storage import atomic_dir, output_folder
    from atelier.models.dreambooth.base import check_sd_directory, model_hash
    from atelier.models.dreambooth.priors import PriorSpec, ensure_class_priors

    settings = cli_settings()
    PriorSpec("", class_prompt, count, resolution, seed, sampler, steps, guidance).check()  # exit 2 before loading anything
    output_folder(out)
    base = check_sd_directory(base_model.resolve() if base_model else settings.resolved_base_model)
    spec = PriorSpec(model_hash(base), class_prompt, count, resolution, seed, sampler, steps, guidance)
    made = ensure_class_priors(settings.priors_cache, spec, base, batch_size, on_progress=Progress("class images", "images"))
    with atomic_dir(Path(out), replace=True) as tmp:
        for item in sorted(p for p in made.path.iterdir() if p.is_file()):  # the images and their manifest
            shutil.copy2(item, tmp / item.name)
    typer.echo(f"{count} class images for '{class_prompt}' in {out} (key {spec.key}, {'from the cache' if made.reused else 'generated'})")


@app.command()
@friendly
def generate(
    model: str = typer.Argument(..., help="NAME@ALIAS or NAME/VERSION, e.g. dreambooth-acme-robot@champion"),
    prompt: list[str] = typer.Option(..., "--prompt", help="prompt (repeatable)"),
    out: Path = typer.Option(Path("generated"), help="folder for the PNGs"),
    seed: int = typer.Option(0, help="seed of the first image; the next prompts use seed+1, seed+2, ..."),
    steps: Optional[int] = typer.Option(None, min=1, max=200, help="sampler steps (default: the model's)"),
    guidance: Optional[float] = typer.Option(
        None, "--guidance", min=0.0, max=50.0, help="classifier-free guidance scale (default: the model's)"
    ),
    size: Optional[int] = typer.Option(
        None, min=32, max=2048, help="image width and height in pixels, a multiple of 8 (default: the model's)"
    ),
    negative_prompt: Optional[str] = typer.Option(None, "--negative-prompt", help="what the images should not show"),
    customer: Optional[str] = typer.Option(None, "--customer", help="refuse unless the model belongs to this customer"),
) -> None:
    """Generate images with a registered model through MLflow's pyfunc interface. Each PNG carries its
    prompt, seed, settings and model version in its metadata (`identify -verbose`, PIL's `.text`)."""
    import io

    import mlflow
    import pandas as pd
    from mlflow import MlflowClient
    from PIL.PngImagePlugin import PngInfo

    from atelier.kernel.errors import ConfigError
    from atelier.kernel.outages import preflight
    from atelier.kernel.storage import output_folder, write_bytes_atomic
    from atelier.models.dreambooth.config import SEED_MAX
    from atelier.registry.lineage import resolve
    from atelier.registry.pyfunc import decode_png

    if size is not None and size % 8:
        raise ConfigError(f"--size {size}", "is not a multiple of 8", f"use {size - size % 8} or {size - size % 8 + 8}")
    if not 0 <= seed <= SEED_MAX - len(prompt):
        raise ConfigError(f"--seed {seed}", f"is out of range (0 to {SEED_MAX - len(prompt)})", "give a smaller seed")
    output_folder(out)
    settings = cli_settings()
    preflight(settings)
    mlflow.set_tracking_uri(settings.resolved_tracking_uri)
    client = MlflowClient(settings.resolved_tracking_uri)
    mv = resolve(client, model)  # an unknown name, alias or version: exit 2 naming what exists
    uri = f"models:/{mv.name}/{mv.version}"  # pinned: the alias cannot move under this command
    if customer:
        from atelier.registry.isolation import require_owner

        require_owner(client, mv.name, customer)
    typer.echo(f"loading {uri} (checking its files against the ledger) ...", err=True)
    from atelier.registry.serving import load_pyfunc

    loaded = load_pyfunc(settings, mv.name, str(mv.version))
    rows = {"prompt": prompt, "seed": [seed + i for i in range(len(prompt))]}
    for column, value in (
        ("steps", steps),
        ("guidance_scale", guidance),
        ("height", size),
        ("width", size),
        ("negative_prompt", negative_prompt),
    ):
        if value is not None:
            rows[column] = [value] * len(prompt)
    typer.echo(f"generating {len(prompt)} image(s) ...", err=True)
    frame = loaded.predict(pd.DataFrame(rows))
    out.mkdir(parents=True, exist_ok=True)
    for i, (text, row_prompt, row_seed) in enumerate(zip(frame["image_png_base64"], frame["prompt"], frame["seed"])):
        meta = PngInfo()
        for key, value in {
            "prompt": row_prompt,
            "seed": row_seed,
            "model": mv.name,
            "model_version": mv.version,
            "steps": steps,
            "guidance_scale": guidance,
            "negative_prompt": negative_prompt,
            "software": "Atelier",
        }.items():
            if value is not None:
                meta.add_text(key, str(value))
        buf = io.BytesIO()
        decode_png(text).save(buf, format="PNG", pnginfo=meta)
        write_bytes_atomic(out / f"{mv.name}-v{mv.version}-seed{row_seed}-{i:03d}.png", buf.getvalue())
    typer.echo(f"{len(frame)} image(s) from {uri} in {out}")


@app.command()
@friendly
def demo() -> None:
    """The embedded default end to end: init, demo photos for customer 'acme', fine-tune, register,
    promote; then OCR: render and track document sets, quantize, evaluate, register, gate."""
    import tempfile
    import time

    from atelier.cli.demo_data import DEMO_CLASS, DEMO_CUSTOMER, DEMO_SUBJECT, write_demo_photos
    from atelier.kernel.workspace import list_subjects

    t0 = time.perf_counter()
    init()
    settings = cli_settings()
    if f"{DEMO_CUSTOMER}/{DEMO_SUBJECT}" not in list_subjects(settings):
        with tempfile.TemporaryDirectory() as tmp:
            photos = write_demo_photos(Path(tmp), count=5)
            subject_add(DEMO_CUSTOMER, DEMO_SUBJECT, photos, DEMO_CLASS, False)
    result = _run_finetune(DEMO_CUSTOMER, DEMO_SUBJECT, None, None, None)
    _print_result(result)
    from atelier.kernel.stages import commit_stage, reproduce_stage

    # the workspace's DVC pipeline holds what the flow used and made, so `dvc status` is clean after
    # the demo and `dvc dag` draws photos and class priors -> finetune
    reproduce_stage(settings, "class_priors", "class priors of the demo subject (dvc repro class_priors)")
    stage = f"{DEMO_CUSTOMER}.{DEMO_SUBJECT}"
    _write_record(settings.workspace / "models" / f"{stage}.json", result)
    try:
        commit_stage(
            settings, f"finetune@{stage}", f"fine-tune of {DEMO_CUSTOMER}/{DEMO_SUBJECT}: version {result['version']} (dvc commit)"
        )
        typer.echo("class priors reproduced and the fine-tune recorded in the workspace's DVC pipeline (`dvc dag` draws it)")
    except ConfigError as exc:  # a workspace made before the finetune stage: the demo goes on
        typer.echo(f"class priors reproduced; the fine-tune is not in this workspace's DVC pipeline: {exc}")
    missing = cli_ocr.ocr_dependencies_missing()
    if missing:
        typer.echo(f"\nOCR part skipped: {missing} is missing (make ocr-system-deps installs it)")
    else:
        from atelier.flows.ocr_calibrate import ocr_calibrate

        typer.echo("\nOCR: calibrating and quantizing the recogniser (ocr-calibrate flow)")
        cli_ocr.report_calibration(ocr_calibrate())
    typer.echo(f"\ndemo finished in {time.perf_counter() - t0:.0f} s. Next:")
    env = f"ATELIER_WORKSPACE={settings.workspace}"
    for line in cli_stack.ui_urls(settings):  # what `atelier ui` prints
        typer.echo(f"  {line}")
    typer.echo(f"  generate:    {env} {sys.prefix}/bin/atelier generate {result['model']}@champion --prompt 'a sks toy on the beach'")
    typer.echo(
        f"  read:        {env} {sys.prefix}/bin/atelier ocr {settings.workspace}/data/documents/synthetic/evaluation --out ocr.jsonl"
    )
    typer.echo(f"  where:       {env} {sys.prefix}/bin/atelier info")


cli_registry.install(app)
cli_serve.install(app)
cli_stack.install(app)
cli_trainer.install(app)
app.command("ocr-calibrate")(cli_ocr.ocr_calibrate_cmd)
app.command("ocr")(cli_ocr.ocr_cmd)
app.command("documents-render")(cli_ocr.documents_render_cmd)
app.command("judge")(cli_judge.judge_cmd)


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
