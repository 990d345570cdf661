"""`atelier judge`: ask the configured VLM judge about images, ad hoc."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from atelier.cli.common import cli_settings, friendly


@friendly
def judge_cmd(
    images: list[Path] = typer.Argument(..., help="PNG/JPEG files to judge"),
    prompt: str = typer.Option(..., "--prompt", help="what each image should show, e.g. 'a toy on the beach'"),
    reference: list[Path] = typer.Option([], "--reference", help="photos of the subject (repeatable): adds subject fidelity"),
    caption: bool = typer.Option(True, "--caption/--no-caption", help="also ask for a caption with grounding boxes"),
) -> None:
    """One JSON line per image: P(yes) that it shows PROMPT, fidelity to the reference photos, caption.
    The judge is the settings' `judge` (ATELIER_JUDGE__BACKEND=http|local ...); answers are cached."""
    from atelier.kernel.errors import NotFound
    from atelier.models.vlm.factory import make_judge
    from atelier.models.vlm.scoring import Cache, Scorer, judge_images

    settings = cli_settings()
    for p in [*images, *reference]:
        if not p.is_file():
            raise NotFound(str(p), "does not exist", "pass image files")
    scorer = Scorer(
        make_judge(settings.judge, settings.tiny_judge_dir),
        Cache(settings.state_dir / "judge-cache" if settings.workspace.is_dir() else None),
    )
    rows, summary = judge_images(
        scorer, [(str(p), p.read_bytes(), prompt) for p in images], [p.read_bytes() for p in reference], [], captions=caption
    )
    for row in rows:
        typer.echo(json.dumps({**row, "objects": json.loads(row.get("objects", "[]"))}, ensure_ascii=False))
    label = "" if summary["calibrated"] else " (uncalibrated judge: not a judgment)"
    typer.echo(
        f"{scorer.judge.name}{label}: prompt {summary['prompt_score']}, fidelity {summary['fidelity']}, "
        f"{summary['failures']} failed, {scorer.judge.usage.requests} requests, {scorer.cache.hits} cached",
        err=True,
    )
