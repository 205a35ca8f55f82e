"""Run models in onnxruntime in batches; fidelity of a pruned model against the original."""

from __future__ import annotations

import numpy as np
import onnx

from onnxprune.graph import session


def run_batches(model: onnx.ModelProto, data: dict[str, np.ndarray], *, batch_size: int = 64) -> dict[str, np.ndarray]:
    """All outputs of `model` on `data`, run in batches and concatenated."""
    sess = session(model, optimize=True)
    names = [o.name for o in sess.get_outputs()]
    n = len(next(iter(data.values())))
    parts: dict[str, list[np.ndarray]] = {k: [] for k in names}
    for i in range(0, n, batch_size):
        outs = sess.run(names, {k: v[i : i + batch_size] for k, v in data.items()})
        for k, v in zip(names, outs):
            parts[k].append(v)
    return {k: np.concatenate(v) for k, v in parts.items()}


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
        want = want.astype(np.float64).reshape(len(want), -1)
        entry = {
            "cosine": float(
                np.mean(np.sum(have * want, 1) / (np.linalg.norm(have, axis=1) * np.linalg.norm(want, axis=1) + 1e-30))
            ),
            "relative_error": float(np.linalg.norm(have - want) / (np.linalg.norm(want) + 1e-30)),
        }
        if ref[name].ndim == 2 and want.shape[1] > 1:
            entry["top1_agreement"] = float(np.mean(have.argmax(1) == want.argmax(1)))
            if labels is not None and len(labels) == len(want):
                entry["accuracy_original"] = float(np.mean(want.argmax(1) == labels))
                entry["accuracy_pruned"] = float(np.mean(have.argmax(1) == labels))
        found[name] = entry
    return found
