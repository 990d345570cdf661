"""OCR domain: rendering, metrics, routing, confidence calibration, quantization, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.ocr.confidence import expected_calibration_error, fit_isotonic
from models.ocr.images import BadDocument, load_document
from models.ocr.langs import UnknownLanguage, language, script_of
from models.ocr.metrics import edit_distance, summarise
from models.ocr.render import RenderSpec, read_labels, render_splits
from models.ocr.router import choose_routes, guess_language

from models.ocr.render import FONT_FILES  # noqa: E402

pytestmark = pytest.mark.skipif(not all(Path(f).is_file() for fonts in FONT_FILES.values() for f in fonts[:1]),
                                reason="needs Debian's fonts-noto-cjk and fonts-dejavu-core (make ocr-system-deps)")
needs_tesseract = pytest.mark.skipif(shutil.which("tesseract") is None, reason="needs Debian's tesseract-ocr (make ocr-system-deps)")


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("docs")
    return render_splits(root, RenderSpec(lines_per_lang=4, seed=1), RenderSpec(lines_per_lang=3, pages_per_lang=1, seed=2))


def test_splits_never_share_a_line(sets):
    cal = {line for r in read_labels(sets["calibration"]) for line in r["text"].split("\n")}
    ev = {line for r in read_labels(sets["evaluation"]) for line in r["text"].split("\n")}
    assert cal and ev and not cal & ev
    langs = {r["lang"] for r in read_labels(sets["evaluation"])}
    assert langs == {"zh", "en", "fr", "es", "de", "ru", "ja", "ko"}
    assert all((sets["evaluation"] / r["file"]).is_file() for r in read_labels(sets["evaluation"]))


def test_rendering_is_reproducible(tmp_path):
    a = render_splits(tmp_path / "a", RenderSpec(langs=("ko",), lines_per_lang=2, seed=5), RenderSpec(langs=("ko",), lines_per_lang=2, seed=6))
    b = render_splits(tmp_path / "b", RenderSpec(langs=("ko",), lines_per_lang=2, seed=5), RenderSpec(langs=("ko",), lines_per_lang=2, seed=6))
    assert read_labels(a["evaluation"]) == read_labels(b["evaluation"])
    first = read_labels(a["evaluation"])[0]["file"]
    assert (a["evaluation"] / first).read_bytes() == (b["evaluation"] / first).read_bytes()


def test_cer_and_scripts():
    assert edit_distance("kitten", "sitting") == 3
    s = summarise([{"lang": "en", "text": "abcd", "predicted": "abxd"}, {"lang": "zh", "text": "中文", "predicted": "中 文"}])
    assert s["en"]["cer"] == 0.25 and s["zh"]["cer"] == 0.0 and s["overall"]["cer"] == pytest.approx(1 / 6)
    assert script_of("русский язык") == "cyrillic" and script_of("한국어") == "hangul"
    assert script_of("請求書ありがとう") == "kana" and script_of("发票") == "han"
    assert [guess_language(t) for t in ("año", "Straße", "été", "total")] == ["es", "de", "fr", "en"]
    with pytest.raises(UnknownLanguage, match="xx"):
        language("xx")


def test_routes_pick_the_lowest_cer_and_break_ties_by_speed():
    table = choose_routes({"ppocr": {"zh": 0.0, "en": 0.02, "ru": 0.8}, "tesseract": {"zh": 0.0005, "en": 0.0, "ru": 0.0}},
                          {"ppocr": 30.0, "tesseract": 4.0})
    assert table.routes == {"zh": "ppocr", "en": "tesseract", "ru": "tesseract"}


def test_isotonic_calibration_lowers_the_calibration_error():
    rng = np.random.default_rng(0)
    conf = rng.uniform(0.5, 1.0, 2000)
    correct = rng.uniform(0, 1, 2000) < (conf - 0.5) * 1.2  # over-confident backend
    before = expected_calibration_error(list(conf), list(correct))
    mapping = fit_isotonic(list(conf[:1000]), list(correct[:1000]))
    after = expected_calibration_error([mapping(c) for c in conf[1000:]], list(correct[1000:]))
    assert before > 0.15 and after < 0.05
    assert all(a <= b for a, b in zip(mapping.y, mapping.y[1:]))  # monotone


def test_bad_documents_are_named(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not an image")
    with pytest.raises(BadDocument, match="broken.png.*not a readable image"):
        load_document(tmp_path / "broken.png")
    with pytest.raises(BadDocument, match="missing.png.*does not exist"):
        load_document(tmp_path / "missing.png")
    Image.new("RGB", (3000, 2000), "white").save(tmp_path / "big.png")
    assert load_document(tmp_path / "big.png", max_pixels=1_000_000).size <= 3 * 1_000_000


def test_document_suite_names_each_bad_item(sets, tmp_path):
    from models.validation.document_suite import validate_document_set

    folder = tmp_path / "set"
    shutil.copytree(sets["evaluation"], folder)
    labels = read_labels(folder)
    labels[0]["text"] = " "
    labels[1]["lang"] = "xx"
    labels[2]["file"] = "../../etc/passwd"
    labels[3]["file"] = "gone.png"
    (folder / labels[4]["file"]).write_bytes(b"garbage")
    Image.new("RGB", (40, 20), "white").save(folder / "stray.png")
    lines = [json.dumps(r, ensure_ascii=False) for r in labels] + ["{not json"]
    (folder / "labels.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    report = validate_document_set(folder, tmp_path / "report")
    found = {(item, rule) for item, rule, _ in report.failures}
    assert not report.success
    assert {(labels[0]["file"], "has_text"), (labels[1]["file"], "lang"), ("../../etc/passwd", "inside"),
            ("gone.png", "exists"), (labels[4]["file"], "decodable"), ("stray.png", "labelled"),
            (f"labels.jsonl:{len(lines)}", "json")} <= found
    assert (tmp_path / "report" / "validation.json").is_file()
    assert validate_document_set(sets["evaluation"]).success


def test_ppocr_reads_chinese_and_latin_lines(sets):
    from models.ocr.backends import PPOCR
    from models.ocr.evaluate import evaluate_lines, load_set

    records, images = load_set(sets["evaluation"], langs=("zh", "en"))
    result = evaluate_lines(PPOCR(threads=2).read_lines, records, images)
    assert result.summary["zh"]["cer"] < 0.1 and result.summary["en"]["cer"] < 0.1


@needs_tesseract
def test_tesseract_reads_cyrillic_and_hangul_that_ppocr_cannot(sets):
    from models.ocr.backends import PPOCR, Tesseract
    from models.ocr.evaluate import evaluate_lines, load_set

    records, images = load_set(sets["evaluation"], langs=("ru", "ko"))
    tess = evaluate_lines(Tesseract().read_lines, records, images)
    pp = evaluate_lines(PPOCR(threads=2).read_lines, records, images)
    for lang in ("ru", "ko"):
        assert tess.summary[lang]["cer"] < 0.15 < pp.summary[lang]["cer"]


def test_static_int8_recogniser_keeps_metadata_and_reads(sets, tmp_path):
    import onnx

    from models.ocr.backends import PPOCR, shipped_ppocr_models
    from models.ocr.evaluate import load_set
    from models.ocr.quantize import QuantizeConfig, quantize_model

    fp32 = PPOCR(threads=2)
    records, images = load_set(sets["calibration"], langs=("zh", "en"))
    out = quantize_model(shipped_ppocr_models()["rec"], tmp_path / "rec-int8.onnx",
                         QuantizeConfig(method="MinMax", calibration_lines=8), images, fp32.preprocess_line)
    model = onnx.load(str(out))
    source = onnx.load(str(shipped_ppocr_models()["rec"]))
    assert {p.key for p in model.metadata_props} == {p.key for p in source.metadata_props}  # the character list
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 13
    assert sum(n.op_type == "QuantizeLinear" for n in model.graph.node) > 10
    int8 = PPOCR(rec=out, threads=2)
    assert int8.read_lines(images[:2])[0].text.strip()  # reads something with the shipped character list


def test_routed_engine_reads_a_mixed_batch_and_names_bad_files(sets, tmp_path):
    from models.ocr.backends import shipped_ppocr_models
    from models.ocr.engine import load_engine, read_documents

    m = shipped_ppocr_models()
    routes = {"zh": "ppocr", "en": "ppocr", "fr": "ppocr", "es": "ppocr", "de": "ppocr"}
    if shutil.which("tesseract"):
        routes.update({"ru": "tesseract", "ko": "tesseract", "ja": "tesseract"})
    engine = load_engine(m["det"], m["rec"], m["cls"], {"routes": routes}, {}, threads=2)
    labels = {r["file"]: r for r in read_labels(sets["evaluation"])}
    zh = next(f for f, r in labels.items() if r["lang"] == "zh" and r["kind"] == "line")
    page = next(f for f, r in labels.items() if r["lang"] == "en" and r["kind"] == "page")
    (tmp_path / "bad.png").write_bytes(b"nope")
    rows = [{"path": str(sets["evaluation"] / zh), "lang": None, "kind": "line"},
            {"path": str(tmp_path / "bad.png"), "lang": "en", "kind": "page"},
            {"path": str(sets["evaluation"] / page), "lang": "en", "kind": "page"},
            {"path": str(sets["evaluation"] / zh), "lang": "xx", "kind": "line"}]
    out = read_documents(engine, rows)
    assert out[0]["language"] == "zh" and out[0]["text"] == labels[zh]["text"] and out[0]["backend"] == "ppocr"
    assert "bad.png" in out[1]["error"] and "not a readable image" in out[1]["error"] and out[1]["flagged"]
    assert len(json.loads(out[2]["lines"])) >= 3 and json.loads(out[2]["lines"])[0]["box"]
    assert "xx" in out[3]["error"]
    if shutil.which("tesseract"):
        ru = next(f for f, r in labels.items() if r["lang"] == "ru" and r["kind"] == "line")
        got = read_documents(engine, [{"path": str(sets["evaluation"] / ru), "lang": None, "kind": "line"}])[0]
        assert got["language"] == "ru" and got["backend"] == "tesseract"
