"""The real architectures that ship with the onnx package, made runnable: weights folded and randomised.

Their weights are ConstantOfShape fills and a few Reshape targets are graph inputs with no value (OC2_DUMMY_*);
`materialize` folds the weights to constants with seeded random values and turns those inputs into the
constant targets the architecture needs (flatten before the classifier, ShuffleNet's channel shuffle).
"""

from __future__ import annotations

import functools
import os

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxprune.graph import to_graph, to_model
from onnxprune.passes.cleanup import cleanup

LIGHT = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")
NAMES = [
    "alexnet",
    "densenet121",
    "inception_v1",
    "inception_v2",
    "resnet50",
    "shufflenet",
    "squeezenet",
    "vgg19",
    "zfnet512",
]


def path(name: str) -> str:
    file = "light_bvlc_alexnet.onnx" if name == "alexnet" else f"light_{name}.onnx"
    return os.path.join(LIGHT, file)


@functools.cache
def materialize(name: str) -> bytes:
    model = onnx.load(path(name))
    model = _fix_reshape_inputs(model)
    graph = to_graph(model)
    cleanup(graph, fold_bn=False)
    model = to_model(graph, model)
    rng = np.random.default_rng(0)
    for init in model.graph.initializer:
        value = numpy_helper.to_array(init)
        if value.dtype != np.float32:
            continue
        if "bn_var" in init.name or "_riv" in init.name or "bn_s" in init.name or "scale" in init.name:
            new = rng.uniform(0.5, 1.5, value.shape)
        elif value.ndim >= 2:
            new = rng.standard_normal(value.shape) * np.sqrt(2.0 / np.prod(value.shape[1:]))
        else:
            new = rng.standard_normal(value.shape) * 0.05
        init.CopyFrom(numpy_helper.from_array(new.astype(np.float32), init.name))
    return model.SerializeToString()


def load(name: str) -> onnx.ModelProto:
    return onnx.ModelProto.FromString(materialize(name))


def _fix_reshape_inputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give every Reshape whose target is a bare graph input the constant it needs, in graph order."""
    inits = {t.name for t in model.graph.initializer}
    dummies = {i.name for i in model.graph.input if i.name not in inits and i.name.startswith("OC2_DUMMY")}
    groups = _shuffle_groups(model)
    for node in model.graph.node:
        if node.op_type != "Reshape" or node.input[1] not in dummies:
            continue
        inferred = onnx.shape_inference.infer_shapes(model)
        shapes = {
            v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in list(inferred.graph.value_info) + list(inferred.graph.input)
        }
        src = shapes.get(node.input[0])
        n_target = [i for i in model.graph.input if i.name == node.input[1]][0].type.tensor_type.shape.dim[0].dim_value
        if n_target == 2:
            target = [src[0] if src else 1, -1]
        elif n_target == 5:
            n, c, h, w = src
            target = [n, groups, c // groups, h, w]
        else:
            n, c = src[0], src[1] * src[2]
            target = [n, c, src[3], src[4]]
        model.graph.initializer.append(numpy_helper.from_array(np.array(target, np.int64), node.input[1]))
    keep = [i for i in model.graph.input if i.name not in dummies]
    del model.graph.input[:]
    model.graph.input.extend(keep)
    return model


def _shuffle_groups(model: onnx.ModelProto) -> int:
    for node in model.graph.node:
        if node.op_type == "Conv":
            group = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "group"), 1)
            if group > 1 and not node.input[1].startswith("gpu_0/gconv3"):
                return group
    return 3
