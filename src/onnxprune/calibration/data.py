"""Calibration data: .npy (one input) or .npz (one key per input), checked against the model's inputs."""

from __future__ import annotations

import pathlib
import zipfile

import numpy as np
import onnx

from onnxprune.errors import CalibrationError

_DTYPES = {
    onnx.TensorProto.FLOAT: np.float32,
    onnx.TensorProto.FLOAT16: np.float16,
    onnx.TensorProto.DOUBLE: np.float64,
    onnx.TensorProto.INT64: np.int64,
    onnx.TensorProto.INT32: np.int32,
}


def model_inputs(model: onnx.ModelProto) -> dict[str, tuple[list, type]]:
    """Graph inputs that are not initializers: name -> (dims, numpy dtype); symbolic dims are None."""
    inits = {t.name for t in model.graph.initializer}
    found = {}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        t = inp.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        found[inp.name] = (dims, _DTYPES.get(t.elem_type))
    return found


def load_calibration(
    path: str | pathlib.Path, model: onnx.ModelProto, *, limit: int | None = None
) -> dict[str, np.ndarray]:
    """Read samples for every model input and check shape, dtype and values; one CalibrationError line on failure."""
    path = pathlib.Path(path)
    inputs = model_inputs(model)
    if not path.is_file():
        raise CalibrationError(f"calibration data {path}: no such file")
    try:
        loaded = np.load(path, allow_pickle=False)
    except (ValueError, OSError, zipfile.BadZipFile) as err:
        raise CalibrationError(f"calibration data {path}: not a .npy/.npz file ({err})") from err
    if isinstance(loaded, np.ndarray):
        if len(inputs) != 1:
            raise CalibrationError(
                f"{path}: a .npy holds one input, the model has {len(inputs)}: {list(inputs)}; "
                "use an .npz with one key per input"
            )
        data = {next(iter(inputs)): loaded}
    else:
        data = {k: loaded[k] for k in loaded.files}
        missing = set(inputs) - set(data)
        if missing:
            raise CalibrationError(f"{path}: no array for model input '{sorted(missing)[0]}' (keys: {sorted(data)})")
        data = {k: data[k] for k in inputs}
    sizes = {len(v) for v in data.values() if v.ndim}
    if len(sizes) != 1 or 0 in sizes:
        raise CalibrationError(f"{path}: inputs need the same, non-zero number of samples; found {sorted(sizes)}")
    for name, arr in data.items():
        dims, dtype = inputs[name]
        if arr.ndim != len(dims) or any(d is not None and d != s for d, s in zip(dims[1:], arr.shape[1:])):
            raise CalibrationError(
                f"{path}: input '{name}' has shape {list(arr.shape)}, the model expects "
                f"{['N' if d is None else d for d in dims]}"
            )
        if dtype is not None and arr.dtype != dtype:
            if arr.dtype.kind != np.dtype(dtype).kind:
                raise CalibrationError(f"{path}: input '{name}' is {arr.dtype}, the model expects {np.dtype(dtype)}")
            data[name] = arr.astype(dtype)
        if data[name].dtype.kind == "f" and not np.all(np.isfinite(data[name])):
            raise CalibrationError(f"{path}: input '{name}' holds NaN or Inf")
    if limit:
        data = {k: v[:limit] for k, v in data.items()}
    return data
