"""The Python API makes the request the command line makes: same defaults, paths or arrays, one-line errors."""

import pathlib

import numpy as np
import onnx
import pytest

import onnxprune
from onnxprune import api, cli
from onnxprune.errors import CalibrationError, InvalidModelError, OnnxPruneError
from onnxprune.testing import validate_report

EXAMPLE = pathlib.Path(__file__).resolve().parent.parent / "examples"


class _Stop(Exception):
    """Raised by the captured `prune_guarded`: the request is what is compared, not a prune."""


def _captured(monkeypatch, module):
    calls = []

    def fake(model, **kwargs):
        calls.append((model, kwargs))
        raise _Stop

    monkeypatch.setattr(module, "prune_guarded", fake)
    return calls


def _normalised(kwargs):
    """Options with the calibration data as arrays by input name, and CLI-only spellings of 'nothing' dropped."""
    out = dict(kwargs)
    data = out.pop("calib")
    batches = list(data.batches(1_000_000)) if data is not None else []
    arrays = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]} if batches else None
    return {k: v for k, v in out.items() if v not in (None, (), {})}, arrays


def test_the_api_with_defaults_makes_the_request_the_cli_makes(monkeypatch, tmp_path):
    model, calib = EXAMPLE / "digits_resnet.onnx", EXAMPLE / "digits_calib.npy"
    from_cli = _captured(monkeypatch, cli)
    assert cli.main([str(model), str(tmp_path / "o.onnx"), "--ratio", "0.7", "--calib", str(calib), "-q"]) == 3
    from_api = _captured(monkeypatch, api)
    with pytest.raises(_Stop):
        onnxprune.prune(str(model), ratio=0.7, calib=str(calib))
    (_, cli_kwargs), (_, api_kwargs) = from_cli[0], from_api[0]
    cli_options, cli_data = _normalised(cli_kwargs)
    api_options, api_data = _normalised(api_kwargs)
    cli_options.pop("compensate")  # the CLI's --no-compensate spelled out; the pipeline's default is the same
    assert cli_options == api_options
    assert cli_data.keys() == api_data.keys() and all(np.array_equal(cli_data[k], api_data[k]) for k in cli_data)
    assert api_options["method"] == "best" and api_options["latency_batch"] == 1 and api_options["max_drop"] == 0.05


def test_the_api_takes_a_model_and_an_array_in_memory(monkeypatch):
    model = onnx.load(EXAMPLE / "digits_resnet.onnx")
    x = np.load(EXAMPLE / "digits_calib.npy")
    calls = _captured(monkeypatch, api)
    with pytest.raises(_Stop):
        onnxprune.prune(model, ratio=0.5, calib=x, method="channel", latency_batch=0)
    got, kwargs = calls[0]
    (batch,) = list(kwargs["calib"].batches(len(x)))
    assert got is model and np.array_equal(batch[model.graph.input[0].name], x)
    assert kwargs["method"] == "channel" and kwargs["latency_batch"] == 0 and kwargs["remove_ratio"] == 0.5


@pytest.mark.parametrize(
    "model, calib, error, words",
    [
        (np.zeros(3), None, OnnxPruneError, "expected an onnx.ModelProto or the path of a model, got ndarray"),
        ("missing.onnx", None, InvalidModelError, "missing.onnx"),
        (EXAMPLE / "digits_resnet.onnx", [1, 2], OnnxPruneError, "expected an array, a dict of arrays or a path"),
        (EXAMPLE / "digits_resnet.onnx", np.zeros((4, 3, 5, 5), np.float32), CalibrationError, "calibration data"),
    ],
)
def test_bad_input_is_one_clear_error(model, calib, error, words):
    with pytest.raises(error) as info:
        onnxprune.prune(model, ratio=0.5, calib=calib)
    assert words in str(info.value) and "\n" not in str(info.value)


def test_the_api_report_is_the_cli_report_document():
    """`Report.to_dict` is what `--report` writes: plain JSON values, valid against the shipped schema."""
    import json

    x = np.load(EXAMPLE / "digits_calib.npy")[:100]
    _, report = onnxprune.prune(EXAMPLE / "digits_resnet.onnx", ratio=0.2, calib=x, method="channel", latency_batch=0)
    doc = json.loads(json.dumps(report.to_dict()))  # no numpy left: dumps needs no converter
    validate_report(doc)
    assert doc["schema_version"] == 1 and doc["input"] is None and "fidelity" in doc


def test_the_cli_s_options_are_keywords_and_wrong_ones_are_named(monkeypatch):
    """A new user passed the README table's options by their CLI names: raw TypeErrors from an internal function."""
    x = np.load(EXAMPLE / "digits_calib.npy")
    calls = _captured(monkeypatch, api)
    with pytest.raises(_Stop):
        onnxprune.prune(
            EXAMPLE / "digits_resnet.onnx",
            ratio=0.5,
            calib=x,
            calib_size=100,
            no_compensate=True,
            shape="image:1x1x16x16",
            labels=EXAMPLE / "digits_labels.npy",
            exclude="conv*",
        )
    kwargs = calls[0][1]
    assert len(kwargs["calib"]) == 100 and kwargs["compensate"] is False and kwargs["exclude"] == ("conv*",)
    assert kwargs["shapes"] == {"image": [1, 1, 16, 16]} and len(kwargs["labels"]) == len(x)
    for wrong, words in [
        ({"metod": "channel"}, "unknown option 'metod'; the options are:"),
        ({"report": "r.json"}, "report.to_dict()"),
    ]:
        with pytest.raises(OnnxPruneError, match=words.replace("(", r"\(").replace(")", r"\)")):
            onnxprune.prune(EXAMPLE / "digits_resnet.onnx", ratio=0.5, **wrong)
