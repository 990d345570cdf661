"""DreamBooth tasks: base-model fingerprint, class priors, training, samples."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from prefect import task

from atelier.kernel.gitinfo import SOURCE_ROOT
from atelier.kernel.hashing import value_hash
from atelier.kernel.storage import write_json_atomic
from atelier.models.dreambooth.base import check_sd_directory, model_hash
from atelier.models.dreambooth.config import TrainConfig, load_train_config
from atelier.models.dreambooth.health import assess, sample_grid
from atelier.models.dreambooth.priors import PriorSpec, ensure_class_priors
from atelier.tasks.common import BY_INPUTS, UNCACHED, logger, progress_logger, retry_transient, settings
from atelier.tasks.data import Snapshot
from atelier.tasks.results import result_type

TINY_CONFIG = SOURCE_ROOT / "configs" / "dreambooth" / "tiny.yaml"
VERSIONS = {"fingerprint-base-model": "1", "class-priors": "1", "train-dreambooth": "1", "sample-images": "1"}


@result_type
@dataclass(frozen=True)
class Priors:
    """The class-prior images of one (base model, class prompt, sampling), in the content-keyed cache."""

    path: str
    key: str
    count: int
    sha256: str


@result_type
@dataclass(frozen=True)
class Training:
    """A finished training: the saved pipeline and its loss curve."""

    key: str  # the training key: what the weights depend on
    output_dir: str  # the diffusers pipeline folder
    losses: list[float]
    steps: int
    seconds: float
    resumed_from: int | None  # the checkpoint step an interrupted run resumed from
    reused: bool  # an earlier run's finished output, not trained again
    run_id: str | None  # the MLflow run that took the metrics live (None: registration logs them)


@result_type
@dataclass(frozen=True)
class Samples:
    """The gate's evidence: sample images, their grid, and the health checks on them and the losses."""

    dir: str
    files: list[str]
    grid: str
    health: dict[str, bool | int | float]  # models.dreambooth.health.Health, as the gate reads it


def resolve_config(config_path: str | None, embedded_base: bool) -> dict:
    """--config wins; else the tiny profile for the embedded model, the paper's defaults for real ones."""
    path = Path(config_path) if config_path else (TINY_CONFIG if embedded_base else None)
    return load_train_config(path).model_dump()


@task(name="fingerprint-base-model", version=VERSIONS["fingerprint-base-model"], cache_policy=BY_INPUTS)
def fingerprint_base_model(path: str, stat_signature: str) -> str:
    """Content hash of the base model; cached by (path, sizes, mtimes) so big models hash once."""
    check_sd_directory(Path(path))
    digest = model_hash(Path(path))
    logger().info("base model %s: sha256 %s", path, digest[:16])
    return digest


@task(name="class-priors", version=VERSIONS["class-priors"], cache_policy=UNCACHED, retries=1, retry_condition_fn=retry_transient)
def class_priors(base_model: str, base_hash: str, class_prompt: str, config: dict) -> Priors:
    cfg = TrainConfig(**config)
    spec = PriorSpec(
        base_hash,
        class_prompt,
        cfg.num_class_images,
        cfg.resolution,
        cfg.class_prior_seed,
        cfg.class_sampling.sampler,
        cfg.class_sampling.steps,
        cfg.class_sampling.guidance_scale,
    )
    report = progress_logger(f"class priors '{class_prompt}'", spec.count, "images")
    report(0)  # the bar and its clock start now, while the base model loads, not after
    keep_compiles()
    prior = ensure_class_priors(
        settings().priors_cache,
        spec,
        Path(base_model),
        cfg.class_sampling.batch_size,
        on_progress=lambda done, total: report(done),
        compile_mode=cfg.class_sampling.compile_mode,
    )
    if prior.reused:
        report(spec.count)  # the progress artifact says done, not 0%
    logger().info("class priors %s: %s (%d images)", prior.key, "reused from cache" if prior.reused else "generated", prior.count)
    return Priors(str(prior.path), prior.key, prior.count, prior.sha256)


def keep_compiles() -> None:
    """torch.compile's and Triton's caches in the workspace (see train_setup.keep_compiles): every GPU task of a
    job compiles Triton kernels once per workspace (the captured step's optimizer and norms, the sampler's norms)
    or a whole graph (a compile_mode), and no later job should pay for it again."""
    from atelier.models.dreambooth.train_setup import keep_compiles as keep

    keep(settings().compile_cache)


