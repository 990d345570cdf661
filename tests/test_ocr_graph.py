"""The exact fp32 rewrites that run before int8 quantization (models/ocr/graph.py)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from atelier.models.ocr.graph import simplify


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def paddle_style_block(channels: int = 4) -> onnx.ModelProto:
    """Conv -> BN -> Mul/Add (affine) -> x*Clip(x+3,0,6)/6 -> Mul/Add -> padded depthwise Conv ->
    Mul/Add -> Relu -> Mul/Add -> 1x1 Conv, every weight a Constant node and no node named, as
    Paddle2ONNX writes PP-OCR."""
    rng = np.random.default_rng(0)
    consts = {
        "w0": rng.normal(size=(channels, 3, 3, 3)),
        "bn_s": rng.uniform(0.5, 2, channels),
        "bn_b": rng.normal(size=channels),
        "bn_m": rng.normal(size=channels),
        "bn_v": rng.uniform(0.5, 2, channels),
        "s1": [1.7],
        "t1": [0.3],
        "three": [3.0],
        "zero": 0.0,
        "six_c": 6.0,
        "six": [6.0],
        "s2": [0.6],
        "t2": [-0.4],
        "w1": rng.normal(size=(channels, 1, 3, 3)),
        "b1": rng.normal(size=channels),
        "s3": [1.3],
        "t3": [0.8],
        "w2": rng.normal(size=(5, channels, 1, 1)),
        "b2": rng.normal(size=5),
    }
    nodes = [helper.make_node("Constant", [], [k], value=numpy_helper.from_array(np.asarray(v, np.float32), k)) for k, v in consts.items()]
    nodes += [
        helper.make_node("Conv", ["x", "w0"], ["c0"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c0", "bn_s", "bn_b", "bn_m", "bn_v"], ["bn"]),
        helper.make_node("Mul", ["s1", "bn"], ["m1"]),
        helper.make_node("Add", ["m1", "t1"], ["a1"]),
        helper.make_node("Add", ["a1", "three"], ["h0"]),
        helper.make_node("Clip", ["h0", "zero", "six_c"], ["h1"]),
        helper.make_node("Mul", ["a1", "h1"], ["h2"]),
        helper.make_node("Div", ["h2", "six"], ["hs"]),
        helper.make_node("Mul", ["s2", "hs"], ["m2"]),
        helper.make_node("Add", ["m2", "t2"], ["a2"]),
        helper.make_node("Conv", ["a2", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], group=channels),
        helper.make_node("Mul", ["c1", "s3"], ["m3"]),
        helper.make_node("Add", ["m3", "t3"], ["a3"]),
        helper.make_node("Relu", ["a3"], ["r3"]),
        helper.make_node("Mul", ["r3", "s2"], ["m4"]),
        helper.make_node("Add", ["m4", "t1"], ["a4"]),
        helper.make_node("Conv", ["a4", "w2", "b2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "block",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, 8, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 12)])


def test_rewrites_are_exact_including_padded_borders():
    model = paddle_style_block()
    simple, counts = simplify(model)
    x = np.random.default_rng(1).normal(size=(2, 3, 8, 16)).astype(np.float32) * 3
    want, got = run(model, x), run(simple, x)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)  # borders included: a wrong offset fold breaks them
    ops = [n.op_type for n in simple.graph.node]
    assert counts["hardswish"] == 1 and "HardSwish" in ops and "Div" not in ops and "Clip" not in ops
    assert "Constant" not in ops and "BatchNormalization" not in ops
    assert counts["conv_affine"] == 5  # BN, Mul, Add after the first Conv; Mul, Add after the depthwise one
    assert counts["affine_into_conv"] == 2  # scale into the padded depthwise Conv (Add of t/s kept), all into the 1x1
    assert ops.count("Mul") == 0 and ops.count("Add") == 1


def test_a_tensor_read_twice_is_not_folded():
    model = paddle_style_block()
    model.graph.output.append(helper.make_tensor_value_info("m1", TensorProto.FLOAT, None))  # Mul output is also a graph output
    simple, _ = simplify(model)
    x = np.random.default_rng(2).normal(size=(1, 3, 8, 16)).astype(np.float32)
    want = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})
    got = ort.InferenceSession(simple.SerializeToString()).run(None, {"x": x})
    for w, g in zip(want, got):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_shipped_recogniser_rewrite_matches_and_drops_the_elementwise_ops():
    from atelier.models.ocr.shipped import shipped

    source = onnx.load(str(shipped("ppocrv4-rec")[0]))
    simple, counts = simplify(source)
    assert counts["hardswish"] >= 20 and counts["conv_affine"] >= 30
    assert len(simple.graph.node) < 0.65 * sum(n.op_type != "Constant" for n in source.graph.node)
    x = np.random.default_rng(3).random((2, 3, 48, 320), dtype=np.float32)
    want, got = run(source, x), run(simple, x)
    assert np.abs(got - want).max() < 1e-4 and (got.argmax(-1) == want.argmax(-1)).all()


def test_interleaved_speed_ranks_readers_by_their_cost():
    import time

    from atelier.models.ocr.variants import measure as interleaved_speed

    def reader(cost: float):
        def read(images):
            time.sleep(cost * len(images))
            return images

        return read

    images = [np.zeros((4, 4, 3), np.uint8)] * 20
    speed = interleaved_speed({"fast": reader(0.001), "slow": reader(0.003)}, images, repeats=3)
    assert 2.0 < speed["fast"] / speed["slow"] < 3.5 and 200 < speed["fast"] < 1000


@pytest.mark.slow
def test_v6_small_rewrite_is_exact():
    """The recogniser that is quantized and served: its fp32 rewrite reads what the shipped model reads."""
    from atelier.models.ocr.shipped import shipped

    source = onnx.load(str(shipped("ppocrv6s-rec")[0]))
    simple, counts = simplify(source)
    assert counts["conv_affine"] >= 30
    x = np.random.default_rng(4).random((2, 3, 48, 320), dtype=np.float32)
    want, got = run(source, x), run(simple, x)
    assert np.abs(got - want).max() < 1e-4 and (got.argmax(-1) == want.argmax(-1)).all()
