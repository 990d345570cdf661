"""OCR commands: calibrate and quantize (the ocr-calibrate flow), and batch OCR with a registered model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from cli.common import cli_settings, friendly
from atelier.errors import GateRefused



@friendly
def ocr_calibrate_cmd(
    method: str = typer.Option("Percentile", help="calibration method: MinMax, Entropy or Percentile"),
    calibration_lines: int = typer.Option(64, help="calibration lines fed to the quantizer"),
) -> None:
    """Run the ocr-calibrate flow: document sets -> validate -> baselines -> int8 -> evaluate -> register -> gate."""
    from atelier.workspace import require_workspace
    from flows.ocr_calibrate import ocr_calibrate

    if method not in ("MinMax", "Entropy", "Percentile"):
        raise typer.BadParameter("use MinMax, Entropy or Percentile", param_hint="--method")
    from atelier.outages import preflight

    settings = cli_settings()
    preflight(settings)
    require_workspace(settings)
    result = ocr_calibrate(method=method, calibration_lines=calibration_lines)
    report_calibration(result)
    if not result["gate"]["passed"]:
        raise GateRefused(f"{result['model']} version {result['version']}", "; ".join(result["gate"]["reasons"]),
                          "keep the current champion, or loosen gate.ocr in the settings if the loss is acceptable")


def report_calibration(result: dict) -> None:
    s = result["summary"]
    typer.echo(f"{result['model']} version {result['version']}: CER fp32 {s['cer_fp32']['overall']:.2%} -> int8 "
               f"{s['cer_int8']['overall']:.2%}, {s['speed_int8'] / s['speed_fp32']:.2f}x lines/s; routes {result['routes']}")
    if result["gate"]["passed"]:
        typer.echo(f"promoted: {result['model']}@champion is version {result['version']}")
    else:
        typer.echo(f"gate refused {result['model']} version {result['version']}: {'; '.join(result['gate']['reasons'])}")


def ocr_dependencies_missing() -> str | None:
    """What the OCR flow lacks on this machine (Tesseract, the fonts its sets are rendered with), or None."""
    import shutil

    from models.ocr.render import FONT_FILES

    if shutil.which("tesseract") is None:
        return "tesseract"
    missing = sorted({f for fonts in FONT_FILES.values() for f in fonts[:1] if not Path(f).is_file()})
    return missing[0] if missing else None


@friendly
def documents_render_cmd(
    out: Path = typer.Option(..., help="folder for the calibration/ and evaluation/ sets (replaced atomically)"),
    params: Path = typer.Option(Path("params.yaml"), help="YAML file with a `documents` block (calibration, evaluation)"),
) -> None:
    """Render the synthetic multilingual document sets (the dvc.yaml documents stage calls this)."""
    import yaml

    from atelier.errors import ConfigError
    from models.ocr.render import RenderSpec, render_splits

    try:
        block = yaml.safe_load(params.read_text())["documents"]
        specs = {name: RenderSpec(**block[name]) for name in ("calibration", "evaluation")}
    except (OSError, KeyError, TypeError, yaml.YAMLError) as exc:
        raise ConfigError(str(params), f"has no usable `documents` block ({exc})",
                          "give documents.calibration and documents.evaluation with lines_per_lang, pages_per_lang, seed") from None
    sets = render_splits(out, specs["calibration"], specs["evaluation"], replace=True)
    typer.echo("; ".join(f"{name}: {sum(1 for _ in open(path / 'labels.jsonl'))} images in {path}" for name, path in sets.items()))


def _inputs(paths: list[Path]) -> list[Path]:
    from models.ocr.images import IMAGE_SUFFIXES

    files: list[Path] = []
    for p in paths:
        files.extend(sorted(q for q in p.rglob("*") if q.suffix.lower() in IMAGE_SUFFIXES) if p.is_dir() else [p])
    return files


@friendly
def ocr_cmd(
    paths: list[Path] = typer.Argument(..., help="images or folders of images"),
    model: str = typer.Option("ocr@champion", "--model", help="registered OCR model: NAME@ALIAS or NAME/VERSION"),
    lang: Optional[str] = typer.Option(None, "--lang", help="language code (zh en fr es de ru ja ko); default: the router decides"),
    lines: bool = typer.Option(False, "--lines", help="the images are pre-cropped text lines (no detection)"),
    out: Optional[Path] = typer.Option(None, "--out", help="JSONL output (default: stdout)"),
) -> None:
    """Read documents with a registered OCR model; one JSON line per file (text, lines with boxes,
    confidence, language, flagged for review). A bad file gets an `error` and the rest are still read."""
    import mlflow.pyfunc
    import pandas as pd

    from atelier.storage import write_text_atomic
    from models.ocr.langs import language
    from registry.dreambooth import client_for
    from registry.lineage import resolve

    if lang:
        language(lang)
    settings = cli_settings()
    client = client_for(settings)
    mv = resolve(client, model)
    engine = mlflow.pyfunc.load_model(f"models:/{mv.name}/{mv.version}")
    files = _inputs(paths)
    frame = pd.DataFrame({"path": [str(f) for f in files], "lang": [lang or ""] * len(files), "kind": ["line" if lines else "page"] * len(files)})
    result = engine.predict(frame)
    text = "".join(json.dumps({**row, "lines": json.loads(row["lines"]), "model": f"{mv.name}/{mv.version}"}, ensure_ascii=False) + "\n"
                   for row in result.to_dict(orient="records"))
    if out:
        write_text_atomic(out, text)
        flagged = int(result["flagged"].sum())
        typer.echo(f"{len(files)} file(s) read with {mv.name} v{mv.version} -> {out} ({flagged} flagged for review)")
    else:
        typer.echo(text, nl=False)
