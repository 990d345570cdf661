"""OCR on 2 CPU cores: int8 against fp32 recognition, and the routed engine against Tesseract, one run.

    python benchmarks/ocr.py [--lines-per-lang 12] [--method Percentile] [--threads 2]

Renders a calibration and an evaluation set (disjoint lines, 8 languages), quantizes the shipped
PP-OCRv4 recogniser with the calibration split, then on the evaluation split prints CER per language
and lines/s for fp32 PP-OCR, int8 PP-OCR, Tesseract (language given) and the routed engine (int8
where it wins, Tesseract elsewhere), with the ratios. Targets (issue 3): int8 >= 2x fp32 lines/s with
at most 1 point CER loss per covered language; routed CER <= Tesseract's.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.ocr.backends import PPOCR, Tesseract, shipped_ppocr_models  # noqa: E402
from models.ocr.engine import load_engine  # noqa: E402
from models.ocr.evaluate import evaluate_lines, load_set  # noqa: E402
from models.ocr.quantize import QuantizeConfig, quantize_model  # noqa: E402
from models.ocr.render import RenderSpec, render_splits  # noqa: E402
from models.ocr.router import choose_routes  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lines-per-lang", type=int, default=12)
    ap.add_argument("--method", default="Percentile", choices=["MinMax", "Entropy", "Percentile"])
    ap.add_argument("--all-ops", action="store_true", help="quantize every op type, not only Conv and MatMul")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="atelier-ocr-bench-"))
    sets = render_splits(tmp, RenderSpec(lines_per_lang=args.lines_per_lang * 2, seed=11), RenderSpec(lines_per_lang=args.lines_per_lang, seed=12))
    records, images = load_set(sets["evaluation"])
    fp32 = PPOCR(threads=args.threads)
    pp_langs = ("zh", "en", "fr", "es", "de")
    _, cal = load_set(sets["calibration"], langs=pp_langs)
    cfg = QuantizeConfig(method=args.method, op_types=() if args.all_ops else ("Conv", "MatMul"))
    int8_path = quantize_model(shipped_ppocr_models()["rec"], tmp / "rec-int8.onnx", cfg, cal, fp32.preprocess_line)
    int8 = PPOCR(rec=int8_path, threads=args.threads)
    sub = [i for i, r in enumerate(records) if r["lang"] in pp_langs]
    pp_records, pp_images = [records[i] for i in sub], [images[i] for i in sub]
    fp32.read_lines(pp_images[:8])  # warm-up
    int8.read_lines(pp_images[:8])
    results = {"ppocr fp32": evaluate_lines(fp32.read_lines, pp_records, pp_images),
               "ppocr int8": evaluate_lines(int8.read_lines, pp_records, pp_images)}
    tess = Tesseract(workers=args.threads)
    results["tesseract"] = evaluate_lines(tess.read_lines, records, images)
    table = choose_routes({"ppocr": {k: v["cer"] for k, v in results["ppocr int8"].summary.items()},
                           "tesseract": {k: v["cer"] for k, v in results["tesseract"].summary.items()}},
                          {"ppocr": results["ppocr int8"].lines_per_s, "tesseract": results["tesseract"].lines_per_s})
    m = shipped_ppocr_models()
    routed = load_engine(m["det"], int8_path, m["cls"], table.to_dict(), {}, threads=args.threads)
    results["routed (int8 + tesseract)"] = evaluate_lines(lambda imgs, lang: routed.read_lines(imgs, [lang] * len(imgs)), records, images)

    langs = sorted({r["lang"] for r in records}) + ["overall"]
    print(f"\nrouting: {table.routes}")
    print(f"{'engine':<28}{'lines/s':>9}" + "".join(f"{lang:>8}" for lang in langs) + "   (CER %)")
    for name, r in results.items():
        print(f"{name:<28}{r.lines_per_s:>9.1f}" + "".join(f"{100 * r.summary[lang]['cer']:>8.2f}" if lang in r.summary else f"{'-':>8}" for lang in langs))
    speed = results["ppocr int8"].lines_per_s / results["ppocr fp32"].lines_per_s
    worst = max(results["ppocr int8"].summary[lang]["cer"] - results["ppocr fp32"].summary[lang]["cer"] for lang in pp_langs)
    routed_r, tess_r = results["routed (int8 + tesseract)"], results["tesseract"]
    print(f"\nint8 vs fp32 recognition: {speed:.2f}x lines/s (target 2x); worst per-language CER change {100 * worst:+.2f} points (target <= +1)")
    print(f"routed vs tesseract: {routed_r.lines_per_s / tess_r.lines_per_s:.2f}x lines/s; overall CER "
          f"{100 * routed_r.summary['overall']['cer']:.2f}% vs {100 * tess_r.summary['overall']['cer']:.2f}%")


if __name__ == "__main__":
    main()
