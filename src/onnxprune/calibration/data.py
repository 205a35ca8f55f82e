"""Calibration data: .npy (one input), .npz (one key per input), a folder of those, or a folder of images.

Everything is checked against the model's inputs (names, shapes, dtypes, finite values, the batch size the model
accepts) before anything runs. Images need Pillow (``pip install onnxprune[images]``) and explicit preprocessing
(`ImageOptions`).

The loaded data is a `Samples`: the samples grouped by shape (a folder of pages of different sizes is normal for
detectors and recognisers), so every batch it yields holds samples of one shape, at the batch the model accepts.
"""

from __future__ import annotations

import logging
import pathlib
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxprune.errors import CalibrationError, OnnxPruneError, UnsupportedModelError

log = logging.getLogger(__name__)

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
    """Graph inputs that are not initializers: name -> (dims, numpy dtype); symbolic dims are None.

    Args:
        model: The model whose graph inputs are read.

    Returns:
        Input name -> (dims, dtype), in the graph's order: dims a list (None for a symbolic or unknown dim, empty
        when the input has no shape); dtype float32, float16, float64, int64 or int32, or None for any other element
        type.
    """
    inits = {t.name for t in model.graph.initializer}
    found = {}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        t = inp.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        found[inp.name] = (dims, _DTYPES.get(t.elem_type))
    return found


def batch_axes(model: onnx.ModelProto) -> dict[str, int | None]:
    """The axis holding the samples of each graph input and output: where the batch symbol is, else 0; or None.

    The batch symbol is the symbolic first dim most inputs share (``batch``). A recurrent model's state input
    ``[layers, batch, hidden]`` (silero-vad, LSTM / GRU exports) carries it on axis 1: its samples are stacked there,
    and feeding it ``[batch, layers, hidden]`` is an error onnxruntime reports, or worse, a wrong batch. A tensor
    without the symbol whose dims are all fixed, and a scalar, hold no samples (None): a per-run input, fed one value
    with every batch (faster-whisper's silero-vad: chunks ``[seq_len, 576]`` and the LSTM state ``h`` ``[1, 1, 128]``;
    a sample rate). Without a shared symbol every tensor but a scalar holds its samples on axis 0.

    Args:
        model: The model whose graph inputs and outputs are read.

    Returns:
        Tensor name -> axis or None, for every graph input (not an initializer) and output.
    """
    inits = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    firsts = [
        i.type.tensor_type.shape.dim[0].dim_param
        for i in inputs
        if len(i.type.tensor_type.shape.dim) and i.type.tensor_type.shape.dim[0].dim_param
    ]
    symbol = max(set(firsts), key=firsts.count) if firsts else None
    axes: dict[str, int | None] = {}
    for info in [*inputs, *model.graph.output]:
        shape = info.type.tensor_type.shape
        params = [d.dim_param for d in shape.dim]
        fixed = all(d.HasField("dim_value") for d in shape.dim)
        if info.type.tensor_type.HasField("shape") and (not shape.dim or (symbol and fixed)):
            axes[info.name] = None
        else:
            axes[info.name] = params.index(symbol) if symbol and symbol in params else 0
    return axes


def to_samples_first(arrays: dict[str, np.ndarray], axes: dict[str, int | None]) -> dict[str, np.ndarray]:
    """Arrays laid out as the model takes them (samples on `axes`) with the samples on axis 0."""
    return {k: np.moveaxis(v, axes[k], 0) if axes.get(k) and v.ndim > axes[k] else v for k, v in arrays.items()}


def to_model_layout(arrays: dict[str, np.ndarray], axes: dict[str, int | None]) -> dict[str, np.ndarray]:
    """Arrays with the samples on axis 0 laid out as the model takes them (samples on `axes`)."""
    return {k: np.moveaxis(v, 0, axes[k]) if axes.get(k) and v.ndim > axes[k] else v for k, v in arrays.items()}


