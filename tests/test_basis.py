"""decompose_basis: full rank is exact, filters are orthonormal, basis errors add up, merge-back, pre-split models."""

from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from light_zoo import load
from models import ZOO, Builder, chain, flatten_gemm

from onnxprune import decompose
from onnxprune.graph import to_graph
from onnxprune.passes.basis import decompose_basis, find_basis_pairs, merge_unprofitable
from onnxprune.passes.cleanup import cleanup
from onnxprune.passes.groups import find_channel_groups
from onnxprune.passes.remove import remove_channels
from onnxprune.pipeline import prune
from onnxprune.rules import const
from onnxprune.testing import apply_pass, assert_outputs_close, mask_channels, ort_run, random_feeds

EXAMPLE = Path(__file__).parent.parent / "examples" / "digits_resnet.onnx"


def _relative_close(actual, expected, bound):
    for name, want in expected.items():
        err = np.abs(actual[name] - want).max() / (np.abs(want).max() + 1e-12)
        assert err <= bound, f"output {name!r}: relative error {err:.2e} > {bound}"


@pytest.mark.parametrize("build", ZOO, ids=lambda b: b.__name__)
def test_full_rank_split_is_exact(build):
    model = apply_pass(build(), cleanup)[0]
    split, report = apply_pass(model, decompose_basis, min_channels=2)
    assert report.counts["decomposed"] > 0
    onnx.checker.check_model(split, full_check=True)
    for batch in (1, 3):
        feeds = random_feeds(model, batch=batch, seed=batch)
        # SVD round trip in float32: relative error 1e-4 of the output scale
        _relative_close(ort_run(split, feeds), ort_run(model, feeds), 1e-4)


@pytest.mark.parametrize("name", ["squeezenet", "resnet50", "inception_v1", "densenet121"])
def test_full_rank_split_is_exact_on_real_architectures(name):
    model = load(name)
    split, report = decompose(model)
    assert report.counts["decomposed"] > 10
    feeds = random_feeds(model, batch=1)
    _relative_close(ort_run(split, feeds), ort_run(model, feeds), 1e-4)


def test_basis_filters_are_orthonormal():
    graph = to_graph(apply_pass(chain(), cleanup)[0])
    decompose_basis(graph, min_channels=2)
    pairs = find_basis_pairs(graph)
    assert len(pairs) == 4
    nodes = {n.name: n for n in graph.nodes}
    for pair in pairs:
        w = const(nodes[pair.basis].inputs[1]).astype(np.float64)
        rows = w.reshape(w.shape[0], -1) if w.ndim > 2 else w.T
        np.testing.assert_allclose(rows @ rows.T, np.eye(len(rows)), atol=1e-5)


def _single_conv():
    b = Builder(30)
    y = b.conv("x", 6, 10, 3)
    return b.model([("x", [6, 7, 7])], [y])


def _with_output(model, name):
    model = onnx.ModelProto.FromString(model.SerializeToString())
    model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return model


def test_removed_basis_errors_add_exactly():
    """E||dy||^2 of removing a set of bases equals sum_k s_k^2 E[z_k^2] (the u_k are orthonormal)."""
    model = _single_conv()
    split, _ = apply_pass(model, decompose_basis, min_channels=2)
    graph = to_graph(split)
    (pair,) = find_basis_pairs(graph)
    nodes = {n.name: n for n in graph.nodes}
    s = np.linalg.norm(const(nodes[pair.scaling].inputs[1]).reshape(10, -1).astype(np.float64), axis=0)
    feeds = random_feeds(model, batch=4, seed=3)
    z = ort_run(_with_output(split, pair.mid), feeds)[pair.mid].astype(np.float64)
    y = ort_run(model, feeds)[model.graph.output[0].name].astype(np.float64)
    group = find_channel_groups(graph).groups[0]
    errors = []
    for removed in ([0], [3, 7], [1, 2, 5, 9]):
        keep = np.setdiff1d(np.arange(len(s)), removed)
        pruned, _ = apply_pass(split, remove_channels, plan={group.name: keep})
        got = ort_run(pruned, feeds)[model.graph.output[0].name].astype(np.float64)
        measured = np.sum((got - y) ** 2)
        predicted = np.sum(s[removed] ** 2 * np.sum(z[:, removed] ** 2, axis=(0, 2, 3)))
        np.testing.assert_allclose(measured, predicted, rtol=1e-4)
        errors.append(measured)


