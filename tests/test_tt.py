"""Tensor trains: TT-SVD exact at full bond dimension, the ONNX contraction equals the layer, --method tt end to end."""

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from models import Builder, flatten_gemm
from onnx import TensorProto, helper, numpy_helper

from onnxprune.cli import main
from onnxprune.errors import BudgetError, OnnxPruneError
from onnxprune.graph import to_graph, to_model
from onnxprune.passes.tt import (
    ORDERINGS,
    TTLayer,
    allocate_bonds,
    capped,
    decompose_tt,
    tt_layers,
    tt_macs,
    tt_matrix,
    tt_modes,
    tt_params,
    tt_svd,
)
from onnxprune.pipeline import prune
from onnxprune.rules.layouts import Linear
from onnxprune.testing import assert_outputs_close, ort_run, validate_report

RNG = np.random.default_rng(0)


@settings(max_examples=25, deadline=None)
@given(out_size=st.integers(4, 90), in_size=st.integers(4, 90), seed=st.integers(0, 2**16))
@pytest.mark.parametrize("ordering", ORDERINGS)
def test_tt_svd_at_full_bond_dimension_reproduces_the_matrix(ordering, out_size, in_size, seed):
    modes = tt_modes(out_size, in_size, ordering)
    if modes is None:  # a prime size: no modes, and tt_layers says so
        assert any(all(n % k for k in range(2, n)) for n in (out_size, in_size))
        return
    assert int(np.prod(modes[0])) == out_size and int(np.prod(modes[1])) == in_size
    w = np.random.default_rng(seed).standard_normal((out_size, in_size))
    cores, spectra = tt_svd(w, *modes)
    assert len(cores) == len(modes[0]) and len(spectra) == len(cores) - 1
    assert np.linalg.norm(tt_matrix(cores) - w) <= 1e-10 * np.linalg.norm(w)


@pytest.mark.parametrize("ordering", ORDERINGS)
def test_a_rank_deficient_weight_gets_bonds_of_its_rank_quickly(ordering):
    # a constant 2048 x 2048 weight (light models fill theirs so): unfoldings past the Gram threshold, rank 1;
    # the dense-SVD fallback of an ill-conditioned Gram took over 10 minutes on AlexNet's FC layers
    w = np.full((2048, 2048), 0.5) + np.outer(np.arange(2048), np.ones(2048)) * 1e-3
    modes = tt_modes(*w.shape, ordering)
    cores, spectra = tt_svd(w, *modes)
    assert max(c.shape[-1] for c in cores) <= 2
    assert np.linalg.norm(tt_matrix(cores) - w) <= 1e-9 * np.linalg.norm(w)


def test_a_truncation_errs_at_most_the_singular_values_it_drops():
    w = RNG.standard_normal((64, 96))
    modes = tt_modes(64, 96)
    for ranks in [(3, 5), (10, 2), (1, 1), (16, 12)]:
        cores, spectra = tt_svd(w, *modes, ranks)
        dropped = sum(float(np.sum(s[r:] ** 2)) for s, r in zip(spectra, ranks, strict=True))
        error = np.linalg.norm(tt_matrix(cores) - w) ** 2
        assert error <= dropped * (1 + 1e-9) + 1e-12, (ranks, error, dropped)
        assert sum(c.size for c in cores) == tt_params(tuple(c.shape[-1] for c in cores[:-1]), *modes)


