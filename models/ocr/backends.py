"""OCR backends behind one interface.

- `PPOCR`: PaddleOCR's PP-OCR detection + angle classifier + recognition in ONNX, run by
  rapidocr-onnxruntime. The default models ship inside the `rapidocr-onnxruntime` wheel; any
  compatible ONNX file (a quantized recogniser, another language's) can be passed instead.
- `Tesseract`: the Tesseract 5 command line with Debian's language packs.

Both read pre-cropped text lines (`read_lines`) and whole pages (`read_page`, detection first) and
return `Line`s: text, confidence in [0, 1], and for pages the box (4 corner points).
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path

import numpy as np
from PIL import Image

from atelier.errors import AtelierError, NotFound
from models.ocr.corpus import NO_SPACES
from models.ocr.langs import language


def joiner(lang: str | None) -> str:
    """How words of `lang` join into a line: no spaces in Chinese and Japanese."""
    return "" if lang in NO_SPACES else " "


@dataclass
class Line:
    text: str
    confidence: float
    box: list[list[float]] | None = None
    backend: str = ""
    lang: str | None = None
    extra: dict = field(default_factory=dict)


class OCRError(AtelierError):
    pass


def shipped_ppocr_models() -> dict[str, Path]:
    """The PP-OCRv4 det/rec and v2 cls ONNX files inside the rapidocr-onnxruntime wheel."""
    spec = find_spec("rapidocr_onnxruntime")
    if spec is None or spec.origin is None:
        raise NotFound("rapidocr-onnxruntime", "is not installed", "install the lock file: `make demo` or `pip install rapidocr-onnxruntime==1.4.4`")
    root = Path(spec.origin).parent / "models"
    files = {"det": root / "ch_PP-OCRv4_det_infer.onnx", "rec": root / "ch_PP-OCRv4_rec_infer.onnx",
             "cls": root / "ch_ppocr_mobile_v2.0_cls_infer.onnx"}
    for kind, path in files.items():
        if not path.is_file():
            raise NotFound(str(path), f"the shipped PP-OCR {kind} model is missing", "reinstall rapidocr-onnxruntime==1.4.4")
    return files


class PPOCR:
    name = "ppocr"

    def __init__(self, det: Path | None = None, rec: Path | None = None, cls: Path | None = None,
                 threads: int | None = None, batch_size: int = 8, tuned_sessions: bool = True) -> None:
        from rapidocr_onnxruntime import RapidOCR

        shipped = shipped_ppocr_models()
        self.paths = {"det": Path(det or shipped["det"]), "rec": Path(rec or shipped["rec"]), "cls": Path(cls or shipped["cls"])}
        for kind, path in self.paths.items():
            if not path.is_file():
                raise NotFound(str(path), f"no {kind} model file", "pass an existing ONNX file")
        threads = threads or (os.cpu_count() or 1)
        self.engine = RapidOCR(det_model_path=str(self.paths["det"]), rec_model_path=str(self.paths["rec"]),
                               cls_model_path=str(self.paths["cls"]), intra_op_num_threads=threads)
        self.engine.text_rec.rec_batch_num = batch_size
        # rapidocr turns ONNX Runtime's memory arena off (a fresh allocation per node per batch: on 2
        # cores about as much time in the kernel as in the model) and leaves idle threads spinning;
        # ours keep the arena and let idle threads sleep.
        for wrapper, kind in ((self.engine.text_det.infer, "det"), (self.engine.text_rec.session, "rec"), (self.engine.text_cls.infer, "cls")):
            if tuned_sessions:
                wrapper.session = ort_session(self.paths[kind], threads)

    def preprocess_line(self, image: np.ndarray, wh_ratio: float) -> np.ndarray:
        """The recogniser's exact input for an RGB line padded to `wh_ratio` (width over height), as a
        batch pads its lines to its widest: what int8 calibration must see."""
        rec = self.engine.text_rec
        _, height, width = rec.rec_image_shape
        return rec.resize_norm_img(_bgr(image), max(width / height, wh_ratio))

    def read_lines(self, images: list[np.ndarray], lang: str | None = None) -> list[Line]:
        bgr = [_bgr(img) for img in images]
        results, _ = self.engine.text_rec(bgr)
        return [Line(text, float(conf), None, self.name, lang) for text, conf in results]

    def read_page(self, image: np.ndarray, lang: str | None = None) -> list[Line]:
        result, _ = self.engine(_bgr(image), use_det=True, use_cls=True, use_rec=True)
        if not result:
            return []
        return [Line(text, float(conf), [[float(x), float(y)] for x, y in box], self.name, lang) for box, text, conf in result]


def ort_session(path: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


class Tesseract:
    """Tesseract 5 through its command line (one process per image, `workers` at a time)."""

    name = "tesseract"

    def __init__(self, binary: str = "tesseract", workers: int | None = None) -> None:
        path = shutil.which(binary)
        if path is None:
            raise NotFound(binary, "Tesseract is not installed",
                           "install Debian's tesseract-ocr and its language packs (`make ocr-system-deps`)")
        self.binary = path
        self.workers = workers or (os.cpu_count() or 1)
        listed = subprocess.run([path, "--list-langs"], capture_output=True, text=True, check=False).stdout.split()
        self.installed = set(listed[1:] if listed and listed[0].startswith("List") else listed)

    def _packs(self, lang: str | None, codes: tuple[str, ...] | None = None) -> str:
        codes = list(codes) if codes else [lang] if lang else ["en"]
        packs = [language(c).tesseract for c in codes]
        missing = [p for p in packs if p not in self.installed]
        if missing:
            raise NotFound(f"tesseract language pack {missing[0]}", "is not installed",
                           f"apt-get install tesseract-ocr-{missing[0].replace('_', '-')}")
        return "+".join(packs)

    def _run(self, image: np.ndarray, packs: str, psm: int) -> list[dict]:
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, "PNG")
        done = subprocess.run([self.binary, "stdin", "stdout", "-l", packs, "--psm", str(psm), "tsv"], input=buf.getvalue(),
                              capture_output=True, check=False, env={**os.environ, "OMP_THREAD_LIMIT": "1"})
        if done.returncode != 0:
            raise OCRError("tesseract", f"failed ({done.stderr.decode(errors='replace')[-300:].strip()})", "check the image and the language pack")
        rows = list(csv.DictReader(io.StringIO(done.stdout.decode("utf-8", errors="replace")), delimiter="\t", quoting=csv.QUOTE_NONE))
        return [r for r in rows if r.get("level") == "5" and (r.get("text") or "").strip()]

    def _lines(self, words: list[dict], lang: str | None, with_boxes: bool) -> list[Line]:
        groups: dict[tuple, list[dict]] = {}
        for w in words:
            groups.setdefault((w["block_num"], w["par_num"], w["line_num"]), []).append(w)
        lines = []
        for ws in groups.values():
            conf = float(np.mean([max(float(w["conf"]), 0.0) for w in ws])) / 100.0
            box = None
            if with_boxes:
                x0 = min(int(w["left"]) for w in ws)
                y0 = min(int(w["top"]) for w in ws)
                x1 = max(int(w["left"]) + int(w["width"]) for w in ws)
                y1 = max(int(w["top"]) + int(w["height"]) for w in ws)
                box = [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]
            lines.append(Line(joiner(lang).join(w["text"] for w in ws), conf, box, self.name, lang))
        return lines

    def read_lines(self, images: list[np.ndarray], lang: str | None = None, packs: tuple[str, ...] | None = None) -> list[Line]:
        """`packs` (language codes) overrides `lang`'s pack: the router reads unknown scripts with several."""
        packs = self._packs(lang, packs)

        def one(img: np.ndarray) -> Line:
            lines = self._lines(self._run(img, packs, 7), lang, False)
            if not lines:
                return Line("", 0.0, None, self.name, lang)
            return Line(joiner(lang).join(x.text for x in lines), float(np.mean([x.confidence for x in lines])), None, self.name, lang)

        with ThreadPoolExecutor(self.workers) as pool:
            return list(pool.map(one, images))

    def read_page(self, image: np.ndarray, lang: str | None = None, packs: tuple[str, ...] | None = None) -> list[Line]:
        return self._lines(self._run(image, self._packs(lang, packs), 3), lang, True)


def _bgr(image: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(image[:, :, ::-1]) if image.ndim == 3 else np.stack([image] * 3, axis=-1)
