"""Graphs built in code for the tests: static channels, dynamic batch, seeded weights."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxprune.graph import infer_shapes

OPSET = 17


class Builder:
    """Appends nodes with seeded random weights; every method returns the new tensor's name."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def _name(self, base: str) -> str:
        self.count += 1
        return f"{base}{self.count}"

    def const(self, value: np.ndarray, base: str = "w") -> str:
        name = self._name(base)
        value = np.asarray(value)
        self.inits.append(
            numpy_helper.from_array(value.astype(np.float32) if value.dtype == np.float64 else value, name)
        )
        return name

    def node(self, op: str, inputs: list[str], n_out: int = 1, **attrs) -> str | list[str]:
        name = self._name(op.lower())
        outs = [f"{name}_out{i}" if n_out > 1 else f"{name}_out" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=name, **attrs))
        return outs if n_out > 1 else outs[0]

    def conv(
        self,
        x: str,
        cin: int,
        cout: int,
        k: int = 3,
        *,
        stride: int = 1,
        group: int = 1,
        bias: bool = True,
        pad: int | None = None,
    ) -> str:
        w = self.rng.standard_normal((cout, cin // group, k, k)).astype(np.float32) / np.sqrt(cin // group * k * k)
        inputs = [x, self.const(w)]
        if bias:
            inputs.append(self.const(self.rng.standard_normal(cout).astype(np.float32) * 0.1, "b"))
        p = k // 2 if pad is None else pad
        return self.node("Conv", inputs, kernel_shape=[k, k], strides=[stride, stride], pads=[p] * 4, group=group)

    def bn(self, x: str, c: int) -> str:
        r = self.rng
        params = [
            r.uniform(0.5, 1.5, c),
            r.standard_normal(c) * 0.1,
            r.standard_normal(c) * 0.1,
            r.uniform(0.5, 1.5, c),
        ]
        return self.node(
            "BatchNormalization", [x] + [self.const(p.astype(np.float32), "bn") for p in params], epsilon=1e-5
        )

    def relu(self, x: str) -> str:
        return self.node("Relu", [x])

    def cbr(self, x: str, cin: int, cout: int, k: int = 3, **kw) -> str:
        return self.relu(self.bn(self.conv(x, cin, cout, k, bias=False, **kw), cout))

    def gemm(self, x: str, k: int, n: int) -> str:
        w = self.rng.standard_normal((n, k)).astype(np.float32) / np.sqrt(k)
        return self.node("Gemm", [x, self.const(w), self.const(np.zeros(n, np.float32) + 0.1, "b")], transB=1)

    def head(self, x: str, c: int, classes: int = 5) -> str:
        return self.gemm(self.node("Flatten", [self.node("GlobalAveragePool", [x])], axis=1), c, classes)

    def model(self, inputs: list[tuple[str, list]], outputs: list[str], opset: int = OPSET) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes,
            "zoo",
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", *s]) for n, s in inputs],
            [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
            self.inits,
        )
        domains = sorted({n.domain for n in self.nodes if n.domain})  # onnxruntime's contrib ops: com.microsoft 1
        opsets = [helper.make_opsetid("", opset), *(helper.make_opsetid(d, 1) for d in domains)]
        model = helper.make_model(graph, opset_imports=opsets)
        model.ir_version = 8 if opset < 19 else 9
        inferred = infer_shapes(model)
        for out in model.graph.output:  # declare each output's rank with a symbolic batch
            found = next(v for v in inferred.graph.output if v.name == out.name)
            dims = [None] * len(found.type.tensor_type.shape.dim)
            out.CopyFrom(helper.make_tensor_value_info(out.name, TensorProto.FLOAT, ["batch", *dims[1:]]))
        onnx.checker.check_model(model, full_check=True)
        return model


def chain() -> onnx.ModelProto:
    b = Builder()
    x = b.cbr("x", 3, 8)
    x = b.cbr(x, 8, 16, stride=2)
    x = b.cbr(x, 16, 12)
    return b.model([("x", [3, 8, 8])], [b.head(x, 12)])


def basic_residual() -> onnx.ModelProto:
    b = Builder(1)
    s = b.cbr("x", 3, 8)
    y = b.bn(b.conv(b.cbr(s, 8, 8), 8, 8, bias=False), 8)
    x = b.relu(b.node("Add", [y, s]))
    y = b.bn(b.conv(b.cbr(x, 8, 8), 8, 8, bias=False), 8)
    x = b.relu(b.node("Sum", [x, y]))
    return b.model([("x", [3, 8, 8])], [b.head(x, 8)])


def bottleneck() -> onnx.ModelProto:
    b = Builder(2)
    s = b.cbr("x", 3, 16)
    y = b.cbr(s, 16, 8, 1)
    y = b.cbr(y, 8, 8, 3, stride=2)
    y = b.bn(b.conv(y, 8, 32, 1, bias=False), 32)
    short = b.bn(b.conv(s, 16, 32, 1, stride=2, bias=False), 32)
    x = b.relu(b.node("Add", [y, short]))
    return b.model([("x", [3, 8, 8])], [b.head(x, 32)])


def inception() -> onnx.ModelProto:
    b = Builder(3)
    s = b.cbr("x", 3, 12)
    b1 = b.cbr(s, 12, 4, 1)
    b2 = b.cbr(b.cbr(s, 12, 6, 1), 6, 8, 3)
    b3 = b.cbr(b.node("MaxPool", [s], kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1]), 12, 4, 1)
    x = b.node("Concat", [b1, b2, b3], axis=1)
    x = b.cbr(x, 16, 10, 3)
    return b.model([("x", [3, 8, 8])], [b.head(x, 10)])


def inverted_residual() -> onnx.ModelProto:
    b = Builder(4)
    s = b.bn(b.conv("x", 3, 8, bias=False), 8)
    y = b.node(
        "Clip", [b.bn(b.conv(s, 8, 24, 1, bias=False), 24), b.const(np.float32(0), "lo"), b.const(np.float32(6), "hi")]
    )
    y = b.node(
        "Clip",
        [
            b.bn(b.conv(y, 24, 24, 3, group=24, bias=False), 24),
            b.const(np.float32(0), "lo"),
            b.const(np.float32(6), "hi"),
        ],
    )
    y = b.bn(b.conv(y, 24, 8, 1, bias=False), 8)
    x = b.node("Add", [s, y])
    return b.model([("x", [3, 8, 8])], [b.head(b.cbr(x, 8, 16, 1), 16)])


def grouped_conv() -> onnx.ModelProto:
    b = Builder(5)
    s = b.cbr("x", 3, 8)
    y = b.relu(b.conv(s, 8, 8, 3, group=2))
    x = b.cbr(y, 8, 6)
    return b.model([("x", [3, 8, 8])], [b.head(x, 6)])


def squeeze_excite() -> onnx.ModelProto:
    b = Builder(6)
    s = b.cbr("x", 3, 16)
    g = b.node("GlobalAveragePool", [s])
    g = b.node("Sigmoid", [b.conv(b.relu(b.conv(g, 16, 4, 1)), 4, 16, 1)])
    x = b.node("Mul", [s, g])
    x = b.cbr(x, 16, 8)
    return b.model([("x", [3, 8, 8])], [b.head(x, 8)])


def flatten_gemm() -> onnx.ModelProto:
    b = Builder(7)
    x = b.cbr("x", 3, 8, stride=2)
    x = b.cbr(x, 8, 6, stride=2)
    f = b.node("Flatten", [x], axis=1)
    h = b.relu(b.gemm(f, 6 * 2 * 2, 10))
    return b.model([("x", [3, 8, 8])], [b.gemm(h, 10, 4)])


def reshape_gemm() -> onnx.ModelProto:
    b = Builder(8)
    x = b.cbr("x", 3, 6, stride=2)
    f = b.node("Reshape", [x, b.const(np.array([0, -1], np.int64), "shape")])
    return b.model([("x", [3, 4, 4])], [b.gemm(b.relu(b.gemm(f, 6 * 2 * 2, 7)), 7, 3)])


def channel_shuffle() -> onnx.ModelProto:
    b = Builder(9)
    x = b.cbr("x", 3, 8)
    y = b.node("Reshape", [x, b.const(np.array([0, 2, 4, 8, 8], np.int64), "shape")])
    y = b.node("Transpose", [y], perm=[0, 2, 1, 3, 4])
    y = b.node("Reshape", [y, b.const(np.array([0, 8, 8, 8], np.int64), "shape")])
    return b.model([("x", [3, 8, 8])], [b.head(b.cbr(y, 8, 6), 6)])


def two_in_two_out() -> onnx.ModelProto:
    b = Builder(10)
    a = b.cbr("a", 3, 8)
    c = b.cbr("c", 2, 8)
    x = b.relu(b.node("Add", [b.conv(a, 8, 8, 1), b.conv(c, 8, 8, 1)]))
    y = b.cbr(x, 8, 6)
    return b.model([("a", [3, 8, 8]), ("c", [2, 8, 8])], [b.head(y, 6, 4), b.head(x, 8, 3)])


def sigmoid_consumers() -> onnx.ModelProto:
    """Sigmoid(0) = 0.5: a 1x1 consumer folds it exactly, a padded 3x3 consumer cannot."""
    b = Builder(11)
    x = b.node("Sigmoid", [b.conv("x", 3, 8)])
    y = b.relu(b.conv(x, 8, 6, 1))
    z = b.relu(b.conv(x, 8, 6, 3))
    return b.model([("x", [3, 8, 8])], [b.head(b.node("Add", [y, z]), 6)])


def split_slice() -> onnx.ModelProto:
    b = Builder(12)
    x = b.cbr("x", 3, 12)
    p, q = b.node("Split", [x, b.const(np.array([4, 8], np.int64), "split")], n_out=2, axis=1)
    r = b.node(
        "Slice",
        [
            q,
            b.const(np.array([2], np.int64), "st"),
            b.const(np.array([7], np.int64), "en"),
            b.const(np.array([1], np.int64), "ax"),
        ],
    )
    y = b.node("Concat", [b.cbr(p, 4, 6, 1), r], axis=1)
    return b.model([("x", [3, 8, 8])], [b.head(b.cbr(y, 11, 5), 5)])


def dense_block() -> onnx.ModelProto:
    """DenseNet-style: Concat -> BN -> Relu -> 1x1 Conv (the BN stays unfolded)."""
    b = Builder(13)
    s = b.conv("x", 3, 8)
    y1 = b.conv(b.relu(b.bn(s, 8)), 8, 4, 1)
    c1 = b.node("Concat", [s, y1], axis=1)
    y2 = b.conv(b.relu(b.bn(c1, 12)), 12, 4, 1)
    c2 = b.node("Concat", [c1, y2], axis=1)
    t = b.conv(b.relu(b.bn(c2, 16)), 16, 8, 1)
    return b.model([("x", [3, 8, 8])], [b.head(b.relu(t), 8)])


def _i64(b: Builder, values, base: str = "s") -> str:
    return b.const(np.array(values, np.int64), base)


def split_neck(opset: int = 18) -> onnx.ModelProto:
    """Detector neck (C2f): Conv -> channel Split without sizes -> bottleneck on one half -> Concat of three -> Conv;
    SPPF: Conv -> three max-pools -> Concat -> Conv. Opset 18 uses num_outputs, older opsets an equal split."""
    b = Builder(30)
    x = b.relu(b.conv("x", 3, 16, 1))
    attrs = {"num_outputs": 2} if opset >= 18 else {}
    a, c = b.node("Split", [x], n_out=2, axis=1, **attrs)
    m = b.node("Add", [c, b.relu(b.conv(b.relu(b.conv(c, 8, 8)), 8, 8))])
    y = b.relu(b.conv(b.node("Concat", [a, c, m], axis=1), 24, 16, 1))
    s = b.relu(b.conv(y, 16, 8, 1))
    p1 = b.node("MaxPool", [s], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    p2 = b.node("MaxPool", [p1], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    z = b.relu(b.conv(b.node("Concat", [s, p1, p2], axis=1), 24, 12, 1))
    return b.model([("x", [3, 8, 8])], [b.head(z, 12)], opset=opset)


def split_neck_opset13() -> onnx.ModelProto:
    return split_neck(13)


def chunk_neck() -> onnx.ModelProto:
    """The same neck written with `chunk`: Shape -> Gather -> Div -> Slice bounds computed at run time."""
    b = Builder(31)
    x = b.relu(b.conv("x", 3, 16, 1))
    half = b.node(
        "Div",
        [
            b.node("Gather", [b.node("Shape", [x]), b.const(np.array(1, np.int64), "i")], axis=0),
            b.const(np.array(2, np.int64), "two"),
        ],
    )
    half = b.node("Unsqueeze", [half, _i64(b, [0])])
    a = b.node("Slice", [x, _i64(b, [0]), half, _i64(b, [1])])
    c = b.node("Slice", [x, half, b.node("Mul", [half, _i64(b, [2])]), _i64(b, [1])])
    m = b.node("Add", [c, b.relu(b.conv(c, 8, 8))])
    y = b.relu(b.conv(b.node("Concat", [a, c, m], axis=1), 24, 12, 1))
    return b.model([("x", [3, 8, 8])], [b.head(y, 12)], opset=13)


def view_size0() -> onnx.ModelProto:
    """`x.view(x.size(0), -1)` -> Linear: the Reshape target is computed from Shape."""
    b = Builder(32)
    x = b.relu(b.conv(b.relu(b.conv("x", 3, 8)), 8, 12, stride=2))
    batch = b.node(
        "Unsqueeze",
        [b.node("Gather", [b.node("Shape", [x]), b.const(np.array(0, np.int64), "i")], axis=0), _i64(b, [0])],
    )
    flat = b.node("Reshape", [x, b.node("Concat", [batch, _i64(b, [-1])], axis=0)])
    h = b.relu(b.gemm(flat, 12 * 16, 10))
    return b.model([("x", [3, 8, 8])], [b.gemm(h, 10, 4)], opset=13)


def spatial_gate() -> onnx.ModelProto:
    """Spatial attention: features [N,C,H,W] times sigmoid(Conv -> 1 channel) [N,1,H,W]; SiLU and GELU (Erf) after."""
    b = Builder(33)
    x = b.relu(b.conv("x", 3, 12))
    g = b.node("Sigmoid", [b.conv(x, 12, 1, 3)])
    y = b.node("Mul", [x, g])
    y = b.conv(y, 12, 10, 1)
    y = b.node("Mul", [y, b.node("Sigmoid", [y])])  # SiLU
    y = b.conv(y, 10, 8, 3)
    half = b.node("Mul", [y, b.const(np.array(0.5, np.float32), "h")])
    erf = b.node("Erf", [b.node("Div", [y, b.const(np.array(np.sqrt(2), np.float32), "r")])])
    y = b.node("Mul", [half, b.node("Add", [erf, b.const(np.array(1.0, np.float32), "one")])])  # GELU
    return b.model([("x", [3, 8, 8])], [b.head(y, 8)])


def gemm_bias2d() -> onnx.ModelProto:
    """Flatten -> Gemm(transB=0) with bias [1, N] -> Relu -> Gemm(alpha 0.5, beta 2) with a one-element bias [1]
    (a removed channel then carries 2 * b through the Relu into the last Gemm) -> Relu -> Gemm."""
    b = Builder(34)
    x = b.node("Flatten", [b.relu(b.conv("x", 3, 4, stride=2))], axis=1)
    r = b.rng
    h = b.node("Gemm", [x, b.const(r.standard_normal((64, 16)) / 8), b.const(r.standard_normal((1, 16)) * 0.1, "b")])
    h = b.node(
        "Gemm",
        [b.relu(h), b.const(r.standard_normal((16, 12)) / 4), b.const(np.array([0.3]), "b")],
        alpha=0.5,
        beta=2.0,
    )
    y = b.node("Gemm", [b.relu(h), b.const(r.standard_normal((5, 12)) / 4), b.const(np.zeros(5) + 0.1, "b")], transB=1)
    return b.model([("x", [3, 8, 8])], [y], opset=13)


def shared_head() -> onnx.ModelProto:
    """A detection head whose two Convs each reuse one weight tensor at two pyramid levels."""
    b = Builder(35)
    p3 = b.relu(b.conv("x", 3, 8))
    p4 = b.relu(b.conv(p3, 8, 8, stride=2))
    w1, b1 = b.const(b.rng.standard_normal((12, 8, 3, 3)) / 8), b.const(b.rng.standard_normal(12) * 0.1, "b")
    w2, b2 = b.const(b.rng.standard_normal((6, 12, 1, 1)) / 4), b.const(b.rng.standard_normal(6) * 0.1, "b")
    levels = []
    for p in (p3, p4):
        h = b.relu(b.node("Conv", [p, w1, b1], kernel_shape=[3, 3], pads=[1, 1, 1, 1]))
        levels.append(b.node("GlobalAveragePool", [b.node("Conv", [h, w2, b2], kernel_shape=[1, 1])]))
    y = b.node("Flatten", [b.node("Concat", levels, axis=1)], axis=1)
    return b.model([("x", [3, 8, 8])], [b.gemm(y, 12, 4)])


def features_to_channels() -> onnx.ModelProto:
    """DCGAN-style: Linear -> view(-1, C, h, w) -> ConvTranspose(k4, s2) -> Relu -> ConvTranspose(k3, p1) -> Conv."""
    b = Builder(36)
    z = b.relu(b.gemm(b.node("Flatten", [b.node("GlobalAveragePool", [b.conv("x", 3, 6)])], axis=1), 6, 8 * 2 * 2))
    x = b.node("Reshape", [z, _i64(b, [-1, 8, 2, 2])])
    w1 = b.const(b.rng.standard_normal((8, 6, 4, 4)) / 8)
    x = b.relu(
        b.node(
            "ConvTranspose", [x, w1, b.const(b.rng.standard_normal(6) * 0.1, "b")], strides=[2, 2], pads=[1, 1, 1, 1]
        )
    )
    w2 = b.const(b.rng.standard_normal((6, 5, 3, 3)) / 6)
    x = b.relu(b.node("ConvTranspose", [x, w2], pads=[1, 1, 1, 1]))
    return b.model([("x", [3, 8, 8])], [b.conv(x, 5, 2, 1)])


def nhwc_flatten() -> onnx.ModelProto:
    """Converter layouts: Conv -> Transpose to NHWC -> Reshape [N, H*W*C] -> Gemm -> Reshape [N, h, w, C] ->
    Transpose back -> Conv (the Flatten block mapping in both directions, channels innermost)."""
    b = Builder(37)
    x = b.relu(b.conv("x", 3, 6, stride=2))
    flat = b.node("Reshape", [b.node("Transpose", [x], perm=[0, 2, 3, 1]), _i64(b, [0, -1])])
    h = b.relu(b.gemm(flat, 4 * 4 * 6, 2 * 2 * 5))
    y = b.node(
        "Transpose",
        [
            b.node("Reshape", [h, _i64(b, [-1, 2, 2, 5])]),
        ],
        perm=[0, 3, 1, 2],
    )
    return b.model([("x", [3, 8, 8])], [b.head(b.relu(b.conv(y, 5, 4, 1)), 4)])


def option_a_shortcut(opset: int = 13) -> onnx.ModelProto:
    """CIFAR ResNet shortcut "option A": strided Slice of the input + a constant Pad over channels, added to the
    downsampling branch (the padded channels are known zeros; the rest is tracked)."""
    b = Builder(38)
    x = b.relu(b.conv("x", 3, 8))
    x = b.relu(b.node("Add", [x, b.conv(b.relu(b.conv(x, 8, 8)), 8, 8)]))
    main = b.conv(b.relu(b.conv(x, 8, 16, stride=2)), 16, 16)
    sub = b.node("Slice", [x, _i64(b, [0, 0]), _i64(b, [2**62, 2**62]), _i64(b, [2, 3]), _i64(b, [2, 2])])
    short = b.node("Pad", [sub, _i64(b, [0, 4, 0, 0, 0, 4, 0, 0], "p")], mode="constant")
    y = b.relu(b.node("Add", [main, short]))
    return b.model([("x", [3, 8, 8])], [b.head(y, 16)], opset=opset)


def _layer_norm(b: Builder, x: str, c: int) -> str:
    scale, shift = b.const(b.rng.uniform(0.5, 1.5, c), "ln"), b.const(b.rng.standard_normal(c) * 0.1, "ln")
    return b.node("LayerNormalization", [x, scale, shift], axis=-1, epsilon=1e-5)


def _gelu_erf(b: Builder, x: str) -> str:
    erf = b.node("Erf", [b.node("Div", [x, b.const(np.array(np.sqrt(2), np.float32), "r")])])
    half = b.node("Mul", [x, b.const(np.array(0.5, np.float32), "h")])
    return b.node("Mul", [half, b.node("Add", [erf, b.const(np.array(1.0, np.float32), "one")])])


def _linear(b: Builder, x: str, k: int, n: int) -> str:
    w = b.const(b.rng.standard_normal((k, n)) / np.sqrt(k))
    return b.node("Add", [b.node("MatMul", [x, w]), b.const(b.rng.standard_normal(n) * 0.1, "b")])


def token_block() -> onnx.ModelProto:
    """ViT-style: patch Conv -> tokens [N, L, C] -> LayerNorm -> MLP (GELU as Erf) -> residual -> LayerNorm -> mean
    over tokens -> Gemm. LayerNorm over the channels: scale/bias slice, statistics change (reported as not exact)."""
    b = Builder(39)
    x = b.conv("x", 3, 16, 4, stride=4, pad=0)
    t = b.node("Transpose", [b.node("Reshape", [x, _i64(b, [0, 16, -1])])], perm=[0, 2, 1])
    h = _linear(b, _gelu_erf(b, _linear(b, _layer_norm(b, t, 16), 16, 24)), 24, 16)
    t = b.node("Add", [t, h])
    y = b.node("ReduceMean", [_layer_norm(b, t, 16)], axes=[1], keepdims=0)
    return b.model([("x", [3, 8, 8])], [b.gemm(y, 16, 4)])


def _heads(b: Builder, x: str, tokens: int, heads: int, dim: int, perm: list[int]) -> str:
    """[N, L, heads * dim] -> Reshape [N, L, heads, dim] -> Transpose `perm`."""
    return b.node("Transpose", [b.node("Reshape", [x, _i64(b, [0, tokens, heads, dim])])], perm=perm)


def _attention(b: Builder, x: str, tokens: int, heads: int, dim: int, *, packed: bool, mask: str | None = None) -> str:
    """Multi-head self-attention over [N, L, C], C = heads * dim, as exporters write it.

    Packed (timm's ViT): one qkv Linear -> Reshape [N, L, 3, heads, dim] -> Transpose (2, 0, 3, 1, 4) -> Gather 0/1/2,
    K transposed before the product. Separate (BERT): three Linears, each -> Reshape [N, L, heads, dim] -> Transpose,
    K straight to [N, heads, dim, L]. Then softmax(Q K^T * scale + mask) V -> Transpose -> Reshape [N, L, C] ->
    Linear. `tokens` 0: the sequence length is copied from the input (a dynamic sequence); `mask`: an additive
    [N, 1, 1, L] mask on the logits (BERT's extended attention mask).
    """
    c = heads * dim
    if packed:
        qkv = b.node("Reshape", [_linear(b, x, c, 3 * c), _i64(b, [0, tokens, 3, heads, dim])])
        qkv = b.node("Transpose", [qkv], perm=[2, 0, 3, 1, 4])
        q, k, v = (b.node("Gather", [qkv, b.const(np.array(i, np.int64), "i")], axis=0) for i in range(3))
        k = b.node("Transpose", [k], perm=[0, 1, 3, 2])
    else:
        q = _heads(b, _linear(b, x, c, c), tokens, heads, dim, [0, 2, 1, 3])
        k = _heads(b, _linear(b, x, c, c), tokens, heads, dim, [0, 2, 3, 1])
        v = _heads(b, _linear(b, x, c, c), tokens, heads, dim, [0, 2, 1, 3])
    logits = b.node("Mul", [b.node("MatMul", [q, k]), b.const(np.array(dim**-0.5, np.float32), "scale")])
    logits = logits if mask is None else b.node("Add", [logits, mask])
    out = b.node("MatMul", [b.node("Softmax", [logits], axis=-1), v])
    out = b.node("Reshape", [b.node("Transpose", [out], perm=[0, 2, 1, 3]), _i64(b, [0, tokens, c])])
    return _linear(b, out, c, c)


def attention_block(packed: bool = True) -> onnx.ModelProto:
    """Pre-norm transformer block on patch tokens: x + attention(LN(x)), x + MLP(LN(x)), LN, mean, Gemm (4 heads)."""
    b = Builder(41 + packed)
    x = b.conv("x", 3, 16, 2, stride=2, pad=0)
    t = b.node("Transpose", [b.node("Reshape", [x, _i64(b, [0, 16, -1])])], perm=[0, 2, 1])
    t = b.node("Add", [t, _attention(b, _layer_norm(b, t, 16), 16, 4, 4, packed=packed)])
    t = b.node("Add", [t, _linear(b, _gelu_erf(b, _linear(b, _layer_norm(b, t, 16), 16, 24)), 24, 16)])
    y = b.node("ReduceMean", [_layer_norm(b, t, 16)], axes=[1], keepdims=0)
    return b.model([("x", [3, 8, 8])], [b.gemm(y, 16, 4)])


def attention_sequence() -> onnx.ModelProto:
    """A BERT-style encoder layer over a dynamic sequence: tokens [N, L, 16] and a padding mask [N, L] (1 keep, 0 pad)
    made additive ((1 - mask) * -10000 -> [N, 1, 1, L]); separate Q/K/V, post-norm residuals, MLP, mean, Gemm."""
    b = Builder(43)
    keep = b.node("Unsqueeze", ["mask", _i64(b, [1, 2], "ax")])
    minus = b.node("Sub", [b.const(np.array(1.0, np.float32), "one"), keep])
    mask = b.node("Mul", [minus, b.const(np.array(-10000.0, np.float32), "big")])
    t = _layer_norm(b, b.node("Add", ["x", _attention(b, "x", 0, 4, 4, packed=False, mask=mask)]), 16)
    t = _layer_norm(b, b.node("Add", [t, _linear(b, _gelu_erf(b, _linear(b, t, 16, 24)), 24, 16)]), 16)
    y = b.node("ReduceMean", [t], axes=[1], keepdims=0)
    return b.model([("x", ["seq", 16]), ("mask", ["seq"])], [b.gemm(y, 16, 4)])


def attention_separate() -> onnx.ModelProto:
    """`attention_block` with Q, K and V from three Linears (BERT's layout)."""
    return attention_block(packed=False)


def convnext_like() -> onnx.ModelProto:
    """ConvNeXt block: depthwise 7x7 -> permute to NHWC -> LayerNorm over C -> Linear -> GELU (Erf) -> Linear ->
    layer scale -> permute back -> residual."""
    b = Builder(40)
    x = b.conv("x", 3, 12, 1)
    h = b.node("Transpose", [b.conv(x, 12, 12, 7, group=12)], perm=[0, 2, 3, 1])
    h = _linear(b, _gelu_erf(b, _linear(b, _layer_norm(b, h, 12), 12, 24)), 24, 12)
    h = b.node("Mul", [h, b.const(b.rng.uniform(0.1, 1.0, 12), "gamma")])
    y = b.node("Add", [x, b.node("Transpose", [h], perm=[0, 3, 1, 2])])
    return b.model([("x", [3, 8, 8])], [b.head(y, 12)])


def ir3_inputs() -> onnx.ModelProto:
    """What old exporters wrote: IR 3, opset 8, every initializer also listed as a graph input (BN unfolded)."""
    b = Builder(41)
    x = b.cbr(b.cbr("x", 3, 8), 8, 12)
    model = b.model([("x", [3, 8, 8])], [b.head(x, 12)], opset=9)
    model.opset_import[0].version = 8
    model.ir_version = 3
    model.graph.input.extend(
        helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in model.graph.initializer
    )
    onnx.checker.check_model(model)
    return model


def sequence_head() -> onnx.ModelProto:
    """A recogniser's head: conv features [N, C, H, W] -> [W, N, C*H] -> [W*N, C*H] -> Gemm, width symbolic.

    Both Reshape targets are computed from `Shape` (as torch exports ``x.reshape(w, n, -1)`` written with sizes);
    onnx shape inference gives the second Reshape, the Gemm and its output no shape at all.
    """
    b = Builder(34)
    x = b.relu(b.conv("x", 3, 8))
    t = b.node("Transpose", [x], perm=[3, 0, 1, 2])  # [W, N, 8, 4]

    def dim(tensor: str, i: int) -> str:  # indices in Constant nodes, as the torch exporter of opset 12 wrote them
        index = b.node("Constant", [], value=numpy_helper.from_array(np.array(i, np.int64)))
        return b.node("Gather", [b.node("Shape", [tensor]), index], axis=0)

    def one(v: str) -> str:
        return b.node("Unsqueeze", [v], axes=[0])

    seq = b.node(
        "Reshape",
        [t, b.node("Concat", [one(dim(t, 0)), one(dim(t, 1)), one(b.node("Mul", [dim(t, 2), dim(t, 3)]))], axis=0)],
    )  # [W, N, 32]: entries copy the input's dims (0) and a product of static ones
    rows = b.node("Mul", [dim(seq, 0), dim(seq, 1)])
    flat = b.node("Reshape", [seq, b.node("Concat", [one(rows), one(dim(seq, 2))], axis=0)])  # [W*N, 32]: -1
    h = b.gemm(b.node("Mul", [flat, b.const(np.array(1.0, np.float32), "one")]), 32, 24)
    y = b.gemm(b.relu(h), 24, 10)
    graph = helper.make_graph(
        b.nodes,
        "sequence_head",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 4, "width"])],
        [helper.make_tensor_value_info(y, TensorProto.FLOAT, ["rows", 10])],
        b.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 12)])
    model.ir_version = 7
    onnx.checker.check_model(model, full_check=True)
    return model


