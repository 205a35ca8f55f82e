"""Data-aware bases: whitened split is exact at full rank and beats plain SVD at equal rank; streamed stats."""

import numpy as np
import onnx_graphsurgeon as gs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from models import Builder

from onnxprune.calibration.runner import channel_statistics, patch_covariances
from onnxprune.graph import to_graph
from onnxprune.passes.basis import decompose_basis, whitenable
from onnxprune.passes.groups import find_channel_groups
from onnxprune.passes.remove import remove_channels
from onnxprune.rules.layouts import im2col, layout_of
from onnxprune.testing import apply_pass, ort_run


def _conv3x3():
    b = Builder(70)
    return b.model([("x", [6, 6, 6])], [b.conv("x", 6, 12, 3)])


def _correlated(n, seed):
    mixing = np.random.default_rng(100).standard_normal((6, 6)) * np.array([3.0, 1.0, 0.3, 0.1, 0.03, 0.01])
    x = np.einsum("ij,njhw->nihw", mixing, np.random.default_rng(seed).standard_normal((n, 6, 6, 6)))
    return {"x": x.astype(np.float32)}


def _truncated_error(model, covariances, data, rank):
    split, report = apply_pass(model, decompose_basis, min_channels=2, covariances=covariances)
    group = find_channel_groups(to_graph(split)).groups[0]
    pruned, _ = apply_pass(split, remove_channels, plan={group.name: np.arange(rank)})
    out = model.graph.output[0].name
    return float(np.sum((ort_run(pruned, data)[out] - ort_run(model, data)[out]) ** 2)), report


def test_whitened_full_rank_split_is_exact():
    model, data = _conv3x3(), _correlated(16, 0)
    cov = patch_covariances(model, data, whitenable(to_graph(model), 2))
    assert set(cov) == {"conv3"}
    split, report = apply_pass(model, decompose_basis, min_channels=2, covariances=cov)
    assert report.counts["whitened"] == 1
    out = model.graph.output[0].name
    want = ort_run(model, data)[out]
    assert np.abs(ort_run(split, data)[out] - want).max() <= 1e-4 * np.abs(want).max()


def test_whitened_basis_beats_plain_svd_at_equal_rank():
    model, data = _conv3x3(), _correlated(32, 1)
    cov = patch_covariances(model, data, whitenable(to_graph(model), 2))
    for rank in (2, 4, 8):
        plain, _ = _truncated_error(model, None, data, rank)
        whitened, _ = _truncated_error(model, cov, data, rank)
        assert whitened < plain, f"rank {rank}: whitened {whitened:.4g} >= plain {plain:.4g}"


@pytest.mark.parametrize("in_session", [True, False], ids=["reduced-in-session", "whole-tensors"])
def test_streamed_statistics_equal_the_batch_computation(in_session, monkeypatch):
    """Channel energies and pooled features, reduced inside the onnxruntime session or from the whole tensors
    (the fallback for tensors of unknown rank or type), equal the computation on all samples at once."""
    from onnxprune.calibration import runner

    if not in_session:
        monkeypatch.setattr(runner, "REDUCED_TYPES", ())
    model, data = _conv3x3(), _correlated(20, 2)
    assert bool(runner._with_reductions(model, {model.graph.output[0].name: 1}, True)[1]) == in_session
    x = data["x"].astype(np.float64)
    patches = im2col(x, [3, 3], strides=[1, 1], pads=[1, 1, 1, 1], dilations=[1, 1])
    full_cov = patches.T @ patches / len(patches)
    out = model.graph.output[0].name
    y = ort_run(model, data)[out].astype(np.float64)
    full_energy = np.mean(np.moveaxis(y, 1, -1).reshape(-1, 12) ** 2, axis=0)
    full_pooled = y.mean(axis=(2, 3))
    for batch in (1, 3, 7, 20):
        np.testing.assert_allclose(
            patch_covariances(model, data, whitenable(to_graph(model), 2), batch_size=batch)["conv3"],
            full_cov,
            rtol=1e-6,
            atol=1e-9,
        )
        energy, pooled = channel_statistics(model, data, {out: 1}, pooled=True, batch_size=batch)
        np.testing.assert_allclose(energy[out], full_energy, rtol=1e-5)
        alone, nothing = channel_statistics(model, data, {out: 1}, batch_size=batch)  # float32 sums per batch
        np.testing.assert_allclose(alone[out], full_energy, rtol=1e-5)
        assert nothing == {}
        np.testing.assert_allclose(pooled[out], full_pooled, rtol=1e-5, atol=1e-6)


@given(
    kernel=st.sampled_from([(1, 1), (3, 3), (2, 3), (5, 1)]),
    stride=st.integers(1, 3),
    pad=st.integers(0, 2),
    dilation=st.integers(1, 2),
    seed=st.integers(0, 1000),
)
@settings(max_examples=30, deadline=None)
def test_patches_at_picked_positions_equal_the_full_im2col_rows(kernel, stride, pad, dilation, seed):
    """The refit computes only the sub-sampled patch rows: they are the full im2col's rows at those positions, and
    `Rows.count` is its row count."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((3, 4, 9, 8)).astype(np.float32)
    geometry = {"strides": [stride, stride], "pads": [pad, 0, pad, 1], "dilations": [dilation, dilation]}
    full = im2col(x, list(kernel), **geometry)
    pick = rng.choice(len(full), min(len(full), 17), replace=False)
    np.testing.assert_array_equal(im2col(x, list(kernel), **geometry, pick=pick), full[pick])
    w = rng.standard_normal((5, 4, *kernel)).astype(np.float32)
    attrs = {"kernel_shape": list(kernel), **geometry}
    node = gs.Node("Conv", "conv", attrs=attrs, inputs=[gs.Variable("x"), gs.Constant("w", w)])
    rows = layout_of(node).patches(node)
    assert rows.count(x) == len(full)
    np.testing.assert_array_equal(rows(x, pick), full[pick].astype(np.float64))
