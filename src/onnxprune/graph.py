"""Load, convert, validate and save models: the only place that touches files and protobufs."""

from __future__ import annotations

import logging
import os
import pathlib
import shutil
import tempfile
from collections.abc import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
from google.protobuf.message import DecodeError, EncodeError
from onnx import external_data_helper

from onnxprune.errors import InvalidModelError, OnnxPruneError, UnsupportedModelError

log = logging.getLogger(__name__)
ort.set_default_logger_severity(3)
gs.logger.G_LOGGER.severity = gs.logger.G_LOGGER.ERROR

TWO_GB = 2**31 - 1
SET_ASIDE_BYTES = 64 << 20  # shape inference sets the weights of larger models aside (`infer_shapes`)


def load(path: str | os.PathLike) -> onnx.ModelProto:
    """Read an ONNX file (external data too) and check it; every failure is one InvalidModelError line.

    External data must lie in the model's folder or below it. Each initializer's declared shape is checked against
    the bytes stored before anything uses it, once for the file and again once the external data is in.

    Args:
        path: The .onnx file.

    Returns:
        The model, its external tensors read into it, accepted by the ONNX checker.

    Raises:
        InvalidModelError: The file is missing, a folder, empty or not readable (permissions); it does not parse
            as an ONNX protobuf, or holds no nodes; an initializer's declared shape is negative, absurd (over 2^36
            elements) or does not match its bytes, or its data type is unknown; external data lies outside the
            model's folder, is missing or cannot be read; or the ONNX checker rejects the model.
    """
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
    _check_declared_sizes(model)  # external tensors too, now that their bytes are in
    check(model, where=str(path), path=path)
    return without_negative_dims(model)