def _recurrent(b: Builder, op: str, x: str, i: int, h: int, *, direction: str, bias: bool, zero_fill: bool) -> str:
    """An ONNX LSTM / GRU / RNN over x [T, N, i], weights seeded; returns Y [T, D, N, h].

    With `zero_fill` the initial state is a ConstantOfShape of [D, N, h] computed from x's shape, as torch exports
    it; else there is none (the op's default, zero).
    """
    gates = {"LSTM": 4, "GRU": 3, "RNN": 1}[op]
    d = 2 if direction == "bidirectional" else 1
    scale = 1 / np.sqrt(h)
    w = b.const(b.rng.uniform(-scale, scale, (d, gates * h, i)))
    r = b.const(b.rng.uniform(-scale, scale, (d, gates * h, h)))
    inputs = [x, w, r, b.const(b.rng.uniform(-scale, scale, (d, 2 * gates * h)), "b") if bias else ""]
    if zero_fill:
        index = b.node("Constant", [], value=numpy_helper.from_array(np.array(1, np.int64)))
        batch = b.node("Unsqueeze", [b.node("Gather", [b.node("Shape", [x]), index], axis=0), _i64(b, [0])])
        shape = b.node("Concat", [_i64(b, [d]), batch, _i64(b, [h])], axis=0)
        states = 2 if op == "LSTM" else 1
        inputs += [""] + [b.node("ConstantOfShape", [shape]) for _ in range(states)]
    outs = b.node(op, inputs, n_out=3 if op == "LSTM" else 2, hidden_size=h, direction=direction)
    return outs[0]


