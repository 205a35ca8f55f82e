"""Where tensor trains pay: --method tt beside the default and the basis split, on a trained net with large FC layers.

    python -m benchmarks.tt [--ratios 0.5,0.77,0.8] [--light]

The model is the suite's VGG stack with a VGG-16-style classifier (`nets.VGGFC`: flatten, 1024 -> 2048 -> 2048 ->
60), trained on the rendered characters (8 epochs, cached like the suite); its fully connected layers hold 6.4 M of
its 7.5 M parameters. Each row is the public API with the command line's defaults (`onnxprune.prune`, 256 calibration
images, `force=True` so a result the guard would refuse is still measured), the default method first, then
``method="tt"`` and ``method="basis"`` at the same ratio: test accuracy on the 2,400 held-out test images, the share of
the fully connected layers' weights removed, and onnxruntime CPU latency at batch 1 and 32 (fastest of repeated runs,
this machine, same process).

Then the ordering ablation, per fully connected layer at 10 % of its weights kept: the relative output error on
test activations of the TT-matrix ordering (interleaved), the plain ordering, the plain SVD and the SVD whitened with
the calibration inputs' covariance (what --method basis starts from), before any refit.

`--light` adds the `onnx` package's light VGG-19 and AlexNet (seeded random weights, so only parameters, latency and
time mean anything): ``method="tt"`` at 0.5, data-free.

Writes results/tt.json and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys
import tempfile
import time

import numpy as np
import onnx
from onnx import numpy_helper

import onnxprune
from onnxprune.latency import model_latency
from onnxprune.passes.tt import TTLayer, allocate_bonds, tt_matrix, tt_modes, tt_svd
from onnxprune.rules.layouts import Linear

ROOT = pathlib.Path(__file__).resolve().parent
CACHE = pathlib.Path.home() / ".cache" / "onnxprune-bench"
CALIB = 256


def _model(tmp: pathlib.Path):
    from benchmarks import data, nets
    from benchmarks.run import trained

    ds = data.load("chars")
    torch_model, seconds = trained(ds, "vggfc", {}, 8, CACHE)
    path = tmp / "vggfc.onnx"
    nets.export(torch_model, path, ds.shape)
    return onnx.load(path), ds, seconds


def _accuracy(model: onnx.ModelProto, x: np.ndarray, y: np.ndarray) -> float:
    from benchmarks.run import accuracy

    return accuracy(model, x, y)


def _fc_weights(model: onnx.ModelProto) -> int:
    """Float weights of the classifier (every initializer the classifier's nodes read)."""
    names = {i for n in model.graph.node if n.name.startswith("/classifier") for i in n.input}
    return sum(
        numpy_helper.to_array(t).size
        for t in model.graph.initializer
        if t.name in names and t.data_type == onnx.TensorProto.FLOAT
    )


def _latency(model: onnx.ModelProto, shape: tuple[int, ...]) -> dict[int, float]:
    name = model.graph.input[0].name
    rng = np.random.default_rng(0)
    return {b: model_latency(model, {name: rng.standard_normal((b, *shape)).astype(np.float32)}) for b in (1, 32)}


def trained_rows(ratios: list[float], tmp: pathlib.Path) -> tuple[list[dict], dict]:
    model, ds, seconds = _model(tmp)
    calib = ds.calib[0][:CALIB]
    test_x, test_y = ds.test
    base = {
        "method": "original",
        "ratio": 0.0,
        "accuracy": _accuracy(model, test_x, test_y),
        "params": sum(numpy_helper.to_array(t).size for t in model.graph.initializer),
        "fc_removed": 0.0,
        "latency_s": _latency(model, ds.shape),
        "seconds": 0.0,
    }
    fc = _fc_weights(model)
    rows = [base]
    for ratio in ratios:
        for method in (onnxprune.DEFAULTS["method"], "tt", "basis"):
            start = time.perf_counter()
            try:
                out, report = onnxprune.prune(model, ratio=ratio, calib=calib, method=method, force=True)
            except onnxprune.OnnxPruneError as e:
                rows.append({"method": method, "ratio": ratio, "error": str(e)})
                continue
            row = {
                "method": method,
                "ratio": ratio,
                "accuracy": _accuracy(out, test_x, test_y),
                "params": report.facts["params_after"],
                "fc_removed": 1 - _fc_weights(out) / fc,
                "latency_s": _latency(out, ds.shape),
                "seconds": time.perf_counter() - start,
                "written": next(
                    (a["method"] for a in report.facts.get("alternatives", []) if a.get("written")), method
                ),
                "layers": {
                    k: {f: v[f] for f in ("ordering", "ranks", "dense", "kept", "relative_error") if f in v}
                    for k, v in report.layers.items()
                    if v.get("op") == "tensor-train"
                },
            }
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "layers"}), flush=True)
    return rows, {"model": "chars VGG-FC", "train_seconds": seconds, "fc_weights": fc, "calib": CALIB}


