"""OCR commands: calibrate and quantize (the ocr-calibrate flow), and batch OCR with a registered model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from atelier.cli.common import cli_settings, friendly, prefect_ready
from atelier.cli.progress import Progress
from atelier.kernel.errors import GateRefused, NotFound, PartlyDone


@friendly
def ocr_calibrate_cmd(
    method: str = typer.Option(
        "MinMax", help="calibration method: MinMax (about 2 GB), Entropy or Percentile (histograms of every activation: 15 GB and more)"
    ),
    calibration_lines: int = typer.Option(64, help="calibration lines fed to the quantizer"),
) -> None:
    """Run the ocr-calibrate flow: document sets -> validate -> baselines -> int8 -> evaluate -> register -> gate."""
    from atelier.kernel.workspace import require_workspace

    if method not in ("MinMax", "Entropy", "Percentile"):
        raise typer.BadParameter("use MinMax, Entropy or Percentile", param_hint="--method")
    from atelier.kernel.outages import preflight

    settings = cli_settings()
    preflight(settings)
    require_workspace(settings)
    prefect_ready(settings)
    from atelier.flows.ocr_calibrate import ocr_calibrate  # Prefect reads its settings when imported: after prefect_ready

    result = ocr_calibrate(method=method, calibration_lines=calibration_lines)
    report_calibration(result)
    if not result["gate"]["passed"]:
        raise GateRefused(
            f"{result['model']} version {result['version']}",
            "; ".join(result["gate"]["reasons"]),
            "keep the current champion, or loosen gate.ocr in the settings if the loss is acceptable",
        )


def report_calibration(result: dict) -> None:
    s = result["summary"]
    speed = s.get("speed", {})
    typer.echo(
        f"{result['model']} version {result['version']}: serving the {s['served']} recogniser ({s.get('served_why', '')}); "
        f"routed engine with no language given: CER {s['engine_cer']:.2%} at {s['engine_images_per_s']:.1f} images/s, "
        f"router {s['router_accuracy']:.0%} right (language given: {s['engine_cer_hint']:.2%})"
    )
    if speed:
        typer.echo("  recogniser lines/s here: " + ", ".join(f"{k} {v:.0f}" for k, v in speed.items()) + f"; routes {result['routes']}")
    if result["gate"]["passed"]:
        typer.echo(f"promoted: {result['model']}@champion is version {result['version']}")
    else:
        typer.echo(f"gate refused {result['model']} version {result['version']}: {'; '.join(result['gate']['reasons'])}")
        typer.echo(f"  read with it anyway: atelier ocr FILES --model {result['model']}/{result['version']}")


def ocr_dependencies_missing() -> str | None:
    """What the OCR flow lacks on this machine (Tesseract, the fonts its sets are rendered with), or None."""
    import shutil

    from atelier.models.ocr.render import missing_fonts

    if shutil.which("tesseract") is None:
        return "tesseract"
    missing = missing_fonts()
    return ", ".join(missing) if missing else None


@friendly
def documents_render_cmd(
    out: Path = typer.Option(..., help="folder for the calibration/ and evaluation/ sets (replaced atomically)"),
    params: Path = typer.Option(Path("params.yaml"), help="YAML file with a `documents` block (calibration, evaluation)"),
) -> None:
    """Render the synthetic multilingual document sets (the dvc.yaml documents stage calls this)."""
    import yaml

    from atelier.kernel.errors import ConfigError
    from atelier.models.ocr.render import RenderSpec, render_splits

    try:
        block = yaml.safe_load(params.read_text())["documents"]
        specs = {name: RenderSpec(**block[name]) for name in ("calibration", "evaluation")}
    except (OSError, KeyError, TypeError, yaml.YAMLError) as exc:
        raise ConfigError(
            str(params),
            f"has no usable `documents` block ({exc})",
            "give documents.calibration and documents.evaluation with lines_per_lang, pages_per_lang, seed",
        ) from None
    sets = render_splits(out, specs["calibration"], specs["evaluation"], replace=True)
    typer.echo("; ".join(f"{name}: {sum(1 for _ in open(path / 'labels.jsonl'))} images in {path}" for name, path in sets.items()))


def _inputs(paths: list[Path]) -> tuple[list[Path], list[Path]]:
    """(files to read, files skipped): a named path is always read (a bad one gets its error row); a
    folder is read for its images (by suffix or content) and video clips (by suffix), hidden files and
    other files skipped."""
    from atelier.models.ocr.images import looks_like_image
    from atelier.models.video.frames import is_video

    files: list[Path] = []
    skipped: list[Path] = []
    for p in paths:
        if not p.is_dir():
            files.append(p)
            continue
        for q in sorted(p.rglob("*")):
            if any(part.startswith(".") for part in q.relative_to(p).parts) or q.is_dir():
                continue
            (files if q.is_file() and (looks_like_image(q) or is_video(q)) else skipped).append(q)
    return files, skipped


FORMATS = ("jsonl", "text", "markdown", "vtt")


def _jsonl(row: dict) -> str:
    """A document's row as one JSON line; a clip's as one line per cue (its time range and text)."""
    if row.get("kind") != "video":
        return json.dumps({**row, "lines": json.loads(row["lines"])}, ensure_ascii=False) + "\n"
    head = {"path": row["path"], "kind": "video", "model": row.get("model", "")}
    if row["error"] or not row["cues"]:
        extra = (
            {"error": row["error"]}
            if row["error"]
            else {"text": "", "start": 0.0, "end": row.get("duration", 0.0), "note": "no text found"}
        )
        return json.dumps({**head, **extra}, ensure_ascii=False) + "\n"
    return "".join(json.dumps({**head, **cue}, ensure_ascii=False) + "\n" for cue in row["cues"])


def _cue_lines(row: dict) -> list[str]:
    from atelier.models.video.track import timestamp

    return [f"[{timestamp(c['start'])} --> {timestamp(c['end'])}] {c['text']}" for c in row["cues"]]


def render(rows: list[dict], fmt: str) -> str:
    """The result rows as JSON lines (everything; a clip's cues one per line), plain text (each file's
    text under its name; a clip's cues with their times), Markdown (a section per file, its lines in
    reading order; a clip's cues as a table) or WebVTT (one clip's subtitles)."""
    if fmt == "jsonl":
        return "".join(_jsonl(row) for row in rows)
    if fmt == "vtt":
        from atelier.models.video.track import webvtt

        return webvtt(rows[0]["cues"])
    out = []
    for row in rows:
        if row.get("kind") == "video" and not row["error"]:
            if fmt == "text":
                head = f"==> {row['path']} <==" if len(rows) > 1 else ""
                out.append("\n".join(x for x in (head, *_cue_lines(row)) if x))
            else:
                table = ["| start | end | text |", "| --- | --- | --- |"] + [
                    f"| {c['start']:.2f} | {c['end']:.2f} | {c['text'].replace('|', '&#124;')} |" for c in row["cues"]
                ]
                out.append(f"## {Path(row['path']).name} (video, {len(row['cues'])} cues)\n\n" + "\n".join(table))
            continue
        if fmt == "text":
            head = f"==> {row['path']} <==" if len(rows) > 1 else ""
            body = f"[error: {row['error']}]" if row["error"] else row["text"]
            out.append("\n".join(x for x in (head, body) if x))
        else:
            lang = f" ({row['language']})" if row.get("language") else ""
            body = f"> error: {row['error']}" if row["error"] else _markdown_lines(json.loads(row["lines"]))
            out.append(f"## {Path(row['path']).name}{lang}\n\n{body}".rstrip())
    return "\n\n".join(out) + "\n"


def _markdown_lines(lines: list[dict]) -> str:
    """A document's lines for Markdown: text lines as they are, each run of a table's rows (lines with
    `cells`) as a Markdown table, its first row the header."""
    out: list[str] = []
    table: list[dict] = []

    def flush() -> None:
        if not table:
            return
        width = max(c["column"] for line in table for c in line["cells"]) + 1
        rows = []
        for line in table:
            cells = [""] * width
            for c in line["cells"]:
                cells[c["column"]] = " ".join(x for x in (cells[c["column"]], c["text"].replace("|", "&#124;")) if x)
            rows.append("| " + " | ".join(cells) + " |")
        out.extend(["", rows[0], "|" + " --- |" * width, *rows[1:], ""])
        table.clear()

    for line in lines:
        if line.get("cells"):
            table.append(line)
            continue
        flush()
        out.append(f"{line['text']}  ")
    flush()
    return "\n".join(out).strip("\n")


def _read_clip(engine, clip: Path, sampling, lang: str | None) -> dict:
    from atelier.models.video.ocr import read_video

    progress = Progress(f"ocr {clip.name}", "frames")
    row = read_video(engine, clip, sampling, lang, on_frames=progress)
    progress.close()
    return {**row, "lines": "[]"}


@friendly
def ocr_cmd(
    paths: list[Path] = typer.Argument(..., help="images or folders of images"),
    model: str = typer.Option("ocr@champion", "--model", help="registered OCR model: NAME@ALIAS or NAME/VERSION"),
    lang: Optional[str] = typer.Option(None, "--lang", help="language code (zh en fr es de ru ja ko); default: the router decides"),
    lines: bool = typer.Option(False, "--lines", help="the images are pre-cropped text lines (no detection)"),
    out: Optional[Path] = typer.Option(None, "--out", help="output file (default: stdout)"),
    fmt: str = typer.Option(
        "jsonl", "--format", help="jsonl (everything: lines, boxes, confidence; a clip's cues with times), text, markdown or vtt (one clip)"
    ),
    every: float = typer.Option(1.0, "--every", help="clips: seconds between sampled frames (plus frames at picture changes)"),
    max_frames: int = typer.Option(
        300, "--max-frames", help="clips: at most this many frames each (a longer clip is sampled more sparsely)"
    ),
) -> None:
    """Read documents and video clips with a registered OCR model, loaded once for all of them: pages are
    detected and read in reading order, lines of all files batched together; a clip's frames are
    sampled by time and its text becomes a track of cues (start, end, text). A bad file gets an `error`
    naming it and the fix, and the rest are still read; exit 0 when every file was read, 7 when some
    were not, 2 when none was."""
    from atelier.kernel.storage import printable, write_text_atomic
    from atelier.models.ocr.engine import read_documents
    from atelier.models.ocr.langs import language
    from atelier.registry.serving import load_ocr_engine

    if lang:
        language(lang)
    if fmt not in FORMATS:
        raise typer.BadParameter(f"use one of {', '.join(FORMATS)}", param_hint="--format")
    from atelier.models.video.frames import Sampling, is_video

    try:
        sampling = Sampling(every, max_frames)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--every/--max-frames") from None
    settings = cli_settings()
    files, skipped = _inputs(paths)
    if fmt == "vtt" and (len(files) != 1 or not is_video(files[0])):
        raise typer.BadParameter("WebVTT holds one clip's subtitles: pass one video file (or use jsonl)", param_hint="--format")
    if skipped:
        typer.echo(
            f"skipped {len(skipped)} file(s) that are not images: "
            + ", ".join(printable(str(s)) for s in skipped[:5])
            + (" ..." if len(skipped) > 5 else ""),
            err=True,
        )
    if not files:
        raise NotFound(
            ", ".join(str(p) for p in paths), "holds no image to read", "pass image files, or folders of PNG/JPEG/TIFF/WebP/BMP images"
        )
    mv, engine = load_ocr_engine(settings, model)
    clips = [f for f in files if is_video(f)]
    rows = [{"path": str(f), "lang": lang, "kind": "line" if lines else "page"} for f in files if not is_video(f)]
    progress = Progress(f"ocr {mv.name} v{mv.version}", "files")
    read = {r["path"]: r for r in read_documents(engine, rows, progress)} if rows else {}
    progress.close()
    for clip in clips:
        read[str(clip)] = _read_clip(engine, clip, sampling, lang)
    result = [read[str(f)] for f in files]
    for row in result:
        row["model"] = f"{mv.name}/{mv.version}"
        row["path"], row["error"] = printable(row["path"]), printable(row["error"])  # names that are not UTF-8, escaped
    text = render(result, fmt)
    failed = [r for r in result if r["error"]]
    for r in failed:
        typer.echo(f"error: {r['error']}", err=True)
    if out:
        write_text_atomic(out, text)
        flagged = sum(1 for r in result if r["flagged"] and not r["error"])
        if fmt == "vtt":
            typer.echo(f"{len(result[0]['cues'])} cue(s) of {result[0]['path']} -> {out} (WebVTT)", err=True)
        typer.echo(
            f"{len(result) - len(failed)} of {len(result)} file(s) read with {mv.name} v{mv.version} -> {out} "
            f"({flagged} flagged for review, {len(failed)} not readable)",
            err=True,
        )
    else:
        typer.echo(text, nl=False)
    if failed and len(failed) == len(result):
        raise typer.Exit(2)
    if failed:
        raise PartlyDone(
            f"{len(failed)} of {len(result)} file(s)",
            "could not be read (named above; the others were read)",
            "fix or remove those files and run again",
        )
