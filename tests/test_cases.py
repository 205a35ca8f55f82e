"""The graphs handed to the project (../shared/cases/graphs): each one pruned as a user would, removal == masking.

Skipped cleanly where that folder is absent; every pattern also has a generated variant in `models.py` (ZOO).
"""

import os
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxprune import BudgetError, decompose
from onnxprune.graph import to_graph
from onnxprune.passes.cleanup import cleanup
from onnxprune.passes.groups import find_channel_groups
from onnxprune.passes.remove import remove_channels
from onnxprune.pipeline import prune
from onnxprune.testing import (
    apply_pass,
    assert_outputs_close,
    every_other_channel,
    mask_channels,
    ort_run,
    random_feeds,
)

CASES = Path(os.environ.get("ONNXPRUNE_CASES", Path(__file__).parent.parent.parent / "shared" / "cases")) / "graphs"

# per file: the producers that must be prunable (removal == masking through the pattern), and every group still
# blocked, with (a substring of) the reason it is blocked
EXPECT = {
    "c2f_sppf_op13.onnx": ({"/1/cv1/cv1.0/Conv", "/1/m/m.0/m.0.0/Conv"}, {"/4/Conv": "reaches graph output"}),
    "cifar_resnet_optA.onnx": (
        {"/stem/Conv+/l1/c2/Conv+/l2/c2/Conv+/l3/c2/Conv", "/l2/c1/Conv"},
        {"/l2/c2/Conv+/l3/c2/Conv": "Pad '/l2/Pad' fills these channels with the constant 0", "/fc/Gemm": "output"},
    ),
    "convnext_block.onnx": ({"/block/fc1/MatMul", "/stem/Conv+/block/fc2/MatMul"}, {"/head/Gemm": "output"}),
    "convtranspose.onnx": ({"/2/ConvTranspose", "/4/ConvTranspose", "/7/ConvTranspose"}, {"/9/Conv": "output"}),
    "dcgan_view.onnx": ({"/fc/Gemm", "/t1/ConvTranspose"}, {"/out/Conv": "output"}),
    "gemm_bias2d.onnx": ({"fc1", "fc2"}, {"fc3": "output"}),
    "ir3_inputs_opset8.onnx": ({"conv1", "conv2"}, {"fc": "output"}),
    "shared_weights.onnx": ({"/h1/Conv+/h1_1/Conv", "/c1/Conv+/c2/Conv"}, {"/h2/Conv+/h2_1/Conv": "output"}),
    "spatial_mask_mul.onnx": (
        {"/c1/Conv", "/c2/Conv"},
        {"/att/Conv": "Mul '/Mul' broadcasts this single channel over 32 channels", "/fc/Gemm": "output"},
    ),
    "view_size0.onnx": ({"/conv3/Conv", "/fc1/Gemm"}, {"/fc2/Gemm": "output"}),
    "vit_block.onnx": (
        {"/block/fc1/MatMul", "/embed/Conv+/block/proj/MatMul+/block/fc2/MatMul", "/block/qkv/MatMul"},
        {"/head/Gemm": "output"},
    ),
    "yolo_split_op18.onnx": ({"c2f.cv1", "c2f.cv1+c2f.m.cv2", "sppf.cv1"}, {"head": "output"}),
}


def _files():
    return sorted(p.name for p in CASES.glob("*.onnx")) if CASES.is_dir() else []


def _case(name):
    path = CASES / name
    if not path.exists():
        pytest.skip(f"{CASES} is absent")
    return onnx.load(path)


def test_every_case_has_expectations():
    if not CASES.is_dir():
        pytest.skip(f"{CASES} is absent")
    assert set(_files()) == set(EXPECT)