def test_error_grows_as_rank_drops():
    model = _single_conv()
    split, _ = apply_pass(model, decompose_basis, min_channels=2)
    group = find_channel_groups(to_graph(split)).groups[0]
    feeds = random_feeds(model, batch=2, seed=1)
    y = ort_run(model, feeds)[model.graph.output[0].name]
    errors = []
    for rank in range(10, 0, -1):
        pruned, _ = apply_pass(split, remove_channels, plan={group.name: np.arange(rank)})
        errors.append(float(np.sum((ort_run(pruned, feeds)[model.graph.output[0].name] - y) ** 2)))
    assert errors[0] < 1e-6
    assert all(b >= a for a, b in zip(errors, errors[1:]))


def test_bases_removed_equal_masked():
    model = apply_pass(flatten_gemm(), cleanup)[0]
    split, _ = apply_pass(model, decompose_basis, min_channels=2)
    graph = to_graph(split)
    analysis = find_channel_groups(graph)
    pairs = {p.basis for p in find_basis_pairs(graph)}
    plan = {g.name: np.arange(0, len(g.classes), 2) for g in analysis.groups if g.producers[0] in pairs}
    assert len(plan) == 4
    pruned, _ = apply_pass(split, remove_channels, plan=plan)
    feeds = random_feeds(model, batch=3)
    assert_outputs_close(ort_run(pruned, feeds), ort_run(mask_channels(split, plan), feeds), rtol=1e-4, atol=1e-5)


def test_few_bases_removed_merge_back_into_one_conv():
    model = _single_conv()
    split, _ = apply_pass(model, decompose_basis, min_channels=2)
    group = find_channel_groups(to_graph(split)).groups[0]
    pruned, _ = apply_pass(split, remove_channels, plan={group.name: np.arange(9)})
    merged, report = apply_pass(pruned, merge_unprofitable)
    assert report.counts["merged_back"] == 1
    assert [n.op_type for n in merged.graph.node] == ["Conv"]
    feeds = random_feeds(model, batch=2)
    _relative_close(ort_run(merged, feeds), ort_run(pruned, feeds), 1e-5)
    deep, _ = apply_pass(split, remove_channels, plan={group.name: np.arange(2)})
    kept, report = apply_pass(deep, merge_unprofitable)
    assert not report.counts and len(kept.graph.node) == 2


@pytest.mark.parametrize("method", ["basis", "auto", "double", "channel"])
def test_methods_reach_the_target_and_never_grow_a_layer(method):
    model = onnx.load(EXAMPLE)
    pruned, report = prune(model, remove_ratio=0.5, method=method)
    assert abs(report.facts["params_removed"] - 0.5) <= 0.01
    onnx.checker.check_model(pruned, full_check=True)
    largest = max(np.prod(t.dims) for t in model.graph.initializer)
    assert max(np.prod(t.dims) for t in pruned.graph.initializer) <= largest
    feeds = random_feeds(model, batch=3)
    assert ort_run(pruned, feeds)["logits"].shape == (3, 10)


@pytest.mark.parametrize("method", ["double", "auto"])
def test_two_stage_methods_refit_on_the_channels_every_stage_kept(method):
    """The basis stage's refit reads the original's tensors at the channels the channel stage kept.

    `double` with calibration data crashed in the refit (targets of 96 channels against a pruned sum of 59).
    """
    model = onnx.load(EXAMPLE)
    calib = {"image": np.load(EXAMPLE.parent / "digits_calib.npy")[:96]}
    pruned, report = prune(model, remove_ratio=0.5, method=method, calib=calib)
    assert report.counts["refitted"] > 0 and report.counts["refit_residual_sums"] > 0
    assert abs(report.facts["params_removed"] - 0.5) <= 0.01
    onnx.checker.check_model(pruned, full_check=True)
    assert ort_run(pruned, random_feeds(model, batch=3))["logits"].shape == (3, 10)