def recurrent_head(
    op: str = "LSTM", direction: str = "bidirectional", *, bias: bool = True, time_major: bool = False
) -> onnx.ModelProto:
    """A text recogniser's tail (CRNN): conv features -> mean over height -> [W, N, C] -> recurrent layer -> per-step
    classes [N, W, 10], as torch exports ``nn.LSTM`` (time first, zero initial state from the input's shape).

    With `time_major` the head stays time first, [W, N, D*12] (a symbolic batch in the middle of the Reshape), and
    the scores are moved to [N, W, 10] at the end."""
    b = Builder(41)
    x = b.relu(b.conv(b.relu(b.conv("x", 3, 16)), 16, 16))
    seq = b.node("Transpose", [b.node("ReduceMean", [x], axes=[2], keepdims=0)], perm=[2, 0, 1])  # [W, N, 16]
    y = _recurrent(b, op, seq, 16, 12, direction=direction, bias=bias, zero_fill=True)  # [W, D, N, 12]
    d = 2 if direction == "bidirectional" else 1
    perm = [0, 2, 1, 3] if time_major else [2, 0, 1, 3]
    feats = b.node("Reshape", [b.node("Transpose", [y], perm=perm), _i64(b, [0, 0, -1])])  # [N, W, D*12]
    w = b.const(b.rng.standard_normal((12 * d, 10)) / np.sqrt(12 * d))
    out = b.node("Add", [b.node("MatMul", [feats, w]), b.const(np.full(10, 0.1), "b")])
    if time_major:
        out = b.node("Transpose", [out], perm=[1, 0, 2])
    return b.model([("x", [3, 4, 8])], [out])


