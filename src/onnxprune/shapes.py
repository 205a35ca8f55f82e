"""Concrete input shapes for counting MACs: from the calibration data, `--shape`, or a stated default.

A model with symbolic spatial dims (a detector, a recogniser of any width) does not have one MAC count: it depends
on the input. Counting with symbolic dims taken as 1 understates it by orders of magnitude, so MACs are counted
on a copy of the model whose symbolic input dims are fixed to one chosen shape (then onnx shape inference); the
written model keeps its dynamic dims.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import numpy as np
import onnx

from onnxprune.calibration.data import Samples, as_samples, batch_axes, model_inputs
from onnxprune.errors import OnnxPruneError
from onnxprune.graph import infer_shapes

DEFAULT_IMAGE_SIDE = 224  # symbolic H/W of an image input (4-D, 1 to 4 channels) when nothing else says
IMAGE_CHANNELS = (1, 2, 3, 4)

_SPEC = re.compile(r"^(?P<name>.+)[:=](?P<dims>\d+(?:[xX]\d+)*)$")


def parse_shapes(specs: Iterable[str], option: str = "--shape") -> dict[str, list[int]]:
    """``NAME:1x3x224x224`` (or ``NAME=1x3x224x224``) specs -> {name: [1, 3, 224, 224]}.

    The name is everything before the last ``:`` or ``=``, so names such as ``input_1:0`` work.

    Args:
        specs: One spec per input.
        option: The option's name, for messages.

    Returns:
        Input name -> dims.

    Raises:
        OnnxPruneError: A spec is malformed or has a zero dim.
    """
    shapes = {}
    for spec in specs:
        match = _SPEC.match(spec.strip())
        if match is None:
            raise OnnxPruneError(f"{option} {spec!r}: expected NAME:DxDx..., e.g. input:1x3x224x224")
        if match["name"] in shapes:
            raise OnnxPruneError(f"{option} {spec!r}: input '{match['name']}' is given twice")
        dims = [int(d) for d in match["dims"].lower().split("x")]
        if any(d <= 0 for d in dims):
            raise OnnxPruneError(f"{option} {spec!r}: dims must be positive")
        shapes[match["name"]] = dims
    return shapes


def choose_shapes(
    model: onnx.ModelProto, *, given: dict[str, list[int]] | None = None, data: Samples | dict | None = None
) -> tuple[dict[str, list[int]] | None, str]:
    """The concrete shape of every model input that MACs are counted at, and where it came from.

    Per input, in order: `given` (``--shape``), the calibration data (the shape most samples have), the model's own
    dims when they are all fixed, ``DEFAULT_IMAGE_SIDE`` for the symbolic H/W of an image input (4-D, 1 to 4
    channels, NCHW or NHWC). MACs are per sample: a symbolic batch dim (the first, or the one `batch_axes` names)
    counts as 1 whatever its source.

    Args:
        model: The model.
        given: Shapes the user gave.
        data: Calibration samples.

    Returns:
        (input name -> dims, a phrase naming the sources); (None, reason) when some input keeps a symbolic dim that
        nothing resolves (MACs cannot be counted then).

    Raises:
        OnnxPruneError: A given shape names no input, has the wrong rank, or contradicts a fixed dim.
    """
    inputs = model_inputs(model)
    given = dict(given or {})
    for name, dims in given.items():
        if name not in inputs:
            raise OnnxPruneError(f"--shape {name}: the model has no input '{name}' (inputs: {', '.join(inputs)})")
        want = inputs[name][0]
        if len(dims) != len(want) or any(w is not None and w != d for w, d in zip(want, dims)):
            shown = "x".join("?" if w is None else str(w) for w in want)
            raise OnnxPruneError(f"--shape {name}:{'x'.join(map(str, dims))} does not fit the input's dims {shown}")
    common = _common_shapes(as_samples(data, model, min_batches=1)) if data is not None else {}
    axes = batch_axes(model)
    shapes, sources = {}, []
    for name, (dims, _) in inputs.items():
        axis = axes[name]
        batch = dims[axis] if axis is not None and len(dims) > axis and dims[axis] is not None else 1
        if axis is None:  # a scalar, or a per-run input of fixed dims
            shapes[name], source = list(dims), "model"
        elif name in given:  # MACs are per sample: a batch given for a symbolic batch dim is counted as 1
            shapes[name], source = _with_batch(given[name], axis, batch), "--shape"
        elif name in common:  # the samples' shape, without the batch
            shapes[name], source = [*common[name][:axis], batch, *common[name][axis:]], "calibration data"
        elif all(d is not None for i, d in enumerate(dims) if i != axis):
            shapes[name], source = _with_batch(dims, axis, batch), "model"
        elif axis == 0 and (side := _image_default(dims)) is not None:
            shapes[name], source = side, f"default {DEFAULT_IMAGE_SIDE} for symbolic H/W"
        else:
            shown = "x".join("?" if d is None else str(d) for d in dims)
            return None, f"input '{name}' has symbolic dims {shown}; give --shape {name}:DxD..."
        sources.append(source)
    return shapes, ", ".join(dict.fromkeys(sources)) or "model"


def format_shapes(shapes: dict[str, list[int]]) -> str:
    """{name: dims} -> ``name:1x3x224x224 other:1x4``."""
    return " ".join(f"{name}:{'x'.join(map(str, dims))}" for name, dims in shapes.items())


def fix_input_shapes(model: onnx.ModelProto, shapes: dict[str, list[int]]) -> onnx.ModelProto:
    """A copy of `model` whose graph inputs have the concrete `shapes`, other shapes left to inference.

    Args:
        model: The model (not modified).
        shapes: Input name -> dims.

    Returns:
        The copy, shapes inferred again (with data propagation).
    """
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for inp in copy.graph.input:
        if inp.name in shapes and inp.type.HasField("tensor_type"):
            dims = inp.type.tensor_type.shape.dim
            for d, value in zip(dims, shapes[inp.name]):
                d.Clear()
                d.dim_value = int(value)
    del copy.graph.value_info[:]  # inferred before with symbolic dims
    for out in copy.graph.output:
        if out.type.HasField("tensor_type"):
            out.type.tensor_type.ClearField("shape")
    return infer_shapes(copy, in_place=True)


def concrete_shapes(model: onnx.ModelProto, shapes: dict[str, list[int]]) -> dict[str, list[int | None]]:
    """Every tensor's shape in `model` with its inputs fixed to `shapes` (unknown dims None).

    Args:
        model: The model (not modified).
        shapes: Input name -> dims.

    Returns:
        Tensor name -> dims, for each tensor shape inference reached.
    """
    inferred = fix_input_shapes(model, shapes)
    found = {}
    for info in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        t = info.type.tensor_type
        if info.type.HasField("tensor_type") and t.HasField("shape"):
            found[info.name] = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    return found


def _with_batch(dims: list, axis: int, batch: int) -> list[int]:
    """`dims` with the one at `axis` (the batch) set to `batch`."""
    return [batch if i == axis else d for i, d in enumerate(dims)]


def _common_shapes(data: Samples) -> dict[str, tuple[int, ...]]:
    """Per input, the sample shape of the largest shape group."""
    if not data.groups:
        return {}
    sizes = [len(index) for index, _ in data.groups]
    return data.shapes[int(np.argmax(sizes))]


def _image_default(dims: list) -> list[int] | None:
    """[batch, C, 224, 224] (or NHWC) for an image input whose only symbolic dims are the batch and H/W."""
    if len(dims) != 4:
        return None
    batch = dims[0] if dims[0] is not None else 1
    side = DEFAULT_IMAGE_SIDE
    if dims[1] in IMAGE_CHANNELS:  # NCHW
        return [batch, dims[1], dims[2] or side, dims[3] or side]
    if dims[3] in IMAGE_CHANNELS:  # NHWC
        return [batch, dims[1] or side, dims[2] or side, dims[3]]
    return None