def training_key(base_hash: str, snapshot: Snapshot, prior_key: str | None, config: dict, processes: int = 1) -> str:
    """What the trained weights depend on. N processes train with N times the batch, so N is part of
    the key (left out at 1, which keeps the keys of versions registered before it existed)."""
    inputs = {
        "base": base_hash,
        "files": snapshot.files,
        "class": snapshot.class_noun,
        "priors": prior_key,
        "config": config,
        "task": VERSIONS["train-dreambooth"],
    }
    if processes > 1:
        inputs["processes"] = processes
    return value_hash(inputs)[:24]


@task(name="train-dreambooth", version=VERSIONS["train-dreambooth"], cache_policy=BY_INPUTS)
def train_dreambooth(
    base_model: str, base_hash: str, snapshot: Snapshot, priors: Priors | None, config: dict, processes: int = 1
) -> Training:
    """Train (or resume an interrupted run of) the subject model; the output folder is keyed by inputs.
    With `processes` > 1 the task starts `accelerate launch` with that many processes: one per GPU
    (DDP), or CPU processes with gloo where there is no GPU."""
    from atelier.models.dreambooth.launch import train_launched
    from atelier.models.dreambooth.trainer import TrainInputs, train

    cfg = TrainConfig(**config)
    keep_compiles()
    key = training_key(base_hash, snapshot, priors.key if priors else None, config, processes)
    work = settings().runs_dir / snapshot.customer / key
    inputs = TrainInputs(
        Path(base_model),
        Path(snapshot.path),
        snapshot.class_noun,
        work,
        work / "pipeline",
        Path(priors.path) if priors else None,
        class_latents=settings().priors_cache / "latents" / f"{base_hash[:16]}-{priors.key}" if priors else None,
    )
    done_file, run_file = work / "training.json", work / "mlflow-run.json"
    if done_file.is_file() and (inputs.output_dir / "model_index.json").is_file():
        record = json.loads(done_file.read_text())
        logger().info("training %s already finished (%d steps); reusing it", key, record["steps"])
        live_record = json.loads(run_file.read_text()) if run_file.is_file() else {}
        run_id = live_record.get("run_id") if live_record.get("complete") else None  # a curve with gaps is logged again
        return Training(
            key,
            str(inputs.output_dir),
            record["losses"],
            record["steps"],
            record.get("seconds", 0.0),
            record.get("resumed_from"),
            reused=True,
            run_id=run_id,
        )
    live = _open_training_run(snapshot, priors, config, key)
    if live is None:  # MLflow did not answer: train anyway, registration logs the whole record (and retries the server)
        live = _Unreported()
    try:
        if processes > 1:
            logger().info("training with %d processes: accelerate launch -m models.dreambooth.launch", processes)
            result = train_launched(
                cfg, inputs, processes, on_line=lambda line: logger().info(line) if line.startswith("trained") else None
            )
        else:
            report = progress_logger("DreamBooth training", cfg.max_train_steps, "steps")
            latest = {"text": ""}

            def on_step(step: int, total: int) -> None:  # each step as it ends: the bar and its ETA move with the work
                report(step, latest["text"])

            def on_loss(step: int, total: int, loss: float, lr: float) -> None:  # losses arrive in bursts
                latest["text"] = f"loss {loss:.4f} lr {lr:.2e} (step {step})"
                live.log(step, loss, lr)

            sock = settings().trainer_socket
            if sock is not None:
                from atelier.models.dreambooth.service import train_resident

                logger().info("training in the resident trainer at %s", sock)
                result = train_resident(
                    sock,
                    cfg,
                    inputs,
                    on_progress=on_loss,
                    on_step=on_step,
                    on_start=lambda e: logger().info(
                        "resident trainer %s (%.1f s to start)",
                        "kept its session" if e.get("session_reused") else "loaded the base model",
                        e.get("load_seconds", 0),
                    ),
                )
            else:
                result = train(cfg, inputs, on_progress=on_loss, on_step=on_step)
    except BaseException:
        live.fail()
        raise
    live.close(result.losses)
    write_json_atomic(run_file, {"run_id": live.run_id, "complete": live.usable is not None})
    if live.broken:  # (never for _Unreported: it said so when training started)
        logger().warning("the MLflow run stopped taking live metrics (%s); registration logs the whole loss curve", live.broken)
    if result.resumed_from:
        logger().info("resumed from checkpoint at step %d", result.resumed_from)
    logger().info("trained %d steps in %.1f s (%.2f steps/s)", result.step, result.seconds, result.step / max(result.seconds, 1e-9))
    return Training(
        key, str(result.output_dir), result.losses, result.step, result.seconds, result.resumed_from, reused=False, run_id=live.usable
    )


