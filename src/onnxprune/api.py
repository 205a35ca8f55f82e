"""The Python API: ``onnxprune.prune`` makes the model ``onnxprune IN OUT --ratio R`` makes, with the same defaults.

The command line and this function share their defaults (`DEFAULTS`: the CLI's options read them), so the same
request gives the same model. Models and calibration data may be given in memory or as paths; bad input raises
`OnnxPruneError` with the one line the CLI would print.
"""

from __future__ import annotations

import os
import pathlib

import numpy as np
import onnx

from onnxprune import graph as graph_io
from onnxprune.calibration.data import (
    ImageOptions,
    Samples,
    as_samples,
    load_calibration,
    load_labels,
    model_inputs,
    subset,
)
from onnxprune.errors import OnnxPruneError
from onnxprune.pipeline import MAX_DROP, Options, prune_guarded
from onnxprune.result import Report
from onnxprune.shapes import parse_shapes

DEFAULTS = {
    "target": "params",  # what --ratio removes: params, flops (MACs) or latency
    "method": "best",  # basis result, timed against channel results when it is not clearly faster
    "max_drop": MAX_DROP,  # with calibration data: largest fall of held-out agreement before nothing is returned
    "latency_batch": 1,  # the batch the split layers and the finished model are timed at (0: parameters alone)
    "round_to": 1,  # kept channel counts rounded to a multiple of this
    "batch_size": 32,  # samples per onnxruntime run
    "min_rank": 8,  # layers of smaller rank are not split
    "seed": 0,  # drives every random choice (the fit / held-out split, sub-sampled rows)
    "threads": 0,  # onnxruntime intra-op threads for timing (0: its default)
    "tucker": True,  # split k x k Convs written in Tucker-2 form where that is closer at no more weights
}


def prune(
    model: onnx.ModelProto | str | os.PathLike,
    *,
    ratio: float,
    calib: np.ndarray | dict[str, np.ndarray] | str | os.PathLike | None = None,
    force: bool = False,
    **options,
) -> tuple[onnx.ModelProto, Report]:
    """Remove `ratio` of the model's parameters (or MACs, or measured latency) as the command line does.

    Args:
        model: An ONNX model, or the path of one.
        ratio: Fraction to remove, in [0, 1).
        calib: Calibration samples: an array ``[N, ...]`` for a model with one input, a dict input name -> array,
            or a path (``.npy``, ``.npz``, a folder of images or arrays) as ``--calib`` takes.
        force: Return a result that fails the held-out check instead of raising `GuardError`.
        **options: Any option of ``pipeline.prune`` (``target``, ``method``, ``criterion``, ``exclude``,
            ``latency_batch``, ``max_drop``, ``labels``, ``shapes``, ``compensate``...); the ones not given take
            `DEFAULTS`, the command line's.

    Returns:
        (pruned model, report): ``report.facts`` holds what the CLI's summary prints (``fidelity``, ``guard``...).

    Raises:
        OnnxPruneError: The model, the data or an option is invalid (the CLI's exit 2).
        BudgetError: The request cannot be reached; the message says how far it can go.
        GuardError: With `calib`, the result fails the held-out check (``max_drop``) and `force` is off.
    """
    model = _model(model)
    options = _spelled(options)
    images = {k[len("image_") :]: options.pop(k) for k in list(options) if k.startswith("image_")}
    limit = options.pop("calib_size", None)
    seed = options.get("seed", DEFAULTS["seed"])
    data = _calibration(calib, model, seed=seed, limit=limit, images=images)
    if isinstance(options.get("labels"), (str, os.PathLike)):
        options["labels"] = load_labels(options["labels"], data)
    return prune_guarded(model, remove_ratio=ratio, calib=data, force=force, **{**DEFAULTS, **options})


OPTIONS = sorted(
    ({*Options.__dataclass_fields__} - {"remove_ratio"})
    | {"max_drop", "calib_size", "no_compensate", "shape", *(f"image_{f}" for f in ImageOptions.__dataclass_fields__)}
)
COMMAND_LINE_ONLY = {  # options of the CLI that have another spelling in Python
    "report": "report.to_dict() is the --report document",
    "overwrite": "onnx.save writes the model where you choose",
    "quiet": "nothing is printed from Python",
    "verbose": "logging.basicConfig(level=logging.DEBUG) shows every step",
    "debug": "exceptions propagate from Python",
}


def _spelled(options: dict) -> dict:
    """The options in `prune_one`'s spelling: the CLI's names accepted, strings parsed as the CLI parses them."""
    for name in options:
        if name in COMMAND_LINE_ONLY:
            raise OnnxPruneError(f"{name}: a command-line option; from Python, {COMMAND_LINE_ONLY[name]}")
        if name not in OPTIONS:
            raise OnnxPruneError(f"unknown option {name!r}; the options are: {', '.join(OPTIONS)}")
    out = dict(options)
    if "no_compensate" in out:
        out["compensate"] = not out.pop("no_compensate")
    if "shape" in out:
        out["shapes"] = out.pop("shape")
    if isinstance(out.get("shapes"), (str, list, tuple)):  # "image:1x3x224x224", as --shape takes it
        specs = out["shapes"]
        out["shapes"] = parse_shapes((specs,) if isinstance(specs, str) else tuple(specs))
    if isinstance(out.get("exclude"), str):
        out["exclude"] = (out["exclude"],)
    return out


def _model(model) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, (str, os.PathLike)):
        return graph_io.load(pathlib.Path(model))
    raise OnnxPruneError(f"model: expected an onnx.ModelProto or the path of a model, got {type(model).__name__}")


def _calibration(calib, model: onnx.ModelProto, *, seed: int, limit: int | None, images: dict) -> Samples | None:
    if calib is None:
        if images or limit:
            raise OnnxPruneError("calib_size and image_* options need calib")
        return None
    if isinstance(calib, (str, os.PathLike)):
        size = images.get("size")
        if isinstance(size, str):
            images["size"] = tuple(int(v) for v in size.lower().split("x"))
        try:
            options = ImageOptions(**images)
        except TypeError as err:
            raise OnnxPruneError(f"image options: {err}") from err
        return load_calibration(pathlib.Path(calib), model, limit=limit, image_options=options, seed=seed)
    if images:
        raise OnnxPruneError("image_* options apply to a folder of images given as calib (a path)")
    if isinstance(calib, np.ndarray):
        inputs = list(model_inputs(model))
        if len(inputs) != 1:
            raise OnnxPruneError(
                f"calib: the model has {len(inputs)} inputs ({', '.join(inputs)}): give a dict input name -> array"
            )
        calib = {inputs[0]: calib}
    if isinstance(calib, (Samples, dict)):
        return subset(as_samples(calib, model), limit, seed=seed)
    raise OnnxPruneError(f"calib: expected an array, a dict of arrays or a path, got {type(calib).__name__}")