def _layer(op, attrs, x_shape, weight, extra=(), ids=False):
    inits = [numpy_helper.from_array(weight, "W")]
    inits += [numpy_helper.from_array(e, f"C{i}") for i, e in enumerate(extra)]
    if ids:
        node = helper.make_node("Gather", ["W", "x"], ["y"], **attrs)
        x = helper.make_tensor_value_info("x", TensorProto.INT64, x_shape)
    else:
        node = helper.make_node(op, ["x", "W", *[f"C{i}" for i in range(len(extra))]], ["y"], **attrs)
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph([node], "layer", [x], [y], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


W = RNG.standard_normal((48, 60)).astype(np.float32)
BIAS = RNG.standard_normal(60).astype(np.float32)
LAYERS = {
    "gemm alpha beta": (_layer("Gemm", {"alpha": 0.5, "beta": 2.0}, ["b", 48], W, [BIAS]), ["b", 48]),
    "gemm transB, bias [1, M]": (_layer("Gemm", {"transB": 1}, ["b", 48], W.T.copy(), [BIAS[None]]), ["b", 48]),
    "gemm transA transB": (_layer("Gemm", {"transA": 1, "transB": 1}, [48, "b"], W.T.copy(), [BIAS]), [48, "b"]),
    "gemm transA": (_layer("Gemm", {"transA": 1}, [48, "b"], W), [48, "b"]),
    "matmul": (_layer("MatMul", {}, ["b", 48], W), ["b", 48]),
    "matmul 3-d input": (_layer("MatMul", {}, ["b", "s", 48], W), ["b", 7, 48]),
    "gather (negative ids wrap)": (
        _layer("Gather", {}, ["b", "s"], RNG.standard_normal((100, 24)).astype(np.float32), ids=True),
        ["b", 9],
    ),
}


@pytest.mark.parametrize("ordering", ORDERINGS)
@pytest.mark.parametrize("case", LAYERS)
def test_the_onnx_tensor_train_at_full_bond_dimension_equals_the_layer(case, ordering):
    model, shape = LAYERS[case]
    graph = to_graph(model)
    found, report = tt_layers(graph, min_weights=1)
    assert len(found) == 1, report.skipped
    view = found[0].linear
    modes = tt_modes(*view.matrix.shape, ordering)
    layers = [TTLayer(found[0].node, view, *modes, spectra=tt_svd(view.matrix, *modes)[1], ordering=ordering)]
    made = decompose_tt(graph, layers, {layers[0].node: layers[0].full_ranks}).report
    assert made.layers[layers[0].node]["relative_error"] < 1e-10
    out = to_model(graph, model)
    onnx.checker.check_model(out, full_check=True)
    assert "Gemm" not in {n.op_type for n in out.graph.node}
    for batch in (1, 5):  # dynamic batch: the leading dims stay symbolic
        dims = [batch if d == "b" else d for d in shape]
        if "gather" in case:
            feeds = {"x": RNG.integers(-100, 100, dims)}
        else:
            feeds = {"x": RNG.standard_normal(dims).astype(np.float32)}
        want = ort_run(model, feeds)
        got = ort_run(out, feeds)
        scale = float(np.abs(want["y"]).max())
        assert_outputs_close(got, want, rtol=0, atol=1e-5 * scale)


def test_the_bonds_remove_what_is_asked_and_refuse_what_cannot_be():
    w = RNG.standard_normal((256, 512))
    modes = tt_modes(256, 512)
    layer = TTLayer("a", Linear(w, None), *modes, spectra=tt_svd(w, *modes)[1])
    for remove in (10_000, 60_000, 120_000):
        ranks = allocate_bonds([layer], remove)
        assert w.size - layer.params(ranks["a"]) >= remove
    with pytest.raises(BudgetError, match="at most"):
        allocate_bonds([layer], w.size)


def test_trains_the_request_does_not_need_stay_dense():
    layers = []
    for name, shape in (("a", (1024, 2048)), ("b", (512, 512))):  # rank 2: each saves almost all at full bonds
        w = np.ones(shape) + np.outer(np.arange(shape[0]), np.ones(shape[1])) * 1e-3
        modes = tt_modes(*shape)
        layers.append(TTLayer(name, Linear(w, None), *modes, spectra=tt_svd(w, *modes)[1]))
    assert set(allocate_bonds(layers, 100_000)) == {"b"}
    assert set(allocate_bonds(layers, 1_000_000)) == {"a"}
    assert set(allocate_bonds(layers, 2_300_000)) == {"a", "b"}


def _mlp(width=256, seed=0):
    b = Builder(seed)
    x = b.node("Relu", [b.gemm("x", 64, width)])
    x = b.node("Relu", [b.gemm(x, width, width)])
    return b.model([("x", [64])], [b.gemm(x, width, 10)])


def test_method_tt_removes_the_ratio_and_writes_a_valid_model():
    model = _mlp()
    out, report = prune(model, remove_ratio=0.3, method="tt")
    onnx.checker.check_model(out, full_check=True)
    weights = sum(numpy_helper.to_array(i).size for i in out.graph.initializer if i.data_type == TensorProto.FLOAT)
    assert report.facts["params_after"] == weights
    assert report.facts["params_removed"] >= 0.3 - 0.01
    trains = {k: v for k, v in report.layers.items() if v.get("op") == "tensor-train"}
    assert trains and all(k in {n.name for n in out.graph.node} for k in trains)
    for batch in (1, 3):
        ort_run(out, {"x": RNG.standard_normal((batch, 64)).astype(np.float32)})


def test_the_last_core_refit_lowers_the_held_out_error():
    model, rng = _mlp(seed=1), np.random.default_rng(11)  # its own draws: the test does not hang on the file's order
    basis = rng.standard_normal((6, 64)).astype(np.float32)  # inputs on a 6-dim subspace: the refit can use that
    calib = {"x": rng.standard_normal((160, 6)).astype(np.float32) @ basis}
    _, plain = prune(model, remove_ratio=0.3, method="tt", calib=calib, compensate=False)
    _, fitted = prune(model, remove_ratio=0.3, method="tt", calib=calib)
    assert fitted.counts["refitted_cores"] >= 1
    assert fitted.facts["criterion"] == "l2"  # the bonds fall by weight error, data or not
    errors = [v for k, v in fitted.layers.items() if "refit_error_after" in v]
    assert all(e["refit_error_after"] < e["refit_error_before"] for e in errors)
    (name,) = fitted.facts["fidelity"]
    assert fitted.facts["fidelity"][name]["relative_error"] < plain.facts["fidelity"][name]["relative_error"]


def test_method_tt_says_why_it_cannot_run():
    with pytest.raises(OnnxPruneError, match="--target params"):
        prune(_mlp(), remove_ratio=0.3, method="tt", target="flops")
    with pytest.raises(OnnxPruneError, match="--criterion cmi does not apply"):
        prune(_mlp(), remove_ratio=0.3, method="tt", criterion="cmi", calib={"x": np.ones((64, 64), np.float32)})
    with pytest.raises(BudgetError, match="no layer can be written as a tensor train"):
        prune(flatten_gemm(), remove_ratio=0.3, method="tt")


def test_the_command_line_writes_tensor_trains_and_says_they_are_not_faster(tmp_path, capsys):
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(_mlp(), src)
    code = main([str(src), str(out), "--method", "tt", "--ratio", "0.3", "--force"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "written as tensor trains" in printed and "bond dimensions" in printed
    onnx.checker.check_model(onnx.load(out), full_check=True)


def test_a_bond_is_capped_by_what_its_neighbours_can_feed():
    out_modes, in_modes = (1, 1, 4, 4), (4, 4, 1, 1)  # every core 4 wide
    assert capped((4, 1, 16), out_modes, in_modes) == (4, 1, 4)
    assert capped((16, 16, 16), out_modes, in_modes) == (4, 16, 4)
    assert tt_params((4, 1, 16), out_modes, in_modes) == tt_params((4, 1, 4), out_modes, in_modes)


def test_exact_trains_that_remove_more_than_asked_are_written_with_a_note():
    table = (RNG.standard_normal((4096, 8)) @ RNG.standard_normal((8, 128))).astype(np.float32)  # rank 8
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", 128])
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s"])
    graph = helper.make_graph([helper.make_node("Gather", ["E", "ids"], ["y"])], "emb", [ids], [y])
    graph.initializer.append(numpy_helper.from_array(table, "E"))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    out, report = prune(model, remove_ratio=0.1, method="tt")
    assert report.facts["ratio_achieved"] > 0.8 and "exact" in report.facts["ratio_note"]
    assert report.facts["groups_pruned"] == 1  # a lookup counts as a train written
    feeds = {"ids": RNG.integers(0, 4096, (2, 5))}
    assert_outputs_close(ort_run(out, feeds), ort_run(model, feeds), rtol=0, atol=1e-4)


def test_the_report_of_method_tt_follows_the_shipped_schema(tmp_path):
    import json

    src, out, doc = tmp_path / "in.onnx", tmp_path / "out.onnx", tmp_path / "r.json"
    onnx.save(_mlp(), src)
    assert main([str(src), str(out), "--method", "tt", "--ratio", "0.3", "--report", str(doc), "-q"]) == 0
    report = json.loads(doc.read_text())
    validate_report(report)
    assert any(layer.get("ordering") for layer in report["layers"])


def test_bond_spectra_are_the_tt_svd_spectra_and_computed_once_per_content(monkeypatch):
    """The guard's retries and bisection prune the same model again: each layer's spectra come back from memory
    (by content: a changed weight is decomposed again)."""
    from onnxprune.passes import tt

    monkeypatch.setattr(tt, "_SPECTRA", {})
    calls = []
    real = tt.tt_svd
    monkeypatch.setattr(tt, "tt_svd", lambda *a, **k: calls.append(1) or real(*a, **k))
    w = np.random.default_rng(3).standard_normal((64, 96))
    modes = tt_modes(64, 96)
    want = real(w, *modes)[1]
    for _ in range(2):
        got = tt.bond_spectra(w.copy(), *modes)
        assert len(got) == len(want) and all(np.allclose(a, b) for a, b in zip(got, want, strict=True))
    assert len(calls) == 1
    changed = w.copy()
    changed[0, 0] += 1.0
    tt.bond_spectra(changed, *modes)
    assert len(calls) == 2


def test_a_tied_embedding_keeps_one_copy_of_its_table():
    """Gather of E and MatMul by Transpose(E) (an output layer tied to the embedding): constant folding would store E
    and E^T, doubling the model and its weight count; the tied table is left to the run time, and stays whole."""
    from onnxprune.budget import count
    from onnxprune.passes.cleanup import cleanup

    table = np.random.default_rng(5).standard_normal((512, 64)).astype(np.float32)
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"])
    out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", 512])
    nodes = [
        helper.make_node("Gather", ["E", "ids"], ["h"], name="embed"),
        helper.make_node("Transpose", ["E"], ["Et"], name="tie", perm=[1, 0]),
        helper.make_node("MatMul", ["h", "Et"], ["logits"], name="lm_head"),
    ]
    graph = helper.make_graph(nodes, "tied", [ids], [out], [numpy_helper.from_array(table, "E")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    g = to_graph(model)
    cleanup(g)
    stored = [t for t in g.tensors().values() if isinstance(t, gs.Constant) and t.values.size >= 1024]
    assert [t.name for t in stored] == ["E"] and [n.op for n in g.nodes] == ["Gather", "Transpose", "MatMul"]
    assert count(model)[0] == table.size
    feeds = {"ids": np.random.default_rng(6).integers(0, 512, (2, 3))}
    np.testing.assert_allclose(ort_run(to_model(g, model), feeds)["logits"], ort_run(model, feeds)["logits"])


def test_a_feature_major_gemm_with_a_fixed_first_dim_is_checked_without_calibration():
    """Gemm(transA=1) on x [512, N]: the fixed first dim (512) is not a batch to split into fit and held-out parts;
    the data-free drift check runs the model once on random inputs of its own shape (it raised "512 samples do not
    fill two")."""
    rng = np.random.default_rng(7)
    w = (rng.standard_normal((256, 16)) @ rng.standard_normal((16, 512)) / 20).astype(np.float32)
    node = helper.make_node("Gemm", ["x", "W"], ["y"], name="fcT", transA=1, transB=1)
    graph = helper.make_graph(
        [node],
        "ta",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [512, "N"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 256])],
        [numpy_helper.from_array(w, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(BudgetError, match=r"no layer offers anything to remove.*left whole: fcT: Gemm with transA=1"):
        prune(model, remove_ratio=0.5)  # the basis split does not take a transposed input: it says so
    out, report = prune(model, remove_ratio=0.5, method="tt")
    assert report.facts["synthetic_drift"]["samples"] == 1  # one run of x [512, 1]: the 512 are features
    assert report.facts["synthetic_drift"]["cosine"] > 0.99  # the weight has rank 16: the train keeps it
    feeds = {"x": rng.standard_normal((512, 3)).astype(np.float32)}
    got, want = ort_run(out, feeds)["y"], ort_run(model, feeds)["y"]
    assert np.linalg.norm(got - want) <= 0.05 * np.linalg.norm(want)


def test_a_feature_major_input_s_drift_is_measured_on_its_outputs_as_they_come():
    """x [64, N] -> Gemm(transA) -> Relu -> Gemm -> y [N, 10]: the data-free drift check took the input's 64 features
    as samples and reshaped y by them (exit 3, "cannot reshape array of size 80"); the second Gemm is split."""
    rng = np.random.default_rng(9)
    w1, w2 = (rng.standard_normal(s).astype(np.float32) / 8 for s in ((128, 64), (128, 10)))
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["x", "W1"], ["h"], name="g1", transA=1, transB=1),
            helper.make_node("Relu", ["h"], ["r"], name="relu"),
            helper.make_node("Gemm", ["r", "W2"], ["y"], name="g2"),
        ],
        "ta2",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, "N"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    out, report = prune(model, remove_ratio=0.05, latency_batch=0)
    drift = report.facts["synthetic_drift"]
    assert drift["samples"] == 1 and 0 < drift["cosine"] <= 1
    assert any(s.node == "g1" and "transA=1" in s.reason for s in report.skipped)
    ort_run(out, {"x": rng.standard_normal((64, 3)).astype(np.float32)})


def test_a_request_past_what_the_trains_can_remove_names_the_most_they_remove():
    """A request larger than the eligible layers hold (here: nearly every weight of the model) is refused with the
    most the trains remove and what was left dense, not with "no layer can be written as a tensor train"."""
    rng = np.random.default_rng(8)
    w = rng.standard_normal((512, 256)).astype(np.float32)
    small = rng.standard_normal((256, 30)).astype(np.float32)  # too small for a train: stays dense
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="big"), helper.make_node("MatMul", ["h", "S"], ["y"])]
    graph = helper.make_graph(
        nodes,
        "two",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 512])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 30])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(small, "S")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(BudgetError, match=r"removes at most [\d,]+ weights, [\d,]+ asked"):
        prune(model, remove_ratio=0.999, method="tt", latency_batch=0)
    prune(model, remove_ratio=0.3, method="tt", latency_batch=0)  # within what the one train removes


