"""Text-line detection on pages (PP-OCR's DB detector in ONNX) and the crops handed to recognisers.

`LineDetector.detect(page)` returns one `Box` per text line: its four corners on the page and the
line's image, cut out along the box and warped level. The angle classifier (PP-OCR's 0/180 degree
model) decides for the whole page: when most of its lines look upside down and the recognisers read
them better turned (the router's check), the page is turned and detected again. Line by line it is not to be trusted: it calls 16-18% of upright Korean and Russian
lines upside down (measured on 120 lines each), and misses a third of the really turned ones.
Post-processing (thresholds, polygon unclipping) is rapidocr's port of PaddleOCR's, so boxes match what PaddleOCR itself finds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from atelier.models.ocr.recognizer import ort_session


@dataclass
class Box:
    corners: list[list[float]]  # 4 points, clockwise from the top left, on the page the right way up
    image: np.ndarray  # the line, RGB, level
    on_page: list[list[float]] | None = None  # the corners on the page as given, where it had to be turned
    cell: tuple[int, int] | None = None  # (row, column) where the box is a table's cell (layout.py)

    @property
    def page_corners(self) -> list[list[float]]:
        return self.on_page or self.corners

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        xs, ys = [p[0] for p in self.corners], [p[1] for p in self.corners]
        return min(xs), min(ys), max(xs), max(ys)


def crop_quad(page: np.ndarray, quad: np.ndarray) -> np.ndarray:
    """The quadrilateral `quad` of `page`, warped to an upright rectangle (tall crops turned to lie flat)."""
    quad = quad.astype(np.float32)
    width = int(max(np.linalg.norm(quad[0] - quad[1]), np.linalg.norm(quad[2] - quad[3])))
    height = int(max(np.linalg.norm(quad[0] - quad[3]), np.linalg.norm(quad[1] - quad[2])))
    width, height = max(width, 1), max(height, 1)
    target = np.array([[0, 0], [width, 0], [width, height], [0, height]], np.float32)
    crop = cv2.warpPerspective(
        page, cv2.getPerspectiveTransform(quad, target), (width, height), borderMode=cv2.BORDER_REPLICATE, flags=cv2.INTER_CUBIC
    )
    return np.rot90(crop) if height >= 1.5 * width else crop


class LineDetector:
    def __init__(
        self,
        det: Path,
        cls: Path | None = None,
        threads: int | None = None,
        limit_side_len: int = 960,
        fine_side_len: int = 2048,
        box_thresh: float = 0.5,
        unclip_ratio: float = 1.6,
    ) -> None:
        from rapidocr_onnxruntime.ch_ppocr_det.utils import DBPostProcess

        self.det = ort_session(det, threads)
        self.det_input = self.det.get_inputs()[0].name
        self.cls = ort_session(cls, threads) if cls else None
        self.limit_side_len = limit_side_len
        self.fine_side_len = fine_side_len
        self.post = DBPostProcess(
            thresh=0.3, box_thresh=box_thresh, max_candidates=1000, unclip_ratio=unclip_ratio, use_dilation=True, score_mode="fast"
        )

    def _input(self, page: np.ndarray, limit: int) -> np.ndarray:
        """Longest side scaled to at most `limit` (and at least 32), both sides multiples of 32; a faint
        page's light flattened first (`flatten`)."""
        page = flatten(page) if faint(page) else page
        h, w = page.shape[:2]
        ratio = min(1.0, limit / max(h, w))
        rh, rw = max(32, int(round(h * ratio / 32) * 32)), max(32, int(round(w * ratio / 32) * 32))
        bgr = np.ascontiguousarray(cv2.resize(page, (rw, rh))[:, :, ::-1])
        return ((bgr.astype(np.float32) / 127.5 - 1.0).transpose(2, 0, 1))[np.newaxis]

    def detect(self, page: np.ndarray, upside_down: Callable[[list[Box]], bool] | None = None) -> list[Box]:
        """The page's lines. When the angle classifier says most lines are upside down, `upside_down`
        (the router's check with its recognisers) has the last word before the page is turned."""
        boxes = self._scaled_boxes(page)
        if self.cls is not None and boxes and self._upside_down(boxes) and (upside_down is None or upside_down(boxes)):
            boxes = self._scaled_boxes(np.ascontiguousarray(page[::-1, ::-1]), turned=True)
        return boxes

    def _scaled_boxes(self, page: np.ndarray, turned: bool = False) -> list[Box]:
        """Detection at the resolution the text needs: first with the longest side at `limit_side_len`;
        a page shrunk so far that its lines' boxes are under SMALL_TEXT pixels high there (a dense A4
        scan: 60 lines of 8 px x-height) is detected again at up to `fine_side_len`, where its boxes are
        tight enough to cut one line each (on the hard set's dense pages: 16% -> 4% CER, 0.12 -> 0.32 s)."""
        boxes = self._boxes(page, self.limit_side_len, turned)
        longest = max(page.shape[:2])
        if not boxes or longest <= self.limit_side_len:
            return boxes
        ratio = self.limit_side_len / longest
        height = float(np.median([b.bounds[3] - b.bounds[1] for b in boxes])) * ratio
        if height >= SMALL_TEXT or self.fine_side_len <= self.limit_side_len:
            return boxes
        return self._boxes(page, self.fine_side_len, turned)

    def _boxes(self, page: np.ndarray, limit: int, turned: bool = False) -> list[Box]:
        probs = self.det.run(None, {self.det_input: self._input(page, limit)})[0]
        quads, _ = self.post(probs, page.shape[:2])
        boxes = []
        for quad in quads:
            quad = _clockwise(np.asarray(quad, np.float32))
            quad[:, 0] = quad[:, 0].clip(0, page.shape[1] - 1)
            quad[:, 1] = quad[:, 1].clip(0, page.shape[0] - 1)
            if min(np.linalg.norm(quad[0] - quad[1]), np.linalg.norm(quad[0] - quad[3])) <= 3:
                continue
            corners = [[float(x), float(y)] for x, y in quad]
            on_page = None
            if turned:  # where the line is on the page as it was given
                h, w = page.shape[:2]
                on_page = [[w - 1 - x, h - 1 - y] for x, y in corners[2:] + corners[:2]]
            boxes.append(Box(corners, crop_quad(page, quad), on_page))
        return boxes

    def _upside_down(self, boxes: list[Box], threshold: float = 0.9) -> bool:
        """Whether PP-OCR's angle classifier is sure that most of the page's lines are upside down."""
        name = self.cls.get_inputs()[0].name
        turned = 0
        for start in range(0, len(boxes), 16):
            batch = np.stack([_cls_input(b.image) for b in boxes[start : start + 16]])
            probs = self.cls.run(None, {name: batch})[0]
            turned += int(((probs.argmax(axis=1) == 1) & (probs.max(axis=1) > threshold)).sum())
        return turned >= 0.5 * len(boxes)


