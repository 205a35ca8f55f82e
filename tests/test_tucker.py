"""Tucker-2 form of split k x k convolutions (passes/tucker.py): exact where the layer has that form, and written
only where it is closer to the layer than the split it replaces."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from models import Builder

from onnxprune.passes.tucker import tucker_factors, tucker_rank
from onnxprune.pipeline import prune
from onnxprune.testing import ort_run, random_feeds


def _tucker_weight(co: int, ci: int, t: int, seed: int = 0) -> np.ndarray:
    """A [Co, Ci, 3, 3] weight of Tucker rank t in both channel modes (and matrix rank t)."""
    rng = np.random.default_rng(seed)
    u, g, p = rng.standard_normal((co, t)), rng.standard_normal((t, t, 3, 3)), rng.standard_normal((t, ci))
    return np.einsum("oa,abhw,bi->oihw", u, g, p) / np.sqrt(ci * 9)


def _one_conv(weight: np.ndarray, *, stride: int = 1) -> onnx.ModelProto:
    b = Builder(0)
    co, ci = weight.shape[:2]
    y = b.node(
        "Conv",
        ["x", b.const(weight), b.const(np.full(co, 0.1), "b")],
        kernel_shape=[3, 3],
        pads=[1] * 4,
        strides=[stride, stride],
    )
    return b.model([("x", [ci, 8, 8])], [y])


def test_the_tucker_rank_keeps_weights_within_the_split():
    assert tucker_rank(64, 64, 9, 1) == 3  # 3 * 64 + 81 + 3 * 64 = 465 <= 640 < 656 at 4
    for ci, co, r in [(64, 64, 1), (16, 16, 8), (32, 64, 5), (64, 128, 30)]:
        t = tucker_rank(ci, co, 9, r)
        assert t * ci + t * t * 9 + t * co <= r * (ci * 9 + co)
        assert (t + 1) * ci + (t + 1) ** 2 * 9 + (t + 1) * co > r * (ci * 9 + co) or t == min(ci, co)


@pytest.mark.parametrize("co, ci, t", [(8, 8, 8), (12, 12, 12), (8, 6, 4), (6, 9, 5)])
def test_tucker_factors_reproduce_a_weight_of_that_tucker_rank(co, ci, t):
    w = _tucker_weight(co, ci, t, seed=co + ci)
    p, core, u = tucker_factors(w, t)
    assert np.allclose(np.einsum("oa,ab...,bi->oi...", u, core, p), w)
    flat = core.reshape(len(core), -1)
    assert np.allclose(p @ p.T, np.eye(len(p))) and np.allclose(flat @ flat.T, np.eye(len(flat)))  # orthonormal


def test_a_layer_of_tucker_rank_t_is_written_exactly_where_the_split_cannot_be():
    """W of Tucker (and matrix) rank 3, 64 -> 64: at 95 % removed the split keeps rank 2 (not exact); its Tucker
    form at the same weights keeps rank >= 3, which is W: the model written computes the original's outputs."""
    model = _one_conv(_tucker_weight(64, 64, 3))
    out, report = prune(model, remove_ratio=0.95, method="basis")
    assert report.counts["tucker"] == 1
    ops = [n.op_type for n in out.graph.node]
    assert ops.count("Conv") == 3
    onnx.checker.check_model(out, full_check=True)
    for batch in (1, 3):  # dynamic batch kept
        feeds = random_feeds(model, batch=batch, seed=batch)
        want, got = ort_run(model, feeds), ort_run(out, feeds)
        for name in want:
            assert np.allclose(got[name], want[name], atol=1e-4 * np.abs(want[name]).max())
    plain, plain_report = prune(model, remove_ratio=0.95, method="basis", tucker=False)
    assert not plain_report.counts.get("tucker")
    assert plain_report.facts["params_after"] >= report.facts["params_after"]
    feeds = random_feeds(model, batch=2, seed=5)
    want, got = ort_run(model, feeds), ort_run(plain, feeds)
    error = max(np.abs(got[k] - want[k]).max() / np.abs(want[k]).max() for k in want)
    assert error > 0.05  # the rank-2 split is not the layer: the test would not tell the two apart otherwise


def test_a_strided_layer_stays_split():
    """Its projection would run at the input's resolution (4x the MACs of its weights at stride 2)."""
    out, report = prune(_one_conv(_tucker_weight(64, 16, 3), stride=2), remove_ratio=0.9, method="basis")
    assert not report.counts.get("tucker") and [n.op_type for n in out.graph.node].count("Conv") == 2


def test_a_split_closer_to_the_layer_is_kept_as_it_is():
    """A weight of matrix rank 2 whose channel modes are full: the rank-2 split is exact, a Tucker form of that
    weight count is not, so the split stays."""
    rng = np.random.default_rng(2)
    w = (rng.standard_normal((64, 2)) @ rng.standard_normal((2, 64 * 9))).reshape(64, 64, 3, 3) / 24
    out, report = prune(_one_conv(w), remove_ratio=0.95, method="basis")
    assert not report.counts.get("tucker") and [n.op_type for n in out.graph.node].count("Conv") == 2