def _open_training_run(snapshot: Snapshot, priors: Priors | None, config: dict, key: str):
    """The MLflow run this training reports to live (loss, learning rate, system metrics), tagged so
    that registration resumes it and a later attempt at the same training abandons it if it died."""
    from atelier.registry.dreambooth import dataset_inputs
    from atelier.registry.training_run import TrainingRun

    customer, subject = snapshot.customer, snapshot.subject
    facts = {
        "data.rev": snapshot.rev,
        "data.dvc_md5": snapshot.dvc_md5,
        "data.files": snapshot.files,
        "class_priors.key": priors.key if priors else "none",
        "class_priors.sha256": priors.sha256 if priors else "none",
    }
    tags = {
        "atelier.customer": customer,
        "atelier.subject": subject,
        "atelier.training.key": key,
        "atelier.data.rev": snapshot.rev,
        "atelier.class_priors.key": facts["class_priors.key"],
    }
    s = settings()
    try:
        run = TrainingRun.open(s, customer, subject, tags, config, dataset_inputs(s, customer, subject, facts))
    except Exception as exc:  # noqa: BLE001 (only an unreachable server is let through; anything else is raised)
        from atelier.registry.tracking import unreachable

        if not unreachable(exc):
            raise
        logger().warning(
            "MLflow at %s did not answer: training goes on without live metrics; registration logs them", s.resolved_tracking_uri
        )
        return None
    logger().info("MLflow run %s takes the training's metrics live", run.run_id)
    return run


class _Unreported:
    """Training without a live MLflow run (the server was away when it started)."""

    run_id = usable = broken = None

    def log(self, step: int, loss: float, lr: float | None = None) -> None:
        pass

    def close(self, losses: list[float] | None = None) -> None:
        pass

    def fail(self) -> None:
        pass


@task(name="sample-images", version=VERSIONS["sample-images"], cache_policy=BY_INPUTS)
def sample_images(pipeline_dir: str, class_noun: str, config: dict, losses: list[float]) -> Samples:
    """Generate the gate's evidence: samples_per_prompt images for each sample prompt, and a grid."""
    from atelier.kernel.storage import atomic_dir
    from atelier.models.dreambooth.sampling import GenerationRequest, generate, load_pipeline

    cfg = TrainConfig(**config)
    keep_compiles()
    pipe = load_pipeline(Path(pipeline_dir), cfg.sampling.sampler, compile_mode=cfg.sampling.compile_mode)
    requests = [
        GenerationRequest(
            cfg.fill(p, class_noun), cfg.seed + j, cfg.sampling.steps, cfg.sampling.guidance_scale, cfg.resolution, cfg.resolution
        )
        for p in cfg.sample_prompts
        for j in range(cfg.samples_per_prompt)
    ]
    images = generate(pipe, requests, cfg.sampling.batch_size)
    out = Path(pipeline_dir).parent / "samples"
    with atomic_dir(out, replace=True) as tmp:
        paths = []
        for i, img in enumerate(images):
            img.save(tmp / f"{i:03d}.png")
            paths.append(f"{i:03d}.png")
        sample_grid(images, cfg.samples_per_prompt).save(tmp / "grid.png")
        (tmp / "prompts.json").write_text(
            json.dumps([{"file": p, "prompt": r.prompt, "seed": r.seed} for p, r in zip(paths, requests)], indent=1)
        )
    health = assess(losses, images, settings().gate.min_sample_std)
    logger().info("%d samples written to %s", len(images), out)
    return Samples(str(out), [str(out / p) for p in paths], str(out / "grid.png"), health.as_dict())
