"""GLM-OCR backend on a tiny random-config instance of transformers' GlmOcrForConditionalGeneration."""

from __future__ import annotations

import numpy as np
import pytest

from atelier.kernel.errors import NotFound
from tests.tiny_glm import build_tiny_glm_ocr


@pytest.fixture(scope="module")
def tiny_glm(tmp_path_factory):
    return build_tiny_glm_ocr(tmp_path_factory.mktemp("glm-ocr"))


def lines():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 255, (48, 160, 3), dtype=np.uint8), np.full((32, 300, 3), 255, np.uint8)]


def test_glm_ocr_reads_a_batch_deterministically_with_confidences(tiny_glm):
    from atelier.models.ocr.glm import GlmOcr

    glm = GlmOcr(tiny_glm, batch_size=2)
    first, again = glm.read_lines(lines(), "en"), glm.read_lines(lines(), "en")
    assert [x.text for x in first] == [x.text for x in again]
    assert all(x.backend == "glm" and x.lang == "en" and 0.0 < x.confidence <= 1.0 for x in first)
    assert len(glm.read_lines(lines()[:1] * 3)) == 3  # a batch that does not fill the last slot


def test_glm_ocr_directory_errors_name_the_path(tmp_path, tiny_glm):
    from atelier.models.ocr.glm import GlmOcr

    with pytest.raises(NotFound, match=str(tmp_path)):
        GlmOcr(tmp_path)


def test_routed_engine_sends_a_language_to_glm_and_needs_its_weights(tiny_glm):
    from atelier.models.ocr.engine import load_engine, shipped_engine_files

    files, spec = shipped_engine_files({"zh": "ppocr", "en": "glm"})
    with pytest.raises(NotFound, match="ATELIER_GLM_OCR_WEIGHTS"):
        load_engine(files, spec, {}, threads=2)
    engine = load_engine(files, {**spec, "glm_weights": str(tiny_glm)}, {}, threads=2)
    readings = engine.read_lines(lines(), ["en", "zh"])
    assert [r.backend for r in readings] == ["glm", "ppocr"]
