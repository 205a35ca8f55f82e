"""Run models in onnxruntime in batches: expose intermediate tensors, stream them, measure fidelity."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx

from onnxprune.graph import session

HELD_OUT = 0.2  # fraction of the calibration samples kept for measuring fidelity, never used for decisions


def split_held_out(data: dict[str, np.ndarray], fraction: float = HELD_OUT) -> tuple[dict, dict]:
    """(fit, held-out): the last `fraction` of the samples are held out (at least one, when there are two)."""
    n = len(next(iter(data.values())))
    held = max(1, int(round(n * fraction))) if n >= 2 else 0
    return {k: v[: n - held] for k, v in data.items()}, {k: v[n - held :] for k, v in data.items()}


def with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of `model` that also outputs the intermediate tensors `names`."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    present = {o.name for o in copy.graph.output}
    for name in names:
        if name not in present:
            copy.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
            present.add(name)
    return copy


def stream(
    model: onnx.ModelProto, data: dict[str, np.ndarray], names: list[str], *, batch_size: int = 64
) -> Iterator[dict[str, np.ndarray]]:
    """Batches of the tensors `names` (graph outputs or intermediate), computed on `data` in onnxruntime."""
    sess = session(with_outputs(model, names), optimize=False)
    n = len(next(iter(data.values())))
    for i in range(0, n, batch_size):
        outs = sess.run(names, {k: v[i : i + batch_size] for k, v in data.items()})
        yield dict(zip(names, outs))


def run_batches(model: onnx.ModelProto, data: dict[str, np.ndarray], *, batch_size: int = 64) -> dict[str, np.ndarray]:
    """All graph outputs of `model` on `data`, run in batches and concatenated."""
    names = [o.name for o in model.graph.output]
    parts: dict[str, list[np.ndarray]] = {k: [] for k in names}
    for batch in stream(model, data, names, batch_size=batch_size):
        for k, v in batch.items():
            parts[k].append(v)
    return {k: np.concatenate(v) for k, v in parts.items()}


def channels_last(x: np.ndarray, axis: int = 1) -> np.ndarray:
    """[..., C, ...] -> [positions, C]: every spatial position (and sample) becomes a row."""
    return np.moveaxis(x, axis, -1).reshape(-1, x.shape[axis]).astype(np.float64)


def channel_statistics(
    model: onnx.ModelProto,
    data: dict[str, np.ndarray],
    axes: dict[str, int],
    *,
    pooled: bool = False,
    batch_size: int = 32,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """E[x_c^2] per channel of each tensor in `axes` (name -> channel axis), streamed over `data`.

    With `pooled`, also each sample's spatially averaged channel values ([N, C] per tensor), the features the label
    criteria read: memory grows with samples x channels, never with spatial size.
    """
    names = list(axes)
    sums = {k: 0.0 for k in names}
    counts = dict.fromkeys(names, 0)
    features: dict[str, list[np.ndarray]] = {k: [] for k in names}
    for batch in stream(model, data, names, batch_size=batch_size):
        for name in names:
            x = batch[name]
            rows = channels_last(x, axes[name])
            sums[name] = sums[name] + np.sum(rows * rows, axis=0)
            counts[name] += len(rows)
            if pooled:
                features[name].append(rows.reshape(x.shape[0], -1, x.shape[axes[name]]).mean(1))
    energy = {k: sums[k] / max(counts[k], 1) for k in names}
    return energy, ({k: np.concatenate(v) for k, v in features.items()} if pooled else {})


MAX_POSITIONS = 4096  # patch rows kept per batch for covariances: memory depends on the batch, not the data set


def im2col(
    x: np.ndarray, kernel: list[int], *, strides: list[int], pads: list[int], dilations: list[int]
) -> np.ndarray:
    """[N, C, H, W] -> [positions, C*kh*kw]: the input patch each output position of a 2-D Conv sees."""
    n, c, h, w = x.shape
    kh, kw = kernel
    pt, pl, pb, pr = pads[0], pads[1], pads[2], pads[3]
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    ho = (h + pt + pb - dilations[0] * (kh - 1) - 1) // strides[0] + 1
    wo = (w + pl + pr - dilations[1] * (kw - 1) - 1) // strides[1] + 1
    cols = np.empty((n, c, kh, kw, ho, wo), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            hi, wj = i * dilations[0], j * dilations[1]
            cols[:, :, i, j] = xp[:, :, hi : hi + strides[0] * ho : strides[0], wj : wj + strides[1] * wo : strides[1]]
    return cols.transpose(0, 4, 5, 1, 2, 3).reshape(n * ho * wo, c * kh * kw)


def patch_covariances(
    model: onnx.ModelProto,
    data: dict[str, np.ndarray],
    convs: dict[str, tuple[str, dict]],
    *,
    batch_size: int = 32,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """E[p p^T] of each Conv's input patches (node name -> (input tensor, attrs with kernel_shape, strides...)).

    Streamed: per batch at most MAX_POSITIONS patch rows are sampled, so memory depends on the batch size and the
    layers, not on the number of samples.
    """
    rng = np.random.default_rng(seed)
    sums: dict[str, np.ndarray] = {}
    counts = dict.fromkeys(convs, 0)
    tensors = sorted({t for t, _ in convs.values()})
    for batch in stream(model, data, tensors, batch_size=batch_size):
        for name, (tensor, attrs) in convs.items():
            x = batch[tensor].astype(np.float64)
            rank = x.ndim - 2
            patches = im2col(
                x,
                attrs["kernel_shape"],
                strides=attrs.get("strides", [1] * rank),
                pads=attrs.get("pads", [0] * 2 * rank),
                dilations=attrs.get("dilations", [1] * rank),
            )
            if len(patches) > MAX_POSITIONS:
                patches = patches[rng.choice(len(patches), MAX_POSITIONS, replace=False)]
            sums[name] = sums.get(name, 0) + patches.T @ patches
            counts[name] += len(patches)
    return {k: sums[k] / max(counts[k], 1) for k in sums}


def fidelity(
    original: onnx.ModelProto,
    pruned: onnx.ModelProto,
    data: dict[str, np.ndarray],
    *,
    labels: np.ndarray | None = None,
    batch_size: int = 64,
) -> dict[str, dict[str, float]]:
    """Per output: top-1 agreement (2-D outputs), cosine similarity and relative L2 error against the original."""
    ref, got = run_batches(original, data, batch_size=batch_size), run_batches(pruned, data, batch_size=batch_size)
    found = {}
    for name, want in ref.items():
        have = got[name].astype(np.float64).reshape(len(want), -1)
        flat = want.astype(np.float64).reshape(len(want), -1)
        norms = np.linalg.norm(have, axis=1) * np.linalg.norm(flat, axis=1) + 1e-30
        entry = {
            "cosine": float(np.mean(np.sum(have * flat, 1) / norms)),
            "relative_error": float(np.linalg.norm(have - flat) / (np.linalg.norm(flat) + 1e-30)),
        }
        if want.ndim == 2 and flat.shape[1] > 1:
            entry["top1_agreement"] = float(np.mean(have.argmax(1) == flat.argmax(1)))
            if labels is not None and len(labels) == len(flat):
                entry["accuracy_original"] = float(np.mean(flat.argmax(1) == labels))
                entry["accuracy_pruned"] = float(np.mean(have.argmax(1) == labels))
        found[name] = entry
    return found