@pytest.mark.parametrize("name", sorted(EXPECT))
def test_groups_and_reasons(name):
    model = _case(name)
    graph = to_graph(model)
    cleanup(graph)
    analysis = find_channel_groups(graph)
    prunable, blocked = EXPECT[name]
    groups = {g.name: g for g in analysis.groups}
    for producer in prunable:
        assert producer in groups and len(groups[producer].removable), f"{producer}: {groups.get(producer)}"
    fully_blocked = {g.name: next(iter(g.blocked.values())) for g in analysis.groups if not len(g.removable)}
    assert set(fully_blocked) == set(blocked), fully_blocked
    for group, reason in blocked.items():
        assert reason in fully_blocked[group]


@pytest.mark.parametrize("name", sorted(EXPECT))
def test_remove_equals_mask(name):
    model = apply_pass(_case(name), cleanup)[0]
    plan = every_other_channel(find_channel_groups(to_graph(model)))
    assert set(EXPECT[name][0]) <= set(plan)
    pruned, report = apply_pass(model, remove_channels, plan=plan)
    assert report.counts["channels_removed"] > 0
    onnx.checker.check_model(pruned, full_check=True)
    reference = mask_channels(model, plan)
    for batch in (1, 3):
        feeds = random_feeds(model, batch=batch, seed=batch)
        assert_outputs_close(ort_run(pruned, feeds), ort_run(reference, feeds), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", sorted(EXPECT))
def test_decompose_is_exact(name):
    model = _case(name)
    split, _ = decompose(model, min_rank=2)
    for batch in (1, 3):
        feeds = random_feeds(model, batch=batch, seed=batch)
        want, got = ort_run(model, feeds), ort_run(split, feeds)
        for key, value in want.items():  # SVD round trip in float32: 1e-4 of the output scale
            assert np.abs(got[key] - value).max() <= 1e-4 * (np.abs(value).max() + 1e-12), key


@pytest.mark.parametrize("method", ["channel", "basis"])
@pytest.mark.parametrize("name", sorted(EXPECT))
def test_prune_half(name, method):
    """--ratio 0.5 by parameters: within 1 point, or refused with the reason (never off by more, silently)."""
    model = _case(name)
    try:
        pruned, report = prune(model, remove_ratio=0.5, method=method, latency_batch=0)
    except BudgetError as err:
        assert (name, method) in REFUSED, f"{name} {method}: {err}"
        assert REFUSED[(name, method)] in str(err) and f"--method {method}" not in str(err)
        return
    assert (name, method) not in REFUSED
    assert abs(report.facts["params_removed"] - 0.5) <= 0.01 or "ratio_note" in report.facts
    assert abs(report.facts["params_removed"] - 0.5) <= 0.03
    assert 0.0 < report.facts["macs_removed"] < 1.0
    onnx.checker.check_model(pruned, full_check=True)
    feeds = random_feeds(pruned, batch=3)
    assert all(np.all(np.isfinite(v)) for v in ort_run(pruned, feeds).values())


# what basis cannot reach at 0.5 by parameters, and why
REFUSED = {
    ("shared_weights.onnx", "basis"): "4 layers whose weight is shared by several nodes were left whole, not split",
}


@pytest.mark.parametrize("method", ["channel", "basis"])
def test_ratio_zero_never_grows(method):
    model = _case("shared_weights.onnx")
    pruned, report = prune(model, remove_ratio=0.0, method=method, latency_batch=0)
    assert report.facts["params_after"] <= report.facts["params_before"]
    names = [t.name for t in pruned.graph.initializer]
    assert len(names) == len(set(names))


def test_shared_weight_is_sliced_once_and_stays_shared():
    model = _case("shared_weights.onnx")
    before = {n.input[1] for n in model.graph.node if n.op_type == "Conv"}
    pruned, report = prune(model, remove_ratio=0.5, method="channel", latency_batch=0)
    convs = [n for n in pruned.graph.node if n.op_type == "Conv"]
    assert len({n.input[1] for n in convs}) == len(before)  # as many weight tensors as before: none duplicated
    assert abs(report.facts["params_removed"] - 0.5) <= 0.01
