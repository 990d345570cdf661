"""Exact fp32 rewrites of exported PP-OCR graphs, run before int8 quantization.

Paddle2ONNX writes PP-OCRv4's recogniser as 700 small nodes: every weight as a `Constant` node
(quantizers then see no initializers, so Conv biases are not quantized to int32), every HardSwish as
Add -> Clip -> Mul -> Div, and each "learnable affine block" of PPLCNetV3 as a scalar Mul -> Add.
In fp32 those element-wise ops cost about a third of the run on 2 cores; in int8 they surround every
QLinearConv with DequantizeLinear/QuantizeLinear pairs and cost more than the convolutions save.

`simplify` rewrites, each step exact up to fp32 rounding:
- `Constant` nodes become initializers;
- Conv -> BatchNormalization, and Conv -> Mul(c) -> Add(c) with constant per-channel or scalar c,
  fold into the Conv's weights and bias;
- x * Clip(x + 3, 0, 6) / 6 becomes one HardSwish (opset 14);
- scalar Mul(s) -> Add(t) in front of a Conv folds into it: wholly for an unpadded 1x1 Conv, the
  scale only (an Add of t/s stays) where zero padding would otherwise see the offset.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import helper, numpy_helper


class Graph:
    """Index over an ONNX graph: producers, consumers and constant values, rebuilt after each rewrite."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        g = model.graph
        self.values = {i.name: numpy_helper.to_array(i) for i in g.initializer}
        self.producer = {o: n for n in g.node for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for n in g.node:
            for i in n.input:
                self.consumers[i].append(n)
        self.outputs = {o.name for o in g.output}

    def const(self, name: str) -> np.ndarray | None:
        return self.values.get(name)

    def only_consumer(self, tensor: str) -> onnx.NodeProto | None:
        users = self.consumers.get(tensor, [])
        return users[0] if len(users) == 1 and tensor not in self.outputs else None

    def const_operand(self, node: onnx.NodeProto) -> tuple[str, np.ndarray] | None:
        """For a binary Mul/Add with exactly one constant input: (the other input, the constant)."""
        a, b = node.input
        if self.const(b) is not None and self.const(a) is None:
            return a, self.const(b)
        if self.const(a) is not None and self.const(b) is None:
            return b, self.const(a)
        return None

    def set_initializer(self, name: str, value: np.ndarray) -> None:
        g = self.model.graph
        for i, init in enumerate(g.initializer):
            if init.name == name:
                g.initializer[i].CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))
                break
        else:
            g.initializer.append(numpy_helper.from_array(value.astype(np.float32), name))
        self.values[name] = value


def attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def constants_to_initializers(model: onnx.ModelProto) -> int:
    g = model.graph
    keep, moved = [], 0
    for n in g.node:
        if n.op_type == "Constant" and len(n.attribute) == 1 and n.attribute[0].name == "value":
            g.initializer.append(numpy_helper.from_array(numpy_helper.to_array(n.attribute[0].t), n.output[0]))
            moved += 1
        else:
            keep.append(n)
    del g.node[:]
    g.node.extend(keep)
    return moved


def _channel_vector(c: np.ndarray, channels: int) -> np.ndarray | None:
    """`c` as one value per output channel if it broadcasts as a scalar or as [1, C, 1, 1]."""
    if c.size == 1:
        return np.full(channels, float(c.ravel()[0]), np.float32)
    if (
        c.size == channels
        and c.ndim in (1, 3, 4)
        and (c.ndim == 1 or c.shape[-(c.ndim - 1) :] == (1,) * (c.ndim - 1) or c.shape == (1, channels, 1, 1))
    ):
        return c.reshape(channels).astype(np.float32)
    return None


def _conv_params(g: Graph, conv: onnx.NodeProto) -> tuple[np.ndarray, np.ndarray] | None:
    w = g.const(conv.input[1])
    if w is None:
        return None
    b = g.const(conv.input[2]) if len(conv.input) > 2 and conv.input[2] else np.zeros(w.shape[0], np.float32)
    return (w, b) if b is not None else None


def _set_conv_params(g: Graph, conv: onnx.NodeProto, w: np.ndarray, b: np.ndarray) -> None:
    wname, bname = conv.output[0] + ".folded_w", conv.output[0] + ".folded_b"  # node names may be empty
    g.set_initializer(wname, w)
    g.set_initializer(bname, b)
    conv.input[1] = wname
    if len(conv.input) > 2:
        conv.input[2] = bname
    else:
        conv.input.append(bname)


def _bypass(model: onnx.ModelProto, dead: list[onnx.NodeProto], src: str, dst: str) -> None:
    """Remove `dead` nodes; whatever read `dst` now reads `src`."""
    ids = {id(n) for n in dead}
    keep = [n for n in model.graph.node if id(n) not in ids]
    for n in keep:
        for k, name in enumerate(n.input):
            if name == dst:
                n.input[k] = src
    del model.graph.node[:]
    model.graph.node.extend(keep)