def test_the_report_names_the_projection_and_the_ranks_written():
    model = _one_conv(_tucker_weight(64, 64, 3))
    _, report = prune(model, remove_ratio=0.95, method="basis")
    doc = report.to_dict("in.onnx", "out.onnx")
    layers = {entry["name"]: entry for entry in doc["layers"]}
    projection = next(e for e in layers.values() if e.get("op") == "projection")
    basis = next(e for e in layers.values() if e.get("op") == "basis")
    t = projection["rank"]
    assert t >= 3 and projection["after"] == [t, 64, 1, 1] and basis["rank"] == t and basis["after"] == [t, t, 3, 3]
    assert projection["split_from"]["name"] == basis["split_from"]["name"]


@pytest.mark.parametrize(
    "co, ci, kernel", [(48, 32, (3, 3)), (32, 48, (5, 5)), (40, 40, (3,)), (36, 24, (3, 1))], ids=str
)
def test_the_rewrite_computes_its_factors_product(co, ci, kernel):
    """Whatever the shapes (Ci != Co, 1-D, 5 x 5, 3 x 1 kernels): the projection, core and scaling written compute the
    Conv whose weight is U G P, with the layer's bias, pads and dilations (a dense Conv built from the factors read
    back from the written model)."""
    rng = np.random.default_rng(co + ci)
    t = 3
    u, g, p = rng.standard_normal((co, t)), rng.standard_normal((t, t, *kernel)), rng.standard_normal((t, ci))
    w = np.einsum("oa,ab...,bi->oi...", u, g, p) + 0.01 * rng.standard_normal((co, ci, *kernel))
    pads = [k // 2 for k in kernel] * 2
    b = Builder(0)
    dilations = [2] + [1] * (len(kernel) - 1)
    y = b.node("Conv", ["x", b.const(w), b.const(np.full(co, 0.1), "b")], pads=pads, dilations=dilations)
    model = b.model([("x", [ci] + [9] * len(kernel))], [y])
    out, report = prune(model, remove_ratio=0.9, method="basis")
    assert report.counts["tucker"] == 1
    onnx.checker.check_model(out, full_check=True)
    weights = {t.name: onnx.numpy_helper.to_array(t).astype(np.float64) for t in out.graph.initializer}
    convs = [n for n in out.graph.node if n.op_type == "Conv"]
    assert len(convs) == 3 and convs[0].name.endswith("_projection")
    first, core, scaling = (weights[n.input[1]] for n in convs)
    product = np.einsum("oa...,ab...,bi...->oi...", scaling, core, first)
    dense = Builder(0)
    bias = weights[convs[2].input[2]] if len(convs[2].input) > 2 else np.zeros(co)
    z = dense.node("Conv", ["x", dense.const(product), dense.const(bias, "b")], pads=pads, dilations=dilations)
    expected = dense.model([("x", [ci] + [9] * len(kernel))], [z])
    feeds = random_feeds(model, batch=2, seed=3)
    got, want = ort_run(out, feeds), ort_run(expected, feeds)
    assert np.allclose(next(iter(got.values())), next(iter(want.values())), atol=1e-4)


@pytest.mark.parametrize("faster", [True, False])
def test_under_a_latency_budget_a_layer_is_rewritten_only_where_its_chain_times_no_slower(monkeypatch, faster):
    """The plan was timed with the splits; one more kernel can make the model slower (the handed digits at 0.9:
    0.64x at batch 1 with every layer rewritten). With a latency batch each rewrite is timed against its split."""
    from onnxprune import pipeline

    asked = []
    monkeypatch.setattr(pipeline, "layer_latency", lambda *, ranks, **kw: (1.0, {r: 0.1 for r in ranks}))
    monkeypatch.setattr(pipeline, "compare_latency", lambda a, b, feeds, **kw: (1.0, 0.5))
    monkeypatch.setattr(pipeline, "tucker_no_slower", lambda **kw: asked.append(kw) or faster)
    model = _one_conv(_tucker_weight(64, 64, 3))
    _, report = prune(model, remove_ratio=0.95, method="basis", latency_batch=1)
    assert len(asked) == 1 and asked[0]["x_shape"] == [1, 64, 8, 8] and asked[0]["weight_shape"] == [64, 64, 3, 3]
    assert asked[0]["t"] > asked[0]["rank"]
    assert report.counts.get("tucker", 0) == int(faster) and report.counts.get("tucker_slower", 0) == int(not faster)
    _, free = prune(model, remove_ratio=0.95, method="basis", latency_batch=0)  # planned by parameters: not asked
    assert len(asked) == 1 and free.counts["tucker"] == 1


def test_the_chain_timing_runs_and_is_remembered(tmp_path, monkeypatch):
    from onnxprune import latency

    monkeypatch.setenv(latency.CACHE_ENV, str(tmp_path / "cache.json"))
    args = dict(x_shape=[1, 16, 8, 8], weight_shape=[16, 16, 3, 3], attrs={"pads": [1, 1, 1, 1]}, rank=2, t=4)
    first = latency.tucker_no_slower(**args)
    monkeypatch.setattr(latency, "_time", lambda *a, **k: pytest.fail("timed again"))
    assert latency.tucker_no_slower(**args) == first
