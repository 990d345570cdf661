"""`atelier judge`: ask the configured VLM judge about images or video clips, ad hoc."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from atelier.cli.common import cli_settings, friendly


@friendly
def judge_cmd(
    images: list[Path] = typer.Argument(..., help="PNG/JPEG images or video clips (MP4, MOV, MKV, WebM, AVI) to judge", metavar="FILE..."),
    prompt: str = typer.Option(..., "--prompt", help="what each image or clip should show, e.g. 'a toy on the beach'"),
    reference: list[Path] = typer.Option([], "--reference", help="photos of the subject (repeatable): adds subject fidelity"),
    caption: bool = typer.Option(True, "--caption/--no-caption", help="also ask for a caption with grounding boxes"),
    every: float = typer.Option(1.0, "--every", help="clips: seconds between sampled frames (plus frames at picture changes)"),
    max_frames: int = typer.Option(32, "--max-frames", help="clips: at most this many frames (a longer clip is sampled more sparsely)"),
) -> None:
    """One JSON line per image or clip: P(yes) that it shows PROMPT, fidelity to the reference photos, a
    caption. A clip goes to a judge that takes video as one input (judge.video: the file, or its frames
    with their times); a judge of images scores its sampled frames and names those that decided. The
    judge is the settings' `judge` (ATELIER_JUDGE__BACKEND=http|local ...); answers are cached."""
    from atelier.kernel.errors import AtelierError, NotFound
    from atelier.models.video.frames import Sampling, is_video
    from atelier.models.vlm.factory import make_judge
    from atelier.models.vlm.scoring import Cache, Scorer, judge_images

    settings = cli_settings()
    for p in [*images, *reference]:
        if not p.is_file():
            raise NotFound(str(p), "does not exist or is not a file", "pass image or video files")
    try:
        sampling = Sampling(every, max_frames)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--every/--max-frames") from None
    clips = [p for p in images if is_video(p)]
    stills = [p for p in images if not is_video(p)]
    scorer = Scorer(
        make_judge(settings.judge, settings.tiny_judge_dir),
        Cache(settings.state_dir / "judge-cache" if settings.workspace.is_dir() else None),
    )
    failed, scores = 0, ""
    if stills:
        rows, summary = judge_images(
            scorer, [(str(p), p.read_bytes(), prompt) for p in stills], [p.read_bytes() for p in reference], [], captions=caption
        )
        for row in rows:
            typer.echo(json.dumps({**row, "objects": json.loads(row.get("objects", "[]"))}, ensure_ascii=False))
        scores = f"prompt {summary['prompt_score']}, fidelity {summary['fidelity']}, "
    if clips:
        from atelier.models.vlm.video import judge_clip, load_clip

        for p in clips:
            try:
                row = judge_clip(scorer, load_clip(p, sampling), prompt, settings.judge.video, caption)
            except AtelierError as exc:  # this clip cannot be read: named, the others are judged
                failed += 1
                typer.echo(f"error: {exc}", err=True)
                continue
            typer.echo(json.dumps(row, ensure_ascii=False))
    label = "" if scorer.judge.calibrated else " (uncalibrated judge: not a judgment)"
    typer.echo(
        f"{scorer.judge.name}{label}: {scores}{len(images) - failed} of {len(images)} judged, {len(scorer.failures)} failed, "
        f"{scorer.judge.usage.requests} requests, {scorer.cache.hits} cached",
        err=True,
    )
    if failed:
        from atelier.kernel.errors import PartlyDone

        if failed == len(images):
            raise typer.Exit(2)
        raise PartlyDone(
            f"{failed} of {len(images)} file(s)", "could not be read (named above; the others were judged)", "fix or leave them out"
        )
