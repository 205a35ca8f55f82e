"""Run models in onnxruntime in batches: expose intermediate tensors, stream them, measure fidelity."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import numpy as np
import onnx

from onnxprune.calibration.data import Samples, as_samples, batch_axes, to_samples_first
from onnxprune.errors import CalibrationError
from onnxprune.graph import oversized, session, weightless_view
from onnxprune.progress import steps
from onnxprune.rules import layouts, scores_reach

HELD_OUT = 0.2  # fraction of the calibration samples kept for measuring fidelity, never used for decisions

Data = Samples | dict[str, np.ndarray]  # what the runners accept: grouped samples, or one array per input


def split_held_out(
    data: Data, fraction: float = HELD_OUT, *, seed: int = 0, strata: np.ndarray | None = None
) -> tuple[Samples, Samples]:
    """(fit, held-out): a seeded random `fraction` of the samples is held out (at least one, when there are two).

    Never the tail of the file: a file sorted by anything (upright crops first, flipped ones last) would give a
    held-out set of one kind. With `strata` (one class per sample, e.g. the original model's top-1), the held-out
    part is stratified: every class gives its share of samples (rounded up or down), so it covers as many classes
    as its size allows. With a fixed batch in the model, both parts are cut to whole batches.

    Args:
        data: The samples.
        fraction: Part held out.
        seed: Seed of the shuffle.
        strata: Per sample, in iteration order (``data.index``), its class; None: plain random sampling.

    Returns:
        The fit and held-out samples, each in a shuffled order.

    Raises:
        CalibrationError: With a fixed batch, too few samples to fill a batch in both parts.
    """
    data = as_samples(data)
    n = len(data)
    held = max(1, int(round(n * fraction))) if n >= 2 else 0
    if data.batch and data.batch > 1 and held:  # whole batches of the model's fixed batch
        held = min(max(1, int(round(held / data.batch))) * data.batch, n)
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    if strata is not None:  # group the shuffled samples by class (classes in random order), then sample evenly
        _, inverse = np.unique(np.asarray(strata)[order], return_inverse=True)
        class_rank = rng.permutation(int(inverse.max()) + 1)[inverse]
        order = order[np.argsort(class_rank, kind="stable")]
    if held:
        step = n / held
        picks = np.minimum(np.floor(np.arange(held) * step + rng.uniform(0, step)).astype(np.int64), n - 1)
    else:
        picks = np.zeros(0, dtype=np.int64)
    is_held = np.zeros(n, dtype=bool)
    is_held[order[picks]] = True
    shuffled = rng.permutation(n)
    fit = data.take(shuffled[~is_held[shuffled]]).whole_batches()
    out = data.take(shuffled[is_held[shuffled]]).whole_batches()
    if data.batch and data.batch > 1 and held and (len(fit) == 0 or len(out) == 0):
        raise CalibrationError(
            f"calibration data: {n} samples cannot fill the model's fixed batch of {data.batch} in both the fit and "
            f"the held-out part; give at least {2 * data.batch} samples of one shape"
        )
    return fit, out


def split_calibration(
    model: onnx.ModelProto, data: Data, *, seed: int = 0, batch_size: int = 64
) -> tuple[Samples, Samples, dict]:
    """The fit / held-out split of the pipeline: seeded, stratified by the model's own top-1 for classifiers.

    Args:
        model: The original model (its top-1 stratifies the split when an output looks like class scores).
        data: The samples.
        seed: Seed of the shuffle.
        batch_size: Samples per onnxruntime run when the batch dim is dynamic.

    Returns:
        (fit, held-out, facts); for classifiers the facts say how many of the predicted classes the held-out
        part covers (``fidelity_classes`` of ``classes_predicted``, output ``class_output``).

    Raises:
        CalibrationError: Fewer than 2 samples, or too few for the model's fixed batch.
    """
    data = as_samples(data, model)
    if len(data) < 2:
        raise CalibrationError(
            f"calibration data: {len(data)} sample; at least 2 are needed, one held out to check the pruned model "
            "(give more --calib samples)"
        )
    found = top1(model, data, batch_size=batch_size)
    fit, held = split_held_out(data, seed=seed, strata=None if found is None else found[1])
    if found is None:
        return fit, held, {}
    facts = {
        "fidelity_classes": int(len(np.unique(predicted(model, data, held, batch_size=batch_size)))),
        "classes_predicted": int(len(np.unique(found[1]))),
        "class_output": found[0],
    }
    return fit, held, facts


def predicted(model: onnx.ModelProto, data: Samples, part: Samples, *, batch_size: int = 64) -> np.ndarray | None:
    """The model's own top-1 class on the samples `part` (a subset of `data`, as `split_held_out` makes it).

    Args:
        model: The model.
        data: The samples the top-1 is computed on (once: `top1` is memoized).
        part: A subset of `data`: the same files, its ``index`` positions among them.
        batch_size: Samples per onnxruntime run when the batch dim is dynamic.

    Returns:
        ``[len(part)]`` int64 classes in `part`'s order, or None when no output looks like class scores.
    """
    found = top1(model, data, batch_size=batch_size)
    if found is None:
        return None
    by_position = np.full(data.total, -1, dtype=np.int64)
    by_position[data.index] = found[1]
    return by_position[part.index]


SCORES_CONFIDENCE = 0.2  # share of the way from a uniform to a one-hot softmax under which rows are an embedding


def confidence(scores: np.ndarray) -> np.ndarray:
    """Per row of ``[N, C]`` outputs, how peaked its softmax is: ``(p_max - 1/C) / (1 - 1/C)``, 0 (flat) to 1.

    Rows that already are a distribution (non-negative, summing to 1: a model ending in Softmax) are read as they
    are: a softmax of probabilities is nearly flat over many classes (PP-OCRv4's recogniser, 6 625 classes per
    frame: 0.0003 where its frames' own top-1 probability averages 0.98), which judged it by cosine alone.
    A trained classifier's logits on its own kind of data are peaked (a mean above 0.5 for the handed digits
    ResNet-20, the suite's ViT, an orientation classifier); a sentence embedding or pooled features read as logits
    are flat (a mean-pooled 128-wide text embedding: about 0.02), so their argmax is not a class:
    `SCORES_CONFIDENCE` separates the two.
    """
    x = scores.astype(np.float64)
    p = np.exp(x - x.max(1, keepdims=True))
    top = 1.0 / p.sum(1)
    probabilities = (x.min(1) >= 0) & (np.abs(x.sum(1) - 1.0) <= PROBABILITY_TOLERANCE)
    top = np.where(probabilities, x.max(1), top)  # a Softmax at the output: its rows are the distribution itself
    uniform = 1.0 / x.shape[1]
    return (top - uniform) / (1.0 - uniform)


PROBABILITY_TOLERANCE = 1e-3  # |row sum - 1| up to which a non-negative row is read as probabilities, not logits


def class_scores(x: np.ndarray) -> np.ndarray | None:
    """`x` as ``[N, classes]`` when it looks like class scores (float, last axis of 2 or more, other axes 1).

    Args:
        x: One batch of an output.

    Returns:
        The ``[N, C]`` view, or None for other outputs (feature maps, sequences, boxes).
    """
    if x.ndim < 2 or x.dtype.kind != "f" or x.shape[-1] < 2 or int(np.prod(x.shape[1:-1])) != 1:
        return None
    return x.reshape(len(x), x.shape[-1])


_TOP1: dict[bytes, tuple[str, np.ndarray] | None] = {}  # digest of (model, samples) -> top1: `--method best`
TOP1_REMEMBERED = 8  # ...splits the same data for every result it makes (a ResNet-50 pass on 256 samples: 24 s)


def model_digest(model: onnx.ModelProto) -> bytes:
    """A digest of the model's content (SHA-1), also of a model over protobuf's 2 GB limit.

    Args:
        model: The model.

    Returns:
        20 bytes; equal for models of equal content.
    """
    if not oversized(model):
        return hashlib.sha1(model.SerializeToString(deterministic=True)).digest()
    found = hashlib.sha1(weightless_view(model).SerializeToString(deterministic=True))
    for tensor in model.graph.initializer:  # the view holds the large ones' dims only
        found.update(tensor.raw_data)
    return found.digest()


def _digest(model: onnx.ModelProto, data: Samples) -> bytes:
    found = hashlib.sha1(model_digest(model))
    for index, arrays in data.groups:
        found.update(index.tobytes())
        for name in sorted(arrays):
            found.update(name.encode())
            found.update(str(arrays[name].shape).encode())
            found.update(np.ascontiguousarray(arrays[name]).tobytes())
    return found.digest()


def top1(model: onnx.ModelProto, data: Data, *, batch_size: int = 64) -> tuple[str, np.ndarray] | None:
    """The model's own top-1 class on each sample, from its first output that looks like class scores.

    Remembered by the content of the model and the samples (the last `TOP1_REMEMBERED`).

    Args:
        model: The model to run.
        data: The samples.
        batch_size: Samples per onnxruntime run (when the batch dim is dynamic).

    Returns:
        (output name, classes in iteration order), or None when no output looks like class scores.
    """
    data = as_samples(data)
    key = _digest(model, data)
    if key not in _TOP1:
        if len(_TOP1) >= TOP1_REMEMBERED:
            del _TOP1[next(iter(_TOP1))]
        _TOP1[key] = _top1(model, data, batch_size)
    found = _TOP1[key]
    return None if found is None else (found[0], found[1].copy())


def _top1(model: onnx.ModelProto, data: Samples, batch_size: int) -> tuple[str, np.ndarray] | None:
    names = [o.name for o in model.graph.output]
    found: dict[str, list[np.ndarray]] = {k: [] for k in names}
    peaked = dict.fromkeys(names, 0.0)
    sizes = data.sizes(batch_size)
    for batch, n in zip(reference_outputs(model, data, batch_size=batch_size, label="original model's top-1"), sizes):
        for name in list(found):
            scores = class_scores(batch[name])
            if scores is None or len(scores) != n:  # e.g. a time-major sequence [T, N, C]: not one class a sample
                del found[name]
            else:
                found[name].append(scores.argmax(1))
                peaked[name] += float(confidence(scores).sum())
        if not found:
            return None
    total = sum(len(c) for c in next(iter(found.values()), []))
    found = {k: v for k, v in found.items() if peaked[k] >= SCORES_CONFIDENCE * max(total, 1)}  # not embeddings
    name = next(iter(found), None)
    return None if name is None else (name, np.concatenate(found[name]))


REFERENCE_BYTES = 256 << 20  # the original's outputs are remembered per sample up to this size...
REFERENCE_MODELS = 2  # ...for this many models: the fit and held-out fidelity read them again (ResNet-50: 15 s)
_REFERENCE: dict[tuple[bytes, object], dict[int, dict[str, np.ndarray]]] = {}


def reference_outputs(
    model: onnx.ModelProto, data: Data, *, batch_size: int = 64, label: str | None = None
) -> Iterator[dict[str, np.ndarray]]:
    """Batches of the graph outputs of `model` on `data`, as `stream` yields them, each sample computed once.

    The outputs are remembered per sample (by its position in the data it was loaded with, `Samples.origin`) for
    the last `REFERENCE_MODELS` models, while they take at most `REFERENCE_BYTES` and every output holds one row per
    sample (not a time-major sequence); a later call on any subset of the same samples reads them back.

    Args:
        model: The model (the original one: pruned models change from call to call and are streamed).
        data: The samples.
        batch_size: Samples per onnxruntime run when the batch dim is dynamic.
        label: Show progress under this name when the model runs.

    Yields:
        Output name -> array per batch, in the samples' iteration order.
    """
    data = as_samples(data, model)
    names = [o.name for o in model.graph.output]
    key = (model_digest(model), data.origin)
    known = _REFERENCE.get(key, {})
    index = data.index
    if len(index) and all(int(i) in known for i in index):
        start = 0
        for size in data.sizes(batch_size):
            rows = index[start : start + size]
            start += len(rows)
            yield {k: np.stack([known[int(i)][k] for i in rows]) for k in names}
        return
    kept: dict[int, dict[str, np.ndarray]] | None = dict(known)
    size = sum(v.nbytes for row in known.values() for v in row.values())
    start = 0
    for batch in stream(model, data, names, batch_size=batch_size, label=label):
        m = len(next(iter(batch.values())))
        rows = index[start : start + m] if all(len(v) == m for v in batch.values()) else None
        start += m
        if kept is not None and rows is not None and len(rows) == m:
            size += sum(v.nbytes for v in batch.values())
            kept.update({int(p): {k: v[j].copy() for k, v in batch.items()} for j, p in enumerate(rows)})
        if rows is None or size > REFERENCE_BYTES:
            kept = None
        yield batch
    if kept is not None:
        _REFERENCE.pop(key, None)
        while len(_REFERENCE) >= REFERENCE_MODELS:
            del _REFERENCE[next(iter(_REFERENCE))]
        _REFERENCE[key] = kept


def with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of `model` that also outputs the intermediate tensors `names`.

    Args:
        model: The model; not modified.
        names: Tensor names; each one that is not a graph output yet is added as one, without type or shape.

    Returns:
        The copy.
    """
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    present = {o.name for o in copy.graph.output}
    for name in names:
        if name not in present:
            copy.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
            present.add(name)
    return copy


def stream(
    model: onnx.ModelProto,
    data: Data,
    names: list[str],
    *,
    batch_size: int = 64,
    label: str | None = None,
    axes: dict[str, int | None] | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Batches of the tensors `names` (graph outputs or intermediate), computed on `data` in onnxruntime.

    Args:
        model: The model to run.
        data: The samples; each batch holds samples of one shape, at the model's fixed batch when it has one.
        names: Tensors to return.
        batch_size: Samples per run when the model's batch dim is dynamic.
        label: Show progress under this name (``progress.steps``).
        axes: The axis holding the samples of each graph output (default `batch_axes` of `model`): one not on
            axis 0 (a recurrent model's state ``[layers, batch, hidden]``) is returned with them on axis 0.

    Yields:
        Name -> array per batch, in the samples' iteration order.
    """
    sess = session(with_outputs(model, names), calibration=True)
    axes = batch_axes(model) if axes is None else axes
    feeds = as_samples(data).batches(batch_size)
    if label is not None:
        feeds = steps(list(feeds), label)
    for feed in feeds:
        outs = sess.run(names, feed)
        yield to_samples_first(dict(zip(names, outs)), {k: axes.get(k, 0) for k in names})


def run_batches(model: onnx.ModelProto, data: Data, *, batch_size: int = 64) -> dict[str, np.ndarray]:
    """All graph outputs of `model` on `data`, run in batches and concatenated (outputs of one shape only).

    Args:
        model: The model to run.
        data: The samples.
        batch_size: Samples per run when the model's batch dim is dynamic.

    Returns:
        Output name -> outputs of all samples, in iteration order.
    """
    names = [o.name for o in model.graph.output]
    parts: dict[str, list[np.ndarray]] = {k: [] for k in names}
    for batch in stream(model, data, names, batch_size=batch_size):
        for k, v in batch.items():
            parts[k].append(v)
    return {k: np.concatenate(v) for k, v in parts.items()}


def channel_statistics(
    model: onnx.ModelProto,
    data: Data,
    axes: dict[str, int],
    *,
    pooled: bool = False,
    batch_size: int = 32,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """E[x_c^2] per channel of each tensor in `axes` (name -> channel axis), streamed over `data`.

    With `pooled`, also each sample's spatially averaged channel values ([N, C] per tensor), the features the label
    criteria read: memory grows with samples x channels, never with spatial size. Tensors of known rank and float
    type are reduced inside the onnxruntime session (ReduceSumSquare / ReduceMean nodes added to a copy of the
    model; with `pooled` after a Cast to float64: the same sums numpy takes, so the label criteria's bins do not
    move; without, per batch in the tensor's type and across batches in float64: the Casts cost a light ResNet-50
    2.5 of its 19 s), so only [C] sums leave it: a batch of 32 at 224 x 224 would otherwise copy out gigabytes of
    feature maps at once (the time is about the same at batch 1: the extra outputs or consumers keep onnxruntime
    from fusing either way); the others come out whole and are reduced here.

    Args:
        model: The model to run.
        data: The samples.
        axes: Tensor name -> its channel axis (with `pooled`, the batch must be axis 0).
        pooled: Also return the per-sample averages.
        batch_size: Samples per onnxruntime run when the model's batch dim is dynamic.

    Returns:
        (energy, pooled): tensor name -> ``[C]`` float64 mean of x_c^2 over every sample and position; and, with
        `pooled`, tensor name -> ``[N, C]`` float64 per-sample averages in iteration order (else an empty dict).
    """
    names = list(axes)
    sums = {k: 0.0 for k in names}
    counts = dict.fromkeys(names, 0)
    features: dict[str, list[np.ndarray]] = {k: [] for k in names}
    reducing, reduced = _with_reductions(model, axes, pooled)
    fetched = sorted({t for outs in reduced.values() for t in outs if t} | (set(names) - set(reduced)))
    for batch in stream(reducing, data, fetched, batch_size=batch_size, label="calibration statistics"):
        for name in names:
            if name in reduced:
                square, size, mean = (batch[t] if t else None for t in reduced[name])
                sums[name] = sums[name] + square.astype(np.float64)
                counts[name] += int(size) // max(len(square), 1)
                if pooled:
                    features[name].append(mean.astype(np.float64))
                continue
            x, axis = batch[name], axes[name] % batch[name].ndim
            others = tuple(i for i in range(x.ndim) if i != axis)  # squares in the tensor's type, sums in float64
            sums[name] = sums[name] + np.sum(np.square(x), axis=others, dtype=np.float64)
            counts[name] += x.size // max(x.shape[axis], 1)
            if pooled:
                spatial = tuple(i for i in others if i != 0)
                features[name].append(x.mean(axis=spatial, dtype=np.float64) if spatial else x.astype(np.float64))
    energy = {k: sums[k] / max(counts[k], 1) for k in names}
    return energy, ({k: np.concatenate(v) for k, v in features.items()} if pooled else {})


REDUCED_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE)


def _with_reductions(
    model: onnx.ModelProto, axes: dict[str, int], pooled: bool
) -> tuple[onnx.ModelProto, dict[str, tuple[str, str, str | None]]]:
    """A copy of `model` that also outputs, per tensor of known rank and float type in `axes`, its channel sums.

    Returns:
        (the copy, tensor name -> (its ReduceSumSquare output [C], its Size output, its ReduceMean output [N, C] or
        None)); tensors left out (unknown rank or type) are not in the map.
    """
    info, opset, copy = _typed_copy(model)
    nodes, outputs, constants = [], [], []
    reduced: dict[str, tuple[str, str, str | None]] = {}

    def reduce(op: str, x: str, over: list[int], out: str) -> None:
        if opset >= 18:
            constants.append(onnx.numpy_helper.from_array(np.array(over, dtype=np.int64), f"{out}/axes"))
            nodes.append(onnx.helper.make_node(op, [x, f"{out}/axes"], [out], keepdims=0))
        else:
            nodes.append(onnx.helper.make_node(op, [x], [out], axes=over, keepdims=0))
        outputs.append(onnx.helper.make_empty_tensor_value_info(out))

    for i, (name, axis) in enumerate(axes.items()):
        t = info.get(name)
        if t is None or not t.HasField("shape") or t.elem_type not in REDUCED_TYPES:
            continue
        rank = len(t.shape.dim)
        if rank < 1 or not -rank <= axis < rank or (pooled and axis % rank == 0):
            continue
        axis %= rank
        stem = f"onnxprune_statistics/{i}"
        wide = name
        if pooled:  # summed in float64, as numpy sums the whole tensors: the label criteria bin the means (CMI)
            wide = f"{stem}/double"
            nodes.append(onnx.helper.make_node("Cast", [name], [wide], to=onnx.TensorProto.DOUBLE))
        reduce("ReduceSumSquare", wide, [a for a in range(rank) if a != axis], f"{stem}/square")
        nodes.append(onnx.helper.make_node("Size", [name], [f"{stem}/size"]))
        outputs.append(onnx.helper.make_empty_tensor_value_info(f"{stem}/size"))
        mean = None
        if pooled:
            spatial = [a for a in range(rank) if a not in (0, axis)]
            if spatial:
                mean = f"{stem}/mean"
                reduce("ReduceMean", wide, spatial, mean)
            else:
                mean = name
        reduced[name] = (f"{stem}/square", f"{stem}/size", mean)
    copy.graph.node.extend(nodes)
    copy.graph.initializer.extend(constants)
    copy.graph.output.extend(outputs)
    return copy, reduced


def _typed_copy(model: onnx.ModelProto) -> tuple[dict, int, onnx.ModelProto]:
    """What `_with_reductions` and `_with_grams` start from.

    Returns:
        (tensor name -> its inferred tensor type, graph inputs and outputs too; the default domain's opset; a copy of
        `model` to add nodes and outputs to).
    """
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - inference failing only means every tensor comes out whole
        inferred = model
    info = {v.name: v.type.tensor_type for v in (*inferred.graph.value_info, *inferred.graph.input)}
    info.update({v.name: v.type.tensor_type for v in inferred.graph.output})
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return info, opset, copy


ROWS_PER_SAMPLE = 128  # patch rows kept per sample for second moments: memory follows the batch, not the data set


def row_budget(samples: int) -> int:
    """Patch rows kept from a batch of `samples` samples (4096 for a batch of 32, 128 for a fixed batch of 1).

    A budget per batch would make a model with a fixed batch of 1 accumulate 32 times the rows of a dynamic one, and
    the K x K second moments of a wide layer cost rows x K^2.

    Args:
        samples: Samples in the batch (fewer than 1 count as 1).

    Returns:
        `ROWS_PER_SAMPLE` (128) rows per sample.
    """
    return ROWS_PER_SAMPLE * max(int(samples), 1)


def patch_covariances(
    model: onnx.ModelProto,
    data: Data,
    layers: dict[str, tuple[str, layouts.Rows]],
    *,
    batch_size: int = 32,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """E[p p^T] [K, K] of each layer's input patches, streamed over `data`.

    Args:
        model: The model to run.
        data: Calibration samples.
        layers: Node name -> (its input tensor, the map from that input to patch rows: ``Layout.patches``).
        batch_size: Samples per batch when the batch dim is dynamic.
        seed: Seeds the sub-sampling of patch rows: per batch at most `row_budget` rows, so memory depends on the
            batch size and the layers, not on the number of samples.

    Returns:
        Node name -> covariance (float64).
    """
    rng = np.random.default_rng(seed)
    sums: dict[str, np.ndarray] = {}
    tensors = sorted({t for t, _ in layers.values()})
    counts = dict.fromkeys(layers, 0)
    for batch in stream(model, data, tensors, batch_size=batch_size):
        for name, (tensor, rows) in layers.items():
            x = batch[tensor]
            total, limit = rows.count(x), row_budget(len(x))
            patches = rows(x, rng.choice(total, limit, replace=False) if total > limit else None)
            sums[name] = sums.get(name, 0) + patches.T @ patches
            counts[name] += len(patches)
    return {k: sums[k] / max(counts[k], 1) for k in sums}


def channel_covariances(
    model: onnx.ModelProto,
    data: Data,
    axes: dict[str, int],
    *,
    batch_size: int = 32,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Covariance [C, C] between the channels of each tensor in `axes`, over samples and positions, streamed.

    What `criteria.reconstruction_curves` reads: how well the channels kept predict those removed. Tensors of known
    rank, float type and channel count are reduced inside the onnxruntime session (X^T X of the tensor as rows of
    channels, a MatMul added to a copy of the model: only [C, C] leaves it); the others come out whole and a seeded
    sample of `row_budget` positions per batch is taken here.

    Args:
        model: The model to run.
        data: Calibration samples.
        axes: Tensor name -> its channel axis.
        batch_size: Samples per batch when the batch dim is dynamic.
        seed: Seeds the sub-sampling of positions of the tensors that come out whole.

    Returns:
        Tensor name -> centred covariance E[x x^T] - E[x] E[x]^T (float64); remembered by the content of the model
        and the samples (the last `COVARIANCES_REMEMBERED`): `--method best` makes each channel result from the
        same graph and data.
    """
    data = as_samples(data)
    key = hashlib.sha1(_digest(model, data) + repr((sorted(axes.items()), seed)).encode()).digest()
    if key in _COVARIANCES:
        return dict(_COVARIANCES[key])
    found = _channel_covariances(model, data, axes, batch_size=batch_size, seed=seed)
    if len(_COVARIANCES) >= COVARIANCES_REMEMBERED:
        del _COVARIANCES[next(iter(_COVARIANCES))]
    _COVARIANCES[key] = found
    return dict(found)


_COVARIANCES: dict[bytes, dict[str, np.ndarray]] = {}
COVARIANCES_REMEMBERED = 2  # a light ResNet-50's are ~0.3 GB


def _channel_covariances(model: onnx.ModelProto, data: Samples, axes: dict[str, int], *, batch_size: int, seed: int):
    rng = np.random.default_rng(seed)
    sums: dict[str, np.ndarray] = {}
    firsts: dict[str, np.ndarray] = {}
    counts = dict.fromkeys(axes, 0)
    reducing, reduced = _with_grams(model, axes)
    fetched = sorted({t for outs in reduced.values() for t in outs} | (set(axes) - set(reduced)))
    for batch in stream(reducing, data, fetched, batch_size=batch_size, label="channel covariances"):
        for name, axis in axes.items():
            if name in reduced:
                gram, first, size = (batch[t] for t in reduced[name])
                rows, gram, first = int(size) // max(len(first), 1), gram.astype(np.float64), first.astype(np.float64)
            else:
                x = batch[name]
                flat = np.moveaxis(x, axis % x.ndim, -1).reshape(-1, x.shape[axis])
                if len(flat) > row_budget(len(x)):
                    flat = flat[rng.choice(len(flat), row_budget(len(x)), replace=False)]
                flat = flat.astype(np.float64)
                rows, gram, first = len(flat), flat.T @ flat, flat.sum(0)
            sums[name] = sums.get(name, 0) + gram
            firsts[name] = firsts.get(name, 0) + first
            counts[name] += rows
    out = {}
    for name, total in sums.items():
        mean = firsts[name] / max(counts[name], 1)
        out[name] = total / max(counts[name], 1) - np.outer(mean, mean)
    return out


def _with_grams(model: onnx.ModelProto, axes: dict[str, int]) -> tuple[onnx.ModelProto, dict[str, tuple[str, ...]]]:
    """A copy of `model` that also outputs, per tensor of `axes` it can, X^T X [C, C], the channel sums and the size.

    Returns:
        (the copy, tensor name -> (its Gram output, its ReduceSum output [C], its Size output)); tensors of unknown
        rank, type or channel count are left out of the map.
    """
    info, opset, copy = _typed_copy(model)
    nodes, outputs, constants = [], [], []
    reduced: dict[str, tuple[str, ...]] = {}
    for i, (name, axis) in enumerate(axes.items()):
        t = info.get(name)
        if t is None or not t.HasField("shape") or t.elem_type not in REDUCED_TYPES:
            continue
        rank = len(t.shape.dim)
        if rank < 1 or not -rank <= axis < rank or t.shape.dim[axis % rank].dim_value < 1:
            continue
        axis, c = axis % rank, t.shape.dim[axis % rank].dim_value
        stem = f"onnxprune_covariance/{i}"
        last = name
        if axis != rank - 1:
            last = f"{stem}/last"
            perm = [a for a in range(rank) if a != axis] + [axis]
            nodes.append(onnx.helper.make_node("Transpose", [name], [last], perm=perm))
        constants.append(onnx.numpy_helper.from_array(np.array([-1, c], dtype=np.int64), f"{stem}/shape"))
        nodes.append(onnx.helper.make_node("Reshape", [last, f"{stem}/shape"], [f"{stem}/rows"]))
        nodes.append(onnx.helper.make_node("Transpose", [f"{stem}/rows"], [f"{stem}/columns"], perm=[1, 0]))
        nodes.append(onnx.helper.make_node("MatMul", [f"{stem}/columns", f"{stem}/rows"], [f"{stem}/gram"]))
        if opset >= 13:
            constants.append(onnx.numpy_helper.from_array(np.array([0], dtype=np.int64), f"{stem}/axes"))
            nodes.append(
                onnx.helper.make_node("ReduceSum", [f"{stem}/rows", f"{stem}/axes"], [f"{stem}/sum"], keepdims=0)
            )
        else:
            nodes.append(onnx.helper.make_node("ReduceSum", [f"{stem}/rows"], [f"{stem}/sum"], axes=[0], keepdims=0))
        nodes.append(onnx.helper.make_node("Size", [name], [f"{stem}/size"]))
        for out in ("gram", "sum", "size"):
            outputs.append(onnx.helper.make_empty_tensor_value_info(f"{stem}/{out}"))
        reduced[name] = (f"{stem}/gram", f"{stem}/sum", f"{stem}/size")
    copy.graph.node.extend(nodes)
    copy.graph.initializer.extend(constants)
    copy.graph.output.extend(outputs)
    return copy, reduced


def fidelity(
    original: onnx.ModelProto,
    pruned: onnx.ModelProto,
    data: Data,
    *,
    labels: np.ndarray | None = None,
    batch_size: int = 64,
    label: str = "held-out fidelity",
) -> dict[str, dict[str, float]]:
    """Per output: top-1 (or sequence) agreement, cosine similarity and relative L2 error against the original.

    Streamed batch by batch, so samples of different shapes (and outputs of different shapes) are fine.

    Args:
        original: The reference model.
        pruned: The model measured.
        data: The samples.
        labels: ``[N]`` true class per sample in iteration order, to report accuracy as well (used only when it
            holds one label per sample).
        batch_size: Samples per run when the model's batch dim is dynamic.
        label: The progress bar's title.

    Returns:
        Output name -> {"cosine", "relative_error"[, "top1_agreement"[, "accuracy_original", "accuracy_pruned"]]}
        (top-1 only for outputs shaped like class scores whose softmax is peaked, `SCORES_CONFIDENCE`); for
        `sequence_outputs` whose frames' softmax is peaked as class scores are (a hidden state [B, S, D] is not: it
        is judged by cosine) {"cosine", "relative_error", "sequence_agreement", "frame_agreement"}: the share of
        samples whose best path reads the same (CTC decoding, the original's most frequent frame class as the blank)
        and of positions whose top-1 is the same. Cosine and error are per sample in every case; for an output of
        rank 3 or more whose `quantity_axis` holds several channels, "cosine" is the least of that and of each
        channel's cosine over all samples and positions, "relative_error" the largest of that and of each channel's,
        and "channel_cosine" gives the worst channel by cosine ({"cosine", "channel", "channels"}).

    Raises:
        CalibrationError: `data` is a dict that does not match the original model's inputs, or too few samples for
            its fixed batch (`as_samples`).
    """
    data = as_samples(data, original, min_batches=1)  # measuring needs one whole batch, not a held-out part
    names = [o.name for o in original.graph.output]
    per_position = sequence_outputs(original)
    keys = ("cos", "err", "ref", "agree", "acc_o", "acc_p", "seq", "frames", "frames_agree", "peaked", "seq_peaked")
    keys += ("dot", "sq_p", "sq_o")  # over all samples, for an output of one value per sample
    sums = {k: dict.fromkeys(keys, 0.0) for k in names}
    scored = dict.fromkeys(names, True)
    sequence = dict.fromkeys(names, False)
    single = dict.fromkeys(names, True)  # one value per sample so far: its per-sample cosine is only a sign
    channels: dict[str, np.ndarray | bool | None] = {}  # per output of several channels: [4, channels] sums
    n = 0
    sizes = data.sizes(batch_size)
    batches = zip(  # the labelled stream first: zip stops at the first exhausted one, the bar must see its end
        stream(pruned, data, names, batch_size=batch_size, label=label, axes=batch_axes(original)),
        reference_outputs(original, data, batch_size=batch_size),
        sizes,
    )
    for got, ref, m in batches:
        truth = None if labels is None else np.asarray(labels)[n : n + m]
        for name in names:
            want, have = ref[name], got[name]
            seqs = sequences(want, m) if name in per_position and want.shape[-1] == per_position[name] else None
            if seqs is not None:  # [m, T, C] whatever the layout: one row per sample
                want, have = seqs, sequences(have, m)
                sequence[name] = True
            rows = m if want.ndim and len(want) == m else 1  # else not batched as the inputs: the run as one row
            axis = quantity_axis(want.shape) if rows == m else None
            if axis is not None:  # per channel: dot, |pruned|^2, |original|^2 over the samples and positions
                w, h = np.moveaxis(want, axis, 0).astype(np.float64), np.moveaxis(have, axis, 0).astype(np.float64)
                w, h = w.reshape(len(w), -1), h.reshape(len(h), -1)
                part = np.stack([np.sum(w * h, 1), np.sum(h * h, 1), np.sum(w * w, 1), np.full(len(w), w.shape[1])])
                prior = channels.get(name)  # False once batches disagree on the channels (never with one axis)
                same = prior is not None and prior is not False and prior.shape == part.shape
                channels[name] = part if prior is None else prior + part if same else False
            have = have.astype(np.float64).reshape(rows, -1)
            flat = want.astype(np.float64).reshape(rows, -1)
            norms = np.linalg.norm(have, axis=1) * np.linalg.norm(flat, axis=1) + 1e-30
            acc = sums[name]
            acc["cos"] += float(np.sum(np.sum(have * flat, 1) / norms)) * (m / rows)  # a mean over the m samples
            single[name] &= rows == m and flat.shape[1] == 1
            acc["dot"] += float(np.sum(have * flat))
            acc["sq_p"] += float(np.sum(have**2))
            acc["sq_o"] += float(np.sum(flat**2))
            acc["err"] += float(np.sum((have - flat) ** 2))
            acc["ref"] += float(np.sum(flat**2))
            if seqs is not None:
                path_o, path_p = want.argmax(-1), sequences(got[name], m).argmax(-1)  # [m, T]
                blank = int(np.bincount(path_o.ravel()).argmax())  # CTC: the blank is the most frequent frame
                acc["seq"] += sum(decode(a, blank) == decode(b, blank) for a, b in zip(path_o, path_p))
                acc["frames"] += path_o.size
                acc["frames_agree"] += float(np.sum(path_o == path_p))
                frames = want.reshape(-1, want.shape[-1])  # how peaked each frame's softmax is, averaged per sample
                acc["seq_peaked"] += float(confidence(frames).reshape(m, -1).mean(1).sum())
                scored[name] = False
                continue
            scores = class_scores(want) if rows == m else None
            scored[name] &= scores is not None
            if scored[name]:
                acc["peaked"] += float(confidence(scores).sum())
                top_o, top_p = flat.argmax(1), have.argmax(1)
                acc["agree"] += float(np.sum(top_o == top_p))
                if truth is not None and len(truth) == m:
                    acc["acc_o"] += float(np.sum(top_o == truth))
                    acc["acc_p"] += float(np.sum(top_p == truth))
        n += m
    found = {}
    for name in names:
        acc = sums[name]
        entry = {
            "cosine": acc["cos"] / max(n, 1)
            if not (single[name] and n)
            else acc["dot"] / (np.sqrt(acc["sq_p"] * acc["sq_o"]) + 1e-30),
            "relative_error": float(np.sqrt(acc["err"]) / (np.sqrt(acc["ref"]) + 1e-30)),
        }
        worst = _worst_channel(channels.get(name))
        if worst is not None and not sequence[name]:
            entry["relative_error"] = max(entry["relative_error"], worst.pop("relative_error"))
            entry["channel_cosine"] = worst
            entry["cosine"] = min(entry["cosine"], worst["cosine"])
        if sequence[name] and n and acc["seq_peaked"] >= SCORES_CONFIDENCE * n:  # flat frames: hidden states
            entry["sequence_agreement"] = acc["seq"] / n
            entry["frame_agreement"] = acc["frames_agree"] / max(acc["frames"], 1)
        elif scored[name] and n and acc["peaked"] >= SCORES_CONFIDENCE * n:  # flat rows: an embedding, by cosine
            entry["top1_agreement"] = acc["agree"] / n
            if labels is not None and len(labels) == n:
                entry["accuracy_original"] = acc["acc_o"] / n
                entry["accuracy_pruned"] = acc["acc_p"] / n
        found[name] = entry
    return found


QUANTITY_CHANNELS = 1024  # an output axis of at most this many entries can hold quantities judged one by one
CHANNEL_RMS_FLOOR = 1e-6  # ... those whose RMS in the original is under this are left out (no direction to keep)


def quantity_axis(shape: tuple[int, ...]) -> int | None:
    """The axis of an output of rank 3 or more whose entries are different quantities, judged one by one, or None.

    Axis 1 for rank 4 and more (channels of an NCHW map); for rank 3 the shorter of axis 1 and the last axis, between
    2 and `QUANTITY_CHANNELS` entries: YOLOv8's [N, 4 + classes, anchors] and YOLOX's [N, anchors, 5 + classes] both
    give their box coordinates and class scores, a hidden state [N, T, D] its positions or its features.

    Args:
        shape: One batch of the output, batch first.

    Returns:
        The axis, or None for rank 2 and less (one vector per sample) and for axes outside those bounds.
    """
    if len(shape) < 3:
        return None
    axis = 1 if len(shape) > 3 or shape[1] <= shape[-1] else len(shape) - 1
    return axis if 2 <= shape[axis] <= QUANTITY_CHANNELS else None


def _worst_channel(sums: np.ndarray | bool | None) -> dict | None:
    """The least cosine and the largest relative error over an output's channels (`quantity_axis`), or None.

    An output holding quantities of different scales is judged by each: one cosine over YOLOv8's whole output is the
    box coordinates' (up to 320) and not the class scores' (up to 0.14): NudeNet's detector pruned data-free at 0.3
    read cosine 0.991 where its class scores' was 0.17. Channels whose RMS in the original is under `CHANNEL_RMS_FLOOR`
    are left out (zero: no direction to keep).

    Returns:
        {"cosine", "channel", "channels", "relative_error"}, or None when there are fewer than two channels.
    """
    if sums is None or sums is False or sums.shape[1] < 2:
        return None
    dot, have, want, count = sums
    kept = np.flatnonzero(want > CHANNEL_RMS_FLOOR**2 * count)
    if not len(kept):
        return None
    cosines = dot[kept] / (np.sqrt(have[kept] * want[kept]) + 1e-30)
    errors = np.sqrt(np.maximum(have[kept] - 2 * dot[kept] + want[kept], 0.0) / want[kept])
    i = int(np.argmin(cosines))
    return {
        "cosine": float(cosines[i]),
        "channel": int(kept[i]),
        "channels": int(sums.shape[1]),
        "relative_error": float(errors.max()),
    }


def sequence_outputs(model: onnx.ModelProto) -> dict[str, int]:
    """Outputs whose last axis holds the scores of one matrix op: output name -> their number (classes).

    The last axis comes from a matrix op (Gemm, MatMul, Conv) through a bias Add and ops that only move elements or
    take a Softmax / LogSoftmax over it (`rules.keeps_class_axis`); a detector's output, whose last axis is a Concat
    of boxes, objectness and classes, is not one. `fidelity` reads the rank-3 ones as a class per position of a
    sequence (a CTC text recogniser's head).

    Args:
        model: The model; not modified.

    Returns:
        Output name -> number of classes (the out size of the first matrix op met within 8 nodes back along the
        first inputs), for the outputs that qualify, whatever their rank.

    Raises:
        UnsupportedModelError: The model's default-domain opset is below 7 (`graph.to_graph`).
        InvalidModelError: The model cannot be read into a graph.
    """
    from onnxprune.graph import to_graph
    from onnxprune.passes.cleanup import cleanup, holds_constant_nodes

    graph = to_graph(model)
    if holds_constant_nodes(graph):  # weights in Constant nodes (paddle2onnx): their layers have constant weights,
        cleanup(graph, fold_bn=False)  # and shapes, only once those are folded
    found = {}
    for out in graph.outputs:
        t, depth = out, 0
        while t.inputs and depth < 8:  # back along the data input to the layer that makes the last axis
            node, depth = t.inputs[0], depth + 1
            matrix = layouts.weight_matrix(node)
            if matrix is not None:
                if scores_reach(node.outputs[0], [out], len(matrix), at_run_time=True):
                    found[out.name] = len(matrix)
                break
            if not node.inputs:
                break
            t = node.inputs[0]
    return found


def sequences(x: np.ndarray, m: int) -> np.ndarray | None:
    """A rank-3 output of `m` samples as ``[m, T, C]``: batch first ``[m, T, C]`` or time first ``[T, m, C]``.

    None when neither leading axis is the batch, or the sequence is a single position (a plain classifier).

    Args:
        x: One batch of an output.
        m: Samples in the batch.

    Returns:
        ``[m, T, C]`` (`x` itself when batch first, else a view with the axes moved), or None: also for an array that
        is not float or whose last axis is under 2. Batch first wins when both leading axes are `m`.
    """
    if x.ndim != 3 or x.dtype.kind != "f" or x.shape[-1] < 2:
        return None
    if x.shape[0] == m and x.shape[1] > 1:
        return x
    if x.shape[1] == m and x.shape[0] > 1:
        return np.moveaxis(x, 1, 0)
    return None


def decode(path: np.ndarray, blank: int) -> tuple[int, ...]:
    """A best path read as CTC does (Graves et al. 2006): repeated labels merged, then the blank dropped.

    Args:
        path: ``[T]`` class per position (the top-1 of each frame).
        blank: The blank class.

    Returns:
        The labels read, as ints.
    """
    merged = [int(c) for i, c in enumerate(path) if i == 0 or c != path[i - 1]]
    return tuple(c for c in merged if c != blank)
