"""One settings object: environment (`ATELIER_*`) over a YAML file over defaults, validated at start.

The YAML file is `$ATELIER_CONFIG` when set, else `atelier.yaml` in the current directory when it
exists. Nested values use `__` in the environment: `ATELIER_GATE__MIN_SAMPLE_STD=0.05`.
Every path and URI the platform uses comes from here.
"""

from __future__ import annotations

import math
import os
from functools import cached_property
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, YamlConfigSettingsSource

from atelier.kernel.errors import ConfigError, schema_problems


class ImageRules(BaseModel):
    """What a subject image set must satisfy (checked by the Great Expectations suite)."""

    model_config = ConfigDict(extra="forbid")
    min_count: int = Field(3, ge=1)
    max_count: int = Field(20, ge=1)
    min_side: int = Field(256, ge=8, description="shortest side in pixels, after EXIF orientation")
    formats: list[str] = ["JPEG", "PNG", "WEBP"]
    near_duplicate_bits: int = Field(4, ge=0, le=64, description="dHash Hamming distance at or under which two images are near duplicates")


class OcrGateRules(BaseModel):
    """Gate of the OCR calibration flow: what the served recogniser may lose against its fp32 form, and
    how well the routed engine must read with no language given; and when int8 is worth serving."""

    model_config = ConfigDict(extra="forbid")
    max_cer_increase: float = Field(0.005, ge=0, description="overall CER, served variant minus fp32 (0.005 = half a point)")
    max_cer_increase_per_language: float = Field(0.01, ge=0, description="on each language the recogniser serves")
    max_cer: float = Field(0.05, ge=0, le=1, description="overall CER of the routed engine with no language given, on the evaluation split")
    # not a gate: int8 reads slightly differently, so it is served only where it pays (models/ocr/variants.py);
    # it measured 1.75x the fp32 rewrite on an AMD EPYC (AVX-512 VNNI) and 0.9x on a Xeon with AMX
    min_speedup: float = Field(
        1.1,
        ge=0,
        description="int8 is served when its lines/s are at least this times the fastest "
        "fp32 variant's on the machine (the flow measures; another CPU re-measures at load time)",
    )


class JudgeGateRules(BaseModel):
    """What the VLM judge's scores must reach. Enforced only for a calibrated judge (an HTTP model, or
    local weights marked calibrated); a judge that is configured but down always fails the gate."""

    model_config = ConfigDict(extra="forbid")
    min_prompt_score: float = Field(0.5, ge=0, le=1, description="mean P(yes) that a sample shows its prompt")
    min_fidelity: float = Field(0.5, ge=0, le=1, description="mean P(yes) that a sample shows the reference subject")
    max_prior_leak: float = Field(0.5, ge=0, le=1, description="mean P(yes) that a class image shows the subject (language drift)")
    max_failure_rate: float = Field(0.2, ge=0, le=1, description="share of judgments that failed (unparseable, refused)")


class JudgeSettings(BaseModel):
    """The VLM judge: `embedded` (the default: a tiny random GLM-4.1V built in the workspace, its scores
    marked uncalibrated and never enforced), `http` (OpenAI-compatible: Z.ai's GLM-4.5V, vLLM,
    SGLang), `local` (a transformers weights directory) or `none`."""

    model_config = ConfigDict(extra="forbid")
    backend: str = Field("embedded", pattern="^(none|embedded|http|local)$")
    base_url: str = "https://api.z.ai/api/paas/v4"
    model: str = "glm-4.5v"
    api_key: SecretStr | None = Field(None, description="sent as a bearer token; never logged or stored in MLflow")
    timeout: float = Field(60.0, gt=0)
    max_retries: int = Field(4, ge=0)
    concurrency: int = Field(4, ge=1)
    local_weights: Path | None = None
    local_calibrated: bool = Field(False, description="true only for real weights; a tiny random instance judges nothing")
    usd_per_million_input: float = Field(0.0, ge=0)
    usd_per_million_output: float = Field(0.0, ge=0)
    captions: bool = True
    video: str = Field(
        "video",
        pattern="^(video|frames)$",
        description="how the http judge is sent a clip: `video` (the file as a video_url part, as GLM-4.5V and vLLM take it) "
        "or `frames` (the sampled frames as images, each after its timestamp)",
    )
    clip_weights: Path | None = Field(None, description="CLIPModel directory: adds CLIP-I and CLIP-T to the judge's report")
    dino_weights: Path | None = Field(None, description="DINO ViT directory: adds the DINO subject similarity")