def test_pre_split_model_is_pruned_in_place():
    split, _ = decompose(onnx.load(EXAMPLE))
    graph = to_graph(split)
    for node in graph.nodes:  # as if the scaling factors were trained after export
        if node.name.endswith("_scaling"):
            w = const(node.inputs[1])
            node.inputs[1].values = (w * np.random.default_rng(0).uniform(0.5, 1.5, w.shape)).astype(w.dtype)
    trained = gs.export_onnx(graph)
    pruned, report = prune(trained, remove_ratio=0.3, method="basis")
    assert report.counts.get("decomposed", 0) == 0
    assert not any("_basis_basis" in n.name for n in pruned.graph.node)
    assert abs(report.facts["params_removed"] - 0.3) <= 0.01


@pytest.mark.parametrize("method", ["basis", "channel"])
def test_round_to_keeps_multiples(method):
    model = onnx.load(EXAMPLE)
    before = {tuple(t.dims) for t in model.graph.initializer}
    pruned, report = prune(model, remove_ratio=0.5, method=method, round_to=8)
    assert report.facts["params_removed"] >= 0.5 - 1e-9
    for t in pruned.graph.initializer:
        if len(t.dims) == 4 and tuple(t.dims) not in before:
            assert all(d % 8 == 0 for d in t.dims[:2] if d > 1), f"{t.name}: {list(t.dims)}"


def test_rounded_allocation_gives_back_whole_steps_while_the_request_holds():
    """Rounding up per group can overshoot by a wide group's step; steps go back, most harmful first, in multiples."""
    from types import SimpleNamespace

    from onnxprune.budget import _Rounding

    groups = [SimpleNamespace(classes=np.arange(a, b), unit="channel") for a, b in ((0, 16), (16, 48), (48, 80))]
    cost = np.r_[np.full(16, 10.0), np.ones(64)]  # group 0: 8 classes are 80 of 224; groups 1, 2: 8 classes are 8
    order = np.r_[np.arange(8), np.arange(16, 32), np.arange(48, 64)]  # each group loses its first half, in order
    rounding = _Rounding(SimpleNamespace(n_classes=80, groups=groups), order, 8)
    alive = np.ones(80, dtype=bool)
    alive[order] = False
    ratio_of = lambda a: float(cost[~a].sum() / cost.sum())  # noqa: E731
    harm = np.r_[np.ones(16), np.full(32, 2.0), np.ones(32)]  # group 1's removals cost more than group 2's
    ratio, given = rounding.give_back(alive, ratio_of(alive), 0.40, ratio_of, harm)
    assert ratio_of(alive) == pytest.approx(0.5) and ratio == pytest.approx(96 / 224) and ratio >= 0.40
    assert np.array_equal(np.flatnonzero(~given), np.r_[np.arange(8), np.arange(48, 64)])  # group 1 given back whole
    for g in groups:
        assert int(given[g.classes].sum()) % 8 == 0


def test_rounded_allocation_ranks_a_step_by_its_mean_harm_not_its_costliest_class():
    from onnxprune.budget import _stepped

    score = np.array([5.0, 0.1, 9.0, 0.2, 0.3, 4.0])  # ascending: 0.1 0.2 | 0.3 4 | 5 9
    saving = np.array([1.0, 1.0, 1.0, 1.0, 3.0, 1.0])
    got = _stepped(score, saving, 2)
    assert got[[1, 3]] == pytest.approx([0.15, 0.15])
    assert got[[4, 5]] == pytest.approx([(0.3 * 3 + 4.0) / 4] * 2)
    assert got[[0, 2]] == pytest.approx([7.0, 7.0])
    assert np.all(np.diff(got[np.argsort(score, kind="stable")]) >= 0)  # the group's own order stays