def lstm_time_major() -> onnx.ModelProto:
    """`recurrent_head` whose LSTM output is reshaped time first: [W, N, D, H] -> [0, 0, -1], N symbolic."""
    return recurrent_head(time_major=True)


def gru_head() -> onnx.ModelProto:
    """`recurrent_head` with a forward GRU without bias (a removed input channel's constant creates one)."""
    return recurrent_head("GRU", "forward", bias=False)


def rnn_head() -> onnx.ModelProto:
    """`recurrent_head` with a reverse plain RNN."""
    return recurrent_head("RNN", "reverse")


def streaming_state() -> onnx.ModelProto:
    """A streaming model's step, as silero-vad exports it: conv features -> one LSTM step whose (h, c) come in as a
    graph input ``state`` [2, batch, 12] and go out as ``stateN`` [2, batch, 12], beside per-sample scores [batch, 5]:
    the batch of the state is its axis 1."""
    b = Builder(43)
    x = b.relu(b.conv(b.relu(b.conv("x", 3, 16)), 16, 16))
    feats = b.node("Flatten", [b.node("GlobalAveragePool", [x])], axis=1)  # [N, 16]
    step = b.node("Unsqueeze", [feats, _i64(b, [0])])  # [1, N, 16]
    h0, c0 = b.node("Split", ["state", _i64(b, [1, 1])], n_out=2, axis=0)  # [1, N, 12] each
    scale = 1 / np.sqrt(12)
    w, r = (b.const(b.rng.uniform(-scale, scale, (1, 48, k))) for k in (16, 12))
    _, h, c = b.node("LSTM", [step, w, r, "", "", h0, c0], n_out=3, hidden_size=12)
    out = b.gemm(b.node("Squeeze", [h, _i64(b, [0])]), 12, 5)
    state_n = b.node("Concat", [h, c], axis=0)
    graph = helper.make_graph(
        b.nodes,
        "streaming",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8]),
            helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "batch", 12]),
        ],
        [
            helper.make_tensor_value_info(out, TensorProto.FLOAT, ["batch", 5]),
            helper.make_tensor_value_info(state_n, TensorProto.FLOAT, [2, "batch", 12]),
        ],
        b.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def per_run_state() -> onnx.ModelProto:
    """A streaming model run on a sequence of chunks, as faster-whisper ships silero-vad: the chunks x [seq, 3, 8, 8]
    are the LSTM's time steps, its state ``h`` [2, 1, 12] a graph input of fixed dims without the batch symbol (one
    value per run), scores [seq, 5] and the last state ``hn`` [2, 1, 12] out."""
    b = Builder(47)
    x = b.relu(b.conv(b.relu(b.conv("x", 3, 16)), 16, 16))
    feats = b.node("Flatten", [b.node("GlobalAveragePool", [x])], axis=1)  # [T, 16]
    steps = b.node("Unsqueeze", [feats, _i64(b, [1])])  # [T, 1, 16]
    h0, c0 = b.node("Split", ["h", _i64(b, [1, 1])], n_out=2, axis=0)  # [1, 1, 12] each
    scale = 1 / np.sqrt(12)
    w, r = (b.const(b.rng.uniform(-scale, scale, (1, 48, k))) for k in (16, 12))
    y, h, c = b.node("LSTM", [steps, w, r, "", "", h0, c0], n_out=3, hidden_size=12)  # y [T, 1, 1, 12]
    out = b.gemm(b.node("Reshape", [y, _i64(b, [-1, 12])]), 12, 5)
    state_n = b.node("Concat", [h, c], axis=0)
    graph = helper.make_graph(
        b.nodes,
        "chunks",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["seq", 3, 8, 8]),
            helper.make_tensor_value_info("h", TensorProto.FLOAT, [2, 1, 12]),
        ],
        [
            helper.make_tensor_value_info(out, TensorProto.FLOAT, ["seq", 5]),
            helper.make_tensor_value_info(state_n, TensorProto.FLOAT, [2, 1, 12]),
        ],
        b.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


