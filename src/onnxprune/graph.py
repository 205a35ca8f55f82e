"""Load, convert, validate and save models: the only place that touches files and protobufs."""

from __future__ import annotations

import logging
import os
import pathlib
import shutil
import tempfile

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
from google.protobuf.message import DecodeError
from onnx import external_data_helper

from onnxprune.errors import InvalidModelError, UnsupportedModelError

log = logging.getLogger(__name__)
ort.set_default_logger_severity(3)
gs.logger.G_LOGGER.severity = gs.logger.G_LOGGER.ERROR

TWO_GB = 2**31 - 1


def load(path: str | os.PathLike) -> onnx.ModelProto:
    """Read an ONNX file (external data too) and check it; every failure is one InvalidModelError line."""
    path = pathlib.Path(path)
    if not path.exists():
        raise InvalidModelError(f"{path}: no such file")
    if path.is_dir():
        raise InvalidModelError(f"{path}: is a directory, expected an .onnx file")
    if path.stat().st_size == 0:
        raise InvalidModelError(f"{path}: file is empty, expected an ONNX model")
    try:
        with open(path, "rb") as f:
            model = onnx.load_model_from_string(f.read())
    except PermissionError as err:
        raise InvalidModelError(f"{path}: cannot read it ({err.strerror})") from err
    except (DecodeError, RuntimeWarning, ValueError, TypeError, RecursionError) as err:
        raise InvalidModelError(f"{path}: not an ONNX model (the protobuf does not parse)") from err
    if not model.graph.node:
        raise InvalidModelError(f"{path}: not an ONNX model (no graph nodes; truncated or another file type?)")
    _check_declared_sizes(model)
    _load_external_data(model, path.parent)
    check(model, where=str(path))
    return model


MAX_ELEMENTS = 2**36  # no real weight holds more; a larger declared shape is corrupt or hostile


def _check_declared_sizes(model: onnx.ModelProto) -> None:
    """Refuse initializers whose declared shape is absurd or disagrees with the bytes stored, before any use."""
    for tensor in model.graph.initializer:
        if any(d < 0 for d in tensor.dims):
            raise InvalidModelError(f"initializer '{tensor.name}': negative dimension in {list(tensor.dims)}")
        count = 1
        for d in tensor.dims:
            count *= d
        if count > MAX_ELEMENTS:
            raise InvalidModelError(
                f"initializer '{tensor.name}': declared shape {list(tensor.dims)} is absurd ({count:.3g} elements)"
            )
        if tensor.HasField("raw_data") and tensor.data_location != onnx.TensorProto.EXTERNAL:
            itemsize = (
                onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
                if tensor.data_type not in (onnx.TensorProto.UNDEFINED, onnx.TensorProto.STRING)
                else 0
            )
            if itemsize and len(tensor.raw_data) != count * itemsize:
                raise InvalidModelError(
                    f"initializer '{tensor.name}': declared shape {list(tensor.dims)} needs "
                    f"{count * itemsize} bytes, the file holds {len(tensor.raw_data)}"
                )


def _load_external_data(model: onnx.ModelProto, folder: pathlib.Path) -> None:
    """Read external tensors, refusing any location that leaves the model's folder."""
    tensors = [t for t in external_data_helper._get_all_tensors(model) if external_data_helper.uses_external_data(t)]
    root = folder.resolve()
    for tensor in tensors:
        info = external_data_helper.ExternalDataInfo(tensor)
        target = (folder / info.location).resolve()
        if os.path.isabs(info.location) or root not in target.parents:
            raise InvalidModelError(
                f"tensor '{tensor.name}': external data location '{info.location}' points outside the model's folder"
            )
        if not target.is_file():
            raise InvalidModelError(f"tensor '{tensor.name}': external data file '{info.location}' is missing")
    if tensors:
        try:
            external_data_helper.load_external_data_for_model(model, str(folder))
        except (OSError, ValueError) as err:
            raise InvalidModelError(f"external data of the model cannot be read: {err}") from err