def test_conv_transpose_split_prune_and_merge_back():
    """ConvTranspose W[Ci, Co, k, k] splits as the matrix [Co, Ci*k*k]: a ConvTranspose to r channels (same strides,
    pads) and a 1x1 Conv. Full rank is exact, pruning bases is removal on the edge between, merging back is exact."""
    from models import features_to_channels

    from onnxprune.testing import every_other_channel

    model = apply_pass(features_to_channels(), cleanup)[0]
    split, report = apply_pass(model, decompose_basis, min_channels=2)
    ops = {n.name: n.op_type for n in split.graph.node}
    pairs = find_basis_pairs(to_graph(split))
    transposed = [p for p in pairs if ops[p.basis] == "ConvTranspose"]
    assert len(transposed) == 2 and all(ops[p.scaling] == "Conv" for p in transposed)
    feeds = random_feeds(model, batch=3, seed=3)
    _relative_close(ort_run(split, feeds), ort_run(model, feeds), 1e-4)
    analysis = find_channel_groups(to_graph(split))
    plan = {k: v for k, v in every_other_channel(analysis).items() if k in {p.basis for p in transposed}}
    assert len(plan) == 2
    pruned, _ = apply_pass(split, remove_channels, plan=plan)
    assert_outputs_close(ort_run(pruned, feeds), ort_run(mask_channels(split, plan), feeds), rtol=1e-4, atol=1e-5)
    merged, report = apply_pass(pruned, merge_unprofitable, pairs=pairs, limits={p.basis: 0 for p in pairs})
    assert report.counts["merged_back"] == len(pairs)
    assert not any("_basis" in n.name for n in merged.graph.node)
    _relative_close(ort_run(merged, feeds), ort_run(pruned, feeds), 1e-4)


def test_conv_transpose_macs_are_weights_times_input_positions():
    from onnxprune.budget import count

    b = Builder(3)
    w = b.const(np.ones((4, 6, 4, 4), np.float32))
    y = b.node("ConvTranspose", ["x", w], strides=[2, 2], pads=[1, 1, 1, 1])
    model = b.model([("x", [4, 5, 5])], [y])
    params, macs = count(model)
    assert params == 4 * 6 * 16
    assert macs == 4 * 6 * 16 * 5 * 5  # each input position meets every weight once; not the 10x10 output positions


@pytest.mark.parametrize("shape", [(2100, 2000), (2000, 2100)], ids=["tall", "wide"])
def test_thin_svd_of_a_large_matrix_through_its_gram_matrix(shape):
    """The Gram path (matrices past GRAM_SVD_MIN_SIZE) gives what the dense SVD gives: spectrum, exact product,
    orthonormal factors; a matrix with a near-null direction goes to the dense SVD instead."""
    from onnxprune.passes.basis import GRAM_SVD_MIN_SIZE, thin_svd

    assert shape[0] * shape[1] >= GRAM_SVD_MIN_SIZE
    rng = np.random.default_rng(0)
    w = rng.standard_normal(shape) * np.logspace(0, -3, shape[1])  # a decaying spectrum, as trained layers have
    u, s, vt = thin_svd(w)
    r = min(shape)
    assert u.shape == (shape[0], r) and s.shape == (r,) and vt.shape == (r, shape[1])
    np.testing.assert_allclose(s, np.linalg.svd(w, compute_uv=False), rtol=1e-8, atol=1e-12 * s[0])
    np.testing.assert_allclose((u * s) @ vt, w, atol=1e-10 * np.abs(w).max())
    np.testing.assert_allclose(vt @ vt.T, np.eye(r), atol=1e-6)
    np.testing.assert_allclose(u.T @ u, np.eye(r), atol=1e-8)
    w[:, 0] = w[:, 1]  # rank deficient: the Gram path would lose orthonormality, the dense SVD is used
    u, s, vt = thin_svd(w)
    np.testing.assert_allclose(vt @ vt.T, np.eye(r), atol=1e-8)
    np.testing.assert_allclose((u * s) @ vt, w, atol=1e-10 * np.abs(w).max())


