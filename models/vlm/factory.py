"""The judge the settings describe."""

from __future__ import annotations

from pathlib import Path

from atelier.kernel.errors import ConfigError
from atelier.kernel.settings import JudgeSettings


def make_judge(cfg: JudgeSettings, embedded_dir: Path | None = None):
    """`embedded_dir`: where the embedded default's tiny judge lives (built there on first use)."""
    if cfg.backend == "embedded":
        from atelier.models.vlm.local import LocalJudge
        from atelier.models.vlm.tiny import write_tiny_judge

        if embedded_dir is None:
            raise ConfigError("judge.backend", "is embedded but no workspace is set", "run inside a workspace (atelier init)")
        return LocalJudge(write_tiny_judge(embedded_dir), calibrated=False)
    if cfg.backend == "http":
        from atelier.models.vlm.http import HttpJudge

        return HttpJudge(
            cfg.base_url,
            cfg.model,
            cfg.api_key.get_secret_value() if cfg.api_key else None,
            cfg.timeout,
            cfg.max_retries,
            concurrency=cfg.concurrency,
        )
    if cfg.backend == "local":
        from atelier.models.vlm.local import LocalJudge

        if cfg.local_weights is None:
            raise ConfigError("judge.local_weights", "is not set", "set ATELIER_JUDGE__LOCAL_WEIGHTS to a GLM-4.1V/4.5V directory")
        return LocalJudge(cfg.local_weights, cfg.local_calibrated)
    raise ConfigError("judge.backend", "is none", "set ATELIER_JUDGE__BACKEND to http or local")
