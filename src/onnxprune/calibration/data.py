"""Calibration data: .npy (one input), .npz (one key per input), a folder of those, or a folder of images.

Everything is checked against the model's inputs (names, shapes, dtypes, finite values) before anything runs.
Images need Pillow (``pip install onnxprune[images]``) and explicit preprocessing (`ImageOptions`).
"""

from __future__ import annotations

import pathlib
import zipfile
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxprune.errors import CalibrationError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


@dataclass(frozen=True)
class ImageOptions:
    """How image files become an input tensor: resize, scale, normalise, lay out."""

    size: tuple[int, int] | None = None  # (H, W); from the model input when None
    resize: str = "bilinear"  # or "nearest"
    scale: float = 1 / 255
    mean: tuple[float, ...] = field(default_factory=tuple)  # per channel, after scaling; empty: none
    std: tuple[float, ...] = field(default_factory=tuple)
    layout: str = "nchw"  # or "nhwc"
    order: str = "rgb"  # or "bgr"


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
    path: str | pathlib.Path,
    model: onnx.ModelProto,
    *,
    limit: int | None = None,
    image_options: ImageOptions | None = None,
) -> dict[str, np.ndarray]:
    """Read samples for every model input and check shape, dtype and values; one CalibrationError line on failure."""
    path = pathlib.Path(path)
    inputs = model_inputs(model)
    if path.is_dir():
        data = _load_folder(path, model, inputs, image_options or ImageOptions())
        return _check(path, data, inputs, limit)
    if not path.is_file():
        raise CalibrationError(f"calibration data {path}: no such file or folder")
    return _check(path, _load_arrays(path, inputs), inputs, limit)


def _load_folder(path: pathlib.Path, model: onnx.ModelProto, inputs: dict, options: ImageOptions) -> dict:
    arrays = sorted(p for p in path.iterdir() if p.suffix in (".npy", ".npz"))
    images = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if arrays:
        parts = [_load_arrays(p, inputs) for p in arrays]
        return {k: np.concatenate([part[k] for part in parts]) for k in parts[0]}
    if images:
        return _load_images(path, images, inputs, options)
    raise CalibrationError(f"calibration folder {path}: no .npy, .npz or image files in it")


def _load_images(path: pathlib.Path, files: list, inputs: dict, options: ImageOptions) -> dict:
    if len(inputs) != 1:
        raise CalibrationError(f"{path}: images can feed a model with one input; this one has {list(inputs)}")
    try:
        from PIL import Image
    except ImportError as err:
        raise CalibrationError("reading images needs Pillow: pip install 'onnxprune[images]'") from err
    name, (dims, _) = next(iter(inputs.items()))
    if len(dims) != 4:
        raise CalibrationError(f"{path}: input '{name}' has {len(dims)} dims; images make 4-D tensors")
    channels = dims[3] if options.layout == "nhwc" else dims[1]
    size = options.size or ((dims[1], dims[2]) if options.layout == "nhwc" else (dims[2], dims[3]))
    if size is None or any(d is None for d in size) or channels not in (1, 3):
        raise CalibrationError(f"{path}: give the image size (--image-size HxW); input '{name}' is {dims}")
    resample = Image.BILINEAR if options.resize == "bilinear" else Image.NEAREST
    batch = []
    for file in files:
        try:
            with Image.open(file) as img:
                img = img.convert("L" if channels == 1 else "RGB").resize((size[1], size[0]), resample)
                arr = np.asarray(img, dtype=np.float32).reshape(size[0], size[1], channels)
        except OSError as err:
            raise CalibrationError(f"{file}: not a readable image ({err})") from err
        if options.order == "bgr" and channels == 3:
            arr = arr[..., ::-1]
        arr = arr * options.scale
        if options.mean:
            arr = arr - np.asarray(options.mean, dtype=np.float32)
        if options.std:
            arr = arr / np.asarray(options.std, dtype=np.float32)
        batch.append(arr if options.layout == "nhwc" else arr.transpose(2, 0, 1))
    return {name: np.ascontiguousarray(np.stack(batch))}


def _load_arrays(path: pathlib.Path, inputs: dict) -> dict[str, np.ndarray]:
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
    return data


def _check(path: pathlib.Path, data: dict[str, np.ndarray], inputs: dict, limit: int | None) -> dict:
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