def test_a_quantized_model_is_refused_naming_its_integer_layers(tmp_path):
    """onnxruntime's dynamic quantization turns every Gemm/MatMul into MatMulInteger: nothing is left to split or
    remove, and the refusal says why (a new user got "0 groups blocked" and four suggestions that could not help)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from onnxprune.errors import BudgetError

    source, quantized = tmp_path / "f.onnx", tmp_path / "q.onnx"
    onnx.save(flatten_gemm(), source)
    quantize_dynamic(str(source), str(quantized), weight_type=QuantType.QInt8)
    assert {"MatMulInteger"} <= {n.op_type for n in onnx.load(quantized).graph.node}
    with pytest.raises(BudgetError, match="quantized layers .* not pruned: prune the float model") as e:
        prune(onnx.load(quantized), remove_ratio=0.3, latency_batch=0)
    assert "--calib would" not in str(e.value)
    with pytest.raises(BudgetError, match="quantized layers .* not pruned"):
        prune(onnx.load(quantized), remove_ratio=0.3, latency_batch=0, method="channel")
    calib = random_feeds(flatten_gemm(), batch=64, seed=1)  # with data (it said "'energy' needs calibration data")
    with pytest.raises(BudgetError, match="quantized layers .* not pruned"):
        prune(onnx.load(quantized), remove_ratio=0.3, latency_batch=0, calib=calib)
    with pytest.raises(BudgetError, match="quantized layers .* not pruned") as e:  # both ways tried: no ratio helps
        prune(onnx.load(quantized), remove_ratio=0.3, calib=calib)
    assert "lower --ratio" not in str(e.value)
    from onnxprune.pipeline import _neither  # a recogniser's quantized twin: both ways tried, neither removes a thing

    none = _neither(BudgetError("basis: nothing", reachable=0.0), [BudgetError("channel", reachable=0.0)], 1)
    assert "reaches at most 0.000" in str(none) and "lower --ratio" not in str(none)
    some = _neither(BudgetError("basis: short", reachable=0.2), [BudgetError("channel", reachable=0.1)], 1)
    assert str(some).endswith("; lower --ratio or --latency-batch 0")


def test_a_pair_merged_back_uncut_is_the_layer_it_was_split_from_bit_for_bit():
    """A split layer left at full rank comes back with its own weights, not their SVD product (which differs in the
    last bits); one with a basis removed keeps the product."""
    graph = to_graph(onnx.load(EXAMPLE))
    cleanup(graph)
    convs = [n for n in graph.nodes if n.op == "Conv"]
    before = {n.outputs[0].name: (n.op, dict(n.attrs), const(n.inputs[1]).copy()) for n in convs}
    pairs = decompose_basis(graph, min_channels=2).report.facts["pairs"]
    group = next(g for g in find_channel_groups(graph).groups if g.name == pairs[1].basis)
    remove_channels(graph, plan={group.name: np.arange(len(group.classes) - 1)})  # one basis of the second pair
    report = merge_unprofitable(graph, pairs=pairs, limits={p.basis: 0 for p in pairs}).report
    assert report.counts["merged_back"] == len(pairs)
    convs = {n.outputs[0].name: n for n in graph.nodes if n.op == "Conv"}
    cut = next(n for n in graph.nodes if n.inputs and n.name == pairs[1].basis.removesuffix("_basis"))
    for name, (op, attrs, weight) in before.items():
        node = convs[name]
        if node is cut:
            assert not np.array_equal(const(node.inputs[1]), weight)
        else:
            assert node.op == op and node.attrs == attrs and np.array_equal(const(node.inputs[1]), weight)


def test_a_layer_split_again_reuses_its_factors(monkeypatch):
    """A guard's retries split the same weights again: the SVD runs once, and the split is the same."""
    from onnxprune.passes import basis

    calls = []
    real = basis.thin_svd
    monkeypatch.setattr(basis, "thin_svd", lambda m: calls.append(m.shape) or real(m))
    monkeypatch.setattr(basis, "_FACTORS", type(basis._FACTORS)())
    model = _single_conv()
    first, _ = apply_pass(model, decompose_basis, min_channels=2)
    second, _ = apply_pass(model, decompose_basis, min_channels=2)
    assert len(calls) == 1
    for a, b in zip(first.graph.initializer, second.graph.initializer, strict=True):
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(a), onnx.numpy_helper.to_array(b))
    monkeypatch.setattr(basis, "FACTORS_REMEMBERED_BYTES", 0)  # nothing fits: split anew each time
    monkeypatch.setattr(basis, "_FACTORS", type(basis._FACTORS)())
    apply_pass(model, decompose_basis, min_channels=2)
    apply_pass(model, decompose_basis, min_channels=2)
    assert len(calls) == 3


def test_blocked_groups_are_named_by_the_model_s_own_layers():
    """The classifier's last layer, split, was reported blocked as '/fc/Gemm_scaling', a node neither the input nor
    the written model holds: it is named '/fc/Gemm'."""
    _, report = prune(onnx.load(EXAMPLE), remove_ratio=0.5, method="basis", latency_batch=0)
    blocked = report.facts["blocked"]
    assert "/fc/Gemm" in blocked and "reaches graph output" in blocked["/fc/Gemm"]
    assert not [name for name in blocked if "_scaling" in name or "_basis" in name]
