"""MACs at a concrete input shape: never with symbolic dims taken as 1; the written model keeps its dynamic dims."""

import json

import numpy as np
import onnx
import pytest
from models import Builder, any_size

from onnxprune.budget import count
from onnxprune.cli import main
from onnxprune.errors import OnnxPruneError
from onnxprune.pipeline import prune
from onnxprune.shapes import choose_shapes, parse_shapes


def run(args, capsys):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def _dims(model):
    return [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]


@pytest.mark.parametrize("h, w", [(32, 32), (24, 40), (224, 224)])
def test_macs_at_a_stated_shape_equal_those_of_the_same_model_with_fixed_dims(h, w):
    params, macs = count(any_size(), shapes={"x": [1, 3, h, w]})
    assert (params, macs) == count(any_size(h, w))
    assert macs > count(any_size())[1] * 100  # symbolic H and W taken as 1: the count this replaces


def test_the_shape_comes_from_the_option_then_the_data_then_the_model_then_the_default():
    model = any_size()
    assert choose_shapes(model) == ({"x": [1, 3, 224, 224]}, "default 224 for symbolic H/W")
    data = {"x": np.zeros((2, 3, 20, 30), np.float32)}
    assert choose_shapes(model, data=data) == ({"x": [1, 3, 20, 30]}, "calibration data")
    given = {"x": [1, 3, 64, 48]}
    assert choose_shapes(model, given=given, data=data) == (given, "--shape")
    assert choose_shapes(any_size(8, 8)) == ({"x": [1, 3, 8, 8]}, "model")
    # MACs are per sample: a batch given for the symbolic batch dim is counted, and named, as 1
    assert choose_shapes(model, given={"x": [4, 3, 64, 48]}) == (given, "--shape")


@pytest.mark.parametrize(
    "given, message",
    [
        ({"y": [1, 3, 8, 8]}, "has no input 'y'"),
        ({"x": [1, 3, 8]}, "does not fit the input's dims"),
        ({"x": [1, 4, 8, 8]}, "does not fit the input's dims"),
    ],
)
def test_a_shape_that_does_not_fit_the_model_is_an_error(given, message):
    with pytest.raises(OnnxPruneError, match=message):
        choose_shapes(any_size(), given=given)


def test_shape_specs():
    assert parse_shapes(["x:1x3x224x224", "input_1:0=1X4"]) == {"x": [1, 3, 224, 224], "input_1:0": [1, 4]}
    for bad in ("x", "x:1xq", "x:0x3", ":1x2"):
        with pytest.raises(OnnxPruneError, match="--shape"):
            parse_shapes([bad])


@pytest.mark.parametrize("method", ["channel", "basis"])
def test_flops_target_on_a_symbolic_model_lands_within_one_point_at_the_stated_shape(method):
    model = any_size()
    pruned, report = prune(model, remove_ratio=0.4, target="flops", method=method, latency_batch=0)
    f = report.facts
    assert f["macs_shape"] == {"x": [1, 3, 224, 224]}
    assert f["macs_before"] == count(any_size(224, 224))[1]
    assert f["macs_after"] == count(pruned, shapes=f["macs_shape"])[1]
    assert abs(f["ratio_achieved"] - 0.4) <= 0.01
    assert _dims(pruned) == ["batch", 3, "H", "W"]  # the written model keeps its dynamic dims


def _sequence_model():
    b = Builder(3)
    w = b.const(b.rng.standard_normal((16, 24)).astype(np.float32))
    h = b.relu(b.node("MatMul", ["x", w]))
    out = b.node("MatMul", [h, b.const(b.rng.standard_normal((24, 4)).astype(np.float32))])
    return b.model([("x", ["T", 16])], [out])


def test_symbolic_dims_nothing_resolves_are_no_mac_count(tmp_path, capsys):
    model_path = tmp_path / "seq.onnx"
    onnx.save(_sequence_model(), model_path)
    out = tmp_path / "o.onnx"
    code, _, err = run([model_path, out, "--ratio", "0.3", "--target", "flops", "--min-rank", "2"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--shape x:" in err and not out.exists()
    code, _, err = run([model_path, out, "--ratio", "0.3", "--min-rank", "2", "--method", "basis"], capsys)
    assert code == 2 and not out.exists()  # split layers are timed at --latency-batch: that needs a shape
    assert "the split layers cannot be timed" in err and "give --shape x:" in err, err
    code, stdout, err = run([model_path, out, "--ratio", "0.3", "--min-rank", "2", "--latency-batch", "0"], capsys)
    assert code == 0, err
    assert "MACs    not counted: input 'x' has symbolic dims" in stdout
    rep = tmp_path / "r.json"
    args = [model_path, out, "--ratio", "0.3", "--target", "flops", "--shape", "x:1x50x16", "--overwrite"]
    code, stdout, err = run([*args, "--min-rank", "2", "--latency-batch", "0", "--report", rep], capsys)
    assert code == 0, err
    facts = json.loads(rep.read_text())
    assert facts["macs_before"] == 50 * (16 * 24 + 24 * 4) and abs(facts["ratio_achieved"] - 0.3) <= 0.01
    assert "at x:1x50x16 (--shape)" in stdout


def test_the_cli_says_which_shape_it_counted_at(tmp_path, capsys):
    model_path, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(any_size(), model_path)
    code, stdout, err = run([model_path, out, "--ratio", "0.3", "--latency-batch", "0"], capsys)
    assert code == 0, err
    assert "at x:1x3x224x224 (default 224 for symbolic H/W)" in stdout
    assert f"{count(any_size(224, 224))[1]:,}" in stdout
    bad = [model_path, tmp_path / "p.onnx", "--ratio", "0.3", "--shape", "x:1x3x64"]
    code, _, err = run(bad, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "does not fit" in err
    assert not (tmp_path / "p.onnx").exists()