SMALL_TEXT = 40  # median box height (detector pixels, unclipped) under which a shrunk page is detected again, finer
FAINT = 45  # grey levels between a page's median (paper) and its darkest 1% (ink) under which it is faint


def faint(page: np.ndarray) -> bool:
    grey = page[::4, ::4].mean(axis=2) if page.ndim == 3 else page[::4, ::4]
    low, median = np.percentile(grey, [1, 50])
    return bool(median - low < FAINT)


def flatten(page: np.ndarray) -> np.ndarray:
    """The page divided by its own background (a dilated, median-blurred copy: light and shadow without
    the ink), then stretched to the full grey range: faint ink on uneven paper becomes dark on white.
    Measured on the hard sets (issue 30), only faint pages gain (a faint receipt: 54% -> 15% CER); on
    others it was a wash or worse, so the detector sees it only for those."""
    grey = cv2.cvtColor(page, cv2.COLOR_RGB2GRAY) if page.ndim == 3 else page
    h, w = grey.shape
    k = max(15, (min(h, w) // 40) | 1)
    background = cv2.medianBlur(cv2.dilate(grey, np.ones((7, 7), np.uint8)), k)
    flat = cv2.divide(grey, background, scale=255)
    lo, hi = np.percentile(flat, [1, 99.5])
    flat = np.clip((flat.astype(np.float32) - lo) * 255.0 / max(hi - lo, 1.0), 0, 255).astype(np.uint8)
    return cv2.cvtColor(flat, cv2.COLOR_GRAY2RGB)


def _cls_input(image: np.ndarray, height: int = 48, width: int = 192) -> np.ndarray:
    h, w = image.shape[:2]
    resized_w = min(width, int(np.ceil(height * w / max(h, 1))))
    resized = cv2.resize(np.ascontiguousarray(image[:, :, ::-1]), (max(resized_w, 1), height)).astype(np.float32)
    out = np.zeros((3, height, width), np.float32)
    out[:, :, :resized_w] = resized.transpose(2, 0, 1) / 127.5 - 1.0
    return out


def _clockwise(quad: np.ndarray) -> np.ndarray:
    """Order 4 points top-left, top-right, bottom-right, bottom-left."""
    s, d = quad.sum(axis=1), np.diff(quad, axis=1).ravel()
    return np.array([quad[np.argmin(s)], quad[np.argmin(d)], quad[np.argmax(s)], quad[np.argmax(d)]], np.float32)