def ordering_rows(tmp: pathlib.Path, keep: float = 0.1) -> list[dict]:
    """Per FC layer at `keep` of its weights: output error on test activations of each way of writing it."""
    model, ds, _ = _model(tmp)
    gemms = [n for n in model.graph.node if n.op_type == "Gemm"]
    fit, test = _layer_inputs(model, [n.input[0] for n in gemms], "image", ds.calib[0][:CALIB], ds.test[0][:1000])
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    rows = []
    for n, xf, xt in zip(gemms, fit, test, strict=True):
        w = weights[n.input[1]]  # [out, in] (transB 1)
        if w.size < 1 << 16 or min(w.shape) < 100:
            continue
        rows.append(_ordering_row(n.name, w, xf, xt, keep))
    return rows


def vit_ordering_rows(keeps: tuple[float, ...] = (0.1, 0.3)) -> list[dict]:
    """The same errors for every MatMul weight of the transformers benchmark's trained ViT (MLP, qkv, projections).

    Its layers hold 16-49 k weights, under `TT_MIN_WEIGHTS`: ``--method tt`` leaves them dense. The rows say what a
    tensor train would give there if it were allowed. Tokens of 256 calibration images fit the whitening; tokens of
    200 test images measure.
    """
    from benchmarks import data
    from benchmarks.run import trained
    from benchmarks.transformers import EPOCHS

    dataset = data.load("chars", n_calib=512)
    torch_model, _ = trained(dataset, "vit", {}, EPOCHS, data.CACHE)
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "vit.onnx"
        from benchmarks import nets

        nets.export(torch_model, path, dataset.shape)
        model = onnx.load(path)
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul" and weights.get(n.input[1]) is not None]
    matmuls = [n for n in matmuls if weights[n.input[1]].ndim == 2]
    name = model.graph.input[0].name
    inputs = [n.input[0] for n in matmuls]
    fit, test = _layer_inputs(model, inputs, name, dataset.calib[0][:CALIB], dataset.test[0][:200])
    rows = []
    for n, xf, xt in zip(matmuls, fit, test, strict=True):
        w = weights[n.input[1]].T  # MatMul's [in, out] as [out, in]
        xf, xt = xf.reshape(-1, w.shape[1]), xt.reshape(-1, w.shape[1])  # every token a row
        rows += [_ordering_row(n.name, w, xf, xt, keep) for keep in keeps]
    return rows


def _layer_inputs(model: onnx.ModelProto, names: list[str], feed: str, fit: np.ndarray, test: np.ndarray):
    """The tensors `names` of `model` on the fit and the test images."""
    from onnxprune.graph import session

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for name in names:
        probe.graph.output.append(onnx.ValueInfoProto(name=name))
    sess = session(probe)
    return sess.run(names, {feed: fit}), sess.run(names, {feed: test})


def _ordering_row(name: str, w: np.ndarray, xf: np.ndarray, xt: np.ndarray, keep: float) -> dict:
    """Relative output error on `xt` of W [out, in] written at `keep` of its weights: TT (both orderings), SVD, and
    SVD whitened by the covariance of the fit inputs `xf` [rows, in]."""
    w, xf, xt = w.astype(np.float64), xf.astype(np.float64), xt.astype(np.float64)
    y = xt @ w.T

    def error(approx: np.ndarray) -> float:
        return float(np.linalg.norm(xt @ approx.T - y) / np.linalg.norm(y))

    budget = keep * w.size
    rank = max(1, int(budget / sum(w.shape)))
    row = {"layer": name, "shape": list(w.shape), "kept": keep}
    for ordering in ("interleaved", "plain"):
        modes = tt_modes(*w.shape, ordering)
        if modes is None:  # a size with no factors to spread over cores
            row[f"tt {ordering}"] = None
            continue
        layer = TTLayer("x", Linear(w, None), *modes, spectra=tt_svd(w, *modes)[1], ordering=ordering)
        ranks = allocate_bonds([layer], int(w.size - budget))["x"]
        row[f"tt {ordering}"] = error(tt_matrix(tt_svd(w, *modes, ranks)[0]))
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    row["svd"] = error((u[:, :rank] * s[:rank]) @ vt[:rank])
    cov = xf.T @ xf / len(xf)
    cov += np.eye(len(cov)) * 1e-3 * np.trace(cov) / len(cov)
    low = np.linalg.cholesky(cov)
    u, s, vt = np.linalg.svd(w @ low, full_matrices=False)
    row["svd whitened"] = error((u[:, :rank] * s[:rank]) @ np.linalg.solve(low.T, vt[:rank].T).T)
    print(json.dumps(row), flush=True)
    return row