# how long Prefect waits for the temporary server it starts for a command (its own default: 20 s)
TEMPORARY_PREFECT_TIMEOUT = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"


class StackSettings(BaseModel):
    """What `atelier up` starts on this machine: the production topology for development, without Docker.
    Databases `<database_prefix>_prefect`, `_mlflow`, `_mlflow_auth` and `_ledger` are created on the
    PostgreSQL server when missing; S3 is SeaweedFS (`weed server -s3`, data on disk under the servers' state
    folder: `.atelier/stack/s3/`, or /var/lib/atelier/stacks/*/s3/ when run as root) at `s3_port`, its internal master, volume and filer servers on the 7 ports from
    `s3_internal_port` on; everything lands in one bucket under mlflow/, dvc/ and prefect-results/."""

    model_config = ConfigDict(extra="forbid")
    host: str = "127.0.0.1"
    postgres_url: str = Field("postgresql://postgres@127.0.0.1:5432", description="PostgreSQL server (no database part)")
    database_prefix: str = Field("atelier", pattern=r"^[a-z][a-z0-9_]{0,40}$")
    prefect_port: int = Field(4200, ge=1, le=65535)
    mlflow_port: int = Field(5000, ge=1, le=65535)
    s3_port: int = Field(9000, ge=1, le=65535, description="SeaweedFS's S3 gateway (9000 in docker/compose.yaml too)")
    s3_internal_port: int = Field(
        19333,
        ge=1,
        le=65528,
        description="first of 7 ports for SeaweedFS's master, volume and filer servers and their gRPC (bound to `host` only)",
    )
    bucket: str = Field("atelier", pattern=r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
    work_pool: str = "atelier"
    worker_limit: int = Field(2, ge=1, description="flow runs at once in the stack's worker")
    start_timeout: float = Field(
        180.0,
        gt=0,
        description="seconds each server (the stack's, the background ones, a temporary Prefect server) may take to answer; first starts migrate the databases",
    )
    s3_readers_file: Path | None = Field(
        None,
        description="where customers' S3 readers are written for an S3 server that runs elsewhere and watches the file "
        "(docker/compose.yaml's `atelier s3-server`); unset: `atelier up`'s own server's identities",
    )
    service_user: str = Field(
        "atelier",
        pattern=r"^([a-z_][a-z0-9_-]{0,31})?$",
        description="the system user the servers run as when `atelier up` runs as root (created if missing; "
        "state then under /var/lib/atelier/stacks/); '' runs them as root",
    )


class ChallengerRules(BaseModel):
    """A challenger replaces the champion only when it is at least as good on what both were measured by."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = True
    max_final_loss_increase: float = Field(
        0.10,
        ge=0,
        description="the challenger's final loss may exceed the champion's by "
        "this share (0.10: 10%); training loss is noisy, a worse model is not",
    )
    max_judge_drop: float = Field(
        0.05,
        ge=0,
        le=1,
        description="prompt score and fidelity may be this much under the champion's "
        "(both judged by a calibrated judge; an uncalibrated judge's scores are not compared)",
    )


class GateRules(BaseModel):
    """Promotion gate: a candidate becomes champion only when every rule passes."""

    model_config = ConfigDict(extra="forbid")
    require_finite_loss: bool = True
    max_final_loss: float = Field(10.0, gt=0, description="mean loss of the last 10% of steps")
    min_sample_std: float = Field(0.02, ge=0, description="pixel std (0-1 scale) under which a sample counts as blank")
    min_distinct_samples: float = Field(0.5, ge=0, le=1, description="share of samples that must differ from each other")
    ocr: OcrGateRules = OcrGateRules()
    judge: JudgeGateRules = JudgeGateRules()
    challenger: ChallengerRules = ChallengerRules()


def _config_file() -> Path | None:
    explicit = os.environ.get("ATELIER_CONFIG")
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise ConfigError(f"ATELIER_CONFIG={explicit}", "names no file", "point it at an existing YAML file or unset it")
        return path
    local = Path("atelier.yaml")
    return local if local.is_file() else None


def _default_actor() -> str:
    import getpass
    import socket

    try:
        user = getpass.getuser()  # $LOGNAME, $USER, ..., then the password database for the uid
    except (KeyError, OSError):
        user = f"uid-{os.getuid()}"
    return f"{user}@{socket.gethostname()}"


def _default_workspace() -> Path:
    here = Path.cwd()
    return here if (here / ".atelier" / "workspace.json").is_file() else here / "workspace"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ATELIER_", env_nested_delimiter="__", extra="forbid")

    workspace: Path = Field(
        default_factory=lambda: _default_workspace(),
        description="git + DVC repo holding data/ and the local stores; default: the current directory when it is a workspace, else ./workspace",
    )
    tracking_uri: str | None = Field(None, description="MLflow tracking URI; default: SQLite in the workspace")
    artifact_root: str | None = Field(None, description="MLflow artifact root; default: a folder in the workspace")
    prefect_api_url: str | None = Field(None, description="Prefect server API; default: Prefect's local SQLite")
    prefect_api_auth_string: SecretStr | None = Field(
        None, description="USER:PASSWORD of a Prefect server started with PREFECT_SERVER_API_AUTH_STRING (`atelier up` generates one)"
    )
    prefect_results: str | None = Field(
        None,
        description="s3://bucket/prefix for Prefect's task results (the server's default "
        "result storage, set by `atelier up` or `atelier stack-init`); default: a workspace folder",
    )
    work_pool: str | None = Field(
        None,
        description="Prefect work pool that `atelier deploy` targets and `atelier worker` polls; "
        "default: none, `atelier worker` serves the deployments itself",
    )
    dvc_remote: str | None = Field(None, description="DVC remote URL; default: a folder in the workspace")
    s3_endpoint_url: str | None = Field(
        None,
        description="S3-compatible endpoint (SeaweedFS, moto) for s3:// batch inputs and outputs; default: AWS, or boto3's AWS_ENDPOINT_URL",
    )
    base_model: Path | None = Field(None, description="diffusers SD directory; default: the tiny embedded model")
    train_processes: int = Field(
        1,
        ge=1,
        le=64,
        description="processes per DreamBooth training: above 1 the training task starts "
        "`accelerate launch` with one process per GPU (DDP); each trains train_batch_size images per step",
    )
    trainer_socket: Path | None = Field(
        None,
        description="Unix socket of a resident GPU trainer (`atelier trainer serve`): the training task sends its job there "
        "instead of loading the base model in its own process; default: train in the flow's process",
    )
    glm_ocr_weights: Path | None = Field(
        None,
        description="local GLM-OCR directory (save_pretrained layout); when set, "
        "ocr-calibrate measures it and routes languages to it where it reads best",
    )
    experiment: str = Field("atelier", description="MLflow experiment prefix: one experiment per customer, <prefix>-<customer>")
    ledger_url: str | None = Field(None, description="SQLAlchemy URL of the promotion ledger; default: SQLite in the workspace")
    outage_budget: float = Field(
        120.0,
        gt=0,
        le=3600,
        description="seconds a flow keeps retrying a server that does not answer, "
        "counted from the first failed call; then it stops with exit 6 naming the server",
    )
    ledger_keys: Path | None = Field(
        None,
        description="folder of the ledger's signing key (0600, made on first use), its "
        "verify key and head witness; default: .atelier/keys in the workspace. Never in the ledger's database",
    )
    actor: str = Field(
        default_factory=lambda: _default_actor(),
        min_length=1,
        description="who promotes, for the ledger: "
        "default USER@HOST from the account database, not only $USER (a cron job or container may not set it)",
    )
    tracking_username: str | None = Field(None, description="MLflow basic-auth user (the operations user)")
    tracking_password: SecretStr | None = Field(None, description="MLflow basic-auth password")
    images: ImageRules = ImageRules()
    gate: GateRules = GateRules()
    judge: JudgeSettings = JudgeSettings()
    stack: StackSettings = StackSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        yaml_file = _config_file()
        if yaml_file is not None:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=yaml_file))
        return tuple(sources)

    @field_validator("workspace", "base_model", "glm_ocr_weights", "ledger_keys", "trainer_socket")
    @classmethod
    def _absolute(cls, value: Path | None) -> Path | None:
        return None if value is None else value.expanduser().resolve()

    # Derived locations -------------------------------------------------------------------------
    @cached_property
    def state_dir(self) -> Path:
        """Local stores of the embedded default (MLflow DB, artifacts, Prefect, caches)."""
        return self.workspace / ".atelier"

    @property
    def resolved_tracking_uri(self) -> str:
        return self.tracking_uri or f"sqlite:///{self.state_dir / 'mlflow.db'}"

    @property
    def resolved_artifact_root(self) -> str:
        return self.artifact_root or (self.state_dir / "mlartifacts").as_uri()

    @property
    def resolved_ledger_keys(self) -> Path:
        return self.ledger_keys or self.state_dir / "keys"

    @property
    def resolved_ledger_url(self) -> str:
        return self.ledger_url or f"sqlite:///{self.state_dir / 'ledger.db'}"

    def experiment_for(self, customer: str) -> str:
        return f"{self.experiment}-{customer}"

    def artifact_root_for(self, customer: str) -> str:
        """Each customer's artifacts under their own prefix (a folder locally, a key prefix on S3)."""
        return f"{self.resolved_artifact_root.rstrip('/')}/{customer}"

    @property
    def resolved_dvc_remote(self) -> str:
        return self.dvc_remote or str(self.state_dir / "dvc-remote")

    @property
    def prefect_home(self) -> Path:
        return self.state_dir / "prefect"

    @property
    def tiny_model_dir(self) -> Path:
        return self.state_dir / "models" / "tiny-sd"

    @property
    def tiny_judge_dir(self) -> Path:
        return self.state_dir / "models" / "tiny-glm4v"

    @property
    def resolved_base_model(self) -> Path:
        return self.base_model or self.tiny_model_dir

    @property
    def priors_cache(self) -> Path:
        return self.state_dir / "cache" / "class-priors"

    @property
    def local_servers_dir(self) -> Path:
        """The embedded default's background servers (Prefect, the MLflow UI): their records and secrets."""
        return self.state_dir / "local"

    def mlflow_ui_url(self, planned: bool = False) -> str | None:
        """Where a person opens this workspace's MLflow: the tracking server itself, or on the embedded
        default the background UI (`atelier ui`) once it has been started; before that None, or with
        `planned` the address `atelier ui` will serve it at (`mlflow_ui_port`)."""
        import json

        if self.resolved_tracking_uri.startswith(("http://", "https://")):
            return self.resolved_tracking_uri.rstrip("/")
        try:
            return json.loads((self.local_servers_dir / "mlflow.json").read_text())["url"].rstrip("/")
        except (OSError, ValueError, KeyError, TypeError):
            return f"http://127.0.0.1:{self.mlflow_ui_port}" if planned else None

    @property
    def mlflow_ui_port(self) -> int:
        """The embedded default's MLflow UI port, fixed per workspace (20000-29999 from its path), so a link
        written before `atelier ui` runs opens once it does; `atelier ui` takes another only if it is busy."""
        import hashlib

        return 20000 + int(hashlib.sha256(str(self.workspace).encode()).hexdigest(), 16) % 10000

    @property
    def data_docs_root(self) -> Path:
        """The workspace's one Great Expectations project: every validation's result and its Data Docs
        site (`uncommitted/data_docs/local_site/index.html`), with the history of every data set."""
        return self.state_dir / "reports" / "gx"

    @property
    def data_docs_index(self) -> Path:
        return self.data_docs_root / "gx" / "uncommitted" / "data_docs" / "local_site" / "index.html"

    @property
    def compile_cache(self) -> Path:
        """torch.compile's caches (Inductor's FX graphs, AOTAutograd, Triton kernels) and, under `triton/`,
        Triton's own (the captured step's optimizer kernel), next to the class priors: a second job on the
        same base model and shapes loads its compiled graphs and kernels instead of compiling."""
        return self.state_dir / "cache" / "torch-compile"

    @property
    def runs_dir(self) -> Path:
        """Training outputs and checkpoints: runs/<customer>/<training key>."""
        return self.state_dir / "runs"

    def subject_dir(self, customer: str, subject: str) -> Path:
        return self.workspace / "data" / "subjects" / customer / subject

    def prefect_environment(self) -> dict[str, str]:
        env = {
            "PREFECT_HOME": str(self.prefect_home),
            "PREFECT_LOCAL_STORAGE_PATH": str(self.prefect_home / "results"),
            "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
            # task results as JSON that names only Atelier's own types (tasks/results.py), never a pickle
            "PREFECT_RESULTS_DEFAULT_SERIALIZER": "atelier-json",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_LOGGING_LEVEL": os.environ.get("PREFECT_LOGGING_LEVEL", "INFO"),
        }
        if self.prefect_api_url:
            env["PREFECT_API_URL"] = self.prefect_api_url
        else:  # a temporary server: Prefect waits 20 s for it, less than a busy machine's imports and migrations take
            env[TEMPORARY_PREFECT_TIMEOUT] = os.environ.get(TEMPORARY_PREFECT_TIMEOUT, str(math.ceil(self.stack.start_timeout)))
        if self.prefect_api_auth_string:
            env["PREFECT_API_AUTH_STRING"] = self.prefect_api_auth_string.get_secret_value()
        return env

    def apply_environment(self) -> None:
        """Export what the libraries read from the environment. Call before importing Prefect."""
        if self.workspace.is_dir():
            self.prefect_home.mkdir(parents=True, exist_ok=True)
        os.environ.update(self.prefect_environment())
        self.apply_library_environment()

    def apply_library_environment(self) -> None:
        """The part of `apply_environment` that is safe once Prefect runs (MLflow, S3, offline hubs):
        tasks call it, so a flow run started by a worker sees the same as one started by the CLI."""
        os.environ["MLFLOW_TRACKING_URI"] = self.resolved_tracking_uri
        if self.s3_endpoint_url:  # MLflow's S3 artifact store reads its endpoint from here
            os.environ.setdefault("MLFLOW_S3_ENDPOINT_URL", self.s3_endpoint_url)
        if self.tracking_username and self.tracking_password:
            os.environ["MLFLOW_TRACKING_USERNAME"] = self.tracking_username
            os.environ["MLFLOW_TRACKING_PASSWORD"] = self.tracking_password.get_secret_value()
        # Never reach a hub at run time: models are local paths or packages.
        for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DIFFUSERS_OFFLINE", "DVC_NO_ANALYTICS", "DO_NOT_TRACK"):
            os.environ[key] = "1"
        os.environ["GX_ANALYTICS_ENABLED"] = "false"
        for key in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY"):
            os.environ.setdefault(key, "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        # each call to a server that does not answer gives up within ~a minute (MLflow's defaults: 7 retries of 120 s
        # each, 12 minutes and more); the flow's own retries then stop at outage_budget (tasks/common.retry_transient)
        for key, value in (
            ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2"),
            ("MLFLOW_HTTP_REQUEST_TIMEOUT", "20"),
            ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1"),
            ("AWS_MAX_ATTEMPTS", "3"),
        ):
            os.environ.setdefault(key, value)
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

    def describe(self) -> dict[str, str]:
        """Where everything lives, for people: passwords in URLs are masked, secrets never shown."""
        return {
            "workspace": str(self.workspace),
            "config file": str(_config_file() or "(none: defaults and ATELIER_* environment)"),
            "MLflow tracking URI": mask_url(self.resolved_tracking_uri),
            "MLflow user": self.tracking_username or "(none: no basic auth)",
            "MLflow artifact root": self.resolved_artifact_root,
            "promotion ledger": mask_url(self.resolved_ledger_url),
            "Prefect API": mask_url(self.prefect_api_url)
            if self.prefect_api_url
            else f"local SQLite in {self.prefect_home} (the workspace's background server; `atelier ui` prints its URL)",
            "Prefect API auth": "set (PREFECT_API_AUTH_STRING)" if self.prefect_api_auth_string else "(none)",
            "Prefect results": self.prefect_results or str(self.prefect_home / "results"),
            "Prefect work pool": self.work_pool or "(none: `atelier worker` serves deployments itself)",
            "S3 endpoint": self.s3_endpoint_url or "(AWS default)",
            "DVC remote": self.resolved_dvc_remote,
            "base model": str(self.resolved_base_model),
            "class-prior cache": str(self.priors_cache),
            "Data Docs (Great Expectations)": str(self.data_docs_index),
        }


def mask_url(url: str) -> str:
    """`scheme://user:secret@host/db` -> `scheme://user:***@host/db`; other strings unchanged."""
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def load_settings(**overrides: Any) -> Settings:
    """Build and validate the settings; a bad value becomes a ConfigError naming the key."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        said, _ = schema_problems(exc.errors())
        raise ConfigError("settings", said, "correct them in atelier.yaml or the ATELIER_* environment (see `atelier info`)") from None