ZOO = [
    chain,
    basic_residual,
    bottleneck,
    inception,
    inverted_residual,
    grouped_conv,
    squeeze_excite,
    flatten_gemm,
    reshape_gemm,
    channel_shuffle,
    two_in_two_out,
    sigmoid_consumers,
    split_slice,
    dense_block,
    split_neck,
    split_neck_opset13,
    chunk_neck,
    view_size0,
    spatial_gate,
    gemm_bias2d,
    shared_head,
    features_to_channels,
    nhwc_flatten,
    option_a_shortcut,
    token_block,
    convnext_like,
    attention_block,
    attention_separate,
    attention_sequence,
    ir3_inputs,
    sequence_head,
    recurrent_head,
    lstm_time_major,
    gru_head,
    rnn_head,
]


def any_size(h: int | str = "H", w: int | str = "W", *, batch: int | None = None) -> onnx.ModelProto:
    """A classifier (10 classes) over images of any size: symbolic H and W unless given; a fixed `batch` if given."""
    b = Builder(11)
    x = b.cbr("x", 3, 16)
    x = b.cbr(x, 16, 32, stride=2)
    x = b.cbr(x, 32, 32)
    model = b.model([("x", [3, h, w])], [b.head(x, 32, 10)])
    if batch is not None:
        for value in (*model.graph.input, *model.graph.output):
            value.type.tensor_type.shape.dim[0].Clear()
            value.type.tensor_type.shape.dim[0].dim_value = batch
    return model