class Samples:
    """Calibration samples grouped by shape; every batch they yield holds samples of one shape.

    Each group is ``(index, arrays)``: the samples' positions in the data as loaded (the order of the file, or of
    the folder's files, which is the order of ``--labels``) and name -> ``[n, ...]`` array per model input. Samples
    are iterated group by group, in each group in its stored order; `index` lists the positions in that order, so
    anything computed per sample (pooled features, predictions) lines up with ``labels[samples.index]``.

    Attributes:
        groups: The ``(index, arrays)`` groups, one per distinct input shape.
        batch: The batch size the model requires (its inputs' fixed first dim), or None when it is dynamic.
        total: How many samples the data held when loaded (before any subset); labels must cover them all.
        axes: Input name -> the axis the model takes its samples on, where not 0 (`batch_axes`): the arrays hold
            them on axis 0, the batches yielded on that axis.
        constants: Per-run input name -> the one value fed with every batch (an input without samples).
        origin: A token shared by the samples as loaded and every subset taken from them: position p means the
            same sample in all of them (what is computed per sample can be looked up again by position).
    """

    def __init__(
        self,
        groups: list[tuple[np.ndarray, dict[str, np.ndarray]]],
        *,
        batch: int | None = None,
        total: int = 0,
        origin: object | None = None,
        axes: dict[str, int | None] | None = None,
        constants: dict[str, np.ndarray] | None = None,
    ) -> None:
        self.groups = [(np.asarray(i, dtype=np.int64), a) for i, a in groups if len(i)]
        self.batch = batch
        self.total = total or len(self)
        self.origin = object() if origin is None else origin
        self.axes = {k: a for k, a in (axes or {}).items() if a}
        self.constants = dict(constants or {})

    @classmethod
    def from_arrays(
        cls,
        data: dict[str, np.ndarray],
        *,
        batch: int | None = None,
        axes: dict[str, int | None] | None = None,
        constants: dict[str, np.ndarray] | None = None,
    ) -> Samples:
        """One group of same-shaped samples, in their order (a plain dict as the API and tests pass it).

        Args:
            data: Input name -> ``[N, ...]`` array (samples on axis 0); all arrays hold the same N.
            batch: The model's fixed batch size, if it has one.
            axes: The axis the model takes each input's samples on, where not 0.
            constants: The value of each per-run input, fed with every batch.

        Returns:
            The samples, positions 0..N-1.
        """
        n = len(next(iter(data.values())))
        return cls([(np.arange(n), dict(data))], batch=batch, total=n, axes=axes, constants=constants)

    def __len__(self) -> int:
        return sum(len(i) for i, _ in self.groups)

    @property
    def index(self) -> np.ndarray:
        """Each sample's position in the data as loaded, in iteration order."""
        return np.concatenate([i for i, _ in self.groups]) if self.groups else np.zeros(0, dtype=np.int64)

    @property
    def shapes(self) -> list[dict[str, tuple[int, ...]]]:
        """Per group, the shape of one sample of each input (without the batch dim)."""
        return [{k: tuple(v.shape[1:]) for k, v in arrays.items()} for _, arrays in self.groups]

    def batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        """Feeds of at most `batch_size` same-shaped samples (exactly the model's fixed batch when it has one).

        Args:
            batch_size: Samples per batch when the model's batch dim is dynamic.

        Yields:
            Input name -> array, in iteration order.
        """
        size = self.batch or batch_size
        for index, arrays in self.groups:
            for i in range(0, len(index), size):
                yield {**to_model_layout({k: v[i : i + size] for k, v in arrays.items()}, self.axes), **self.constants}

    def _like(self, groups: list) -> Samples:
        """Other `groups` of these samples: same batch, total, origin, axes and per-run values."""
        return Samples(
            groups, batch=self.batch, total=self.total, origin=self.origin, axes=self.axes, constants=self.constants
        )

    def sizes(self, batch_size: int) -> Iterator[int]:
        """The number of samples in each batch `batches` yields, in the same order."""
        size = self.batch or batch_size
        for index, _ in self.groups:
            for i in range(0, len(index), size):
                yield min(size, len(index) - i)

    def take(self, positions: np.ndarray) -> Samples:
        """The samples at `positions` (iteration positions 0..len-1), in that order within each shape group.

        Args:
            positions: Positions to keep.

        Returns:
            A new `Samples` (arrays copied), same batch and total.
        """
        positions = np.asarray(positions, dtype=np.int64)
        sizes = [len(i) for i, _ in self.groups]
        offsets = np.cumsum([0, *sizes])
        group_of = np.repeat(np.arange(len(sizes)), sizes)[positions] if len(positions) else positions
        groups = []
        for g in dict.fromkeys(group_of.tolist()):
            local = positions[group_of == g] - offsets[g]
            index, arrays = self.groups[g]
            groups.append((index[local], {k: v[local] for k, v in arrays.items()}))
        return self._like(groups)

    def head(self, n: int) -> Samples:
        """The first `n` samples in iteration order.

        Args:
            n: How many.

        Returns:
            A new `Samples`, cut to whole fixed batches when the model has one.
        """
        return self.take(np.arange(min(n, len(self)))).whole_batches()

    def whole_batches(self) -> Samples:
        """These samples with each shape group cut to a multiple of the model's fixed batch (self when dynamic).

        Returns:
            The samples that fill whole batches.
        """
        if not self.batch or self.batch == 1:
            return self
        kept = [(i[: len(i) // self.batch * self.batch], a) for i, a in self.groups]
        groups = [(i, {k: v[: len(i)] for k, v in a.items()}) for i, a in kept]
        return self._like(groups)


def check_sample_axis(model: onnx.ModelProto, *, calibrated: bool) -> None:
    """Refuse a model with a scalar input unless calibration data gives its value.

    A per-run setting taken as an input (silero-vad's sample rate, an NMS threshold) has no sample axis: random
    values for it are not what the model takes (silero-vad data-free: exit 3). Calibration data gives its one value
    (an .npz key holding a 0-d array), fed with every batch.

    Args:
        model: The model whose graph inputs are read.
        calibrated: Calibration data will be read (it must hold the value).

    Raises:
        UnsupportedModelError: Without calibration data, an input that is not an initializer has a shape of rank 0.
    """
    inits = {t.name for t in model.graph.initializer}
    for inp in model.graph.input:
        t = inp.type.tensor_type
        if inp.name not in inits and t.HasField("shape") and not len(t.shape.dim) and not calibrated:
            raise UnsupportedModelError(
                f"input '{inp.name}' is a scalar, a setting taken as an input (a sample rate, a threshold): random "
                f"values are not what it takes; give its value with --calib, an .npz whose key '{inp.name}' holds a "
                "0-d array (fed with every batch)"
            )


def fixed_batch(model: onnx.ModelProto) -> int | None:
    """The batch size the model's inputs require (a fixed first dim), or None when the batch dim is dynamic.

    Args:
        model: The model whose graph inputs are read.

    Returns:
        The fixed batch dim (the first, or the one `batch_axes` names) shared by the inputs that have one; None when
        none has.

    Raises:
        CalibrationError: Inputs fix different batch sizes.
    """
    axes = batch_axes(model)
    fixed = {
        name: dims[axes[name]]
        for name, (dims, _) in model_inputs(model).items()
        if axes[name] is not None and len(dims) > axes[name] and dims[axes[name]] is not None
    }
    if len(set(fixed.values())) > 1:
        raise CalibrationError(f"the model's inputs fix different batch sizes {fixed}; calibration cannot feed them")
    return next(iter(fixed.values()), None)


def as_samples(
    data: Samples | dict[str, np.ndarray], model: onnx.ModelProto | None = None, *, min_batches: int = 2
) -> Samples:
    """`data` as `Samples`; a dict is checked against `model` (when given) and takes its fixed batch.

    Args:
        data: Samples, or input name -> array laid out as the model takes it (``[N, ...]``, or the samples on the
            axis `batch_axes` names).
        model: The model the data feeds.
        min_batches: Whole batches of the model's fixed batch the data must fill: 2 for calibration (one to fit,
            one held out), 1 to measure a model on it.

    Returns:
        The samples.

    Raises:
        CalibrationError: A dict does not match the model's inputs (names, shapes, dtypes, finite values), or the
            model's fixed batch is more than the samples of any one shape.
    """
    if isinstance(data, Samples):
        return data
    if model is None:
        return Samples.from_arrays(data)
    inputs = model_inputs(model)
    axes = batch_axes(model)
    checked, constants = _check(
        "calibration data", _select_inputs("calibration data", dict(data), inputs), inputs, axes
    )
    samples = Samples.from_arrays(checked, batch=fixed_batch(model), axes=axes, constants=constants)
    return _fill_batches("calibration data", samples, min_batches)


def subset(samples: Samples, limit: int | None, *, seed: int = 0) -> Samples:
    """At most `limit` of `samples`: a seeded random subset, in the samples' order (``--calib-size``).

    Args:
        samples: The samples.
        limit: How many to keep (None or 0: all).
        seed: Seed of the draw.

    Returns:
        The subset (`samples` itself when it holds no more than `limit`).
    """
    if not limit or limit >= len(samples):
        return samples
    return samples.take(np.sort(np.random.default_rng(seed).choice(len(samples), limit, replace=False)))


def load_calibration(
    path: str | pathlib.Path,
    model: onnx.ModelProto,
    *,
    limit: int | None = None,
    image_options: ImageOptions | None = None,
    seed: int = 0,
) -> Samples:
    """Read samples for every model input and check shape, dtype, values and the batch the model accepts.

    Arrays of different sample shapes (a folder of pages of varying size) are kept apart, one group per shape;
    each must match the model's fixed dims.

    Args:
        path: A .npy, an .npz, or a folder of those or of images.
        model: The model the samples feed.
        limit: Use at most this many samples, a random subset (seeded) in the data's order.
        image_options: Preprocessing for image folders.
        seed: Seed of the subset drawn for `limit`.

    Returns:
        The samples, grouped by shape.

    Raises:
        CalibrationError: One line naming what does not match or cannot be read.
    """
    path = pathlib.Path(path)
    inputs = model_inputs(model)
    if path.is_dir():
        parts = _load_folder(path, model, inputs, image_options or ImageOptions())
    elif path.is_file():
        parts = [(path, _load_arrays(path, inputs))]
    else:
        raise CalibrationError(f"calibration data {path}: no such file or folder")
    batch, axes = fixed_batch(model), batch_axes(model)
    groups: dict[tuple, list] = {}
    start, constants = 0, None
    for where, data in parts:
        data, values = _check(where, data, inputs, axes)
        constants = values if constants is None else constants
        for name, value in values.items():
            if not np.array_equal(value, constants[name]):
                raise CalibrationError(
                    f"{where}: input '{name}' holds no samples, and its value differs from the first file's; one "
                    "value is fed with every batch"
                )
        n = len(next(iter(data.values())))
        key = tuple((k, v.shape[1:]) for k, v in data.items())
        groups.setdefault(key, []).append((np.arange(start, start + n), data))
        start += n
    merged = [
        (np.concatenate([i for i, _ in g]), {k: np.concatenate([d[k] for _, d in g]) for k in g[0][1]})
        for g in groups.values()
    ]
    samples = Samples(merged, batch=batch, total=start, axes=axes, constants=constants)
    samples = subset(samples, limit, seed=seed)
    if len(samples.groups) > 1:
        log.info("calibration data: %d sample shapes, streamed shape by shape", len(samples.groups))
    return _fill_batches(path, samples)


def _fill_batches(path: pathlib.Path | str, samples: Samples, min_batches: int = 2) -> Samples:
    """The samples that fill whole batches of the model's fixed batch (a warning names what is left out)."""
    whole = samples.whole_batches()
    if samples.batch and samples.batch > 1 and len(whole) < min_batches * samples.batch:
        need = "two (one to fit, one held out)" if min_batches == 2 else f"{min_batches}"
        raise CalibrationError(
            f"{path}: the model only accepts batches of exactly {samples.batch} (its inputs' first dim is fixed); "
            f"{len(samples)} samples do not fill {need}: give at least "
            f"{min_batches * samples.batch} samples of one shape"
        )
    if samples.batch:
        log.info("the model's inputs fix the batch at %d: it runs at that batch", samples.batch)
    if len(whole) < len(samples):
        log.warning(
            "warning: the model only accepts batches of exactly %d; %d of the %d calibration samples that do not "
            "fill a batch are left out",
            samples.batch,
            len(samples) - len(whole),
            len(samples),
        )
    return whole


def _load_folder(path: pathlib.Path, model: onnx.ModelProto, inputs: dict, options: ImageOptions) -> list:
    arrays = sorted(p for p in path.iterdir() if p.suffix in (".npy", ".npz"))
    images = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if arrays:
        return [(p, _load_arrays(p, inputs)) for p in arrays]
    if images:
        return [(path, _load_images(path, images, inputs, options))]
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
        pickled = "pickle" in str(err) and path.read_bytes()[:6] == b"\x93NUMPY"  # an object array, not text
        why = " (it holds pickled Python objects, which are never loaded)" if pickled else f" ({err})"
        why = "" if "pickle" in str(err) and not pickled else why  # numpy's fallback to pickle: any other file
        raise CalibrationError(f"calibration data {path}: not a .npy/.npz array file{why}") from err
    if isinstance(loaded, np.ndarray):
        if len(inputs) != 1:
            raise CalibrationError(
                f"{path}: a .npy holds one input, the model has {len(inputs)}: {list(inputs)}; "
                "use an .npz with one key per input"
            )
        data = {next(iter(inputs)): loaded}
    else:
        data = _select_inputs(path, {k: loaded[k] for k in loaded.files}, inputs)
    return data


def _select_inputs(path: pathlib.Path | str, data: dict[str, np.ndarray], inputs: dict) -> dict[str, np.ndarray]:
    missing = set(inputs) - set(data)
    if missing:
        raise CalibrationError(f"{path}: no array for model input '{sorted(missing)[0]}' (keys: {sorted(data)})")
    return {k: np.asarray(data[k]) for k in inputs}


def _check(
    path: pathlib.Path | str, data: dict[str, np.ndarray], inputs: dict, axes: dict[str, int | None]
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """`data` (laid out as the model takes it) checked against `inputs`: (samples on axis 0, per-run values)."""
    batched = {k: v for k, v in data.items() if axes.get(k, 0) is not None}
    if any(v.ndim == 0 for v in batched.values()):
        raise CalibrationError(f"{path}: every input needs a leading sample axis; found a scalar")
    sizes = {v.shape[min(axes.get(k, 0), v.ndim - 1)] for k, v in batched.items()}
    if len(sizes) != 1 or 0 in sizes:
        along = (
            ""
            if not any(axes.get(k) for k in batched)
            else " (along each input's batch axis: " + ", ".join(f"'{k}' {axes.get(k, 0)}" for k in batched) + ")"
        )
        raise CalibrationError(
            f"{path}: inputs need the same, non-zero number of samples{along}; found {sorted(sizes)}"
        )
    for name, arr in data.items():
        dims, dtype = inputs[name]
        axis = axes.get(name, 0)
        if axis is None and list(arr.shape) != dims:
            raise CalibrationError(
                f"{path}: input '{name}' has shape {list(arr.shape)}; it holds no samples (fixed dims without the "
                f"batch), so one value of shape {dims} is fed with every batch"
            )
        if arr.ndim != len(dims) or any(
            d is not None and d != s and i != axis for i, (d, s) in enumerate(zip(dims, arr.shape))
        ):
            raise CalibrationError(
                f"{path}: input '{name}' has shape {list(arr.shape)}, the model expects "
                f"{'x'.join('?' if d is None else str(d) for d in dims)} (? any size)"
                + (f", its samples on axis {axis}" if axis else "")
            )
        if dtype is not None and arr.dtype != dtype:
            if arr.dtype.kind != np.dtype(dtype).kind:
                raise CalibrationError(f"{path}: input '{name}' is {arr.dtype}, the model expects {np.dtype(dtype)}")
            data[name] = arr.astype(dtype)
        if data[name].dtype.kind == "f" and not np.all(np.isfinite(data[name])):
            raise CalibrationError(f"{path}: input '{name}' holds NaN or Inf")
    constants = {k: v for k, v in data.items() if axes.get(k, 0) is None}
    return to_samples_first({k: v for k, v in data.items() if k not in constants}, axes), constants


def load_labels(path: str | pathlib.Path, data: Samples | None) -> np.ndarray:
    """Class labels (``--labels FILE.npy``) for the calibration samples, in the file's order.

    Args:
        path: A ``.npy`` file holding a 1-D array with at least one label per sample.
        data: The calibration samples as loaded (before any ``--calib-size`` subset).

    Returns:
        The first ``data.total`` labels.

    Raises:
        OnnxPruneError: No calibration data, an unreadable file, too few labels / not 1-D, or labels that are not
            class indices (integers from 0).
    """
    if data is None:
        raise OnnxPruneError("--labels needs --calib")
    try:
        labels = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise OnnxPruneError(f"labels {path}: cannot read ({err})") from err
    n = data.total  # samples as loaded, before any --calib-size subset: the labels follow the file's order
    if labels.ndim != 1 or len(labels) < n:
        raise OnnxPruneError(f"labels {path}: expected a 1-D array of {n} labels, got shape {list(labels.shape)}")
    labels = labels[:n]
    numeric = labels.dtype.kind in "biuf"
    if not numeric or not np.all(np.isfinite(labels)) or np.any(labels != np.round(labels)) or np.any(labels < 0):
        bad = labels if not numeric else labels[~np.isfinite(labels) | (labels != np.round(labels)) | (labels < 0)]
        raise OnnxPruneError(
            f"labels {path}: expected class indices (integers from 0), got {bad[:3].tolist()} among them"
        )
    return labels.astype(np.int64)