def check(model: onnx.ModelProto, *, where: str = "model", full: bool = False) -> None:
    """Run the ONNX checker; raise InvalidModelError with its first line."""
    try:
        if model.ByteSize() > TWO_GB:
            with tempfile.TemporaryDirectory() as tmp:
                p = os.path.join(tmp, "m.onnx")
                copy = onnx.ModelProto()
                copy.CopyFrom(model)  # saving as external data rewrites the proto it is given
                onnx.save_model(copy, p, save_as_external_data=True, location="m.data")
                onnx.checker.check_model(p, full_check=full)
        else:
            onnx.checker.check_model(model, full_check=full)
    except (
        onnx.checker.ValidationError,
        onnx.shape_inference.InferenceError,
        UnicodeError,
        ValueError,
        TypeError,
        IndexError,
        KeyError,
        OverflowError,
        RuntimeError,
    ) as err:  # all ways a corrupt proto fails
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InvalidModelError(f"{where}: fails the ONNX checker: {first}") from err


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Shape inference with data propagation (Shape -> Gather -> Reshape chains resolve where they can)."""
    if model.ByteSize() > TWO_GB:
        return model
    try:
        return onnx.shape_inference.infer_shapes(model, data_prop=True)
    except (onnx.shape_inference.InferenceError, RuntimeError, ValueError, UnicodeError, TypeError) as err:
        log.debug("shape inference failed: %s", err)
        return model


def to_graph(model: onnx.ModelProto) -> gs.Graph:
    """Import a model into onnx-graphsurgeon with inferred shapes; unnamed nodes get unique names."""
    model = _strip_initializer_inputs(model)
    for domain in model.opset_import:
        if domain.domain in ("", "ai.onnx") and domain.version < 7:
            raise UnsupportedModelError(f"opset {domain.version} is too old; convert the model to opset 9 or newer")
    try:
        graph = gs.import_onnx(infer_shapes(model))
    except (KeyError, ValueError, TypeError, IndexError, AttributeError, RuntimeError, AssertionError) as err:
        raise InvalidModelError(
            f"model cannot be read into a graph ({type(err).__name__}: {err}); is it a valid ONNX model?"
        ) from err
    used = {n.name for n in graph.nodes if n.name}
    for i, node in enumerate(graph.nodes):
        if not node.name:
            name = f"{node.op}_{i}"
            while name in used:
                name += "_"
            node.name = name
            used.add(name)
    return graph


def _strip_initializer_inputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """Old exporters list every initializer as a graph input too; those are weights, not inputs."""
    inits = {t.name for t in model.graph.initializer}
    if not any(i.name in inits for i in model.graph.input):
        return model
    model = onnx.ModelProto.FromString(model.SerializeToString()) if model.ByteSize() <= TWO_GB else model
    keep = [i for i in model.graph.input if i.name not in inits]
    del model.graph.input[:]
    model.graph.input.extend(keep)
    return model


def to_model(graph: gs.Graph, template: onnx.ModelProto) -> onnx.ModelProto:
    """Export `graph` with the template's opsets, IR version and metadata; re-infer shapes."""
    model = gs.export_onnx(graph, do_type_check=False)
    model.ir_version = max(template.ir_version, 4)  # IR < 4 needs initializers listed as inputs; we strip those
    del model.opset_import[:]
    model.opset_import.extend(template.opset_import)
    for field in ("producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(model, field, getattr(template, field))
    del model.metadata_props[:]
    model.metadata_props.extend(template.metadata_props)
    return infer_shapes(model)


def reinfer_shapes(graph: gs.Graph, template: onnx.ModelProto) -> gs.Graph:
    """A fresh import of `graph` with every shape inferred again (after a pass that reset them)."""
    return to_graph(to_model(graph, template))


def unique_name(graph: gs.Graph, base: str) -> str:
    """A tensor/node name derived from `base` that the graph does not use yet."""
    return Namer(graph).fresh_name(base)


class Namer:
    """Fresh names for one graph, remembering those it gave (cheaper than `unique_name` for many rewrites)."""

    def __init__(self, graph: gs.Graph) -> None:
        self._taken = set(graph.tensors().keys()) | {n.name for n in graph.nodes}

    def fresh_name(self, base: str) -> str:
        """`base`, or `base_1`, `base_2`... whichever is still free."""
        name, i = base, 1
        while name in self._taken:
            name, i = f"{base}_{i}", i + 1
        self._taken.add(name)
        return name


def reset_shapes(graph: gs.Graph) -> None:
    """Forget inferred shapes of intermediate tensors so stale channel counts cannot survive export."""
    keep = {t.name for t in graph.inputs} | {t.name for t in graph.outputs}
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Variable) and tensor.name not in keep:
            tensor.shape = None
            tensor.dtype = None


def save(model: onnx.ModelProto, path: str | os.PathLike) -> None:
    """Write atomically: into a temp folder beside the target, then rename. External data above 2 GB, next to it."""
    path = pathlib.Path(path)
    folder = path.parent if str(path.parent) else pathlib.Path(".")
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=folder))
    data_name = path.name + ".data"
    try:
        if model.ByteSize() > TWO_GB or _tensor_bytes(model) > TWO_GB:
            copy = onnx.ModelProto()
            copy.CopyFrom(model)  # saving as external data rewrites the proto it is given
            onnx.save_model(
                copy,
                staging / path.name,
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=data_name,
                size_threshold=1024,
            )
            os.replace(staging / data_name, folder / data_name)
        else:
            onnx.save_model(model, staging / path.name)
        os.replace(staging / path.name, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _tensor_bytes(model: onnx.ModelProto) -> int:
    return sum(int(np.prod(t.dims)) * 4 for t in model.graph.initializer)


def session(model: onnx.ModelProto | str, *, optimize: bool = False, threads: int = 0) -> ort.InferenceSession:
    """A CPU onnxruntime session (graph optimisations off unless asked), for checks and calibration."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    data = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


def validate(model: onnx.ModelProto, *, where: str = "output model") -> None:
    """Full checker and an onnxruntime session must both accept the model."""
    check(model, where=where, full=True)
    try:
        if model.ByteSize() <= TWO_GB:
            session(model)
    except Exception as err:  # onnxruntime raises its own exception types; any of them means invalid.
        raise InvalidModelError(f"{where}: onnxruntime cannot load it: {str(err).splitlines()[0]}") from err