def without_negative_dims(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model`, or a copy of it whose negative dims (``dim_value: -1``) are unknown dims instead.

    paddle2onnx writes a dynamic batch as ``dim_value: -1`` (PP-OCR's text-angle classifier: ``[-1, 3, ?, ?]``); the
    ONNX spec has no negative dims, onnxruntime reads them as dynamic, and so does onnxprune from here on (they made
    random inputs of -1 samples: "negative dimensions are not allowed", exit 3). Inputs, outputs and value_info.

    Args:
        model: The model; not modified.

    Returns:
        `model` itself when no dim is negative, else a copy with those dims cleared (neither value nor name).
    """
    infos = lambda m: [*m.graph.input, *m.graph.output, *m.graph.value_info]  # noqa: E731
    if not any(d.HasField("dim_value") and d.dim_value < 0 for v in infos(model) for d in v.type.tensor_type.shape.dim):
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for info in infos(copy):
        for dim in info.type.tensor_type.shape.dim:
            if dim.HasField("dim_value") and dim.dim_value < 0:
                dim.Clear()
    return copy


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
            try:
                itemsize = (
                    onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
                    if tensor.data_type not in (onnx.TensorProto.UNDEFINED, onnx.TensorProto.STRING)
                    else 0
                )
            except (KeyError, ValueError, TypeError) as err:
                raise InvalidModelError(f"initializer '{tensor.name}': unknown data type {tensor.data_type}") from err
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


def oversized(model: onnx.ModelProto) -> bool:
    """True when the proto cannot be serialised in one piece (over protobuf's 2 GB limit).

    ByteSize walks every byte (seconds on a 2 GB model), so the weights' declared sizes decide the clear cases.

    Args:
        model: The model.

    Returns:
        True when the model cannot be serialised in one piece (over 2^31 - 1 bytes, or the encoder refuses it).
    """
    payload = _tensor_bytes(model)
    if payload > TWO_GB:
        return True
    if payload < TWO_GB // 2:
        return False
    try:
        return model.ByteSize() > TWO_GB
    except EncodeError:
        return True


def check(
    model: onnx.ModelProto, *, where: str = "model", full: bool = False, path: pathlib.Path | None = None
) -> None:
    """Run the ONNX checker (on `path`, the file it was read from, when the proto is over 2 GB); one-line errors.

    Args:
        model: The model to check.
        where: What the error message calls the model (its path, "output model"...).
        full: Run the checker's full check (``full_check``: shape inference included).
        path: The file `model` was read from; checked instead of the proto when that is over 2 GB (`oversized`).

    Raises:
        InvalidModelError: The checker rejects the model; the message holds the first line of its complaint.
    """
    try:
        if path is not None and oversized(model):
            onnx.checker.check_model(str(path), full_check=full)
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


def infer_shapes(model: onnx.ModelProto, *, in_place: bool = False, weightless: bool = False) -> onnx.ModelProto:
    """Shape inference with data propagation (Shape -> Gather -> Reshape chains resolve where they can).

    From `SET_ASIDE_BYTES` of weights on, inference runs on a view with the large initializers set aside (dims kept,
    bytes held back): passing the weights through would serialise and parse them twice per call (VGG-19, 550 MB:
    4.5 s a call, ten calls a prune). The shapes found are written into a copy of `model`, into `model` itself with
    `in_place` or over 2 GB (`oversized`: a copy would double the memory), or returned on the view itself with
    `weightless`.

    Args:
        model: The model; left as it was unless `in_place` or over 2 GB (see above).
        in_place: Write the shapes into `model` (the caller owns it) rather than into a copy.
        weightless: For reading shapes only: the result may be the view, whose large initializers hold no bytes.

    Returns:
        A model with the inferred shapes in ``value_info`` and its outputs' types, or `model` when inference fails
        (logged at debug level, not raised).
    """
    try:
        big = oversized(model)
        if not big and _tensor_bytes(model) < SET_ASIDE_BYTES:
            return _with_contrib_shapes(onnx.shape_inference.infer_shapes(model, data_prop=True))
        inferred = _with_contrib_shapes(onnx.shape_inference.infer_shapes(weightless_view(model), data_prop=True))
        if weightless:
            return inferred
        target = model
        if not (big or in_place):
            target = onnx.ModelProto()
            target.CopyFrom(model)
        del target.graph.value_info[:]
        target.graph.value_info.extend(inferred.graph.value_info)
        for out, found in zip(target.graph.output, inferred.graph.output, strict=True):
            out.type.CopyFrom(found.type)
        return target
    except (onnx.shape_inference.InferenceError, RuntimeError, ValueError, UnicodeError, TypeError) as err:
        log.debug("shape inference failed: %s", err)
        return model


def _with_contrib_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with the shapes onnxruntime's symbolic shape inference finds, when it holds onnxruntime's contrib ops.

    onnx's inference does not know the ``com.microsoft`` domain (the transformer optimizer's fused ops), so every
    shape after one stays unknown; onnxruntime's own inference (``onnxruntime.tools.symbolic_shape_infer``) does.
    Where it fails, the model is returned as it was.
    """
    if not any(n.domain == "com.microsoft" for n in model.graph.node):
        return model
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    try:
        return SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    except Exception as err:  # noqa: BLE001 -- it raises plain Exception for what it cannot resolve
        log.debug("onnxruntime's symbolic shape inference failed: %s", err)
        return model


def to_graph(model: onnx.ModelProto) -> gs.Graph:
    """Import a model into onnx-graphsurgeon with inferred shapes; unnamed nodes get unique names.

    Initializers that old exporters list as graph inputs are dropped from the inputs, and an IR version below 4 is
    raised to 4 (shape inference needs it). Over 2 GB, shapes are inferred on a weightless view and copied over.

    Args:
        model: The model. Not modified, except over 2 GB (`oversized`), where those two edits are made to it in
            place.

    Returns:
        The graph, with the shapes inference found and a name on every node (``<op>_<index>`` for unnamed ones).

    Raises:
        UnsupportedModelError: The default domain's opset is below 7.
        InvalidModelError: onnx-graphsurgeon cannot import the model.
    """
    model = _strip_initializer_inputs(model)
    if model.ir_version < 4:  # IR 3 wants every initializer listed as an input: shape inference needs IR >= 4 now
        model = onnx.ModelProto.FromString(model.SerializeToString()) if not oversized(model) else model
        model.ir_version = 4
    for domain in model.opset_import:
        if domain.domain in ("", "ai.onnx") and domain.version < 7:
            raise UnsupportedModelError(f"opset {domain.version} is too old; convert the model to opset 7 or newer")
    try:
        if oversized(model) or _tensor_bytes(model) >= SET_ASIDE_BYTES:  # infer on a weightless view, import the
            graph = gs.import_onnx(model)  # real weights, then copy the shapes over
            _set_shapes(graph, infer_shapes(model, weightless=True))
        else:
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


def weightless_view(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` whose large initializers are placeholders: dims and type, marked external, no bytes.

    Built field by field, so the weights are never copied (reading a tensor's ``raw_data`` copies it); for shape
    inference and digests, never to run.

    Args:
        model: The model; not modified.

    Returns:
        The view: initializers over 1 KiB (by their dims) replaced by external-data placeholders.
    """
    view = onnx.ModelProto()
    for field in ("ir_version", "producer_name", "producer_version", "domain", "model_version"):
        setattr(view, field, getattr(model, field))
    view.opset_import.extend(model.opset_import)
    view.functions.extend(model.functions)
    graph = view.graph
    graph.name = model.graph.name
    for field in ("node", "input", "output", "value_info", "sparse_initializer"):
        getattr(graph, field).extend(getattr(model.graph, field))
    for tensor in model.graph.initializer:
        if int(np.prod(tensor.dims, dtype=np.int64)) * 4 > 1024 and tensor.data_location != onnx.TensorProto.EXTERNAL:
            placeholder = graph.initializer.add()
            placeholder.name, placeholder.data_type = tensor.name, tensor.data_type
            placeholder.dims.extend(tensor.dims)
            placeholder.data_location = onnx.TensorProto.EXTERNAL
            entry = placeholder.external_data.add()
            entry.key, entry.value = "location", "set-aside"
        else:
            graph.initializer.append(tensor)
    return view


def _set_shapes(graph: gs.Graph, inferred: onnx.ModelProto) -> None:
    values = {v.name: v for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    for tensor in graph.tensors().values():
        info = values.get(tensor.name)
        if isinstance(tensor, gs.Variable) and info is not None and info.type.tensor_type.HasField("shape"):
            tensor.dtype = onnx.helper.tensor_dtype_to_np_dtype(info.type.tensor_type.elem_type)
            tensor.shape = [
                d.dim_param or (d.dim_value if d.HasField("dim_value") else None)
                for d in info.type.tensor_type.shape.dim
            ]


def _strip_initializer_inputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """Old exporters list every initializer as a graph input too; those are weights, not inputs."""
    inits = {t.name for t in model.graph.initializer}
    if not any(i.name in inits for i in model.graph.input):
        return model
    model = onnx.ModelProto.FromString(model.SerializeToString()) if not oversized(model) else model
    keep = [i for i in model.graph.input if i.name not in inits]
    del model.graph.input[:]
    model.graph.input.extend(keep)
    return model


def to_model(graph: gs.Graph, template: onnx.ModelProto) -> onnx.ModelProto:
    """Export `graph` with the template's opsets, IR version and metadata; re-infer shapes.

    Args:
        graph: The graph to export (no type check).
        template: The model whose opset imports, IR version (at least 4), producer name and version, domain, model
            version, doc string and metadata props the export takes.

    Returns:
        The model, shapes inferred again (`infer_shapes`, which see for a model over 2 GB).
    """
    model = gs.export_onnx(graph, do_type_check=False)
    model.ir_version = max(template.ir_version, 4)  # IR < 4 needs initializers listed as inputs; we strip those
    del model.opset_import[:]
    model.opset_import.extend(template.opset_import)
    for field in ("producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(model, field, getattr(template, field))
    del model.metadata_props[:]
    model.metadata_props.extend(template.metadata_props)
    return infer_shapes(model, in_place=True)


def refresh_shapes(graph: gs.Graph) -> None:
    """Infer every intermediate shape of `graph` again, in place (after an edit that makes more of them known).

    Args:
        graph: The graph; edited in place. Intermediate tensors lose their shape and dtype (`reset_shapes`), then
            take those inference finds (graph outputs too); where it finds none, or fails, they stay unknown.
    """
    model = gs.export_onnx(graph, do_type_check=False)
    _forget_placeholder_dims(model)
    reset_shapes(graph)
    _set_shapes(graph, infer_shapes(model, weightless=True))


def _forget_placeholder_dims(model: onnx.ModelProto) -> None:
    """Clear the ``unk__N`` dims an earlier inference wrote into `model`'s value_info (in place).

    onnx names a dim it could not resolve ``unk__N`` and, inferring again, keeps a dim the model already states over
    the one it finds: a Slice whose bounds were computed keeps ``[unk__2, unk__3, 16]`` after the bounds fold, where
    ``[batch, seq, 16]`` is now known. Named and static dims (an exporter's, or ones that are right) stay.
    """
    for info in model.graph.value_info:
        for dim in info.type.tensor_type.shape.dim:
            if dim.dim_param.startswith("unk__"):
                dim.Clear()


def subgraph_weights(graph: gs.Graph) -> tuple[int, list[str]]:
    """Weights held in the bodies of If / Loop / Scan nodes, which no pass prunes.

    silero-vad's ``op18_ifless`` export holds every weight in the branches of an If on its sample-rate input: the
    refusal read "no layer offers anything to remove (0 groups blocked)" and named options that could not help.

    Args:
        graph: The graph (an If whose condition folded is no longer there after `cleanup`).

    Returns:
        (their element count, the names of the top-level nodes holding them).
    """

    def inside(node: gs.Node) -> int:
        bodies = [v for v in node.attrs.values() if isinstance(v, gs.Graph)]
        bodies += [g for v in node.attrs.values() if isinstance(v, list) for g in v if isinstance(g, gs.Graph)]
        total = 0
        for body in bodies:
            total += sum(int(t.values.size) for t in body.tensors().values() if isinstance(t, gs.Constant))
            total += sum(inside(n) for n in body.nodes)
        return total

    found = {n.name or n.op: inside(n) for n in graph.nodes}
    return sum(found.values()), [name for name, count in found.items() if count]


def unique_name(graph: gs.Graph, base: str) -> str:
    """A tensor/node name derived from `base` that the graph does not use yet.

    Args:
        graph: The graph whose tensor and node names are taken.
        base: The name wanted.

    Returns:
        `base`, or `base_1`, `base_2`... whichever is free; not reserved, so a second call may return it again
        (`Namer` remembers).
    """
    return Namer(graph).fresh_name(base)


class Namer:
    """Fresh names for one graph, remembering those it gave (cheaper than `unique_name` for many rewrites)."""

    def __init__(self, graph: gs.Graph) -> None:
        self._taken = set(graph.tensors().keys()) | {n.name for n in graph.nodes}

    def fresh_name(self, base: str) -> str:
        """`base`, or `base_1`, `base_2`... whichever is still free.

        Args:
            base: The name wanted.

        Returns:
            The name, now taken for later calls of this `Namer`.
        """
        name, i = base, 1
        while name in self._taken:
            name, i = f"{base}_{i}", i + 1
        self._taken.add(name)
        return name


def reset_shapes(graph: gs.Graph) -> None:
    """Forget inferred shapes of intermediate tensors so stale channel counts cannot survive export.

    Args:
        graph: The graph; edited in place: every variable other than a graph input or output gets shape and dtype
            None.
    """
    keep = {t.name for t in graph.inputs} | {t.name for t in graph.outputs}
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Variable) and tensor.name not in keep:
            tensor.shape = None
            tensor.dtype = None


def save(model: onnx.ModelProto, path: str | os.PathLike) -> None:
    """Write atomically (`atomic_write`). External data above 2 GB, next to it.

    Args:
        model: The model; not modified.
        path: The .onnx file to write. A model over 2 GB (`oversized`) has its tensors from about 1 KB up written
            to one file beside it, named after it with ``.data`` appended (``model.onnx.data``).

    Raises:
        OnnxPruneError: The folder cannot be written (disk full, quota, permissions); nothing half-written is left.
    """
    path = pathlib.Path(path)
    data_name = path.name + ".data"

    def write(target: pathlib.Path) -> list[str]:
        if not oversized(model):
            onnx.save_model(model, target)
            return []
        copy = onnx.ModelProto()
        copy.CopyFrom(model)  # saving as external data rewrites the proto it is given
        onnx.save_model(
            copy,
            target,
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data_name,
            size_threshold=1024,
        )
        return [data_name]

    atomic_write(path, write)


def atomic_write(path: str | os.PathLike, write: Callable[[pathlib.Path], list[str] | None]) -> None:
    """Write `path` atomically: `write` fills a file in a temp folder beside the target, then renames move it in.

    The file is made by `write` (open(), onnx.save...), so it gets the usual mode (0o666 less the umask), not
    mkstemp's 0o600. Files `write` names besides (external data) are moved next to the target first.

    Args:
        path: The file to write.
        write: Called with the staging path; returns the names of other files it wrote in the staging folder.

    Raises:
        OnnxPruneError: The folder cannot be written (disk full, quota, permissions); nothing half-written is left.
    """
    path = pathlib.Path(path)
    folder = path.parent if str(path.parent) else pathlib.Path(".")
    try:
        staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=folder))
    except OSError as err:
        raise OnnxPruneError(f"{path}: cannot write into {folder} ({err.strerror or err})") from err
    try:
        for extra in write(staging / path.name) or []:
            os.replace(staging / extra, folder / extra)
        os.replace(staging / path.name, path)
    except OSError as err:
        raise OnnxPruneError(f"{path}: cannot write ({err.strerror or err}); nothing was written") from err
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _tensor_bytes(model: onnx.ModelProto) -> int:
    """Bytes the initializers and Constant nodes declare (4 per element: an upper bound for float16 and int8)."""
    tensors = list(model.graph.initializer) + [
        a.t for n in model.graph.node if n.op_type == "Constant" for a in n.attribute if a.HasField("t")
    ]
    return sum(int(np.prod(t.dims, dtype=np.int64)) * 4 for t in tensors)


def session(
    model: onnx.ModelProto | str,
    *,
    optimize: bool = False,
    calibration: bool = False,
    threads: int = 0,
    providers: tuple[str, ...] = ("CPUExecutionProvider",),
    level: ort.GraphOptimizationLevel | None = None,
) -> ort.InferenceSession:
    """The one onnxruntime session builder: CPU, graph optimisations off unless asked, quiet.

    Args:
        model: The model, or the path of a model file.
        optimize: All graph optimisations (timing) instead of none (checks: the graph runs as written).
        calibration: All graph optimisations (a light ResNet-50 runs 1.6x faster at batch 1 than with none), with
            idle threads that do not spin: calibration runs alternate with numpy/LAPACK work on the same cores.
        threads: Intra-op threads (0: onnxruntime's default).
        providers: Execution providers, in order of preference.
        level: An explicit optimisation level (``onnxprune bench --opt-level``); overrides `optimize`.

    Returns:
        The session.
    """
    opts = ort.SessionOptions()
    opts.graph_optimization_level = (
        level
        if level is not None
        else ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimize or calibration
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    if calibration:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    data = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(data, opts, providers=list(providers))


def validate(model: onnx.ModelProto, *, where: str = "output model") -> None:
    """Full checker and an onnxruntime session must both accept the model (over 2 GB: as a file with its data).

    Args:
        model: The model; not modified (over 2 GB, a copy is saved to a temporary folder).
        where: What the error message calls the model.

    Raises:
        InvalidModelError: The full ONNX checker rejects the model, or onnxruntime cannot build a session for it.
    """
    if not oversized(model):
        check(model, where=where, full=True)
        _session_accepts(model, where)
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "m.onnx"
        copy = onnx.ModelProto()
        copy.CopyFrom(model)  # saving as external data rewrites the proto it is given
        onnx.save_model(copy, path, save_as_external_data=True, location="m.data")
        del copy
        check(model, where=where, full=True, path=path)
        _session_accepts(str(path), where)


def _session_accepts(model: onnx.ModelProto | str, where: str) -> None:
    try:
        session(model)
    except Exception as err:  # onnxruntime raises its own exception types; any of them means invalid.
        raise InvalidModelError(f"{where}: onnxruntime cannot load it: {str(err).splitlines()[0]}") from err
