"""The graph layer: external data in and out, refusal of data outside the model's folder, atomic save."""

import os

import onnx
import pytest
from models import chain

from onnxprune.errors import InvalidModelError, OnnxPruneError
from onnxprune.graph import load, save
from onnxprune.testing import assert_outputs_close, ort_run, random_feeds


def test_external_data_loads(tmp_path):
    model = chain()
    path = tmp_path / "m.onnx"
    onnx.save_model(
        onnx.ModelProto.FromString(model.SerializeToString()),
        path,
        save_as_external_data=True,
        location="m.data",
        size_threshold=0,
    )
    assert (tmp_path / "m.data").stat().st_size > 1000
    loaded = load(path)
    feeds = random_feeds(model, batch=2)
    assert_outputs_close(ort_run(loaded, feeds), ort_run(model, feeds), rtol=0, atol=0)


@pytest.mark.parametrize("location", ["../outside.data", "/etc/passwd", "link.data"])
def test_external_data_outside_the_folder_is_refused(tmp_path, location):
    model = chain()
    folder = tmp_path / "inner"
    folder.mkdir()
    path = folder / "m.onnx"
    onnx.save_model(model, path, save_as_external_data=True, location="m.data", size_threshold=0)
    if location == "link.data":  # a symlink inside the folder that leads out of it
        (folder / "m.data").rename(tmp_path / "outside.data")
        (folder / "link.data").symlink_to(tmp_path / "outside.data")
    proto = onnx.load(path, load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save_model(proto, path)
    with pytest.raises(InvalidModelError, match="points outside the model's folder"):
        load(path)


def test_save_is_atomic_and_leaves_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "out.onnx"
    save(chain(), path)
    assert load(path).graph.node
    before = path.read_bytes()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(onnx, "save_model", broken)
    with pytest.raises(OnnxPruneError, match="cannot write .disk full.; nothing was written"):
        save(chain(), path)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["out.onnx"]


@pytest.mark.parametrize(
    "dims, expected",
    [
        ([2**20, 2**20, 2**10], "is absurd"),
        ([3, 3], "needs 36 bytes"),
    ],
)
def test_declared_shapes_that_disagree_with_the_data_are_refused(tmp_path, dims, expected):
    model = chain()
    tensor = model.graph.initializer[0]
    tensor.raw_data = onnx.numpy_helper.to_array(tensor).tobytes()[:100]
    del tensor.dims[:]
    tensor.dims.extend(dims)
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(InvalidModelError, match=expected):
        load(path)


def test_unknown_tensor_data_type_is_refused(tmp_path):  # found by a 4000-input fuzz run
    model = chain()
    model.graph.initializer[0].data_type = 85
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(InvalidModelError, match="unknown data type 85"):
        load(path)


def test_a_model_over_2gb_keeps_its_weights_through_export_and_shape_inference(monkeypatch):
    """Over 2 GB shapes are inferred on a weightless view; the exported model must keep the real weights (it returned
    the view: every large initializer a placeholder without bytes). The limit is lowered so a small model is "large"."""
    import numpy as np

    from onnxprune import graph as graph_io

    model = chain()
    monkeypatch.setattr(graph_io, "TWO_GB", 2048)
    assert graph_io.oversized(model)
    out = graph_io.to_model(graph_io.to_graph(model), model)
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    for tensor in out.graph.initializer:
        assert tensor.data_location != onnx.TensorProto.EXTERNAL, tensor.name
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(tensor), weights[tensor.name])
    assert len(out.graph.value_info) > 0  # the shapes were still inferred
