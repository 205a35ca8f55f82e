"""Property-based: random graphs built from the op table's blocks; every rewrite is checked numerically."""

import numpy as np
import onnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from models import Builder

from onnxprune.graph import to_graph
from onnxprune.passes.basis import decompose_basis
from onnxprune.passes.cleanup import cleanup
from onnxprune.passes.groups import find_channel_groups
from onnxprune.passes.remove import remove_channels
from onnxprune.testing import apply_pass, assert_outputs_close, mask_channels, ort_run, random_feeds

BLOCKS = ["cbr", "residual", "concat", "depthwise", "se", "sigmoid", "split"]
width = st.integers(min_value=3, max_value=10)


def _block(b, kind, x, c, w):
    """Append one block to x (c channels); returns (tensor, channels)."""
    if kind == "cbr":
        return b.cbr(x, c, w), w
    if kind == "residual":
        y = b.bn(b.conv(b.cbr(x, c, w), w, c, bias=False), c)
        return b.relu(b.node("Add", [x, y])), c
    if kind == "concat":
        return b.node("Concat", [b.cbr(x, c, w, 1), b.cbr(x, c, 3, 3)], axis=1), w + 3
    if kind == "depthwise":
        return b.relu(b.bn(b.conv(x, c, c, 3, group=c, bias=False), c)), c
    if kind == "se":
        g = b.node("Sigmoid", [b.conv(b.relu(b.conv(b.node("GlobalAveragePool", [x]), c, 2, 1)), 2, c, 1)])
        return b.node("Mul", [x, g]), c
    if kind == "sigmoid":
        return b.node("Sigmoid", [b.conv(x, c, w, 1)]), w
    p, q = b.node("Split", [x, b.const(np.array([1, c - 1], np.int64), "s")], n_out=2, axis=1)
    return b.node("Concat", [b.relu(b.conv(q, c - 1, w, 1)), p], axis=1), w + 1


@st.composite
def graphs(draw):
    b = Builder(draw(st.integers(0, 2**16)))
    c = draw(width)
    x = b.cbr("x", 3, c)
    for kind in draw(st.lists(st.sampled_from(BLOCKS), min_size=1, max_size=4)):
        x, c = _block(b, kind, x, c, draw(width))
    if draw(st.booleans()):
        out = b.head(x, c, 4)
    else:
        out = b.gemm(b.node("Flatten", [b.node("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])]), c * 16, 4)
    return b.model([("x", [3, 8, 8])], [out])


def _plan(analysis, seed):
    """Remove ~40 % of the removable channels at random, but leave every tracked tensor at least one channel."""
    rng = np.random.default_rng(seed)
    alive = np.ones(analysis.n_classes, dtype=bool)
    for group in analysis.groups:
        for cls in group.classes:
            if cls not in group.blocked and rng.random() < 0.4:
                alive[cls] = False
    for name in analysis.flows:
        classes = analysis.classes(name)
        if not alive[classes].any():
            alive[classes[0]] = True
    plan = {}
    for group in analysis.groups:
        keep = np.flatnonzero(alive[group.classes])
        if len(keep) < len(group.classes):
            plan[group.name] = keep
    return plan


SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(graphs(), st.integers(0, 1000))
def test_remove_equals_mask_on_random_graphs(model, seed):
    model = apply_pass(model, cleanup)[0]
    plan = _plan(find_channel_groups(to_graph(model)), seed)
    pruned, _ = apply_pass(model, remove_channels, plan=plan)
    onnx.checker.check_model(pruned, full_check=True)
    reference = mask_channels(model, plan)
    for batch in (1, 3):
        feeds = random_feeds(model, batch=batch, seed=seed)
        assert_outputs_close(ort_run(pruned, feeds), ort_run(reference, feeds), rtol=1e-4, atol=1e-5)


@SETTINGS
@given(graphs())
def test_full_rank_split_equals_original_on_random_graphs(model):
    split, _ = apply_pass(model, decompose_basis, min_channels=2)
    onnx.checker.check_model(split, full_check=True)
    for batch in (1, 3):
        feeds = random_feeds(model, batch=batch)
        want, got = ort_run(model, feeds), ort_run(split, feeds)
        for name, value in want.items():
            err = np.abs(got[name] - value).max() / (np.abs(value).max() + 1e-12)
            assert err <= 1e-4, f"{name}: relative error {err:.2e}"
