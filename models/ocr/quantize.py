"""int8 quantization of the PP-OCR recogniser with ONNX Runtime.

Static QDQ quantization with per-channel weights is the default: a CalibrationDataReader feeds
calibration lines preprocessed exactly as at inference (the recogniser's own resize, pad and
normalisation), the calibration method is MinMax (the default: about 2 GB), Entropy or Percentile
(histograms of every activation: 16 GB for the demo's set), and nodes that hurt
accuracy can be kept in fp32 by name or by op type. Per-channel bias DequantizeLinear needs an
`axis` attribute, which needs opset 13 or more: older models (PP-OCRv4 ships with opset 12) are
converted first. Dynamic quantization is available for comparison.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Literal

import numpy as np
import onnx
from onnx import version_converter

from atelier.kernel.storage import write_bytes_atomic
from atelier.models.ocr.graph import simplify

Method = Literal["MinMax", "Entropy", "Percentile"]


@dataclass(frozen=True)
class QuantizeConfig:
    mode: Literal["static", "dynamic"] = "static"
    # MinMax keeps each line's activations only to take their range: the demo's calibration peaked at about 2 GB
    # where Percentile's histograms took 16 GB. (onnxruntime's CalibMaxIntermediateOutputs is no way to stream:
    # in 1.32 it drops the outputs it collected instead of merging their ranges, so it is not used.)
    method: Method = "MinMax"
    per_channel: bool = True
    percentile: float = 99.999
    min_opset: int = 13
    # At most this many calibration lines are fed. ORT's calibrators keep every line's activations in
    # memory: 200 lines of about 340 px took over 20 GB when Add/Mul were quantized too.
    calibration_lines: int = 64
    op_types: tuple[str, ...] = ("Conv", "MatMul")  # where the time goes; element-wise ops stay fp32
    exclude_nodes: tuple[str, ...] = ()  # kept in fp32 by name
    simplify: bool = True  # exact fp32 graph rewrites first (models/ocr/graph.py)
    extra: dict = field(default_factory=dict)


class LineReader:
    """onnxruntime CalibrationDataReader over line images preprocessed as at inference: resized to the
    recogniser's height and padded on the right, as a batch pads its lines to its widest. All lines
    share one width (the widest's), so histogram calibrators can stack their activations."""

    def __init__(self, input_name: str, lines: Iterable[np.ndarray], preprocess: Callable[[np.ndarray, float], np.ndarray]) -> None:
        lines = list(lines)
        ratio = max(img.shape[1] / img.shape[0] for img in lines)
        self.input_name = input_name
        self.batches = iter([preprocess(img, ratio)[np.newaxis].astype(np.float32) for img in lines])

    def get_next(self) -> dict | None:
        batch = next(self.batches, None)
        return None if batch is None else {self.input_name: batch}


def with_min_opset(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    current = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    return model if current >= opset else version_converter.convert_version(model, opset)


def write_simplified(src: Path, dst: Path) -> dict[str, int]:
    """The exact fp32 rewrite of `src` (models/ocr/graph.py) written atomically to `dst`, metadata kept;
    returns how many of each rewrite applied."""
    source = onnx.load(str(src))
    model, counts = simplify(source)
    del model.metadata_props[:]
    model.metadata_props.extend(source.metadata_props)
    write_bytes_atomic(Path(dst), model.SerializeToString())
    return counts


def quantize_model(
    src: Path,
    dst: Path,
    cfg: QuantizeConfig,
    calibration: list[np.ndarray] | None = None,
    preprocess: Callable[[np.ndarray, float], np.ndarray] | None = None,
) -> Path:
    """Write the int8 model to `dst` (atomically), keeping the source's metadata (PP-OCR stores the
    recogniser's character list there)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    source = onnx.load(str(src))
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / "fp32.onnx"
        prepared = simplify(source)[0] if cfg.simplify else source
        onnx.save(with_min_opset(prepared, cfg.min_opset), str(staged))
        out = Path(tmp) / "int8.onnx"
        if cfg.mode == "dynamic":
            quantize_dynamic(
                str(staged),
                str(out),
                per_channel=cfg.per_channel,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=list(cfg.exclude_nodes),
                op_types_to_quantize=list(cfg.op_types) or None,
            )
        else:
            if not calibration or preprocess is None:
                raise ValueError("static quantization needs calibration images and the recogniser's preprocessing")
            input_name = source.graph.input[0].name
            extra = {"CalibPercentile": cfg.percentile, **cfg.extra} if cfg.method == "Percentile" else dict(cfg.extra)
            op_types = list(cfg.op_types) or None
            with _without_preprocessing_advice():
                quantize_static(
                    str(staged),
                    str(out),
                    LineReader(input_name, calibration[: cfg.calibration_lines], preprocess),
                    quant_format=QuantFormat.QDQ,
                    per_channel=cfg.per_channel,
                    activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                    calibrate_method=getattr(CalibrationMethod, cfg.method),
                    nodes_to_exclude=list(cfg.exclude_nodes),
                    op_types_to_quantize=op_types,
                    extra_options=extra,
                )
        quantized = onnx.load(str(out))
        del quantized.metadata_props[:]
        quantized.metadata_props.extend(source.metadata_props)
        write_bytes_atomic(Path(dst), quantized.SerializeToString())
    return Path(dst)


class _AdviceFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Please consider")


@contextlib.contextmanager
def _without_preprocessing_advice():
    """onnxruntime logs "Please consider pre-processing before quantization" on the root logger for
    every model; the recogniser is already simplified above (`cfg.simplify`), so the advice is noise."""
    root, advice = logging.getLogger(), _AdviceFilter()
    root.addFilter(advice)
    try:
        yield
    finally:
        root.removeFilter(advice)
