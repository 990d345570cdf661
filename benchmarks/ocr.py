"""OCR on this machine's CPU, one run: the routed engine against Tesseract and each PP-OCR generation.

    python benchmarks/ocr.py [--set DIR] [--model ocr@champion] [--lines-per-lang 14 --pages-per-lang 2] [--command]

On a labelled set (DIR with labels.jsonl, or a fresh one rendered from the evaluation third of the
sentences with a seed no split uses), each row reads every image, wall clock, files loaded from disk:

- engine, no language given: the registered engine (`--model`, from the workspace's registry) or,
  without one, the same engine built from the shipped models in fp32 (`--shipped`);
- engine, language given;
- Tesseract alone, language given, as a user runs it: `tesseract IMAGE stdout -l LANG --psm 7` (a
  line) or `--psm 3` (a page), one image after another, Tesseract's own threading (the issue's 4.6
  images/s baseline was measured this way);
- Tesseract tuned: the same commands with OMP_THREAD_LIMIT=1 and one process per core at a time
  (Tesseract's OpenMP threads cost more than they give on 2 cores: about 4x the throughput here);
- PP-OCRv4, v5 and v6 small alone (shipped, fp32): detection for pages, every line read by that one
  recogniser, whatever its script.

Per-language CER and images/s are printed with the ratio to Tesseract's images/s. `--command` also
times the whole `atelier ocr DIR --out FILE` command (process start, model loading, reading) against
the Tesseract loop, which is what a user waits for. Targets (issue 17): no language given, overall CER
at most Tesseract's with the language given and at most 2% on every language; images/s at least 2x.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from atelier.models.ocr.engine import load_engine, read_documents, shipped_engine_files  # noqa: E402
from atelier.models.ocr.langs import LANGUAGES  # noqa: E402
from atelier.models.ocr.metrics import summarise  # noqa: E402
from atelier.models.ocr.render import RenderSpec, read_labels, render_set  # noqa: E402

TESS, TUNED = "Tesseract alone, language given", "Tesseract tuned (1 thread x cores), language given"
ROUTES = {**{lang: "ppocr" for lang in ("zh", "ja", "en", "fr", "es", "de")}, "ko": "tesseract", "ru": "tesseract"}


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def tesseract_cli(path: Path, lang: str, kind: str, tuned: bool) -> str:
    pack = LANGUAGES[lang].tesseract
    env = {k: v for k, v in os.environ.items() if k != "OMP_THREAD_LIMIT"}
    done = subprocess.run(
        ["tesseract", str(path), "stdout", "-l", pack, "--psm", "7" if kind == "line" else "3"],
        capture_output=True,
        text=True,
        env={**env, "OMP_THREAD_LIMIT": "1"} if tuned else env,
    )
    return done.stdout.strip()


def registered_engine(ref: str):
    from atelier.kernel.settings import load_settings
    from atelier.registry.serving import load_ocr_engine

    settings = load_settings()
    settings.apply_environment()
    mv, engine = load_ocr_engine(settings, ref)
    return f"{mv.name}/{mv.version}", engine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", type=Path, help="a labelled folder (labels.jsonl); default: render a fresh one")
    ap.add_argument("--lines-per-lang", type=int, default=14)
    ap.add_argument("--pages-per-lang", type=int, default=2)
    ap.add_argument("--seed", type=int, default=4242)
    ap.add_argument("--model", default="ocr@champion", help="registered OCR model (the workspace's registry)")
    ap.add_argument("--shipped", action="store_true", help="the engine built from the shipped fp32 models, not a registered one")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--command", action="store_true", help="also time the whole `atelier ocr` command")
    args = ap.parse_args()

    folder = args.set
    if folder is None:
        folder = Path(tempfile.mkdtemp(prefix="atelier-ocr-bench-")) / "set"
        render_set(
            folder, RenderSpec(lines_per_lang=args.lines_per_lang, pages_per_lang=args.pages_per_lang, seed=args.seed, part="evaluation")
        )
    labels = read_labels(folder)
    paths = [folder / r["file"] for r in labels]
    langs = sorted({r["lang"] for r in labels})
    print(
        f"set: {folder} ({sum(r['kind'] == 'line' for r in labels)} lines, {sum(r['kind'] == 'page' for r in labels)} pages, "
        f"{len(langs)} languages); {args.threads} threads"
    )

    if args.shipped:
        name, engine = "shipped fp32", load_engine(*shipped_engine_files(ROUTES), {}, threads=args.threads)
    else:
        name, engine = registered_engine(args.model)
    rows: dict[str, tuple[list[str], float]] = {}

    def run_engine(eng, hint: bool):
        docs = [{"path": str(p), "lang": r["lang"] if hint else None, "kind": r["kind"]} for p, r in zip(paths, labels)]
        read_documents(eng, docs[:4])  # warm-up
        out, seconds = timed(lambda: read_documents(eng, docs))
        return [o["text"] for o in out], seconds

    rows[f"engine {name}, no language"] = run_engine(engine, False)
    rows[f"engine {name}, language given"] = run_engine(engine, True)
    rows[TESS] = timed(lambda: [tesseract_cli(p, r["lang"], r["kind"], False) for p, r in zip(paths, labels)])
    with ThreadPoolExecutor(args.threads) as pool:
        rows[TUNED] = timed(lambda: list(pool.map(lambda pr: tesseract_cli(pr[0], pr[1]["lang"], pr[1]["kind"], True), zip(paths, labels))))
    for generation, model in (("PP-OCRv4", "ppocrv4-rec"), ("PP-OCRv5", "ppocrv5-rec"), ("PP-OCRv6 small", "ppocrv6s-rec")):
        from atelier.models.ocr.shipped import shipped

        files, spec = shipped_engine_files({lang: "ppocr" for lang in LANGUAGES})
        rec, charset = shipped(model)
        files["rec"] = rec
        if charset:
            files["rec_charset"] = charset
        else:
            spec["recognisers"]["ppocr"].pop("charset")
        alone = load_engine(files, {**spec, "probes": []}, {}, threads=args.threads)
        rows[f"{generation} alone (shipped fp32)"] = run_engine(alone, True)

    tess_ips, tuned_ips = len(labels) / rows[TESS][1], len(labels) / rows[TUNED][1]
    print(f"\n{'reader':<52}{'images/s':>9}{'vs tess':>8}{'tuned':>7}" + "".join(f"{lang:>7}" for lang in langs) + f"{'all':>7}   (CER %)")
    for label, (texts, seconds) in rows.items():
        s = summarise([{"lang": r["lang"], "text": r["text"], "predicted": t} for r, t in zip(labels, texts)])
        ips = len(labels) / seconds
        print(
            f"{label:<52}{ips:>9.2f}{ips / tess_ips:>7.2f}x{ips / tuned_ips:>6.2f}x"
            + "".join(f"{100 * s[lang]['cer']:>7.2f}" for lang in langs)
            + f"{100 * s['overall']['cer']:>7.2f}"
        )

    if args.command and not args.shipped:
        atelier = str(ROOT / ".venv" / "bin" / "atelier") if (ROOT / ".venv" / "bin" / "atelier").is_file() else shutil.which("atelier")
        with tempfile.TemporaryDirectory() as tmp:
            done, seconds = timed(
                lambda: subprocess.run(
                    [atelier, "ocr", str(folder), "--model", args.model, "--out", str(Path(tmp) / "o.jsonl")],
                    capture_output=True,
                    text=True,
                )
            )
        if done.returncode not in (0, 2):
            print(f"\n`atelier ocr` failed: {done.stderr[-500:]}")
            return
        command_ips = len(labels) / seconds
        print(
            f"\nwhole command `atelier ocr {folder.name} --out ...` (start, model load, reading): {seconds:.1f} s, {command_ips:.2f} images/s: "
            f"{command_ips / tess_ips:.2f}x Tesseract as users run it ({rows[TESS][1]:.1f} s), "
            f"{command_ips / tuned_ips:.2f}x tuned Tesseract ({rows[TUNED][1]:.1f} s)"
        )


if __name__ == "__main__":
    main()