def light_rows(tmp: pathlib.Path) -> list[dict]:
    sys.path.insert(0, str(ROOT.parent / "tests"))
    from light_zoo import load

    rows = []
    for name in ("vgg19", "alexnet"):
        model = load(name)
        shape = tuple(d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:])
        start = time.perf_counter()
        out, report = onnxprune.prune(model, ratio=0.5, method="tt")
        seconds = time.perf_counter() - start
        batch = model.graph.input[0].type.tensor_type.shape.dim[0]
        fixed = batch.HasField("dim_value")
        lat = {}
        for label, m in (("dense", model), ("tt", out)):
            feeds = {model.graph.input[0].name: np.zeros((1, *shape), np.float32)}
            lat[label] = {1: model_latency(m, feeds)}
            if not fixed:
                feeds = {model.graph.input[0].name: np.zeros((32, *shape), np.float32)}
                lat[label][32] = model_latency(m, feeds)
        row = {
            "model": name,
            "params": [report.facts["params_before"], report.facts["params_after"]],
            "macs": [report.facts["macs_before"], report.facts["macs_after"]],
            "latency_s": lat,
            "seconds": seconds,
            "layers": {k: v for k, v in report.layers.items() if v.get("op") == "tensor-train"},
        }
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "layers"}), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", default="0.5,0.77,0.8")
    parser.add_argument("--light", action="store_true", help="also the onnx package's light VGG-19 and AlexNet")
    parser.add_argument("--vit", action="store_true", help="also the per-layer errors of the trained ViT's MatMuls")
    parser.add_argument(
        "--vit-only", action="store_true", help="only the ViT's per-layer errors; the other stored results are kept"
    )
    args = parser.parse_args()
    out = ROOT / "results" / "tt.json"
    machine = {"machine": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version()}
    if args.vit_only:
        stored = json.loads(out.read_text())
        stored["vit_orderings"] = vit_ordering_rows()
        stored["vit_machine"] = machine
        out.write_text(json.dumps(stored))
        _print_vit(stored["vit_orderings"])
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        rows, about = trained_rows([float(r) for r in args.ratios.split(",")], tmp)
        orderings = ordering_rows(tmp)
        light = light_rows(tmp) if args.light else []
        vit = vit_ordering_rows() if args.vit else []
    out.write_text(
        json.dumps(
            {"machine": machine, **about, "rows": rows, "orderings": orderings, "light": light, "vit_orderings": vit}
        )
    )
    base = rows[0]
    print(f"\n{about['model']}: test accuracy {100 * base['accuracy']:.2f} %, {about['fc_weights']:,} FC weights")
    print("\n| ratio | method | written | test acc. (pts vs orig.) | FC weights removed | ms batch 1 | ms batch 32 |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['ratio']} | {r['method']} | refused: {r['error']} | | | | |")
            continue
        drop = 100 * (r["accuracy"] - base["accuracy"])
        lat = r["latency_s"]
        print(
            f"| {r['ratio']} | {r['method']} | {r.get('written', '')} | {100 * r['accuracy']:.2f} ({drop:+.2f}) "
            f"| {100 * r['fc_removed']:.1f} % | {1e3 * lat[1]:.3f} | {1e3 * lat[32]:.2f} |"
        )
    print("\n| layer | shape | TT interleaved | TT plain | SVD | SVD whitened |  (relative output error, 10 % kept)")
    print("|---|---|---|---|---|---|")
    for r in orderings:
        print(
            f"| {r['layer']} | {r['shape']} | {r['tt interleaved']:.3f} | {r['tt plain']:.3f} | {r['svd']:.3f} "
            f"| {r['svd whitened']:.3f} |"
        )
    for r in light:
        lat = r["latency_s"]
        print(
            f"{r['model']}: params {r['params'][0]:,} -> {r['params'][1]:,}, MACs {r['macs'][0]:,} -> {r['macs'][1]:,}"
            f", ms batch 1 dense {1e3 * lat['dense'][1]:.1f} tt {1e3 * lat['tt'][1]:.1f}, {r['seconds']:.0f} s"
        )
    _print_vit(vit)


def _print_vit(rows: list[dict]) -> None:
    """The ViT's per-layer errors, as the median over its blocks per layer kind and share kept."""
    if not rows:
        return
    print("\n| ViT layer | shape | kept | TT interleaved | TT plain | SVD | SVD whitened |  (median over blocks)")
    print("|---|---|---|---|---|---|---|")
    kinds: dict[tuple, list[dict]] = {}
    for r in rows:
        kinds.setdefault((r["layer"].rsplit("/", 2)[-2], tuple(r["shape"]), r["kept"]), []).append(r)
    for (kind, shape, kept), found in kinds.items():
        cells = [np.median([r[k] for r in found]) for k in ("tt interleaved", "tt plain", "svd", "svd whitened")]
        print(f"| {kind} ({len(found)}) | {list(shape)} | {kept:.0%} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")


if __name__ == "__main__":
    main()
