"""The real architectures shipped with onnx: prune at 0.5, the result is valid and runs, or the refusal explains."""

import numpy as np
import onnx
import pytest
from light_zoo import NAMES, load

from onnxprune import BudgetError, prune
from onnxprune.testing import ort_run, random_feeds


@pytest.mark.parametrize("name", NAMES)
def test_prune_half(name):
    model = load(name)
    feeds = random_feeds(model, batch=1)
    try:
        pruned, report = prune(model, remove_ratio=0.5, method="channel")
    except BudgetError as err:
        assert name == "shufflenet", f"{name}: {err}"  # channel shuffle and grouped convs block nearly everything
        assert "cannot be reached" in str(err) and "blocked" in str(err)
        return
    assert abs(report.facts["params_removed"] - 0.5) <= 0.01
    onnx.checker.check_model(pruned, full_check=True)
    outputs = ort_run(pruned, feeds)
    reference = ort_run(model, feeds)
    for key, value in reference.items():
        assert outputs[key].shape == value.shape
        assert np.all(np.isfinite(outputs[key]))
    assert report.facts["blocked"], "the classifier output group is reported as blocked"