def fold_conv_affine(model: onnx.ModelProto) -> int:
    """Conv -> BatchNormalization | Mul(c) | Add(c) chains fold into the Conv."""
    folded = 0
    while True:
        g = Graph(model)
        for conv in model.graph.node:
            if conv.op_type != "Conv" or (params := _conv_params(g, conv)) is None:
                continue
            nxt = g.only_consumer(conv.output[0])
            if nxt is None or nxt.output[0] in g.outputs:  # the graph must keep its named outputs
                continue
            w, b = params
            cout = w.shape[0]
            if nxt.op_type == "BatchNormalization" and all(g.const(i) is not None for i in nxt.input[1:5]):
                scale, beta, mean, var = (g.const(i).astype(np.float64) for i in nxt.input[1:5])
                k = scale / np.sqrt(var + attr(nxt, "epsilon", 1e-5))
                w2, b2 = w * k.reshape(-1, 1, 1, 1), (b - mean) * k + beta
            elif nxt.op_type in ("Mul", "Add") and (op := g.const_operand(nxt)) is not None and op[0] == conv.output[0]:
                c = _channel_vector(op[1], cout)
                if c is None:
                    continue
                w2, b2 = (w * c.reshape(-1, 1, 1, 1), b * c) if nxt.op_type == "Mul" else (w, b + c)
            else:
                continue
            _set_conv_params(g, conv, w2.astype(np.float32), np.asarray(b2, np.float32))
            _bypass(model, [nxt], conv.output[0], nxt.output[0])
            folded += 1
            break
        else:
            return folded


def fuse_hardswish(model: onnx.ModelProto) -> int:
    """x * Clip(x + 3, 0, 6) / 6 (or * 1/6) -> HardSwish(x). Needs opset 14."""
    fused = 0
    g = Graph(model)
    dead: list[onnx.NodeProto] = []
    for add in list(model.graph.node):
        if add.op_type != "Add" or (op := g.const_operand(add)) is None or op[1].size != 1 or float(op[1].ravel()[0]) != 3.0:
            continue
        x = op[0]
        clip = g.only_consumer(add.output[0])
        if clip is None or clip.op_type != "Clip" or len(clip.input) < 3:
            continue
        lo, hi = g.const(clip.input[1]), g.const(clip.input[2])
        if lo is None or hi is None or float(lo) != 0.0 or float(hi) != 6.0:
            continue
        mul = g.only_consumer(clip.output[0])
        if mul is None or mul.op_type != "Mul" or set(mul.input) != {x, clip.output[0]}:
            continue
        last = g.only_consumer(mul.output[0])
        if last is None or (op6 := g.const_operand(last)) is None or op6[1].size != 1:
            continue
        k = float(op6[1].ravel()[0])
        if not ((last.op_type == "Div" and k == 6.0) or (last.op_type == "Mul" and abs(k - 1 / 6) < 1e-7)):
            continue
        index = list(model.graph.node).index(last)
        model.graph.node.insert(index, helper.make_node("HardSwish", [x], [last.output[0]], name=last.output[0] + ".hardswish"))
        dead += [add, clip, mul, last]
        fused += 1
    ids = {id(n) for n in dead}
    keep = [n for n in model.graph.node if id(n) not in ids]
    del model.graph.node[:]
    model.graph.node.extend(keep)
    return fused


def fold_affine_into_conv(model: onnx.ModelProto) -> int:
    """Mul(scalar s) -> Add(scalar t) feeding only a Conv. An unpadded, ungrouped 1x1 Conv takes both:
    W(s x + t) + b = (s W) x + (b + t sum W). Any other Conv takes the scale, keeping an Add of t/s in
    front: zero padding of s(x + t/s) is s times zero padding of (x + t/s), so (s W) * (x + t/s) is exact."""
    folded = 0
    while True:
        g = Graph(model)
        for mul in model.graph.node:
            if mul.op_type != "Mul" or (m := g.const_operand(mul)) is None or m[1].size != 1 or float(m[1].ravel()[0]) == 0.0:
                continue
            add = g.only_consumer(mul.output[0])
            if add is None or add.op_type != "Add" or (a := g.const_operand(add)) is None or a[1].size != 1:
                continue
            conv = g.only_consumer(add.output[0])
            if conv is None or conv.op_type != "Conv" or conv.input[0] != add.output[0] or (params := _conv_params(g, conv)) is None:
                continue
            w, b = params
            s, t = float(m[1].ravel()[0]), float(a[1].ravel()[0])
            if w.shape[2:] == (1, 1) and not any(attr(conv, "pads", [0])) and attr(conv, "group", 1) == 1:
                _set_conv_params(g, conv, (w * s).astype(np.float32), (b + t * w.sum(axis=(1, 2, 3))).astype(np.float32))
                _bypass(model, [mul, add], m[0], add.output[0])
            else:
                _set_conv_params(g, conv, (w * s).astype(np.float32), b.astype(np.float32))
                shift = add.output[0] + ".shift"
                g.set_initializer(shift, np.array([t / s], np.float32))
                add.input[:] = [m[0], shift]
                _bypass(model, [mul], m[0], mul.output[0])
            folded += 1
            break
        else:
            return folded


def prune(model: onnx.ModelProto) -> None:
    """Drop initializers nothing reads and shape records of tensors that no longer exist."""
    g = model.graph
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    produced = {o for n in g.node for o in n.output}
    inits = [i for i in g.initializer if i.name in used]
    infos = [v for v in g.value_info if v.name in produced]
    del g.initializer[:], g.value_info[:]
    g.initializer.extend(inits)
    g.value_info.extend(infos)


def simplify(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, int]]:
    """The rewrites above on a copy of `model` (opset 14 or more, for HardSwish); returns the model and
    how many of each rewrite applied."""
    from onnx import version_converter

    out = onnx.ModelProto()
    out.CopyFrom(model if opset(model) >= 14 else version_converter.convert_version(model, 14))
    counts = {
        "constants": constants_to_initializers(out),
        "conv_affine": fold_conv_affine(out),
        "hardswish": fuse_hardswish(out),
        "affine_into_conv": fold_affine_into_conv(out),
    }
    prune(out)
    onnx.checker.check_model(out)
    return out, counts