@pytest.mark.parametrize("ordering", ORDERINGS)
def test_tt_macs_counts_what_the_written_train_does(ordering):
    """The allocation's MAC count of a train is the count of the MatMuls `decompose_tt` writes, per input row."""
    from onnxprune.budget import count

    w = RNG.standard_normal((64, 96)).astype(np.float32)
    model = _layer("MatMul", {}, ["b", 64], w)
    graph = to_graph(model)
    found, _ = tt_layers(graph, min_weights=1)
    view = found[0].linear
    modes = tt_modes(*view.matrix.shape, ordering)
    layer = TTLayer(found[0].node, view, *modes, spectra=tt_svd(view.matrix, *modes)[1], ordering=ordering)
    ranks = tuple(max(1, r // 2) for r in layer.full_ranks)
    decompose_tt(graph, [layer], {layer.node: ranks})
    assert count(to_model(graph, model), shapes={"x": [1, 64]})[1] == tt_macs(ranks, *modes) == layer.macs(ranks)
    lookup = TTLayer("g", Linear(w, None, lookup=True), *modes, spectra=layer.spectra)
    assert lookup.macs(ranks) is None  # a lookup's dense layer does no MACs: not compared


def test_a_small_request_writes_no_train_that_does_more_macs_than_its_dense_layer():
    """A new user's 1024 -> 2048 layer at --ratio 0.05: bonds [128, 118] of the TT-matrix ordering did 241x the
    layer's MACs and ran 48x slower. Each train now stays at or under its dense layer's MACs, and the overshoot of
    the request is said."""
    w = (RNG.standard_normal((1024, 2048)) / 32).astype(np.float32)
    model = _layer("MatMul", {}, ["b", 1024], w)
    for ordering in ORDERINGS:
        modes = tt_modes(2048, 1024, ordering)
        matrix = w.T.astype(np.float64)
        layer = TTLayer("a", Linear(matrix, None), *modes, spectra=tt_svd(matrix, *modes)[1], ordering=ordering)
        ranks = allocate_bonds([layer], int(0.05 * w.size))["a"]
        assert layer.macs(ranks) <= w.size
    with pytest.raises(BudgetError, match=r"0\.05: reached .* no more MACs than its dense layer; nothing written"):
        prune(model, remove_ratio=0.05, method="tt", latency_batch=0)  # far past the request: refused, said why
    _, report = prune(model, remove_ratio=0.3, method="tt", latency_batch=0)
    f = report.facts
    assert f["macs_after"] <= f["macs_before"] and abs(f["params_removed"] - 0.3) <= 0.01


def test_method_tt_that_writes_no_train_times_nothing():
    """`--method tt --ratio 0` wrote no train and still said 'measured slower than the original' (timing noise)."""
    _, report = prune(_mlp(), remove_ratio=0.0, method="tt", latency_batch=1)
    assert report.counts.get("tensor_trains", 0) == 0 and "speed_check" not in report.facts
    _, report = prune(_mlp(), remove_ratio=0.3, method="tt", latency_batch=1)
    assert report.counts["tensor_trains"] > 0 and set(report.facts["speed_check"]) == {1, 32}


def test_an_overshoot_is_not_put_on_folding_that_removed_nothing():
    """At --ratio 0.01 every overshoot read 'folding BatchNorm and constants alone removes 0.000' (a new user's
    12544 x 64 layer, 88 % removed): folding explains it only when it removed about what was reached."""
    from onnxprune.pipeline import _check_ratio
    from onnxprune.result import Report

    facts = {"ratio_requested": 0.01, "ratio_achieved": 0.88, "ratio_free": 0.0, "target": "params"}
    with pytest.raises(BudgetError) as info:
        _check_ratio(Report(facts=dict(facts)), method="basis", latency_batch=1, round_to=1)
    assert "folding" not in str(info.value) and "87.0 points over" in str(info.value)
    report = Report(facts={**facts, "ratio_achieved": 0.05, "ratio_free": 0.05})
    _check_ratio(report, method="basis", latency_batch=1, round_to=1)
    assert "folding BatchNorm and constants alone removes 0.050" in report.facts["ratio_note"]
