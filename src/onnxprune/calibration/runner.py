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


def channel_energy(
    model: onnx.ModelProto, data: dict[str, np.ndarray], axes: dict[str, int], *, batch_size: int = 32
) -> dict[str, np.ndarray]:
    """E[x_c^2] per channel of each tensor in `axes` (name -> channel axis), streamed over `data`."""
    names = list(axes)
    sums = {k: 0.0 for k in names}
    counts = dict.fromkeys(names, 0)
    for batch in stream(model, data, names, batch_size=batch_size):
        for name in names:
            x = channels_last(batch[name], axes[name])
            sums[name] = sums[name] + np.sum(x * x, axis=0)
            counts[name] += len(x)
    return {k: sums[k] / max(counts[k], 1) for k in names}


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
