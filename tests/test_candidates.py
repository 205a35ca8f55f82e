"""Candidate plans are compared after the refit: the one written agrees best with the original on fit samples."""

from pathlib import Path

import numpy as np
import onnx

from onnxprune import prune

EXAMPLE = Path(__file__).parent.parent / "examples"


def test_the_plan_written_is_the_best_candidate_after_the_refit():
    model = onnx.load(EXAMPLE / "digits_resnet.onnx")
    calib = np.load(EXAMPLE / "digits_calib.npy")[:160]
    out, report = prune(model, remove_ratio=0.85, calib={model.graph.input[0].name: calib}, latency_batch=0)
    scores = report.facts["candidate_fidelity"]
    assert len(scores) >= 2, "every sensitivity round's plan is taken to the end"
    chosen = report.facts["candidate_chosen"]
    assert tuple(scores[str(chosen)]) == max(tuple(v) for v in scores.values())
    assert abs(report.facts["ratio_achieved"] - 0.85) <= 0.01
    onnx.checker.check_model(out, full_check=True)
